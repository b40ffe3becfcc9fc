"""The returned model runs in the original's dtype; no float64 from the working copy leaks into it (the dtype
audit and the artifact check: docs/patterns.md, "The returned model: dtype audit and a second check").

fxfuse computes on a float64 copy. What tracing evaluates from that copy (fx does not proxy buffers, so a buffer
reshaped in forward becomes a graph constant ``_tensor_constantN``) and what a float64 run caches in a plain
attribute used to reach the result as float64: the first call raised ``expected scalar type Float but found
Double``, or silently returned float64. Each test here checks, in float32 / bfloat16 / float16:

* numbers: the fused model runs in its own dtype and is as close to the float64 truth as the original in that
  dtype is (``≤ 2·e_original + 4·eps``), with the output dtype of the original; in float64 to 1e-9;
* dtypes: every tensor reachable from the result (parameters, buffers, plain attributes, graph constants) has the
  expected dtype, and no ``torch.fx.Proxy`` is left anywhere (``_reachable.wrong_dtypes``, independent of fxfuse);
* structure and report: the conv-BN pair was fused, ``report.artifact_check`` says the model ran in its dtype, and
  ``report.frozen_constants`` lists the trace-time constants (expected shapes computed here from the model).

Models: (a) a Swin-like shifted-window attention block in timm's style (v1: parameter table + index buffer;
v2: continuous position bias from a float buffer) — timm's ``swin_tiny_patch4_window7_224``,
``swinv2_tiny_window8_256`` and ``swin_s3_tiny_224`` failed like this; torchvision's Swin (bias behind
``torch.fx.wrap``) did not, and is checked in the slow sweep; (b) forward caches (``if self.anchor is None: …``),
traced whole and through the sub-module fallback, with ``verify=False`` and ``inplace=True``; float64 tensors a
model holds on purpose; models whose result the artifact check must refuse; a torchvision subset (all of it in
the slow sweep). The dtype property over random nets is in tests/test_fuzz.py.
"""

from __future__ import annotations

import copy
import math
import re
from typing import Any, Iterator, List, Optional, Tuple

import pytest
import torch
import torch.nn.functional as F
from torch import Tensor, fx, nn

import fxfuse
from fxfuse import Reason
from fxfuse.models import randomize_batchnorm_
from fxfuse.testing import assert_close_f64

from _reachable import floating_dtypes, reachable, wrong_dtypes

DTYPES = [torch.float32, torch.bfloat16, torch.float16]


