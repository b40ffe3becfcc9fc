"""Sweep ``fxfuse.reparametrize`` over the torchvision model zoo and write ``docs/zoo.md``.

Every model of ``torchvision.models.list_models()`` (classification, video, segmentation, detection, optical
flow; the ``quantized_*`` entries are built in float with ``quantize=False``) is built with ``weights=None`` (and
``weights_backbone=None``), its BatchNorm statistics randomized (:func:`fxfuse.models.randomize_batchnorm_`), put
in eval mode and cast to float64. Then, per model:

* ``fused = reparametrize(model, x)`` (``verify=True``): the pass time is measured;
* outputs equal: ``max|fused(x) - model(x)| <= 1e-9 · max|model(x)|`` per output tensor, in float64, on ``x`` and
  on a second input of another batch size (integer outputs, e.g. detection labels, must be equal);
* structure: no BatchNorm left whose input is a conv/linear node with no other real user, in any fx graph of the
  result (:func:`unfused_conv_bn`); convs/BNs executed before → after are counted at run time
  (:class:`OpCounter`, so models with untraced Python parts are counted too);
* the input model is untouched: a SHA-256 of every ``state_dict`` entry before and after;
* CPU speed at a small batch: ``torch.utils.benchmark.Timer`` on the float32 original and the float32 fused
  model (``fused.float()``: the float64-computed fused weights rounded once, as ``reparametrize`` does for a
  float32 model), side by side in one process, rounds interleaved.

A model ``reparametrize`` cannot handle at all must raise :class:`fxfuse.FusionError` (status ``refused``);
any other exception, a different output, a leftover conv→BN or a modified input model is a failure. Where the pass
refuses, or (fallback) undoes sub-module rewrites because the whole output changed, :func:`conditioning` measures
whether that output is decided by rounding noise (then no exact rewrite can keep it). A model that cannot run in
float64 at all (RAFT) is checked in float32 and each rewritten sub-module in float64
(:func:`float64_submodule_check`).

    python benchmarks/zoo.py                          # every model, writes docs/zoo.md
    python benchmarks/zoo.py --models resnet18,r3d_18 --out /tmp/zoo.md
    python benchmarks/zoo.py --pass-speed             # resnet152 pass time and resnet50/152 linearity only
"""

from __future__ import annotations

import argparse
import copy
import datetime as _dt
import gc
import hashlib
import json
import math
import os
import platform
import statistics
import subprocess
import sys
import time
import traceback
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple

import torch
import torch.nn.functional as F
import torchvision
from torch import Tensor, fx, nn
from torch.overrides import TorchFunctionMode
from torch.utils._pytree import tree_flatten, tree_map

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

import fxfuse  # noqa: E402
from fxfuse.capture import capture_calls  # noqa: E402
from fxfuse.models import randomize_batchnorm_  # noqa: E402

RTOL = 1e-9
FLOAT32_RTOL = 1e-4  # whole-model check of a model that cannot run in float64 (its rewrites are checked in float64)
SEED = 0

# ------------------------------------------------------------------------------------------- the zoo
_TV = torchvision.models
KIND_MODULES = {
    "detection": _TV.detection,
    "segmentation": _TV.segmentation,
    "video": _TV.video,
    "optical_flow": _TV.optical_flow,
    "quantization": _TV.quantization,
}


def model_kind(name: str) -> str:
    """``classification``, ``detection``, ``segmentation``, ``video``, ``optical_flow`` or ``quantization``."""
    for kind, module in KIND_MODULES.items():
        if name in _TV.list_models(module=module):
            return kind
    return "classification"


def all_models() -> List[str]:
    return sorted(_TV.list_models())


@dataclass(frozen=True)
class ZooCase:
    """How one zoo model is built and called. ``inputs(batch)`` returns the positional arguments of
    ``model(*args)``; ``batches`` are the two batch sizes checked (the first is the pass's example input)."""

    name: str
    kind: str
    build_kwargs: Dict[str, Any]
    inputs: Callable[[int], Tuple[Any, ...]]
    batches: Tuple[int, int] = (2, 1)
    note: str = ""

    def build(self) -> nn.Module:
        """The float32 model with random weights and randomized BatchNorm statistics, in eval mode."""
        torch.manual_seed(SEED)
        model = _TV.get_model(self.name, **self.build_kwargs)
        randomize_batchnorm_(model, seed=SEED)
        return model.eval()

    def input_desc(self) -> str:
        def desc(a: Any) -> str:
            if isinstance(a, Tensor):
                return "x".join(map(str, a.shape))
            if isinstance(a, (list, tuple)):
                return "[" + ", ".join(desc(v) for v in a) + "]"
            return repr(a)

        return ", ".join(desc(a) for a in self.inputs(self.batches[0]))


def _images(batch: int, *shape: int, seed: int = 1) -> Tensor:
    g = torch.Generator().manual_seed(seed + batch)
    return torch.rand(batch, *shape, generator=g)


def _image_list(batch: int, sizes: Sequence[Tuple[int, int]]) -> Tuple[List[Tensor]]:
    """Detection input: a list of ``[3, H, W]`` images in [0, 1] of different sizes."""
    g = torch.Generator().manual_seed(100 + batch)
    return ([torch.rand(3, *sizes[i % len(sizes)], generator=g) for i in range(batch)],)


