"""Forward-time dtype derivations (fxfuse/models/wild/, ``DTYPE_CORPUS``): networks whose forward derives a dtype
from its input or its weights — ``torch.arange(n, dtype=x.dtype)`` grids cached per shape, DETR's sine position
embedding, ``x.to(self.stem.conv.weight.dtype)``, ``torch.full(..., dtype=y.dtype)`` / ``new_tensor`` /
``new_ones`` / ``zeros_like``, a float32 buffer brought in with ``type_as``, ``torch.finfo(x.dtype).min`` — around
RepVGG blocks that must collapse, in float32 and in bfloat16, under every capture.

For each case x capture x dtype, with BN statistics randomized and model and input cast to the dtype:
  (i)   the outputs have the original's structure and dtypes, and equal the original's within a dtype tolerance
        (and the float64 evaluation of the same weights within the same tolerance), on the example and on a
        second input (another batch size, padded columns);
  (ii)  no float64 is reachable from the result: no parameter, buffer, state_dict entry or plain tensor attribute
        (also inside lists / tuples / dicts) of any module, no ``torch.float64`` in any node's args / kwargs of any
        GraphModule inside it;
  (iii) executed convs / BatchNorms / Linears (counted by a TorchFunctionMode while the result runs, whatever its
        capture) are the hand-written deploy form's — except where a capture legitimately cannot see a construct,
        where what it does return is asserted exactly (SYMBOLIC_FALLBACK);
  (iv)  ``capture="auto"`` executes no more convs + BatchNorms than the best single capture that succeeds.
"""

from __future__ import annotations

import copy
from typing import Any, Dict, List, Tuple

import pytest
import torch
from torch import Tensor, fx, nn
from torch.utils._pytree import tree_flatten

import fxfuse
from fxfuse.ir.ops import function_kind
from fxfuse.models import randomize_batchnorm_
from fxfuse.models.wild import CORPUS, DTYPE_CORPUS, make
from fxfuse.tools.executed_ops import run_counting

CAPTURES = ("auto", "symbolic", "export")
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}
# max|fused - reference| <= RTOL * max|reference| (per output tensor): float32 rounding of a 4-conv net after
# folding is ~1e-6 relative; bfloat16 (8 bits of mantissa) ~1e-2.
RTOL = {torch.float32: 1e-4, torch.bfloat16: 5e-2}

# Symbolic tracing cannot capture these models whole; capture="symbolic" returns the per-sub-module fallback.
# name -> (report.capture, the (convs, batch_norms, linears) it executes), by reading the models:
#  * grid_cache_arange: PointHead.grid calls int() on a traced size. The root and the head do not trace; stem and
#    blocks trace and collapse (3 convs), the head's conv / BN / 1x1 are leaf modules called from an untraceable
#    forward, so its BN cannot be folded: 5 convs and 1 BatchNorm.
#  * fcos_scale_finfo: torch.finfo(<Proxy>) fails at the root only; stem and tower collapse, the two head convs
#    are plain convs: the deploy form's 5 convs, no BatchNorm.
SYMBOLIC_FALLBACK = {
    "grid_cache_arange": ("submodules", (5, 1, 0)),
    "fcos_scale_finfo": ("submodules", (5, 0, 0)),
}
KINDS = ("conv", "batch_norm", "linear")


# ------------------------------------------------------------------------------------------ building
def build(name: str, dtype: torch.dtype) -> Tuple[nn.Module, Tensor, Tensor]:
    """The model with random BN statistics in eval mode and ``dtype``, its example input, and a second input (batch
    + 1, the two right-most columns zero: padding, which the FCOS head masks) in ``dtype``."""
    model, x = make(name)
    randomize_batchnorm_(model, seed=0)
    model = model.eval().to(dtype)
    other = torch.randn(x.shape[0] + 1, *x.shape[1:], generator=torch.Generator().manual_seed(7))
    other[..., -2:] = 0
    return model, x.to(dtype), other.to(dtype)


_FUSED: Dict[Tuple[str, str, str], Any] = {}