@pytest.fixture(autouse=True)
def _one_thread() -> Iterator[None]:
    """Small models: one intra-op thread is faster and immune to a busy machine (float64 depthwise convs with
    two threads on a loaded CPU take seconds)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def _name(dtype: torch.dtype) -> str:
    return str(dtype).replace("torch.", "")


def run_or_skip(model: nn.Module, *args: Any) -> Any:
    """``model(*args)``; skips where this torch build has no CPU kernel for an op in this dtype."""
    try:
        with torch.no_grad():
            return model(*args)
    except (RuntimeError, NotImplementedError) as exc:
        if isinstance(exc, NotImplementedError) or "not implemented" in str(exc).lower():
            pytest.skip(f"{args[0].dtype} unsupported on CPU by torch {torch.__version__}: {exc}")
        raise


def rel_to_f64(reference: Tensor, actual: Tensor) -> float:
    """Relative error (of max |reference|) of ``actual`` against the float64 ``reference``."""
    return assert_close_f64(reference, actual, rtol=math.inf)


def check_runs_in_own_dtype(model: nn.Module, x: Tensor, dtype: torch.dtype, **kwargs: Any
                            ) -> Tuple[nn.Module, Any]:
    """Fuse ``model`` cast to ``dtype``; assert the result runs in ``dtype`` with the original's output dtype, is
    as close to the float64 output as the original in ``dtype`` is, holds no tensor of another floating dtype and
    no Proxy, and that its report says it ran. Returns the fused model and the low-precision original."""
    low, xl = copy.deepcopy(model).to(dtype), x.to(dtype)
    ref64 = run_or_skip(copy.deepcopy(model).double(), x.double())
    own = run_or_skip(copy.deepcopy(low), xl)
    fused = fxfuse.reparametrize(low, xl, **kwargs)
    report = fused.fxfuse_report
    assert report.artifact_check is not None and report.artifact_check.startswith(f"ran in {_name(dtype)}"), \
        report.artifact_check
    assert wrong_dtypes(fused, floating_dtypes(low), dtype) == {}
    with torch.no_grad():
        out = fused(xl)
    assert out.dtype == own.dtype == dtype
    eps = torch.finfo(dtype).eps
    if dtype == torch.float64:
        assert rel_to_f64(ref64, out) <= 1e-9
    else:
        assert rel_to_f64(ref64, out) <= 2 * rel_to_f64(ref64, own) + 4 * eps
    return fused, low


def frozen(report: Any) -> List[Tuple[str, List[int], str]]:
    """``report.frozen_constants`` parsed into ``(path, shape, dtype)``."""
    out = []
    for entry in report.frozen_constants:
        m = re.fullmatch(r"(\S+) \[([\d, ]*)\] (\w+)", entry)
        assert m, entry
        out.append((m[1], [int(d) for d in m[2].split(",")] if m[2] else [], m[3]))
    return out


# ============================================================================== (a) Swin-like attention
def window_partition(x: Tensor, w: int) -> Tensor:
    """``[B, H, W, C]`` → ``[B·(H/w)·(W/w), w·w, C]``."""
    b, h, wd, c = x.shape
    return x.view(b, h // w, w, wd // w, w, c).permute(0, 1, 3, 2, 4, 5).reshape(-1, w * w, c)


def window_reverse(x: Tensor, w: int, h: int, wd: int) -> Tensor:
    c = x.shape[-1]
    return x.view(-1, h // w, wd // w, w, w, c).permute(0, 1, 3, 2, 4, 5).reshape(-1, h, wd, c)


def relative_position_index(w: int) -> Tensor:
    """``[w², w²]`` index into a ``(2w−1)²`` table of relative offsets (Swin)."""
    coords = torch.stack(torch.meshgrid(torch.arange(w), torch.arange(w), indexing="ij")).flatten(1)
    rel = (coords[:, :, None] - coords[:, None, :]).permute(1, 2, 0) + (w - 1)
    return rel[..., 0] * (2 * w - 1) + rel[..., 1]


def shifted_window_mask(size: int, w: int, shift: int) -> Tensor:
    """``[nW, w², w²]``: −100 between tokens that came from different regions after the cyclic shift, else 0."""
    region = torch.zeros(size, size)
    cuts = (slice(0, -w), slice(-w, -shift), slice(-shift, None))
    for i, hs in enumerate(cuts):
        for j, ws in enumerate(cuts):
            region[hs, ws] = 3 * i + j
    windows = window_partition(region.view(1, size, size, 1), w).squeeze(-1)
    return (windows[:, None, :] != windows[:, :, None]).float() * -100.0


class WindowAttention(nn.Module):
    """Shifted-window attention as timm writes it. ``v1``: relative-position bias from a parameter table indexed
    by a registered index buffer (``index.view(-1)`` is evaluated while tracing: an int64 constant). ``v2``:
    continuous position bias, an MLP on log-spaced relative coordinates computed in forward from a float buffer
    (a float trace-time constant), cosine attention with a learned logit scale. Both add the shifted-window mask,
    a float buffer reshaped in forward to ``[1, nW, 1, N, N]`` (a float trace-time constant)."""

    def __init__(self, dim: int, heads: int, window: int, size: int, version: str) -> None:
        super().__init__()
        self.heads, self.window, self.version, self.n = heads, window, version, window * window
        self.qkv, self.proj = nn.Linear(dim, 3 * dim), nn.Linear(dim, dim)
        self.register_buffer("relative_position_index", relative_position_index(window))
        self.register_buffer("attn_mask", shifted_window_mask(size, window, window // 2))
        span = 2 * window - 1
        if version == "v1":
            self.relative_position_bias_table = nn.Parameter(torch.randn(span * span, heads) * 0.5)
        else:
            rel = torch.arange(-(window - 1), window, dtype=torch.float32) / (window - 1) * 8
            self.register_buffer("relative_coords", torch.stack(torch.meshgrid(rel, rel, indexing="ij"), -1)[None])
            self.cpb_mlp = nn.Sequential(nn.Linear(2, 16), nn.ReLU(), nn.Linear(16, heads, bias=False))
            self.logit_scale = nn.Parameter(torch.log(10 * torch.rand(heads, 1, 1) + 1))

    def position_bias(self) -> Tensor:
        n = self.n
        if self.version == "v1":
            table = self.relative_position_bias_table
        else:
            coords = torch.sign(self.relative_coords) * torch.log2(self.relative_coords.abs() + 1.0) / math.log2(8)
            table = self.cpb_mlp(coords).view(-1, self.heads)
        bias = table[self.relative_position_index.view(-1)].view(n, n, -1).permute(2, 0, 1).contiguous()
        if self.version == "v2":
            bias = 16 * torch.sigmoid(bias)
        return bias.unsqueeze(0)

    def forward(self, x: Tensor) -> Tensor:
        b_, n, c = x.shape
        q, k, v = self.qkv(x).reshape(b_, n, 3, self.heads, c // self.heads).permute(2, 0, 3, 1, 4).unbind(0)
        if self.version == "v1":
            attn = (q * (c // self.heads) ** -0.5) @ k.transpose(-2, -1)
        else:
            scale = torch.clamp(self.logit_scale, max=math.log(100.0)).exp()
            attn = (F.normalize(q, dim=-1) @ F.normalize(k, dim=-1).transpose(-2, -1)) * scale
        attn = attn + self.position_bias()
        nw = self.attn_mask.shape[0]
        attn = attn.view(-1, nw, self.heads, self.n, self.n) + self.attn_mask.view(1, nw, 1, self.n, self.n)
        attn = attn.view(-1, self.heads, self.n, self.n).softmax(-1)
        return self.proj((attn @ v).transpose(1, 2).reshape(b_, n, c))


class SwinLike(nn.Module):
    """Conv-BN patch embedding (the pair fxfuse fuses), LayerNorm, one shifted-window attention block with a
    residual, mean pool, linear head. Input ``[B, 3, 2·size, 2·size]``."""

    def __init__(self, version: str, dim: int = 8, heads: int = 2, window: int = 4, size: int = 8) -> None:
        super().__init__()
        self.window, self.shift = window, window // 2
        self.embed, self.bn = nn.Conv2d(3, dim, 2, stride=2), nn.BatchNorm2d(dim)
        self.norm = nn.LayerNorm(dim)
        self.attn = WindowAttention(dim, heads, window, size, version)
        self.head = nn.Linear(dim, 5)

    def forward(self, x: Tensor) -> Tensor:
        x = self.bn(self.embed(x)).permute(0, 2, 3, 1)  # B H W C
        b, h, w, c = x.shape
        shifted = torch.roll(self.norm(x), shifts=(-self.shift, -self.shift), dims=(1, 2))
        y = self.attn(window_partition(shifted, self.window))
        y = torch.roll(window_reverse(y, self.window, h, w), shifts=(self.shift, self.shift), dims=(1, 2))
        return self.head((x + y).mean((1, 2)))


def swin_like(version: str) -> Tuple[nn.Module, Tensor]:
    torch.manual_seed(0)
    model = randomize_batchnorm_(SwinLike(version), 0).eval()
    return model, torch.randn(2, 3, 16, 16, generator=torch.Generator().manual_seed(1))


@pytest.mark.parametrize("dtype", DTYPES + [torch.float64], ids=_name)
@pytest.mark.parametrize("version", ["v1", "v2"])
def test_swin_like_attention_runs_in_its_dtype(version: str, dtype: torch.dtype) -> None:
    """Without the dtype audit the float32 result raised ``expected scalar type Float but found Double``: the mask
    (and in v2 the log-spaced coordinates) were float64 graph constants."""
    model, x = swin_like(version)
    fused, low = check_runs_in_own_dtype(model, x, dtype)
    report = fused.fxfuse_report
    assert report.fused.get("conv_bn") == 1 and report.after.batch_norms == 0

    # The trace-time constants: the mask reshaped to [1, nW, 1, N, N] (shape derived here from the model's
    # buffer) in the model's dtype; the others (the index, v2's coordinates) may be folded away by other rules,
    # but every one listed is a real tensor of the result with the listed dtype, floating ones the model's.
    attn = low.attn
    nw, n = attn.attn_mask.shape[0], attn.n
    constants = frozen(report)
    assert [dt for _, shape, dt in constants if shape == [1, nw, 1, n, n]] == [_name(dtype)], constants
    for path, shape, dt in constants:
        t = reachable(fused)[path]
        assert list(t.shape) == shape and _name(t.dtype) == dt
        assert dt in (_name(dtype), "int64"), constants
    # Captured in the model's own dtypes (docs/dtypes.md): nothing was made in float64, so nothing is cast back.
    assert report.cast_attributes == []


class GatedFrozenAffine(nn.Module):
    """conv → BN → sigmoid → a frozen BN written with buffers (torchvision's ``FrozenBatchNorm2d``: scale and shift
    computed in forward). After the sigmoid nothing folds it, so its scale and shift stay graph constants; without
    the dtype audit they stayed float64 and the float32 model silently answered in float64."""

    def __init__(self) -> None:
        super().__init__()
        self.conv, self.bn = nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4)
        gen = torch.Generator().manual_seed(9)
        for name in ("weight", "bias", "running_mean", "running_var"):
            self.register_buffer(name, torch.rand(4, generator=gen) + 0.5)

    def forward(self, x: Tensor) -> Tensor:
        scale = self.weight * (self.running_var + 1e-5).rsqrt()
        shift = self.bias - self.running_mean * scale
        return torch.sigmoid(self.bn(self.conv(x))) * scale.reshape(1, -1, 1, 1) + shift.reshape(1, -1, 1, 1)


@pytest.mark.parametrize("dtype", DTYPES, ids=_name)
def test_unfolded_frozen_batchnorm_constants(dtype: torch.dtype) -> None:
    torch.manual_seed(0)
    model = randomize_batchnorm_(GatedFrozenAffine(), 0).eval()
    fused, _ = check_runs_in_own_dtype(model, torch.randn(2, 3, 6, 6), dtype)
    report = fused.fxfuse_report
    assert report.fused.get("conv_bn") == 1
    constants = frozen(report)
    assert sorted((shape, dt) for _, shape, dt in constants) == [([1, 4, 1, 1], _name(dtype))] * 2
    assert report.cast_attributes == []  # computed by the capture in the model's dtype: nothing cast back


@pytest.mark.parametrize(("name", "dtype"), [
    pytest.param("swin_v2_t", torch.bfloat16, id="swin_v2_t-bfloat16"),
    pytest.param("swin_v2_t", torch.float32, id="swin_v2_t-float32", marks=pytest.mark.slow),
    pytest.param("swin_t", torch.bfloat16, id="swin_t-bfloat16", marks=pytest.mark.slow),
    pytest.param("swin_t", torch.float32, id="swin_t-float32", marks=pytest.mark.slow)])
def test_torchvision_swin_runs_in_its_dtype(name: str, dtype: torch.dtype) -> None:
    """torchvision's Swin wraps the bias computation in ``torch.fx.wrap``: no constants, but the same checks
    (1x3x32x32; ~2 s each, one in the default run)."""
    import torchvision

    torch.manual_seed(0)
    model = randomize_batchnorm_(getattr(torchvision.models, name)(num_classes=10), 0).eval()
    check_runs_in_own_dtype(model, torch.randn(1, 3, 32, 32), dtype)


# ============================================================================== torchvision sweep
# Slow sweep: bfloat16 convs of the biggest models take minutes on a CPU.
ZOO_HUGE = {"vit_h_14", "vit_l_16", "vit_l_32", "regnet_y_128gf", "regnet_y_32gf", "regnet_y_16gf", "regnet_x_32gf",
            "regnet_x_16gf", "efficientnet_b7", "efficientnet_b6", "convnext_large", "mvit_v1_b", "mvit_v2_s",
            "s3d", "raft_large", "maxvit_t"}


def zoo_names() -> List[str]:
    from benchmarks import zoo

    return [n for n in zoo.all_models() if n not in ZOO_HUGE]


def check_zoo_model(name: str, dtype: torch.dtype, capture: str) -> None:
    """A torchvision model (built as the zoo harness builds it) cast to ``dtype``: the result ran in ``dtype``,
    every tensor reachable from it has that dtype, and its outputs have the original's dtypes."""
    from benchmarks import zoo

    case = zoo.zoo_case(name)
    model = case.build().to(dtype)
    args = zoo.cast_floats(case.inputs(case.batches[0]), dtype)
    try:
        with torch.no_grad():
            own = copy.deepcopy(model)(*args)
    except Exception as exc:  # e.g. RAFT builds float32 grids: it has no bfloat16 form to keep
        pytest.skip(f"the original {name} does not run in {_name(dtype)}: {type(exc).__name__}: {exc}")
    fused = fxfuse.reparametrize(model, args, capture=capture)
    report = fused.fxfuse_report
    assert report.artifact_check is not None and report.artifact_check.startswith(f"ran in {_name(dtype)}"), \
        report.artifact_check
    # Tensors under the original's paths keep its dtypes (torchvision's AnchorGenerator keeps float32
    # ``cell_anchors`` plain attributes in a bfloat16 model); everything new has the model's.
    assert wrong_dtypes(fused, floating_dtypes(model), dtype) == {}
    with torch.no_grad():
        out = fused(*args)
    got = [t.dtype for t in torch.utils._pytree.tree_leaves(out) if isinstance(t, Tensor)]
    assert got == [t.dtype for t in torch.utils._pytree.tree_leaves(own) if isinstance(t, Tensor)] and got


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=_name)
@pytest.mark.parametrize("name", ["resnet18", "mobilenet_v3_small"])
def test_zoo_subset_runs_in_its_dtype(name: str, dtype: torch.dtype) -> None:
    """Symbolic capture, a second or two each (``capture="auto"`` may also try torch.export: the slow sweep)."""
    check_zoo_model(name, dtype, "symbolic")


