"""Property-testing helpers for fusion rules: Hypothesis strategies for conv / BatchNorm configurations and a
checker that a model re-parameterizes into an equal, smaller one.

A new pattern is property-tested in a few lines::

    from hypothesis import given
    from fxfuse.testing import assert_reparametrizes, batchnorm_states, conv_geometries

    @given(conv_geometries(), batchnorm_states())
    def test_conv_bn(geo, bn):
        model = nn.Sequential(geo.conv(), bn.module(geo.out_channels))
        assert_reparametrizes(model, geo.example_input(), expect_convs=1, expect_batch_norms=0)

Needs ``hypothesis`` (``pip install fxfuse[test]``).
"""

from __future__ import annotations

import copy
from collections import Counter
from dataclasses import dataclass
from typing import Any, Callable, Mapping, Optional, Sequence, Tuple, Union

import torch
from torch import Tensor, fx, nn
from torch.utils._pytree import tree_map

try:
    from hypothesis import strategies as st
except ImportError as exc:  # pragma: no cover - only without the test extra
    raise ImportError("fxfuse.testing needs hypothesis: pip install 'fxfuse[test]'") from exc

from .api import reparametrize
from .ir.algebra import ConvGeometry  # the one geometry type (re-exported: fxfuse.testing.ConvGeometry)
from .ir.ops import module_kind, op_kind
from .models import randomize_batchnorm_
from .verify import compare

__all__ = [
    "ConvGeometry",
    "BatchNormState",
    "conv_geometries",
    "batchnorm_states",
    "randomize_batchnorm_",
    "op_counts",
    "assert_close_f64",
    "assert_reparametrizes",
]

IntTuple = Tuple[int, ...]


# ------------------------------------------------------------------------------------ conv geometry
def _divisors(n: int, limit: int) -> list:
    return [g for g in range(1, min(n, limit) + 1) if n % g == 0]


