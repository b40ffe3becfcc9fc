"""``capture="auto"``: which capture's result ``reparametrize`` returns (docs/patterns.md, "capture="auto"").

Candidates, in order: symbolic tracing, ``torch.export``, the per-sub-module fallback. A capture that raises, or
whose rewrite cannot be verified, is dropped with a :class:`~fxfuse.reasons.Reason` and the next one is tried, so
``auto`` raises only when none gives a verified model. Among verified candidates the one executing the fewest
convs + BatchNorms + pools on the example input is kept (symbolic, then export, on a tie); a program pinned to the
example's batch size is kept only when no candidate keeps every batch size. Export is tried only where it could
do better (symbolic tracing failed, or its result leaves work an ATen graph may explain), the fallback only where
whole-model tracing failed and export did not leave a fully fused graph. ``report.captures`` lists every capture
considered, with its outcome."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, List, Optional, Tuple

from torch import fx, nn

from ..errors import FusionError, IllConditioned, UnfaithfulTrace
from ..ir.ops import module_kind
from ..ir.read import Reader
from ..reasons import Reason
from ..report import CaptureAttempt, FusionReport
from .export import ExportCapture, failure_text

CAPTURES = ("auto", "symbolic", "export")
ORDER = ("symbolic", "export", "submodules")

Result = Tuple[nn.Module, FusionReport]


@dataclass
class Captures:
    """How each capture is tried, for :func:`choose` (the caller binds the model, its inputs and the rewrite)."""

    symbolic: Callable[[], Result]
    export: Callable[[], Tuple[nn.Module, FusionReport, ExportCapture]]
    submodules: Callable[[Exception], Result]
    executed: Callable[[nn.Module], int]  # convs + BatchNorms + pools one call on the example input executes


@dataclass
class _Candidate:
    capture: str
    module: nn.Module
    report: FusionReport
    how: str
    pinned: bool = False
    executed: Optional[int] = None


def _code(exc: BaseException, capture: str) -> Reason:
    if isinstance(exc, UnfaithfulTrace):
        return Reason.UNFAITHFUL
    if isinstance(exc, IllConditioned):
        return Reason.ILL_CONDITIONED
    if isinstance(exc, FusionError):
        return Reason.REWRITE_FAILED
    return Reason.TRACE_FAILED if capture == "symbolic" else Reason.EXPORT_FAILED


def _why(exc: BaseException) -> str:
    return failure_text(exc, 200)


def choose(capture: str, fallback: bool, dynamic_given: bool, tries: Captures) -> Result:
    """The kept result and its report (``report.capture``, ``capture_reason``, ``captures`` filled)."""
    if capture not in CAPTURES:
        raise ValueError(f"capture must be one of {CAPTURES}, got {capture!r}")
    attempts: List[CaptureAttempt] = []
    found: List[_Candidate] = []
    symbolic_error: Optional[Exception] = None

    if capture in ("auto", "symbolic"):
        try:
            module, report = tries.symbolic()
            found.append(_Candidate("symbolic", module, report, "traced whole by torch.fx"))
        except Exception as exc:  # any tracing or rewrite failure: the other captures are tried
            symbolic_error = exc
            attempts.append(CaptureAttempt("symbolic", False, _code(exc, "symbolic"), None, _why(exc)))
    else:
        attempts.append(CaptureAttempt("symbolic", False, Reason.NOT_REQUESTED, None, "capture=\"export\""))

    improvable = bool(found) and export_may_improve(found[0].module, found[0].report)
    if capture == "export" or (capture == "auto" and (not found or improvable)):
        try:
            module, report, captured = tries.export()
            how = f"torch.export in {captured.seconds:.2f} s, {captured.dynamic}"
            found.append(_Candidate("export", module, report, how, captured.batch_pinned and not dynamic_given))
        except Exception as exc:
            if capture == "export":
                if isinstance(exc, FusionError) and not isinstance(exc, UnfaithfulTrace):
                    raise  # the graph was captured; the rewrite could not be verified
                raise FusionError(f"torch.export could not capture an equal graph of the model, or the rewrite of "
                                  f"the captured graph failed ({type(exc).__name__}: {_why(exc)})") from exc
            attempts.append(CaptureAttempt("export", False, _code(exc, "export"), None,
                                           f"torch.export failed ({_why(exc)})"))
    elif capture == "auto":
        attempts.append(CaptureAttempt("export", False, Reason.NOT_TRIED, None,
                                       "the symbolic result leaves nothing an ATen graph could fuse"))

    whole_done = any(not c.pinned and c.report.after.batch_norms == 0 and not c.report.unfused for c in found)
    if symbolic_error is not None and capture != "export":
        if not fallback:
            if not found:
                if isinstance(symbolic_error, FusionError):  # traced, but no verified rewrite / unfaithful
                    raise symbolic_error
                raise FusionError(f"model does not trace with torch.fx ({type(symbolic_error).__name__}: "
                                  f"{symbolic_error}); pass fallback=True to rewrite its traceable sub-modules"
                                  ) from symbolic_error
        elif whole_done:
            attempts.append(CaptureAttempt("submodules", False, Reason.NOT_TRIED, None,
                                           "a whole-model capture left nothing unfused"))
        else:
            try:
                module, report = tries.submodules(symbolic_error)
                found.append(_Candidate("submodules", module, report, "the model does not trace whole with torch.fx"))
            except FusionError as exc:
                attempts.append(CaptureAttempt("submodules", False, _code(exc, "submodules"), None, _why(exc)))
    if not found:
        raise FusionError("no capture of the model gives a verified model: "
                          + "; ".join(f"{a.capture} [{a.code}]: {a.detail}" for a in attempts))

    free = [c for c in found if not c.pinned]
    pool = free or found
    if len(found) > 1:
        for c in found:
            c.executed = tries.executed(c.module)
    kept = min(pool, key=lambda c: (c.executed or 0, ORDER.index(c.capture)))
    for c in found:
        if c is kept:
            continue
        if c.pinned and free:
            code, detail = Reason.BATCH_PINNED, (f"it captured {c.how.split(', ', 1)[-1]} — the result would run at "
                                                 "the example's batch size only (capture=\"export\" returns it)")
        else:
            code, detail = Reason.EXECUTES_MORE, (f"executes {c.executed} convs + BatchNorms + pools, the kept "
                                                  f"{kept.capture} capture {kept.executed}")
        attempts.append(CaptureAttempt(c.capture, False, code, c.executed, detail))
    attempts.append(CaptureAttempt(kept.capture, True, None, kept.executed, kept.how))
    attempts.sort(key=lambda a: ORDER.index(a.capture))

    report = kept.report
    report.capture = kept.capture
    notes = [f"{a.capture} not used [{a.code}]: {a.detail}" for a in attempts
             if not a.kept and a.code not in (Reason.NOT_TRIED, Reason.NOT_REQUESTED)]
    head = f"requested; {kept.how}" if capture == "export" else kept.how
    report.capture_reason = "; ".join([head, *notes])
    report.captures = attempts
    return kept.module, report


def export_may_improve(module: nn.Module, report: FusionReport) -> bool:
    """Whether an ATen graph could fuse more than the symbolic result did. Only where symbolic capture is the limit:
    a module the symbolic graph calls as an opaque leaf while it holds parameters (a forward hook, a ``torch.nn``
    leaf export inlines) when BatchNorms are left, or a skip because a weight / statistic was not a constant in
    the symbolic graph. BatchNorms left for algebraic reasons (batch statistics, a padded conv after a shift)
    stay in any capture, so they do not cost an export."""
    if not isinstance(module, fx.GraphModule):
        return True
    if any(u.code is Reason.NOT_CONSTANT for u in report.unfused):
        return True
    if report.after.batch_norms == 0 and not report.unfused:
        return False
    reader = Reader(module)
    return any(n.op == "call_module" and reader.module(n) is None and _opaque_layer(reader.modules[str(n.target)])
               for n in module.graph.nodes if str(n.target) in reader.modules)


def _opaque_layer(mod: nn.Module) -> bool:
    """A conv / BN / linear-kind leaf (:func:`fxfuse.ir.ops.module_kind`) the symbolic graph cannot read — a
    subclass overriding ``forward``, or hooked — or any hooked leaf with parameters: export runs its Python and may
    expose a fusable layer. Other ``torch.nn`` leaves (LayerNorm, GroupNorm, attention) stay unfusable in any
    capture, so they cost no export."""
    hooked = bool(mod._forward_hooks or mod._forward_pre_hooks)
    return module_kind(mod) is not None or (hooked and any(True for _ in mod.parameters()))