@pytest.mark.slow
@pytest.mark.parametrize(("dtype", "capture"), [(torch.float32, "symbolic"), (torch.bfloat16, "symbolic"),
                                                (torch.float32, "auto")],
                         ids=lambda v: v if isinstance(v, str) else _name(v))
@pytest.mark.parametrize("name", zoo_names())
def test_zoo_runs_in_its_dtype(name: str, dtype: torch.dtype, capture: str) -> None:
    check_zoo_model(name, dtype, capture)


# ============================================================================== (b) forward-cached attributes
class CachedAnchor(nn.Module):
    """Caches a tensor in a plain attribute on its first call (symbolic tracing stores a Proxy there)."""

    def __init__(self) -> None:
        super().__init__()
        self.conv, self.bn, self.fc = nn.Conv2d(3, 4, 3, padding=1), nn.BatchNorm2d(4), nn.Linear(4, 3)
        self.anchor: Optional[Tensor] = None

    def forward(self, x: Tensor) -> Tensor:
        y = self.bn(self.conv(x)).mean((2, 3))
        if self.anchor is None:
            self.anchor = torch.zeros_like(y)
        return self.fc(y + self.anchor)


class Untraceable(nn.Module):
    """Data-dependent control flow at the root (fx cannot trace it: the sub-module fallback runs), a root-level
    cache written before the untraceable branch, a call counter, and a traceable ``CachedAnchor`` inside."""

    def __init__(self) -> None:
        super().__init__()
        self.body = CachedAnchor()
        self.calls = 0
        self.scale: Optional[Tensor] = None

    def forward(self, x: Tensor) -> Tensor:
        self.calls += 1
        if self.scale is None:
            self.scale = torch.ones_like(x[:, :1, :1, :1])
        y = self.body(x * self.scale)
        if float(y.abs().sum()) > 0:
            y = y * 2
        return y