def zoo_case(name: str) -> ZooCase:
    """The build arguments and inputs of ``name`` (small inputs to keep the sweep short)."""
    kind = model_kind(name)
    kw: Dict[str, Any] = {"weights": None}
    size = 64
    if kind == "quantization":
        kw["quantize"] = False
    if kind in ("detection", "segmentation"):
        kw["weights_backbone"] = None
    if kind == "detection":
        if name.startswith("ssd"):  # SSD resizes every image to its fixed 300 / 320 square
            return ZooCase(name, kind, kw, lambda b: _image_list(b, [(120, 160), (96, 128)]), (2, 1),
                           "images resized to the model's fixed size")
        kw.update(min_size=128, max_size=160)
        note = "min_size=128, max_size=160"
        if "rcnn" in name:  # fewer proposals (float64 box heads are slow); keep every box so outputs are not empty
            kw.update(rpn_pre_nms_top_n_test=200, rpn_post_nms_top_n_test=100, box_score_thresh=0.0)
            note += ", 100 proposals, box_score_thresh=0"
        else:
            kw.update(score_thresh=0.0)
            note += ", score_thresh=0"
        return ZooCase(name, kind, kw, lambda b: _image_list(b, [(120, 160), (96, 128)]), (2, 1), note)
    if kind == "optical_flow":
        return ZooCase(name, kind, kw, lambda b: (_images(b, 3, 128, 128), _images(b, 3, 128, 128, seed=7)),
                       (1, 2), "12 flow updates (default)")
    if kind == "video":
        if name == "s3d":  # ends in AvgPool3d((2, 7, 7)): needs 16 x 224 x 224
            return ZooCase(name, kind, kw, lambda b: (_images(b, 3, 16, 224, 224),), (1, 2))
        if name.startswith("mvit"):  # position embeddings fixed to 16 x 224 x 224
            return ZooCase(name, kind, kw, lambda b: (_images(b, 3, 16, 224, 224),), (1, 2))
        return ZooCase(name, kind, kw, lambda b: (_images(b, 3, 4, 64, 64),), (1, 2))
    if name.startswith("vit_"):
        patch = 14 if name.endswith("_14") else int(name.rsplit("_", 1)[1])
        size = 4 * patch
        kw["image_size"] = size
        return ZooCase(name, kind, kw, lambda b: (_images(b, 3, size, size),), (2, 1), f"image_size={size}")
    if name == "maxvit_t":  # partition size 7 at every stage: 224 only
        return ZooCase(name, kind, kw, lambda b: (_images(b, 3, 224, 224),), (1, 2))
    if "inception_v3" in name:
        size = 80  # >= 75
    return ZooCase(name, kind, kw, lambda b: (_images(b, 3, size, size),), (2, 1))


# ------------------------------------------------------------------------------------------- checks
_CONV_FUNCS = {torch.conv1d, torch.conv2d, torch.conv3d, torch.conv_transpose1d, torch.conv_transpose2d,
               torch.conv_transpose3d, F.conv1d, F.conv2d, F.conv3d, F.conv_transpose1d, F.conv_transpose2d,
               F.conv_transpose3d}
_BN_FUNCS = {F.batch_norm, torch.batch_norm}
_LINEAR_FUNCS = {F.linear, torch._C._nn.linear}
_META_ATTRS = {"shape", "ndim", "dtype", "device", "is_cuda", "layout", "requires_grad"}
_META_METHODS = {"size", "dim", "ndimension", "numel", "type", "get_device"}


class OpCounter(TorchFunctionMode):
    """Counts convolutions and batch norms executed (module or functional, traced or not) while active."""

    def __init__(self) -> None:
        super().__init__()
        self.convs = 0
        self.batch_norms = 0

    def __torch_function__(self, func, types, args=(), kwargs=None):
        if func in _CONV_FUNCS:
            self.convs += 1
        elif func in _BN_FUNCS:
            self.batch_norms += 1
        return func(*args, **(kwargs or {}))


def run_counted(model: nn.Module, args: Tuple[Any, ...]) -> Tuple[Any, int, int]:
    """``(model(*args), convs, batch_norms)``: the output and the convs / batch norms that call executed."""
    counter = OpCounter()
    with torch.no_grad(), counter:
        out = model(*args)
    return out, counter.convs, counter.batch_norms


def _is_metadata_user(user: fx.Node) -> bool:
    if user.op == "call_function" and user.target is getattr:
        return len(user.args) > 1 and user.args[1] in _META_ATTRS
    return user.op == "call_method" and user.target in _META_METHODS


def _node_kind(node: fx.Node, modules: Dict[str, nn.Module]) -> Optional[str]:
    if node.op == "call_module":
        mod = modules.get(node.target)
        if isinstance(mod, nn.modules.conv._ConvNd):
            return "conv"
        if isinstance(mod, nn.Linear):
            return "linear"
        if isinstance(mod, nn.modules.batchnorm._BatchNorm):
            return "bn"
    elif node.op == "call_function":
        if node.target in _CONV_FUNCS:
            return "conv"
        if node.target in _LINEAR_FUNCS:
            return "linear"
        if node.target in _BN_FUNCS:
            return "bn"
    return None


