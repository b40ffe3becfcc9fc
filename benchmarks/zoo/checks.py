"""Checking one zoo model: outputs equal (:func:`fxfuse.verify.compare`), convs / BatchNorms executed before and
after (classified by :mod:`fxfuse.ir.ops`), no foldable conv → BN left, input model untouched; and, where the pass
refuses or cannot run in float64, why (:func:`conditioning`, :func:`float64_submodule_check`)."""

from __future__ import annotations

import copy
import gc
import hashlib
import math
import re
import time
import traceback
from dataclasses import dataclass, field
from typing import Any, Dict, Iterator, List, Set, Tuple, cast

import torch
from torch import Tensor, fx, nn

import fxfuse
from fxfuse.capture import capture_calls
from fxfuse.capture import export as fx_export
from fxfuse.ir.ops import function_kind, module_kind, op_kind, real_users
from fxfuse.report import FusionReport
from fxfuse.tools.executed_ops import run_counting
from fxfuse.verified import CONDITIONED_FACTOR, CONDITIONED_RTOL_CAP
from fxfuse.verify import compare

from ..common import ROOT
from .cases import ZooCase, cast_floats, zoo_case
from .speed import speed_ratio

RTOL = 1e-9
FLOAT32_RTOL = 1e-4  # whole-model check of a model that cannot run in float64 (its rewrites are checked in float64)


# ------------------------------------------------------------------------------------------- op counts
def run_counted(model: nn.Module, args: Tuple[Any, ...]) -> Tuple[Any, int, int]:
    """``(model(*args), convs, batch_norms)``: the output and the convs / batch norms that call executed (module or
    functional, traced or not), counted by :func:`fxfuse.tools.executed_ops.run_counting`."""
    out, counts = run_counting(model, *args, key=function_kind)
    return out, counts["conv"], counts["batch_norm"]


# ----------------------------------------------------------------------------------------- structure
def _bn_and_input(node: fx.Node, modules: Dict[str, nn.Module]) -> fx.Node | None:
    """The input node of a BatchNorm node, else ``None``."""
    if op_kind(node, modules) != "batch_norm" or not node.args or not isinstance(node.args[0], fx.Node):
        return None
    return node.args[0]


def _conv_bn_in_graph(gm: fx.GraphModule, path: str) -> List[str]:
    modules = dict(gm.named_modules())
    bad = []
    for node in gm.graph.nodes:
        src = _bn_and_input(node, modules)
        if src is not None and op_kind(src, modules) in ("conv", "linear") and len(real_users(src)) == 1:
            bad.append(f"{path or '<root>'}:{src.name}->{node.name}")
    return bad


def unfused_conv_bn(result: nn.Module) -> List[str]:
    """BatchNorms whose input is a conv/linear node with a single real user (metadata reads,
    :func:`fxfuse.ir.ops.is_metadata_user`, do not count): each is a fold the pass should have made. Checked in
    every fx graph inside ``result`` and, for BatchNorm modules that no graph calls (parts the pass left as
    Python), in the largest ancestor of each that ``symbolic_trace`` can trace (marked ``(untraced)``). Empty when
    all are done."""
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
                except Exception:  # not traceable: try the next smaller ancestor
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
            src = _bn_and_input(node, modules)
            if src is None:
                continue
            if src.op == "call_module":
                what = type(modules[str(src.target)]).__name__
            elif src.op in ("call_function", "call_method"):
                target = src.target
                what = target if isinstance(target, str) else \
                    f"{getattr(target, '__module__', '') or ''}.{getattr(target, '__name__', str(target))}".lstrip(".")
                what = what.replace("torch.nn.functional.", "F.").replace("_operator.", "operator.")
            else:
                what = src.op
            if op_kind(src, modules) in ("conv", "linear"):
                what += f" with {len(real_users(src))} users"
            counts[what] = counts.get(what, 0) + 1
    return dict(sorted(counts.items(), key=lambda kv: -kv[1]))


def untraced_batch_norms(result: nn.Module) -> List[str]:
    """BatchNorm modules of ``result`` that no fx graph calls (they run from untraced Python code)."""
    in_graph: Set[int] = set()
    for gm in result.modules():
        if isinstance(gm, fx.GraphModule):
            mods = dict(gm.named_modules())
            in_graph.update(id(mods[str(n.target)]) for n in gm.graph.nodes
                            if n.op == "call_module" and n.target in mods)
    return [name for name, m in result.named_modules() if module_kind(m) == "batch_norm" and id(m) not in in_graph]


def state_fingerprint(model: nn.Module) -> Dict[str, Tuple[str, Tuple[int, ...], str]]:
    """``state_dict`` key → (dtype, shape, SHA-256 of the raw bytes): equal fingerprints = bit-identical state."""
    out = {}
    for k, t in model.state_dict(keep_vars=True).items():
        t = t.detach()
        raw = t.cpu().contiguous().reshape(-1).view(torch.uint8) if t.numel() else t.new_empty(0, dtype=torch.uint8)
        out[k] = (str(t.dtype), tuple(t.shape), hashlib.sha256(raw.numpy().data).hexdigest())
    return out