def cached_models() -> List[Tuple[str, nn.Module]]:
    torch.manual_seed(0)
    return [("whole", randomize_batchnorm_(CachedAnchor(), 0).eval()),
            ("fallback", randomize_batchnorm_(Untraceable(), 0).eval())]


@pytest.mark.parametrize("dtype", DTYPES, ids=_name)
@pytest.mark.parametrize("kind", ["whole", "fallback"])
@pytest.mark.parametrize("verify", [True, False])
def test_forward_cached_attribute(kind: str, dtype: torch.dtype, verify: bool) -> None:
    """The result runs in its dtype, holds no Proxy and no float64, and is in the state of the user's model: the
    caches are still empty and the counter untouched (the pass's own runs and traces left no trace), so its
    first call creates the cache in its own dtype — as the original's would."""
    model = dict(cached_models())[kind]
    x = torch.randn(2, 3, 6, 6, generator=torch.Generator().manual_seed(2))
    fused, low = check_runs_in_own_dtype(model, x, dtype, verify=verify)
    report = fused.fxfuse_report
    assert report.traced_whole is (kind == "whole")
    body = fused if kind == "whole" else fused.body
    if kind == "fallback":
        assert report.submodules["body"].startswith("rewritten") and isinstance(body, fx.GraphModule)
        assert fused.calls == 1 and fused.scale is not None  # the one call made by check_runs_in_own_dtype
        assert low.calls == 0 and low.scale is None  # the input model was never run (nor traced) in place
    assert report.fused.get("conv_bn") == 1 and report.cast_attributes == []
    assert getattr(body, "anchor", None) is None or body.anchor.dtype == dtype
    assert low.body.anchor is None if kind == "fallback" else low.anchor is None