def _conv_bn_in_graph(gm: fx.GraphModule, path: str) -> List[str]:
    modules = dict(gm.named_modules())
    bad = []
    for node in gm.graph.nodes:
        if _node_kind(node, modules) != "bn" or not node.args or not isinstance(node.args[0], fx.Node):
            continue
        src = node.args[0]
        real = [u for u in src.users if not _is_metadata_user(u)]
        if _node_kind(src, modules) in ("conv", "linear") and len(real) == 1:
            bad.append(f"{path or '<root>'}:{src.name}->{node.name}")
    return bad


def unfused_conv_bn(result: nn.Module) -> List[str]:
    """BatchNorms whose input is a conv/linear node with a single real user (shape reads do not count): each is a
    fold the pass should have made. Checked in every fx graph inside ``result`` and, for BatchNorm modules that no
    graph calls (parts the pass left as Python), in the largest ancestor of each that ``symbolic_trace`` can trace
    (marked ``(untraced)``). Empty when all are done."""
    bad = []
    for path, gm in result.named_modules():
        if isinstance(gm, fx.GraphModule):
            bad.extend(_conv_bn_in_graph(gm, path))
    tried: Dict[str, bool] = {}
    for name in untraced_batch_norms(result):
        parts = name.split(".")
        for k in range(len(parts)):
            anc = ".".join(parts[:k])
            if anc not in tried:
                try:
                    gm = fx.symbolic_trace(result.get_submodule(anc) if anc else result)
                except Exception:  # noqa: BLE001 - not traceable: try the next smaller ancestor
                    tried[anc] = False
                    continue
                tried[anc] = True
                bad.extend(f"{b} (untraced)" for b in _conv_bn_in_graph(gm, anc))
            if tried[anc]:
                break
    return bad


def remaining_bn_inputs(result: nn.Module) -> Dict[str, int]:
    """What feeds each BatchNorm left in the fx graphs of ``result`` (why it could not fold into a producer):
    ``{"torch.cat": 58, "ReLU": 3, "Conv2d with 2 users": 1, ...}``."""
    counts: Dict[str, int] = {}
    for gm in result.modules():
        if not isinstance(gm, fx.GraphModule):
            continue
        modules = dict(gm.named_modules())
        for node in gm.graph.nodes:
            if _node_kind(node, modules) != "bn" or not node.args or not isinstance(node.args[0], fx.Node):
                continue
            src = node.args[0]
            if src.op == "call_module":
                what = type(modules[src.target]).__name__
            elif src.op in ("call_function", "call_method"):
                target = src.target
                what = target if isinstance(target, str) else \
                    f"{getattr(target, '__module__', '') or ''}.{getattr(target, '__name__', str(target))}".lstrip(".")
                what = what.replace("torch.nn.functional.", "F.").replace("_operator.", "operator.")
            else:
                what = src.op
            if _node_kind(src, modules) in ("conv", "linear"):
                what += f" with {len([u for u in src.users if not _is_metadata_user(u)])} users"
            counts[what] = counts.get(what, 0) + 1
    return dict(sorted(counts.items(), key=lambda kv: -kv[1]))


def untraced_batch_norms(result: nn.Module) -> List[str]:
    """BatchNorm modules of ``result`` that no fx graph calls (they run from untraced Python code)."""
    in_graph = set()
    for gm in result.modules():
        if isinstance(gm, fx.GraphModule):
            mods = dict(gm.named_modules())
            in_graph.update(id(mods[n.target]) for n in gm.graph.nodes
                            if n.op == "call_module" and n.target in mods)
    return [name for name, m in result.named_modules()
            if isinstance(m, nn.modules.batchnorm._BatchNorm) and id(m) not in in_graph]


def state_fingerprint(model: nn.Module) -> Dict[str, Tuple[str, Tuple[int, ...], str]]:
    """``state_dict`` key → (dtype, shape, SHA-256 of the raw bytes): equal fingerprints = bit-identical state."""
    out = {}
    for k, t in model.state_dict(keep_vars=True).items():
        t = t.detach()
        raw = t.cpu().contiguous().reshape(-1).view(torch.uint8) if t.numel() else t.new_empty(0, dtype=torch.uint8)
        out[k] = (str(t.dtype), tuple(t.shape), hashlib.sha256(raw.numpy().data).hexdigest())
    return out


def max_rel_error(reference: Any, actual: Any) -> float:
    """Largest per-tensor ``max|a - r| / max|r|`` over the outputs; ``inf`` when the structure, a shape or an
    integer output differs."""
    ref, ref_spec = tree_flatten(reference)
    out, out_spec = tree_flatten(actual)
    if ref_spec != out_spec:
        return math.inf
    worst = 0.0
    for r, a in zip(ref, out):
        if not isinstance(r, Tensor):
            if r != a:
                return math.inf
            continue
        if not isinstance(a, Tensor) or a.shape != r.shape or a.dtype != r.dtype:
            return math.inf
        if not r.is_floating_point():
            if not torch.equal(r, a):
                return math.inf
            continue
        if r.numel() == 0:
            continue
        a, r = a.detach().double(), r.detach().double()
        err = float((a - r).abs().max())
        scale = float(r.abs().max())
        if math.isnan(err):
            return math.inf
        worst = max(worst, err / scale if scale > 0 else (0.0 if err == 0 else math.inf))
    return worst


def _double(args: Any) -> Any:
    return tree_map(lambda t: t.double() if isinstance(t, Tensor) and t.is_floating_point() else t, args)