# ------------------------------------------------------------------------------------------- numbers
def _tensors(obj: Any) -> Iterator[Tensor]:
    if isinstance(obj, Tensor):
        yield obj
    elif isinstance(obj, (list, tuple)):
        for v in obj:
            yield from _tensors(v)
    elif isinstance(obj, dict):
        for v in obj.values():
            yield from _tensors(v)


def max_rel_error(reference: Any, actual: Any) -> float:
    """Worst per-output ``max|a - r| / max|r|`` (:func:`fxfuse.verify.compare`); ``inf`` when the structure, a
    shape, an integer output or an output dtype differs."""
    if [t.dtype for t in _tensors(reference)] != [t.dtype for t in _tensors(actual)]:
        return math.inf
    return compare(reference, actual).max_rel


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


def conditioned_tolerance(eta: float) -> float:
    """The float64 equality bound for a model whose output moves by ``eta`` under rounding-sized weight noise
    (:func:`conditioning`): 1e-9, or ``CONDITIONED_FACTOR · eta`` up to ``CONDITIONED_RTOL_CAP`` — the resolution
    ``reparametrize`` itself checks such a model at (fxfuse.verified, docs/dtypes.md). An exact rewrite's weights
    differ from the original's by rounding, so its output may differ by about ``eta`` on any input, also on the
    second one the pass never saw (maskrcnn_resnet50_fpn_v2: eta 7.3e-10, 1.3e-9 on its second input)."""
    if math.isnan(eta) or eta * CONDITIONED_FACTOR <= RTOL:
        return RTOL
    return min(CONDITIONED_FACTOR * eta, CONDITIONED_RTOL_CAP)


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
    report = cast(FusionReport, fused.fxfuse_report)
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
        calls = [cast_floats(a, torch.float64) for a, _ in records[p]]
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


# ------------------------------------------------------------------------------------------- capture
DATA_DEPENDENT = ("torch.export's limit: a Python branch on a value computed from the input's data (e.g. the "
                  "number of boxes left after score filtering) cannot be captured as one graph")
IN_FXFUSE = ("raised inside fxfuse, not by torch.export: torch.export captured the model and fxfuse's rewrite of the "
             "captured ATen graph failed (an fxfuse bug)")
# Frames that are not "where it stopped": torch itself, the harnesses, and fxfuse's calls into torch.export.
_NOT_THE_SITE = ("/torch/", "/benchmarks/zoo/", "/benchmarks/zoo_timm/", "/contextlib.py", "fxfuse/api.py",
                 "fxfuse/capture/export.py")


def _site(frame: traceback.FrameSummary) -> str:
    path = frame.filename.replace("\\", "/")
    for marker in ("site-packages/", "/work/main/", f"{ROOT}/"):
        if marker in path:
            path = path.split(marker, 1)[1]
    code = f": `{frame.line.strip()}`" if frame.line else ""
    return f"{path}:{frame.lineno} in {frame.name}{code}"


def _chain(exc: BaseException) -> List[BaseException]:
    """``exc`` and the exceptions it was raised from, outermost first (``__cause__``, else an unsuppressed
    ``__context__``: what Python's own traceback display follows)."""
    chain = [exc]
    while len(chain) < 8:
        e = chain[-1]
        nxt = e.__cause__ if e.__cause__ is not None else (None if e.__suppress_context__ else e.__context__)
        if nxt is None or nxt in chain:
            break
        chain.append(nxt)
    return chain


def export_failure(exc: BaseException) -> str:
    """``"Type: first line [at file:line in function: `code`]"`` for an exception out of an export capture: the
    innermost exception of the chain, and where it stopped: the deepest traceback frame outside torch, this harness
    and fxfuse's calls into torch.export (a line of the model's code, or of fxfuse when the failure is fxfuse's);
    else the ``Caused by: (...)`` location torch puts in data-dependent errors."""
    chain = _chain(exc)
    root = chain[-1]
    text = f"{type(root).__name__}: {fx_export._first_line(root, 200)}"
    for e in reversed(chain):
        frames = [f for f in traceback.extract_tb(e.__traceback__)
                  if not any(part in f.filename.replace("\\", "/") for part in _NOT_THE_SITE)]
        if frames:
            return f"{text} [at {_site(frames[-1])}]"
    caused = re.search(r"Caused by: \(([^)]*)\)", "\n".join(str(e) for e in chain))
    return f"{text} [at {caused.group(1)}]" if caused else text


def export_failure_kind(failure: str) -> str:
    """Whose limit an export failure (:func:`export_failure`) is, when its text says: torch.export's
    (:data:`DATA_DEPENDENT`) or fxfuse's own (:data:`IN_FXFUSE`); ``""`` otherwise."""
    if "GuardOnDataDependentSymNode" in failure or "data-dependent" in failure or "data dependent" in failure:
        return DATA_DEPENDENT
    if "[at fxfuse/" in failure:
        return IN_FXFUSE
    return ""