def test_fresh_result_state_and_other_inputs() -> None:
    """Right after fusing, the result's caches are as the user's model's (empty, counter 0); on a second input
    it still equals the original (the cache was not frozen from the example input)."""
    model = dict(cached_models())["fallback"]
    x = torch.randn(2, 3, 6, 6, generator=torch.Generator().manual_seed(3))
    fused = fxfuse.reparametrize(model, x)
    assert fused.calls == 0 and fused.scale is None
    assert wrong_dtypes(fused, {}, torch.float32) == {}
    for seed in (4, 5):
        x2 = torch.randn(3, 3, 6, 6, generator=torch.Generator().manual_seed(seed))
        with torch.no_grad():
            assert_close_f64(model(x2), fused(x2), rtol=1e-5)


class LastActivation(nn.Module):
    """The parent reads a tensor the child stored during its forward (``self.body.last``). A GraphModule does not
    store it, so rewriting ``body`` would change the model: the whole-model check must undo it."""

    def __init__(self) -> None:
        super().__init__()
        self.body = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.BatchNorm2d(4))
        self.tap = _Tap(self.body)

    def forward(self, x: Tensor) -> Tensor:
        y = self.tap(x)
        if float(y.sum()) > 0:  # untraceable root
            y = y + 1
        return y + self.tap.last