def _float(args: Any) -> Any:
    return tree_map(lambda t: t.float() if isinstance(t, Tensor) and t.is_floating_point() else t, args)


# ------------------------------------------------------------------------------------------- one model
@dataclass
class ZooRow:
    """One model's sweep result (a row of docs/zoo.md)."""

    name: str
    kind: str
    input: str
    status: str = ""  # ok | fallback | refused | FAIL
    detail: str = ""
    convs: Tuple[int, int] = (0, 0)
    batch_norms: Tuple[int, int] = (0, 0)
    rewrites: int = 0
    rewrites_by_rule: Dict[str, int] = field(default_factory=dict)
    pass_s: float = 0.0
    max_rel_error: float = math.nan
    speed_ratio: float = math.nan  # median of paired per-round ratios original / fused
    speed_min: float = math.nan
    speed_max: float = math.nan
    speed_batch: int = 0
    unfused_conv_bn: List[str] = field(default_factory=list)
    untraced_bns: List[str] = field(default_factory=list)
    submodules: Dict[str, str] = field(default_factory=dict)
    unfused: List[str] = field(default_factory=list)
    state_untouched: bool = True
    failures: List[str] = field(default_factory=list)
    seconds: float = 0.0
    float32_reason: str = ""  # why the model runs in float32 only ("" = float64)
    bn_left_inputs: Dict[str, int] = field(default_factory=dict)  # producer of each BN left in a graph
    conditioning: float = math.nan  # output change under a ~1e-15 weight perturbation (refused / error > 1e-12)
    submodule_checks: Dict[str, "SubmoduleCheck"] = field(default_factory=dict)
    max_rel_error_f64: float = math.nan  # float32-only models: worst float64 error over rewritten sub-modules

    @property
    def passed(self) -> bool:
        return not self.failures


def check_model(name: str, *, speed: bool = True, min_run_time: float = 0.3) -> ZooRow:
    """Build, reparametrize and check one zoo model (see module docstring); never raises for a model failure,
    which is recorded in ``row.failures``."""
    start = time.perf_counter()
    case = zoo_case(name)
    row = ZooRow(name, case.kind, case.input_desc())
    try:
        _check(case, row, speed, min_run_time)
    except Exception as exc:  # noqa: BLE001 - a crash of the harness or the pass is a failure of this model
        row.status = "FAIL"
        row.failures.append(f"{type(exc).__name__}: {exc}".splitlines()[0][:300])
        row.detail = traceback.format_exc(limit=-3)
    row.seconds = time.perf_counter() - start
    gc.collect()
    return row


def _check(case: ZooCase, row: ZooRow, speed: bool, min_run_time: float) -> None:
    model = case.build().double()
    x1, x2 = (_double(case.inputs(b)) for b in case.batches)
    try:
        ref1, convs, bns = run_counted(model, x1)
    except Exception as exc:  # noqa: BLE001 - e.g. RAFT builds its coordinate grid in float32
        row.float32_reason = f"{type(exc).__name__}: {exc}".splitlines()[0][:200]
        model.float()
        x1, x2 = (_float(case.inputs(b)) for b in case.batches)
        ref1, convs, bns = run_counted(model, x1)
    float64 = not row.float32_reason
    tolerance = RTOL if float64 else FLOAT32_RTOL
    row.convs, row.batch_norms = (convs, 0), (bns, 0)
    before_state = state_fingerprint(model)

    t0 = time.perf_counter()
    try:
        fused = fxfuse.reparametrize(model, x1)
    except fxfuse.FusionError as exc:
        row.pass_s = time.perf_counter() - t0
        row.status = "refused"
        row.detail = str(exc).splitlines()[0][:300]
        row.conditioning = conditioning(model, x1, ref1)
        if state_fingerprint(model) != before_state:
            row.state_untouched = False
            row.failures.append("input model modified")
        return
    row.pass_s = time.perf_counter() - t0
    report = fused.fxfuse_report

    row.state_untouched = state_fingerprint(model) == before_state
    if not row.state_untouched:
        row.failures.append("input model modified")
    if report.verified is not True:
        row.failures.append(f"verify did not accept the result (verified={report.verified})")
    out1, convs, bns = run_counted(fused, x1)
    err1 = max_rel_error(ref1, out1)
    del out1, ref1
    with torch.no_grad():
        ref2 = model(*x2)
        out2 = fused(*x2)
        err2 = max_rel_error(ref2, out2)
        del ref2, out2
    row.max_rel_error = max(err1, err2)
    if row.max_rel_error > 1e-12 and float64 and math.isnan(row.conditioning):  # model's own noise amplification?
        row.conditioning = conditioning(model, x1, run_counted(model, x1)[0])
    if not row.max_rel_error <= tolerance:
        row.failures.append(f"outputs differ: max relative error {err1:.3g} (batch {case.batches[0]}), "
                            f"{err2:.3g} (batch {case.batches[1]})")
    row.convs, row.batch_norms = (row.convs[0], convs), (row.batch_norms[0], bns)
    row.rewrites = report.total_fused
    row.rewrites_by_rule = dict(report.fused)
    row.unfused = sorted({f"[{u.rule}] {u.reason}" for u in report.unfused})
    row.unfused_conv_bn = unfused_conv_bn(fused)
    undone = [p for p, why in report.submodules.items() if why.startswith("rewrite undone")]
    if undone and float64 and math.isnan(row.conditioning):  # the pass undid sub-module rewrites because the whole model changed: why?
        row.conditioning = conditioning(model, x1, run_counted(model, x1)[0])
    if row.unfused_conv_bn and not (undone and row.conditioning > RTOL):
        row.failures.append(f"{len(row.unfused_conv_bn)} conv/linear -> BN left unfused: "
                            + ", ".join(row.unfused_conv_bn[:5]))
    row.untraced_bns = untraced_batch_norms(fused)
    row.bn_left_inputs = remaining_bn_inputs(fused)
    if report.traced_whole:
        row.status = "ok"
    else:
        row.submodules = dict(report.submodules)
        n = sum(1 for v in report.submodules.values() if v.startswith("rewritten"))
        row.status = "fallback"
        row.detail = f"{n} sub-modules rewritten"
        if undone:
            row.detail += (f", {len(undone)} rewrites undone by the pass (ill-conditioned output: scaling every "
                           f"weight by 1 + 1e-15 changes it by {_fmt_err(row.conditioning)})")
    if not float64:
        row.submodule_checks = float64_submodule_check(model, fused, x1)
        row.max_rel_error_f64 = max([c.error for c in row.submodule_checks.values()], default=0.0)
        for path, c in row.submodule_checks.items():
            if not c.ok:
                row.failures.append(f"sub-module {path}: {c.detail}")
    if speed:
        gc.collect()
        row.speed_batch = 1
        model32, fused32 = model.float(), fused.float()
        del model, fused
        gc.collect()
        row.speed_ratio, row.speed_min, row.speed_max = speed_ratio(model32, fused32, _float(case.inputs(1)),
                                                                    min_run_time)
    if row.failures:
        row.status = "FAIL"