def export_probe(model: nn.Module, args: Tuple[Any, ...]) -> str:
    """Why ``reparametrize(model, args, capture="export")`` fails (:func:`export_failure` of its exception chain:
    torch.export's own error and the line of the model's code where it stopped, or the fxfuse error when the
    capture worked and the rewrite failed); ``""`` when it succeeds. Run by the harness for models the pass
    rewrote per sub-module, whose ``report.capture_reason`` does not carry that error. The model is not modified
    (``reparametrize`` works on a copy)."""
    try:
        fxfuse.reparametrize(model, args, capture="export")
    except Exception as exc:  # any failure is the answer
        return export_failure(exc)
    return ""


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
    submodule_checks: Dict[str, SubmoduleCheck] = field(default_factory=dict)
    max_rel_error_f64: float = math.nan  # float32-only models: worst float64 error over rewritten sub-modules
    capture: str = ""  # report.capture: symbolic | export | submodules ("" when refused / crashed)
    capture_reason: str = ""  # report.capture_reason
    export_error: str = ""  # submodules: why torch.export failed (export_probe), when capture_reason does not say

    @property
    def passed(self) -> bool:
        return not self.failures


def check_model(name: str, *, speed: bool = True, min_run_time: float = 0.3) -> ZooRow:
    """Build, reparametrize and check one zoo model (see :mod:`benchmarks.zoo`); never raises for a model failure,
    which is recorded in ``row.failures``."""
    start = time.perf_counter()
    case = zoo_case(name)
    row = ZooRow(name, case.kind, case.input_desc())
    try:
        _check(case, row, speed, min_run_time)
    except Exception as exc:  # a crash of the harness or the pass is a failure of this model
        row.status = "FAIL"
        row.failures.append(f"{type(exc).__name__}: {exc}".splitlines()[0][:300])
        row.detail = traceback.format_exc(limit=-3)
    row.seconds = time.perf_counter() - start
    gc.collect()
    return row


def fmt_err(e: float) -> str:
    return "—" if math.isnan(e) else f"{e:.1e}"


def _check(case: ZooCase, row: ZooRow, speed: bool, min_run_time: float) -> None:
    model = case.build().double()
    x1, x2 = (cast_floats(case.inputs(b), torch.float64) for b in case.batches)
    try:
        ref1, convs, bns = run_counted(model, x1)
    except Exception as exc:  # e.g. RAFT builds its coordinate grid in float32
        row.float32_reason = f"{type(exc).__name__}: {exc}".splitlines()[0][:200]
        model.float()
        x1, x2 = (cast_floats(case.inputs(b), torch.float32) for b in case.batches)
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
    report = cast(FusionReport, fused.fxfuse_report)
    row.capture, row.capture_reason = report.capture, report.capture_reason

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
        ran2 = True
        try:
            out2 = fused(*x2)
        except Exception as exc:  # e.g. a graph exported with static shapes refuses another batch size
            row.failures.append(f"the fused model does not run on the second input (batch {case.batches[1]}), "
                                f"which the original runs: {type(exc).__name__}: {fx_export._first_line(exc, 200)}")
            err2, ran2 = math.inf, False
        else:
            err2 = max_rel_error(ref2, out2)
            del out2
        del ref2
    row.max_rel_error = max(err1, err2)
    if row.max_rel_error > 1e-12 and float64 and math.isnan(row.conditioning) and ran2:
        row.conditioning = conditioning(model, x1, run_counted(model, x1)[0])  # model's own noise amplification?
    if float64:
        tolerance = conditioned_tolerance(row.conditioning)
    if not (err1 <= tolerance and (err2 <= tolerance or not ran2)):  # (not ran2: already a failure)
        row.failures.append(f"outputs differ: max relative error {err1:.3g} (batch {case.batches[0]}), "
                            f"{err2:.3g} (batch {case.batches[1]})")
    row.convs, row.batch_norms = (row.convs[0], convs), (row.batch_norms[0], bns)
    row.rewrites = report.total_fused
    row.rewrites_by_rule = dict(report.fused)
    row.unfused = sorted({f"[{u.rule}] {u.reason}" for u in report.unfused})
    row.unfused_conv_bn = unfused_conv_bn(fused)
    undone = [p for p, why in report.submodules.items() if why.startswith("rewrite undone")]
    if undone and float64 and math.isnan(row.conditioning):  # the pass undid sub-module rewrites: why?
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
                           f"weight by 1 + 1e-15 changes it by {fmt_err(row.conditioning)})")
    if row.capture == "submodules" and "torch.export failed (" not in row.capture_reason:
        row.export_error = export_probe(model, x1)
    if not float64 and not report.traced_whole:
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
        row.speed_ratio, row.speed_min, row.speed_max = speed_ratio(
            model32, fused32, cast_floats(case.inputs(1), torch.float32), min_run_time)
    if row.failures:
        row.status = "FAIL"