class _Tap(nn.Module):
    def __init__(self, body: nn.Module) -> None:
        super().__init__()
        self.body, self.last = body, None

    def forward(self, x: Tensor) -> Tensor:
        y = self.body(x)
        self.last = y * 0.5
        return y


def test_attribute_written_in_forward_is_not_frozen() -> None:
    """``tap`` traces, but its rewrite would drop the write to ``tap.last`` (the parent would read the value some
    earlier run left there, e.g. the pass's float64 reference run, on any input). The pass's runs leave no such
    value behind, so the whole-model check sees the difference: the rewrite of ``tap`` is undone, ``tap.last`` is
    as in the user's model, and the result equals the original on other inputs."""
    torch.manual_seed(0)
    model = randomize_batchnorm_(LastActivation(), 0).eval()
    x = torch.randn(2, 3, 5, 5, generator=torch.Generator().manual_seed(6))
    fused = fxfuse.reparametrize(model, x)
    report = fused.fxfuse_report
    assert report.submodules["tap"].startswith("rewrite undone"), report.submodules
    assert isinstance(fused.tap, _Tap) and fused.tap.last is None
    x2 = torch.randn(1, 3, 5, 5, generator=torch.Generator().manual_seed(7))
    with torch.no_grad():
        assert_close_f64(model(x2), fused(x2), rtol=1e-6)


def test_inplace_leaves_no_proxy_on_the_model() -> None:
    """``inplace=True`` works on the user's model itself: tracing it must not leave a Proxy in ``anchor``."""
    model = dict(cached_models())["whole"]
    x = torch.randn(2, 3, 6, 6)
    expected = copy.deepcopy(model)(x)
    fused = fxfuse.reparametrize(model, x, inplace=True, verify=False)
    assert model.anchor is None and wrong_dtypes(model, {}, torch.float32) == {}
    assert wrong_dtypes(fused, {}, torch.float32) == {}
    with torch.no_grad():
        assert_close_f64(expected, model(x), rtol=1e-6)
        assert_close_f64(expected, fused(x), rtol=1e-6)


def test_cache_filled_before_fusing_is_kept_in_its_dtype() -> None:
    """A model already run (its ``anchor`` is a float32 tensor): the graph reads it, it stays float32, and the
    report lists it as frozen."""
    model = dict(cached_models())["whole"]
    x = torch.randn(2, 3, 6, 6)
    with torch.no_grad():
        model(x)
    model.anchor = torch.randn(2, 4)  # a non-trivial cached value
    fused, _ = check_runs_in_own_dtype(model, x, torch.float32)
    assert frozen(fused.fxfuse_report) == [("anchor", [2, 4], "float32")]
    assert fused.fxfuse_report.cast_attributes == []
    assert torch.equal(fused.anchor, model.anchor)


class AliasedBuffer(nn.Module):
    """An untraceable root (the fallback keeps it) holding its buffer also in a plain list attribute."""

    def __init__(self) -> None:
        super().__init__()
        self.body = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4))
        self.register_buffer("scale", torch.rand(1, 4, 1, 1) + 0.5)
        self.views = [self.scale]

    def forward(self, x: Tensor) -> Tensor:
        y = self.body(x)
        if float(y.sum()) > 0:
            y = -y
        return y * self.views[0]


def test_plain_attribute_aliasing_a_buffer_stays_an_alias() -> None:
    """The float64 copy keeps the alias (one float64 tensor in both places); casting back must too. (float32
    only: ``model.to(other dtype)`` itself replaces the buffer and leaves the list holding the old tensor.)"""
    torch.manual_seed(0)
    model = randomize_batchnorm_(AliasedBuffer(), 0).eval()
    fused, _ = check_runs_in_own_dtype(model, torch.randn(2, 3, 6, 6), torch.float32)
    assert fused.fxfuse_report.submodules["body"].startswith("rewritten")
    assert fused.views[0] is fused.scale and fused.scale.dtype == torch.float32


# ============================================================================== float64 on purpose
class Float64OnPurpose(nn.Module):
    """A float32 conv-BN model with a float64 plain attribute and a float64 buffer, both used in forward after a
    ReLU (so nothing folds them into the conv); the output is float64 by type promotion."""

    def __init__(self) -> None:
        super().__init__()
        self.conv, self.bn = nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4)
        self.register_buffer("offset", torch.randn(1, 4, 1, 1, dtype=torch.float64))
        self.gain = torch.rand(1, 4, 1, 1, dtype=torch.float64) + 0.5  # plain attribute

    def forward(self, x: Tensor) -> Tensor:
        return torch.relu(self.bn(self.conv(x))) * self.gain + self.offset