def fused_case(name: str, capture: str, dtype_name: str) -> Tuple[nn.Module, nn.Module, Tensor, Tensor]:
    """``(original, fused, x, other)``, computed once per case (test (iv) reuses the single captures); raises what
    ``reparametrize`` raised."""
    key = (name, capture, dtype_name)
    if key not in _FUSED:
        model, x, other = build(name, DTYPES[dtype_name])
        try:
            _FUSED[key] = (model, fxfuse.reparametrize(model, x, capture=capture), x, other)
        except Exception as exc:  # kept so that test (iv) sees the same failure
            _FUSED[key] = exc
    value = _FUSED[key]
    if isinstance(value, Exception):
        raise value
    return value


def executed(model: nn.Module, x: Tensor) -> Tuple[int, int, int]:
    """(convs, batch_norms, linears) one ``model(x)`` executes, counted as they run (any capture, any nesting)."""
    _, counts = run_counting(model, x, key=function_kind)
    return tuple(counts[k] for k in KINDS)  # type: ignore[return-value]


# ------------------------------------------------------------------------------------------ checks
def sentinel(t: Tensor) -> Tensor:
    """Where ``t`` holds a fill value at the edge of its dtype's range (``finfo.min`` masks)."""
    return t.abs() >= torch.finfo(t.dtype).max / 2


def assert_close(reference: Any, actual: Any, rtol: float, what: str, same_dtypes: bool = True) -> float:
    """Same structure; per tensor leaf the same dtype (``same_dtypes``), the same sentinel (``finfo`` fill)
    positions with equal values, elsewhere ``max|a - r| <= rtol * max|r|`` in float64. Returns the worst ratio."""
    ref_leaves, ref_spec = tree_flatten(reference)
    act_leaves, act_spec = tree_flatten(actual)
    assert act_spec == ref_spec, f"{what}: output structure {act_spec} != {ref_spec}"
    worst = 0.0
    for i, (r, a) in enumerate(zip(ref_leaves, act_leaves)):
        if not isinstance(r, Tensor):
            assert a == r, f"{what}: output leaf {i}: {a!r} != {r!r}"
            continue
        assert isinstance(a, Tensor) and a.shape == r.shape, f"{what}: output leaf {i}: {a!r} vs shape {r.shape}"
        if same_dtypes:
            assert a.dtype == r.dtype, f"{what}: output leaf {i} is {a.dtype}, the original's is {r.dtype}"
        r_edge, a_edge = sentinel(r), sentinel(a)
        assert torch.equal(r_edge, a_edge), f"{what}: output leaf {i}: finfo-filled positions differ"
        if same_dtypes:
            assert torch.equal(a[a_edge], r[r_edge]), f"{what}: output leaf {i}: finfo fill values differ"
        r64, a64 = r.double()[~r_edge], a.double()[~a_edge]
        assert torch.isfinite(a64).all() and torch.isfinite(r64).all(), f"{what}: output leaf {i}: non-finite"
        scale = float(r64.abs().max()) if r64.numel() else 0.0
        err = float((a64 - r64).abs().max()) if r64.numel() else 0.0
        assert scale > 0, f"{what}: output leaf {i} is all zero: the comparison would prove nothing"
        assert err <= rtol * scale, f"{what}: output leaf {i}: max|diff| {err:.3g} > {rtol:g} * max|ref| {scale:.3g}"
        worst = max(worst, err / scale)
    return worst


def _tensors_in(value: Any, path: str, seen: set) -> List[Tuple[str, Tensor]]:
    if id(value) in seen:
        return []
    if isinstance(value, Tensor):
        return [(path, value)]
    if isinstance(value, (list, tuple, set, frozenset)):
        seen.add(id(value))
        return [hit for i, v in enumerate(value) for hit in _tensors_in(v, f"{path}[{i}]", seen)]
    if isinstance(value, dict):
        seen.add(id(value))
        return [hit for k, v in value.items() for hit in _tensors_in(v, f"{path}[{k!r}]", seen)]
    return []


def _dtype_args(value: Any) -> List[Any]:
    if isinstance(value, (list, tuple)):
        return [hit for v in value for hit in _dtype_args(v)]
    if isinstance(value, dict):
        return [hit for v in value.values() for hit in _dtype_args(v)]
    return [value] if value is torch.float64 else []