def conditioning(model: nn.Module, args: Tuple[Any, ...], reference: Any) -> float:
    """Relative output change when every floating parameter is scaled by ``1 + 2**-50`` (~1e-15, the rounding noise
    any exact rewrite introduces): about 1e-15 for a model whose outputs are continuous in its values; ``inf`` (or
    large) when discrete post-processing (top-k, NMS over scores tied to 1e-16) is decided by rounding noise, so
    that no exact rewrite can keep the output."""
    nudged = copy.deepcopy(model)
    with torch.no_grad():
        for p in nudged.parameters():
            if p.is_floating_point():
                p.mul_(1 + 2.0 ** -50)
        return max_rel_error(reference, nudged(*args))


@dataclass
class SubmoduleCheck:
    """Float64 check of one rewritten sub-module of a model that cannot run in float64 as a whole."""

    error: float = math.nan  # max relative error, float64, of reparametrize(sub-module in float64) on its inputs
    same_as_shipped: bool = False  # the shipped (float32-pass) sub-module = that float64 rewrite rounded once
    detail: str = ""

    @property
    def ok(self) -> bool:
        return self.error <= RTOL and self.same_as_shipped


def float64_submodule_check(model: nn.Module, fused: nn.Module, args: Tuple[Any, ...]) -> Dict[str, SubmoduleCheck]:
    """For a model that runs only in float32 (RAFT): each sub-module the fallback rewrote is taken from
    ``model``, cast to float64 and reparametrized on the (float64) inputs it received; that rewrite must equal
    the float64 sub-module (relative error <= 1e-9) and, rounded to the model's dtype, be exactly the sub-module
    shipped in ``fused`` (same code, bit-identical parameters)."""
    report = fused.fxfuse_report
    paths = [p for p, why in report.submodules.items() if why.startswith("rewritten")]
    recorded = capture_calls(model, args)  # fxfuse's own fallback capture: inputs of every sub-module call
    records = {p: [(c.args, c.kwargs) for c in recorded.get(id(model.get_submodule(p)), [])] for p in paths}
    out: Dict[str, SubmoduleCheck] = {}
    for p in paths:
        check = out[p] = SubmoduleCheck()
        if not records[p] or any(kw for _, kw in records[p]):
            check.detail = "not called positionally on the example input; not checked"
            continue
        original = copy.deepcopy(model.get_submodule(p)).double()
        calls = [_double(a) for a, _ in records[p]]
        try:
            rewritten = fxfuse.reparametrize(original, tuple(calls[0]))
        except fxfuse.FusionError as exc:
            check.detail = f"float64 reparametrize refused: {exc}"
            continue
        with torch.no_grad():
            check.error = max(max_rel_error(original(*c), rewritten(*c)) for c in calls)
        shipped = fused.get_submodule(p)
        sd_shipped, sd_rewritten = shipped.state_dict(), rewritten.state_dict()
        check.same_as_shipped = (
            getattr(shipped, "code", None) == getattr(rewritten, "code", None)
            and sd_shipped.keys() == sd_rewritten.keys()
            and all(torch.equal(v, sd_rewritten[k].to(v.dtype)) for k, v in sd_shipped.items()))
        if not check.ok:
            check.detail = (f"float64 error {check.error:.3g}, shipped sub-module "
                            f"{'is' if check.same_as_shipped else 'is NOT'} the float64 rewrite rounded once")
    return out