def test_float64_attribute_and_buffer_stay_float64() -> None:
    torch.manual_seed(0)
    model = randomize_batchnorm_(Float64OnPurpose(), 0).eval()
    x = torch.randn(2, 3, 6, 6)
    with torch.no_grad():
        y = model(x)
    fused = fxfuse.reparametrize(model, x)
    report = fused.fxfuse_report
    assert report.fused.get("conv_bn") == 1 and report.after.batch_norms == 0
    assert wrong_dtypes(fused, {"offset": torch.float64, "gain": torch.float64}, torch.float32) == {}
    assert fused.offset.dtype == fused.gain.dtype == torch.float64
    assert {p.dtype for p in fused.parameters()} == {torch.float32}
    assert report.cast_attributes == [] and report.artifact_check.startswith("ran in float64")
    assert frozen(report) == [("gain", [1, 4, 1, 1], "float64")]  # a plain attribute the graph reads
    with torch.no_grad():
        out = fused(x)
    assert out.dtype == y.dtype == torch.float64
    assert_close_f64(y, out, rtol=1e-6)


class Float64Affine(nn.Module):
    """float32 conv → BN → ``× float64 buffer``: folding the product into the float32 conv would turn the float64
    output (type promotion) into float32."""

    def __init__(self) -> None:
        super().__init__()
        self.conv, self.bn = nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4)
        self.register_buffer("gain", torch.rand(1, 4, 1, 1, dtype=torch.float64) + 0.5)

    def forward(self, x: Tensor) -> Tensor:
        return self.bn(self.conv(x)) * self.gain


def test_mixed_dtype_fold_never_changes_the_output_dtype() -> None:
    """Whatever the rules fold, what is returned answers in the original's dtype: folding ``× gain`` into the
    float32 conv would make the output float32; the artifact check sees the changed dtype and that fold is rolled
    back (code ``artifact_dtype``), while conv → BN stays fused."""
    torch.manual_seed(0)
    model = randomize_batchnorm_(Float64Affine(), 0).eval()
    x = torch.randn(2, 3, 6, 6)
    with torch.no_grad():
        y = model(x)
    assert y.dtype == torch.float64
    fused = fxfuse.reparametrize(model, x)
    report = fused.fxfuse_report
    assert [r.code for r in report.rollbacks] == [Reason.ARTIFACT_DTYPE], report.rollbacks
    assert "changed an output's dtype: output 0 is float32 on cpu, the original model's is float64" in \
        report.rollbacks[0].detail
    assert report.fused.get("conv_bn") == 1 and report.after.batch_norms == 0
    with torch.no_grad():
        out = fused(x)
    assert out.dtype == torch.float64
    assert_close_f64(y, out, rtol=1e-6)
    assert report.artifact_check.startswith("ran in float64")


# ============================================================================== the check can fail
class DtypeFromParameters(nn.Module):
    """Reads a dtype from a concrete parameter while traced: the trace records ``out.to(<that dtype>)``. Captured from
    a float64 copy (fxfuse <= 0.2) that literal was float64 and the float32 model would have answered in float64;
    captured from the model as given it is the model's own."""

    def __init__(self) -> None:
        super().__init__()
        self.conv, self.bn = nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4)

    def forward(self, x: Tensor) -> Tensor:
        return self.bn(self.conv(x)).to(next(self.parameters()).dtype)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=_name)
@pytest.mark.parametrize("capture", ["symbolic", "export"])
def test_dtype_read_from_a_parameter_is_the_models_own(capture: str, dtype: torch.dtype) -> None:
    torch.manual_seed(0)
    model = randomize_batchnorm_(DtypeFromParameters(), 0).eval().to(dtype)
    x = torch.randn(2, 3, 5, 5).to(dtype)
    fused = fxfuse.reparametrize(model, x, capture=capture)
    report = fused.fxfuse_report
    assert report.fused.get("conv_bn") == 1 and report.after.batch_norms == 0 and not report.rolled_back
    literals = [a for n in fused.graph.nodes for a in (*n.args, *n.kwargs.values()) if isinstance(a, torch.dtype)]
    assert torch.float64 not in literals and (capture == "symbolic" or dtype in literals), literals
    with torch.no_grad():
        out, y = fused(x), model(x)
    assert out.dtype == y.dtype == dtype
    assert_close_f64(y, out, rtol=4 * torch.finfo(dtype).eps)


class ScoresThenNms(nn.Module):
    """Conv-BN scores per image, then ``torchvision.ops.nms``, which has no bfloat16 CPU kernel."""

    def __init__(self) -> None:
        super().__init__()
        self.conv, self.bn = nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4)
        self.register_buffer("boxes", torch.tensor([[0.0, 0, 10, 10], [1, 1, 11, 11], [20, 20, 30, 30]]))

    def forward(self, x: Tensor) -> Tensor:
        scores = self.bn(self.conv(x)).mean((1, 2, 3))
        return scores[torchvision_nms(self.boxes, scores, 0.5)]