def float64_reachable(root: nn.Module) -> List[str]:
    """Everything float64 reachable from ``root``: state_dict entries, parameters, buffers, plain tensor
    attributes (nested in containers) of every module, and ``torch.float64`` in node args / kwargs of every
    GraphModule."""
    found = [f"state_dict {k}" for k, v in root.state_dict(keep_vars=True).items()
             if isinstance(v, Tensor) and v.dtype == torch.float64]
    for prefix, mod in root.named_modules(remove_duplicate=False):
        dot = f"{prefix}." if prefix else ""
        for name, t in [*mod.named_parameters(recurse=False), *mod.named_buffers(recurse=False)]:
            if t.dtype == torch.float64:
                found.append(f"{dot}{name}")
        for key, value in vars(mod).items():
            if key in ("_modules", "_parameters", "_buffers"):  # modules visited, tensors listed above
                continue
            found += [f"attribute {dot}{p}" for p, t in _tensors_in(value, key, set()) if t.dtype == torch.float64]
        if isinstance(mod, fx.GraphModule):
            for node in mod.graph.nodes:
                if _dtype_args(node.args) or _dtype_args(node.kwargs):
                    found.append(f"graph {prefix or '<root>'}: node {node.name} ({node.format_node()})")
    return found


def run(model: nn.Module, x: Tensor) -> Any:
    with torch.no_grad():
        return model(x)


# ------------------------------------------------------------------------------------------ the corpus
def test_corpus_tables() -> None:
    """The dtype corpus is its own table, reachable through ``make``; each factory builds a float32 network."""
    assert not set(DTYPE_CORPUS) & set(CORPUS)
    for name, (_, shape, counts) in DTYPE_CORPUS.items():
        model, x = make(name)
        assert tuple(x.shape) == tuple(shape) and len(counts) == 3 and counts[1] == 0
        assert {p.dtype for p in model.parameters()} == {torch.float32}


@pytest.mark.parametrize("name", list(DTYPE_CORPUS))
def test_original_runs_in_its_dtype_and_carries_bns(name: str) -> None:
    """The originals run in bfloat16 with bfloat16 outputs and execute more convs + BNs than their deploy form
    (so a result at the deploy count did fuse something)."""
    model, x, _ = build(name, torch.bfloat16)
    out = run(model, x)
    assert all(t.dtype == torch.bfloat16 for t in tree_flatten(out)[0] if isinstance(t, Tensor))
    convs, bns, linears = executed(model, x)
    deploy = DTYPE_CORPUS[name][2]
    assert bns > 0 and convs > deploy[0] and linears == deploy[2]


# Each export costs 1-3 s on one core. The default run covers bfloat16 under every capture and float32 under
# symbolic tracing; float32 through export (and auto, which may export) runs with --runslow.
def _slow(capture: str, dtype_name: str) -> bool:
    return dtype_name == "float32" and capture != "symbolic"


def _params() -> List[Any]:
    return [pytest.param(n, c, d, id=f"{n}-{c}-{d}", marks=pytest.mark.slow if _slow(c, d) else ())
            for n in DTYPE_CORPUS for c in CAPTURES for d in DTYPES]


@pytest.mark.parametrize(("name", "capture", "dtype_name"), _params())
def test_dtype_derivation_fuses_and_keeps_the_dtypes(name: str, capture: str, dtype_name: str) -> None:
    dtype = DTYPES[dtype_name]
    model, fused, x, other = fused_case(name, capture, dtype_name)
    truth_model = copy.deepcopy(model).double()  # the same (dtype-rounded) weights, evaluated in float64
    report = fused.fxfuse_report
    # (i) dtypes and values, on the example and on another batch size with padded columns
    for label, inp in (("example", x), ("other input", other)):
        reference = run(model, inp)
        actual = run(fused, inp)
        assert_close(reference, actual, RTOL[dtype], f"{label} vs the original in {dtype_name}")
        assert_close(run(truth_model, inp.double()), actual, RTOL[dtype], f"{label} vs float64 evaluation",
                     same_dtypes=False)
    # (ii) no float64 anywhere in the result
    leaks = float64_reachable(fused)
    assert not leaks, f"float64 reachable from the result: {leaks[:8]}\n{report}"
    # (iii) structure: the deploy form's convs / BNs / Linears executed (or the fallback's, stated above)
    deploy = DTYPE_CORPUS[name][2]
    if capture == "symbolic" and name in SYMBOLIC_FALLBACK:
        how, expected = SYMBOLIC_FALLBACK[name]
        assert report.capture == how and not report.traced_whole, report
    else:
        expected = deploy
        assert report.traced_whole, report
        if capture != "auto":
            assert report.capture == capture, report
    assert executed(fused, x) == expected, f"expected (convs, BNs, linears) {expected}\n{report}"