@st.composite
def conv_geometries(
    draw: Callable,
    ndim: int = 2,
    *,
    in_channels: Optional[int] = None,
    out_channels: Optional[int] = None,
    max_channels_per_group: int = 4,
    max_groups: int = 3,
    kernel_sizes: Sequence[int] = (1, 3, 5),
    asymmetric: bool = False,
    strides: Sequence[int] = (1, 2),
    dilations: Sequence[int] = (1, 2),
    padding: Union[str, int] = "any",
    bias: Optional[bool] = None,
) -> ConvGeometry:
    """Strategy for :class:`~fxfuse.ir.algebra.ConvGeometry`.

    Channels are drawn as ``channels_per_group × groups`` so that groups always divide them; a fixed
    ``in_channels`` / ``out_channels`` restricts groups to their common divisors (≤ ``max_groups``).
    ``asymmetric`` draws the kernel size per axis (1x3, 5x1, …); otherwise it is square. Stride and dilation are
    drawn per conv from ``strides`` / ``dilations``. ``padding``: ``"same"`` (``d(k-1)/2``, output size
    ``ceil(n/s)``), ``"valid"`` (0), an int, or ``"any"`` (per axis, between 0 and ``d(k-1)/2``; half of the
    draws are ``"same"``). ``bias=None`` draws it."""
    fixed = [c for c in (in_channels, out_channels) if c is not None]
    group_choices = [g for g in range(1, max_groups + 1) if all(c % g == 0 for c in fixed)]
    groups = draw(st.sampled_from(group_choices))
    cin = in_channels if in_channels is not None else groups * draw(st.integers(1, max_channels_per_group))
    cout = out_channels if out_channels is not None else groups * draw(st.integers(1, max_channels_per_group))
    if asymmetric:
        kernel = tuple(draw(st.sampled_from(list(kernel_sizes))) for _ in range(ndim))
    else:
        kernel = (draw(st.sampled_from(list(kernel_sizes))),) * ndim
    stride = (draw(st.sampled_from(list(strides))),) * ndim
    dilation = (draw(st.sampled_from(list(dilations))),) * ndim
    half = tuple(d * (k - 1) // 2 for d, k in zip(dilation, kernel))
    if padding == "same":
        pad = half
    elif padding == "valid":
        pad = (0,) * ndim
    elif isinstance(padding, int) and not isinstance(padding, bool):
        pad = (padding,) * ndim
    elif padding == "any":
        pad = half if draw(st.booleans()) else tuple(draw(st.integers(0, h)) for h in half)
    else:
        raise ValueError(f"padding must be 'same', 'valid', 'any' or an int, got {padding!r}")
    has_bias = draw(st.booleans()) if bias is None else bool(bias)
    return ConvGeometry(cin, cout, kernel, stride, pad, dilation, groups, has_bias)


# --------------------------------------------------------------------------------------- BatchNorm
@dataclass(frozen=True)
class BatchNormState:
    """A BatchNorm configuration with random (non-identity) parameters and running statistics drawn from
    ``seed``: ``γ = ±U(0.5, 1.5)``, ``β ~ N(0, 1)``, ``μ ~ N(0, 1)``, ``σ² ~ U(0.1, 3)``."""

    affine: bool
    eps: float
    momentum: Optional[float]
    track_running_stats: bool
    seed: int
    num_features: Optional[int] = None

    def module(self, num_features: Optional[int] = None, ndim: int = 2) -> nn.Module:
        """A ``BatchNorm{1,2,3}d`` in eval mode holding this state (``ndim`` = spatial axes; 0 gives 1d)."""
        n = num_features if num_features is not None else self.num_features
        if n is None:
            raise ValueError("num_features is needed (the state was drawn without it)")
        cls = {0: nn.BatchNorm1d, 1: nn.BatchNorm1d, 2: nn.BatchNorm2d, 3: nn.BatchNorm3d}[ndim]
        bn = cls(n, eps=self.eps, momentum=self.momentum, affine=self.affine,
                 track_running_stats=self.track_running_stats)
        return self.apply_(bn).eval()

    @torch.no_grad()
    def apply_(self, bn: nn.Module) -> nn.Module:
        """Write this state's random parameters / statistics into ``bn`` (in place; missing tensors skipped)."""
        n = bn.num_features
        if not isinstance(n, int):
            raise TypeError(f"expected a BatchNorm module, got {type(bn).__name__}")
        gen = torch.Generator().manual_seed(self.seed)
        f64 = torch.float64
        values = {
            "weight": (torch.rand(n, generator=gen, dtype=f64) + 0.5)
            * (torch.randint(0, 2, (n,), generator=gen).to(f64) * 2 - 1),
            "bias": torch.randn(n, generator=gen, dtype=f64),
            "running_mean": torch.randn(n, generator=gen, dtype=f64),
            "running_var": torch.rand(n, generator=gen, dtype=f64) * 2.9 + 0.1,
        }
        for name, v in values.items():
            t = getattr(bn, name, None)
            if isinstance(t, Tensor):
                t.copy_(v.to(t))
        return bn


@st.composite
def batchnorm_states(
    draw: Callable,
    num_features: Optional[int] = None,
    *,
    affine: Optional[bool] = None,
    eps: Optional[float] = None,
    track_running_stats: bool = True,
) -> BatchNormState:
    """Strategy for :class:`BatchNormState`: ``affine`` on/off, ``eps`` in {1e-5, 1e-3, 0.1, 1.0} (or given),
    momentum (irrelevant in eval, drawn for realism) and a seed for the random γ, β, μ, σ²."""
    return BatchNormState(
        affine=draw(st.booleans()) if affine is None else bool(affine),
        eps=draw(st.sampled_from([1e-5, 1e-3, 0.1, 1.0])) if eps is None else float(eps),
        momentum=draw(st.sampled_from([0.1, 0.01, None])),
        track_running_stats=track_running_stats,
        seed=draw(st.integers(0, 2**31 - 1)),
        num_features=num_features,
    )


# ---------------------------------------------------------------------------------------- structure
COUNTED_KINDS = ("conv", "batch_norm", "avg_pool", "linear")
"""The op classes :func:`op_counts` counts (names from :data:`fxfuse.ir.ops.OP_KINDS`)."""


def _graph_counts(gm: fx.GraphModule, counts: Counter) -> None:
    modules = dict(gm.named_modules())
    for node in gm.graph.nodes:
        mod = modules.get(str(node.target)) if node.op == "call_module" else None
        if isinstance(mod, fx.GraphModule):
            _graph_counts(mod, counts)
            continue
        kind = op_kind(node, modules) if node.op in ("call_module", "call_function", "call_method") else None
        if kind in COUNTED_KINDS:
            counts[kind] += 1


def op_counts(model: nn.Module) -> Counter:
    """``Counter`` of ``conv`` (incl. transposed), ``batch_norm``, ``avg_pool`` and ``linear`` ops, classified by
    the op table (:func:`fxfuse.ir.ops.op_kind` / :func:`~fxfuse.ir.ops.module_kind`).

    For a ``GraphModule`` these are call sites in the graph (modules and functional calls; a module called twice
    counts twice); for other modules (the fallback result of an untraceable model) sub-modules are counted by
    instance, and rewritten ``GraphModule`` children by call site."""
    counts: Counter = Counter()
    if isinstance(model, fx.GraphModule):
        _graph_counts(model, counts)
        return counts

    def visit(mod: nn.Module) -> None:
        for child in mod.children():
            if isinstance(child, fx.GraphModule):
                _graph_counts(child, counts)
                continue
            kind = module_kind(child)
            if kind in COUNTED_KINDS:
                counts[kind] += 1
            else:
                visit(child)

    visit(model)
    return counts


# --------------------------------------------------------------------------------------- numerics
def _to_double(args: Any) -> Any:
    return tree_map(lambda a: a.to(torch.float64) if isinstance(a, Tensor) and a.is_floating_point() else a, args)


def assert_close_f64(reference: Any, actual: Any, rtol: float = 1e-10, what: str = "output",
                     atol: float = 0.0) -> float:
    """Assert :func:`fxfuse.verify.compare` accepts ``actual``: the same nested structure, equal non-tensor
    leaves, and per tensor leaf ``max|a − r| ≤ atol + rtol · max|r|`` computed in float64 (NaN only where the
    reference is NaN). Returns the worst relative error ``max|a − r| / max|r|``.

    The same comparison as the pass's own verification, on purpose: a test then checks the number
    ``reparametrize`` promises, with the test's (tighter) tolerance and on inputs the pass never saw."""
    cmp = compare(reference, actual, rtol, atol)
    assert cmp.ok, f"{what}: {cmp.detail} (relative {cmp.max_rel:.3g}, rtol {rtol:g}, atol {atol:g})"
    return cmp.max_rel


def _other_batch(args: Tuple[Any, ...], batch: Optional[int], seed: int) -> Tuple[Any, ...]:
    """The inputs with a different batch size: fresh ``randn`` for floating tensors, integer tensors repeated."""
    gen = torch.Generator().manual_seed(seed + 1)
    sizes = [a.shape[0] for a in args if isinstance(a, Tensor) and a.dim() > 0]
    if not sizes:
        raise ValueError("second_batch needs a tensor input with a batch axis (pass second_batch=False)")
    new = batch if batch is not None else (sizes[0] + 1 if sizes[0] > 1 else 3)

    def remake(a: Any) -> Any:
        if not isinstance(a, Tensor) or a.dim() == 0:
            return a
        if a.is_floating_point():
            return torch.randn(new, *a.shape[1:], generator=gen, dtype=torch.float64).to(a.dtype)
        reps = -(-new // a.shape[0])
        return a.repeat(reps, *([1] * (a.dim() - 1)))[:new]

    return tuple(remake(a) for a in args)


def _run(model: nn.Module, args: Tuple[Any, ...]) -> Any:
    with torch.no_grad():
        return model(*args)


# ---------------------------------------------------------------------------------------- checker
def assert_reparametrizes(
    model_or_factory: Union[nn.Module, Callable[[], nn.Module]],
    example_input: Any,
    *,
    expect_convs: Optional[int] = None,
    expect_batch_norms: Optional[int] = 0,
    expect_fused: Optional[Mapping[str, int]] = None,
    expect_linears: Optional[int] = None,
    rtol: float = 1e-10,
    atol: float = 0.0,
    second_batch: Union[bool, int] = True,
    extra_inputs: Sequence[Any] = (),
    randomize: bool = True,
    seed: int = 0,
    allow_rollback: bool = False,
    **reparametrize_kwargs: Any,
) -> nn.Module:
    """Re-parameterize a model and assert the result is equal and has the expected structure; return it.

    1. Build the model (call ``model_or_factory`` if it is a factory, else deep-copy the instance), randomize
       every BatchNorm (``randomize_batchnorm_(model, seed)``; ``randomize=False`` keeps the stats), cast it
       to float64 and put it in eval mode, so that the fold is exact and an error of 1e-10 is a bug.
    2. ``fused = fxfuse.reparametrize(model, example_input, **reparametrize_kwargs)`` (``rules=``,
       ``enable=``, ``verify=`` … pass through).
    3. Outputs of deep copies of both, in float64, agree to ``max|Δ| ≤ atol + rtol · max|y|`` on
       ``example_input``, (``second_batch``: True or a batch size) on random inputs with another batch size, and
       on each of ``extra_inputs`` (a tensor or a tuple of inputs each, e.g. another spatial size).
       ``atol`` (default 0) is also passed to ``reparametrize``'s verification: an absolute floor for outputs
       that are exactly zero up to float64 rounding (e.g. the mean of a batch-normalized map).
    4. Structure, each only when given: conv ops (``expect_convs``), BatchNorm ops (``expect_batch_norms``,
       default 0: every BN folded), linear ops (``expect_linears``), and for each rule named in
       ``expect_fused`` its count in ``fused.fxfuse_report.fused`` (0 = the rule must not fire).
    5. No rewrite was rolled back by verification (``allow_rollback=True`` permits it), and the model passed
       to ``reparametrize`` has exactly the state dict it had before.
    """
    if "inplace" in reparametrize_kwargs:
        raise TypeError("assert_reparametrizes checks that the input model is untouched; inplace is not allowed")
    if isinstance(model_or_factory, nn.Module):
        model = copy.deepcopy(model_or_factory)
    elif callable(model_or_factory):
        model = model_or_factory()
        if not isinstance(model, nn.Module):
            raise TypeError(f"the factory returned {type(model).__name__}, not an nn.Module")
    else:
        raise TypeError(f"expected an nn.Module or a factory, got {type(model_or_factory).__name__}")
    if randomize:
        randomize_batchnorm_(model, seed)
    model = model.double().eval()
    args = tuple(example_input) if isinstance(example_input, (tuple, list)) else (example_input,)
    args = _to_double(args)
    before = {k: v.detach().clone() for k, v in model.state_dict().items()}

    fused = reparametrize(model, args, atol=atol, **reparametrize_kwargs)
    report = getattr(fused, "fxfuse_report", None)
    summary = f"\n{report}" if report is not None else ""

    after = model.state_dict()
    assert list(after) == list(before), "reparametrize changed the input model's state_dict keys"
    for k, v in before.items():
        assert after[k].dtype == v.dtype and torch.equal(after[k], v), \
            f"reparametrize modified the input model: {k} changed"

    inputs = [args]
    if second_batch:
        inputs.append(_other_batch(args, None if second_batch is True else int(second_batch), seed))
    inputs.extend(_to_double(tuple(e) if isinstance(e, (tuple, list)) else (e,)) for e in extra_inputs)
    ref_model, new_model = copy.deepcopy(model).double().eval(), copy.deepcopy(fused).double().eval()
    for i, inp in enumerate(inputs):
        reference = _run(ref_model, inp)
        try:
            actual = _run(new_model, inp)
        except Exception as exc:  # a model that no longer runs is a failed check
            raise AssertionError(f"the fused model fails on input {i}: {type(exc).__name__}: {exc}{summary}") \
                from exc
        try:
            label = "example" if i == 0 else "other batch" if second_batch and i == 1 else "extra input"
            assert_close_f64(reference, actual, rtol, what=f"input {i} ({label})", atol=atol)
        except AssertionError as exc:
            raise AssertionError(f"{exc}{summary}") from None

    if report is not None and not allow_rollback:
        assert not report.rolled_back, f"verification rolled back rewrites {report.rolled_back}{summary}"
    counts = op_counts(fused)
    for what, expected in (("conv", expect_convs), ("batch_norm", expect_batch_norms), ("linear", expect_linears)):
        if expected is not None:
            assert counts[what] == expected, f"expected {expected} {what} op(s), found {counts[what]}{summary}"
    if expect_fused:
        assert report is not None, "the result carries no fxfuse_report"
        for rule, n in expect_fused.items():
            assert report.fused.get(rule, 0) == n, \
                f"expected rule {rule!r} to fire {n} time(s), it fired {report.fused.get(rule, 0)}{summary}"
    return fused