def torchvision_nms(boxes: Tensor, scores: Tensor, iou: float) -> Tensor:
    import torchvision

    return torchvision.ops.nms(boxes, scores, iou)


def test_model_that_does_not_run_in_its_dtype_here_is_reported() -> None:
    """The original itself cannot run in bfloat16 on this CPU: the fused model is verified in float64 and
    audited (no float64 left), but it cannot be run here either; the report says so instead of claiming a run."""
    torch.manual_seed(0)
    model = randomize_batchnorm_(ScoresThenNms(), 0).eval()
    x = torch.randn(3, 3, 6, 6, generator=torch.Generator().manual_seed(8))
    low = copy.deepcopy(model).bfloat16()
    with pytest.raises(RuntimeError, match="not implemented for 'BFloat16'"):
        low(x.bfloat16())
    fused = fxfuse.reparametrize(low, x.bfloat16())
    report = fused.fxfuse_report
    assert report.artifact_check.startswith("not run: the original model does not run on the example input in its "
                                            "own dtype either (RuntimeError"), report.artifact_check
    assert any(w.startswith("the returned model was not run in its own dtype") for w in report.warnings)
    assert report.verified and report.fused.get("conv_bn") == 1
    assert wrong_dtypes(fused, floating_dtypes(low), torch.bfloat16) == {}
    with torch.no_grad():  # in float32 (where nms runs) the fused model equals the original
        assert_close_f64(copy.deepcopy(low).float()(x), copy.deepcopy(fused).float()(x),
                         rtol=4 * torch.finfo(torch.bfloat16).eps)  # the fused weights rounded to bfloat16


def test_float16_overflow_of_fused_weights_is_rolled_back() -> None:
    """conv → BN with ``γ/σ ≈ 3·10⁵``: the original is fine in float16 (BN scales after the conv, outputs ~10⁴), but
    the fused weight ``w·γ/σ`` does not fit float16 (max 65504) and the fused model would answer inf. The float64
    check cannot see that; the artifact check can, and the fold is rolled back with its reason code: what is
    returned is the unfused model, equal to the original in float16."""
    model = nn.Sequential(nn.Conv2d(1, 1, 1), nn.BatchNorm2d(1)).eval()
    with torch.no_grad():
        model[0].weight.fill_(1.0)
        model[0].bias.zero_()
        model[1].running_mean.fill_(1.0)
        model[1].running_var.zero_()  # σ = √ε ≈ 3.2e-3
        model[1].weight.fill_(1000.0)
    x = (1 + 0.05 * torch.randn(1, 1, 4, 4, generator=torch.Generator().manual_seed(0))).half()
    model = model.half()
    with torch.no_grad():
        y = model(x)
        assert y.isfinite().all() and y.abs().max() > 1000
    fused = fxfuse.reparametrize(model, x)
    report = fused.fxfuse_report
    assert [(r.key, r.code) for r in report.rollbacks] == [("conv_bn:_1", Reason.ARTIFACT_OVERFLOW)], report.rollbacks
    assert re.search(r"finite in float64, inf once cast\): \S+\.weight \(float16\)", report.rollbacks[0].detail)
    assert report.rolled_back == ["conv_bn:_1"] and report.after.batch_norms == 1 and not report.fused
    with torch.no_grad():
        out = fused(x)
    assert out.dtype == torch.float16 and torch.equal(out, y)


class DriftsBetweenCalls(nn.Module):
    """Each call writes its own buffer: the second call on the same input differs from the first."""

    def __init__(self) -> None:
        super().__init__()
        self.register_buffer("calls", torch.zeros(()))

    def forward(self, x: Tensor) -> Tensor:
        self.calls += 1
        return x * self.calls


def test_drift_between_calls_is_not_excused_as_rounding() -> None:
    """The artifact check's rounding allowance (outputs decided by NMS / top-k) measures how far a one-ulp nudge
    of the input moves the output; a model whose calls change its state must get no measure (NaN), or a fused model
    writing into its own weight would pass as "ill-conditioned"."""
    from fxfuse.artifact import _rounding_noise

    x = torch.randn(4, dtype=torch.float64)
    drifting = DriftsBetweenCalls().double()
    assert math.isnan(_rounding_noise(drifting, (x,), drifting(x), 1e-9, 0.0))
    steady = nn.Identity()
    assert 0 < _rounding_noise(steady, (x,), steady(x), 1e-9, 0.0) <= 2 * torch.finfo(torch.float64).eps