@pytest.mark.parametrize(("name", "dtype_name"), [pytest.param(n, d, marks=pytest.mark.slow if _slow("auto", d) else ())
                                             for n in DTYPE_CORPUS for d in DTYPES])
def test_auto_is_no_worse_than_the_single_captures(name: str, dtype_name: str) -> None:
    """(iv) ``capture="auto"`` executes no more convs + BNs than the best of symbolic / export that succeeds."""
    model, auto, x, _ = fused_case(name, "auto", dtype_name)
    singles: Dict[str, int] = {}
    for capture in ("symbolic", "export"):
        try:
            _, fused, _, _ = fused_case(name, capture, dtype_name)
        except fxfuse.FusionError:
            continue
        convs, bns, _ = executed(fused, x)
        singles[capture] = convs + bns
    assert singles, "neither single capture succeeded"
    convs, bns, _ = executed(auto, x)
    assert convs + bns <= min(singles.values()), (singles, auto.fxfuse_report)


@pytest.mark.parametrize("capture", ["symbolic", "export", pytest.param("auto", marks=pytest.mark.slow)])
def test_grid_cache_warmed_before_fusing(capture: str) -> None:
    """The usual order in practice: the model was evaluated (its shape-keyed grid cache holds a bfloat16 grid)
    before it is fused; the fused model still runs in bfloat16, equal, with no float64 grid cached anywhere, and
    the model passed in keeps its own cache untouched."""
    model, x, other = build("grid_cache_arange", torch.bfloat16)
    reference = run(model, x)
    cached = dict(model.head._cache)
    assert [t.dtype for t in cached.values()] == [torch.bfloat16]
    fused = fxfuse.reparametrize(model, x, capture=capture)
    assert model.head._cache.keys() == cached.keys()
    assert all(model.head._cache[k] is v for k, v in cached.items())
    assert_close(reference, run(fused, x), RTOL[torch.bfloat16], "example")
    assert_close(run(model, other), run(fused, other), RTOL[torch.bfloat16], "other input")
    leaks = float64_reachable(fused)
    assert not leaks, f"float64 reachable from the result: {leaks[:8]}\n{fused.fxfuse_report}"


# ------------------------------------------------------------------------------ the checks can fail
def test_float64_reachable_finds_each_kind_of_leak() -> None:
    """The audit of (ii) sees a float64 buffer, a float64 tensor in a dict attribute and a ``torch.float64``
    argument in a graph (and nothing in a clean bfloat16 module)."""
    clean = nn.Sequential(nn.Conv2d(3, 4, 1)).to(torch.bfloat16)
    assert float64_reachable(clean) == []
    leaky = copy.deepcopy(clean)
    leaky[0].register_buffer("b", torch.zeros(2, dtype=torch.float64))
    assert float64_reachable(leaky) == ["state_dict 0.b", "0.b"]
    cached = copy.deepcopy(clean)
    cached[0].cache = {(2, 2): [torch.zeros(1, dtype=torch.float64)]}
    assert float64_reachable(cached) == ["attribute 0.cache[(2, 2)][0]"]

    class Cast(nn.Module):
        def forward(self, x: Tensor) -> Tensor:
            return x.to(dtype=torch.float64)

    found = float64_reachable(fx.symbolic_trace(Cast()))
    assert len(found) == 1 and found[0].startswith("graph <root>")


def test_comparison_catches_a_dtype_or_value_change() -> None:
    ref = (torch.tensor([1.0, -2.0], dtype=torch.bfloat16), torch.tensor([0.5, torch.finfo(torch.bfloat16).min],
                                                                          dtype=torch.bfloat16))
    assert_close(ref, tuple(t.clone() for t in ref), 5e-2, "same")
    with pytest.raises(AssertionError, match="is torch.float64"):
        assert_close(ref, (ref[0].double(), ref[1]), 5e-2, "promoted")
    with pytest.raises(AssertionError, match="max\\|diff\\|"):
        assert_close(ref, (ref[0] * 1.1, ref[1]), 5e-2, "off by 10%")
    with pytest.raises(AssertionError, match="finfo-filled positions"):
        assert_close(ref, (ref[0], torch.tensor([0.5, -1.0], dtype=torch.bfloat16)), 5e-2, "fill lost")