def speed_ratio(original: nn.Module, fused: nn.Module, args: Tuple[Any, ...], min_run_time: float,
                rounds: int = 7, threads: int = 1) -> Tuple[float, float, float]:
    """``original(*args)`` time over ``fused(*args)`` time (>1: fused is faster) with ``torch.utils.benchmark.Timer``:
    the two take turns in ``rounds`` rounds in this process (order alternating), each round gives the ratio of the
    two ``blocked_autorange`` medians measured next to each other; returns (median, min, max) of those paired
    ratios, so that drifting load on a shared machine cancels. One thread by default: on a shared 2-core machine a
    multi-threaded run stalls whenever another process takes a core."""
    from torch.utils.benchmark import Timer

    models = {"original": original, "fused": fused}
    ratios: List[float] = []
    with torch.no_grad():
        for m in models.values():
            m(*args)  # warm-up
        for r in range(rounds):
            order = ("original", "fused") if r % 2 == 0 else ("fused", "original")
            t: Dict[str, float] = {}
            for key in order:
                timer = Timer("m(*args)", globals={"m": models[key], "args": args}, num_threads=threads)
                t[key] = timer.blocked_autorange(min_run_time=min_run_time).median
            ratios.append(t["original"] / t["fused"])
    return statistics.median(ratios), min(ratios), max(ratios)


# ------------------------------------------------------------------------------------------- pass speed
def graph_nodes(model: nn.Module) -> int:
    return sum(1 for n in fx.symbolic_trace(model).graph.nodes if n.op not in ("placeholder", "output", "get_attr"))


def pass_speed(repeats: int = 7, threads: Sequence[int] = (2, 1)) -> Dict[str, Any]:
    """Pass time of ``reparametrize(m, x, verify=False)`` (float32, x 1x3x64x64) for resnet50 and resnet152, per
    torch thread count: median / min / max of ``repeats`` runs after a warm-up, the two models alternating so that
    load on a shared machine hits both alike; plus graph node counts and the machine's load average."""
    models = {name: zoo_case(name).build() for name in ("resnet50", "resnet152")}
    x = torch.randn(1, 3, 64, 64)
    out: Dict[str, Any] = {"nodes": {name: graph_nodes(m) for name, m in models.items()}, "runs": {},
                           "load_before": os.getloadavg()}
    previous = torch.get_num_threads()
    try:
        for n in threads:
            torch.set_num_threads(n)
            times: Dict[str, List[float]] = {name: [] for name in models}
            for name, m in models.items():
                fxfuse.reparametrize(m, x, verify=False)  # warm-up (imports, first-touch allocations)
            for _ in range(repeats):
                for name, m in models.items():
                    gc.collect()
                    t = time.perf_counter()
                    fxfuse.reparametrize(m, x, verify=False)
                    times[name].append(time.perf_counter() - t)
            out["runs"][n] = {name: {"median_s": statistics.median(ts), "min_s": min(ts), "max_s": max(ts)}
                              for name, ts in times.items()}
    finally:
        torch.set_num_threads(previous)
    out["load_after"] = os.getloadavg()
    out["repeats"] = repeats
    out["node_ratio"] = out["nodes"]["resnet152"] / out["nodes"]["resnet50"]
    return out


# ------------------------------------------------------------------------------------------- report
def machine(threads: bool = True) -> str:
    cpu = platform.processor() or "unknown CPU"
    try:
        for line in subprocess.run(["lscpu"], capture_output=True, text=True, check=False).stdout.splitlines():
            if line.startswith("Model name:"):
                cpu = line.split(":", 1)[1].strip()
    except OSError:
        pass
    return (f"{cpu} ({os.cpu_count()} cores){f', {torch.get_num_threads()} torch threads' if threads else ''}; "
            f"torch {torch.__version__}, torchvision {torchvision.__version__}, Python {platform.python_version()}")


def _short(text: str, limit: int = 140) -> str:
    """First sentence-ish of a long message (fx trace errors run to several lines)."""
    text = text.replace("|", "\\|")
    return text if len(text) <= limit else text[:limit].rsplit(" ", 1)[0] + " …"


def _fmt_err(e: float) -> str:
    return "—" if math.isnan(e) else f"{e:.1e}"


def _fmt_err_row(r: "ZooRow") -> str:
    if not r.float32_reason:
        probe = "" if math.isnan(r.conditioning) or r.status == "refused" else \
            f" (weights × (1 + 1e-15): {_fmt_err(r.conditioning)})"
        return _fmt_err(r.max_rel_error) + probe
    return f"{_fmt_err(r.max_rel_error)} (float32); sub-modules in float64: {_fmt_err(r.max_rel_error_f64)}"


def _fmt_speed(r: "ZooRow") -> str:
    if math.isnan(r.speed_ratio):
        return "—"
    return f"{r.speed_ratio:.2f} ({r.speed_min:.2f}–{r.speed_max:.2f})"


def _fmt_ratio(r: float) -> str:
    return "—" if math.isnan(r) else f"{r:.2f}"


def _status(row: ZooRow) -> str:
    if row.status == "fallback":
        return f"fallback ({row.detail})"
    if row.status == "refused":
        probe = ""
        if not math.isnan(row.conditioning):
            probe = (f" (ill-conditioned: scaling every weight by 1 + 1e-15 alters the output by "
                     f"{_fmt_err(row.conditioning)})" if row.conditioning > RTOL
                     else f" (weight-perturbation probe: {_fmt_err(row.conditioning)})")
        return f"refused: {row.detail}{probe}"
    if row.status == "FAIL":
        return "**FAIL**: " + "; ".join(row.failures)
    return row.status


def render(rows: Sequence[ZooRow], header: str, speed_info: Optional[Dict[str, Any]]) -> str:
    lines = [header, ""]
    n_ok = sum(r.status == "ok" for r in rows)
    n_fb = sum(r.status == "fallback" for r in rows)
    n_ref = sum(r.status == "refused" for r in rows)
    n_fail = sum(r.status == "FAIL" for r in rows)
    lines.append(f"**{len(rows)} models: {n_ok} ok (traced whole), {n_fb} fallback (sub-modules rewritten), "
                 f"{n_ref} refused, {n_fail} failed.**")
    lines.append("")
    for title, pick in (
            ("Refused (FusionError)", lambda r: r.status == "refused"),
            ("Failed", lambda r: r.status == "FAIL"),
            ("Fallback (did not trace as a whole)", lambda r: r.status == "fallback"),
            ("BatchNorms left after the pass", lambda r: r.batch_norms[1] > 0),
            ("Checked in float32 (cannot run in float64)", lambda r: bool(r.float32_reason))):
        picked = [r for r in rows if pick(r)]
        if picked:
            lines.append(f"- {title}: " + ", ".join(
                f"{r.name}" + (f" ({r.batch_norms[1]} left)" if "BatchNorms" in title else "") for r in picked))
    lines.append("")
    lines.append("Columns: convs / BNs executed on the example input before → after (counted at run time, "
                 "module and functional calls); fused rewrites (by rule); pass time of `reparametrize` on the "
                 "float64 model with `verify=True`; max relative error (float64, max over both batch sizes of "
                 "`max|Δ| / max|ref|` per output); CPU speed ratio original / fused in float32 at batch 1 "
                 "(>1: fused is faster), median (min–max) of paired rounds; status.")
    lines.append("")
    lines.append("| model | kind | input | convs | BNs | rewrites | pass s | max rel err | speed ×"
                 " | status |")
    lines.append("|---|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        rules = ", ".join(f"{k} {v}" for k, v in sorted(r.rewrites_by_rule.items()))
        lines.append(f"| {r.name} | {r.kind} | {r.input} | {r.convs[0]} → {r.convs[1]} | "
                     f"{r.batch_norms[0]} → {r.batch_norms[1]} | {r.rewrites}{f' ({rules})' if rules else ''} | "
                     f"{r.pass_s:.2f} | {_fmt_err_row(r)} | {_fmt_speed(r)} | {_status(r)} |")
    lines.append("")
    remaining = [r for r in rows if r.batch_norms[1] > 0 or r.status in ("refused", "fallback", "FAIL")
                 or r.untraced_bns or r.float32_reason]
    if remaining:
        lines.append("## Models with BatchNorms left, fallbacks and refusals")
        lines.append("")
        for r in remaining:
            lines.append(f"### {r.name}: {_status(r)}")
            lines.append("")
            if r.float32_reason:
                lines.append(f"- runs in float32 only ({r.float32_reason}): the whole model is compared in "
                             f"float32 (relative error {_fmt_err(r.max_rel_error)}, limit {FLOAT32_RTOL:g}); each "
                             "rewritten sub-module is reparametrized again in float64 on the inputs it received and "
                             "must equal the float64 original (≤ 1e-9) and, rounded once, be the shipped one "
                             "(same code, bit-identical parameters):")
                for path, c in r.submodule_checks.items():
                    lines.append(f"  - `{path}`: float64 error {_fmt_err(c.error)}, shipped = float64 rewrite "
                                 f"rounded: {'yes' if c.same_as_shipped else 'NO'}{'; ' + c.detail if c.detail else ''}")
            if r.batch_norms[1]:
                fed = ", ".join(f"{k}: {v}" for k, v in r.bn_left_inputs.items())
                lines.append(f"- {r.batch_norms[1]} BatchNorm call(s) remain at run time"
                             + (f"; in the rewritten graphs they read from {fed} (no conv/linear producer with a "
                                "single user: cannot fold)" if fed else "") + ".")
            if r.unfused_conv_bn:
                lines.append(f"- conv → BN pairs left in parts the pass did not rewrite: {len(r.unfused_conv_bn)} "
                             f"({', '.join(r.unfused_conv_bn[:3])}{', …' if len(r.unfused_conv_bn) > 3 else ''}).")
            if r.untraced_bns:
                lines.append(f"- BatchNorm modules run from untraced Python code (not in any fx graph): "
                             f"{len(r.untraced_bns)} ({', '.join(r.untraced_bns[:6])}"
                             f"{', …' if len(r.untraced_bns) > 6 else ''}).")
            for u in r.unfused[:8]:
                lines.append(f"- left unfused: {u}")
            if len(r.unfused) > 8:
                lines.append(f"- … {len(r.unfused) - 8} more unfused candidates")
            for path, why in r.submodules.items():
                lines.append(f"- `{path}`: {_short(why)}")
            lines.append("")
    if speed_info:
        lines.append(render_pass_speed(speed_info))
    return "\n".join(lines) + "\n"


def render_pass_speed(info: Dict[str, Any]) -> str:
    nodes, limit = info["nodes"], 1.2 * info["node_ratio"]
    lines = [
        "## Pass speed on a big graph",
        "",
        f"`reparametrize(model, x, verify=False)`, float32 model, x = 1x3x64x64; median (min–max) of "
        f"{info['repeats']} runs after one warm-up, resnet50 and resnet152 alternating. Command "
        f"`{info['command']}`; {info['machine']}; {info['date']}; load average "
        f"{info['load_before'][0]:.1f} before, {info['load_after'][0]:.1f} after (the machine is shared).",
        "",
        "| torch threads | resnet50 pass s | resnet152 pass s | time ratio 152/50 | node ratio 152/50 "
        "| linear (ratio ≤ 1.2 × node ratio) | resnet152 ≤ 1.0 s |",
        "|---|---|---|---|---|---|---|",
    ]
    for n, run in info["runs"].items():
        r50, r152 = run["resnet50"], run["resnet152"]
        ratio = r152["median_s"] / r50["median_s"]
        lines.append(
            f"| {n} | {r50['median_s']:.3f} ({r50['min_s']:.3f}–{r50['max_s']:.3f}) | {r152['median_s']:.3f} "
            f"({r152['min_s']:.3f}–{r152['max_s']:.3f}) | {ratio:.2f} | {info['node_ratio']:.2f} "
            f"({nodes['resnet152']}/{nodes['resnet50']}) | {'yes' if ratio <= limit else 'NO'} ({limit:.2f}) | "
            f"{'yes' if r152['median_s'] <= 1.0 else 'NO'} |")
    lines.append("")
    return "\n".join(lines)


def main(argv: Optional[Sequence[str]] = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--models", default="", help="comma-separated model names (default: every list_models())")
    p.add_argument("--out", default=str(ROOT / "docs" / "zoo.md"), help="markdown report to write")
    p.add_argument("--json", default="", help="also write the rows as JSON here")
    p.add_argument("--no-speed", action="store_true", help="skip the float32 speed comparison")
    p.add_argument("--min-run-time", type=float, default=0.3, help="Timer.blocked_autorange min_run_time (s)")
    p.add_argument("--pass-speed", action="store_true", help="only measure the resnet50/152 pass speed")
    p.add_argument("--no-pass-speed", action="store_true", help="skip the resnet50/152 pass-speed section")
    p.add_argument("--threads", type=int, default=1, help="torch threads (1: robust on a shared machine)")
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    command = "python benchmarks/zoo.py " + " ".join(argv if argv is not None else sys.argv[1:])
    date = _dt.datetime.now(_dt.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    speed_info = None
    if not args.no_pass_speed:
        speed_info = pass_speed()
        speed_info.update(command=command.strip(), machine=machine(threads=False), date=date)
        print(render_pass_speed(speed_info), flush=True)
        if args.pass_speed:
            return 0
    names = [n.strip() for n in args.models.split(",") if n.strip()] or all_models()
    rows = []
    for i, name in enumerate(names):
        row = check_model(name, speed=not args.no_speed, min_run_time=args.min_run_time)
        rows.append(row)
        print(f"[{i + 1}/{len(names)}] {name}: {_status(row)} | convs {row.convs} bns {row.batch_norms} "
              f"rewrites {row.rewrites} pass {row.pass_s:.2f}s err {_fmt_err_row(row)} "
              f"speed {_fmt_ratio(row.speed_ratio)} ({row.seconds:.0f}s)", flush=True)
        if row.status == "FAIL" and row.detail:
            print(row.detail, flush=True)
    header = "\n".join([
        "# fxfuse on the torchvision model zoo",
        "",
        f"Generated by `{command.strip()}` on {machine()}, {date}.",
        "",
        "Every model of `torchvision.models.list_models()` is built with `weights=None` (and "
        "`weights_backbone=None`; `quantize=False` for the `quantized_*` entries), its BatchNorm statistics "
        "randomized (`fxfuse.models.randomize_batchnorm_`, seed 0), in eval mode, cast to float64, and passed to "
        "`fxfuse.reparametrize(model, x)` (`verify=True`). Inputs are small (input column; detection takes a list "
        "of `[3, H, W]` images, RAFT a pair of frames); the second check input has another batch size. "
        "A row passes when the outputs are equal (relative error ≤ 1e-9 of max-abs per output, on both inputs), "
        "`verify=True` accepted the result, no BatchNorm is left whose input is a conv/linear with no other real "
        "user (in every fx graph of the result, and in the largest traceable ancestor of any BatchNorm the pass "
        "left as Python), and the input model's `state_dict` is bit-identical afterwards (SHA-256 per entry). "
        "RAFT cannot run in float64 (torchvision builds its coordinate grid in float32), so it is checked in "
        "float32 and its rewritten sub-modules in float64 (see below). Speed: float32, batch 1, one torch thread "
        "(robust on this shared 2-core machine), `torch.utils.benchmark.Timer.blocked_autorange(min_run_time="
        f"{args.min_run_time})`, original and fused alternating over 7 rounds in one process; the column gives "
        "the median (min–max) of the 7 paired ratios original / fused (>1: fused is faster).",
    ])
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(render(rows, header, speed_info))
    if args.json:
        Path(args.json).write_text(json.dumps([asdict(r) for r in rows], indent=1, default=str))
    print(f"wrote {args.out}; {sum(not r.passed for r in rows)} failure(s)")
    return 1 if any(not r.passed for r in rows) else 0


if __name__ == "__main__":
    raise SystemExit(main())
