"""The verified rewrite of one captured graph (docs/dtypes.md):

    lens (float64 view) → rules to a fixed point → float64 check → the returned module in the model's dtypes
    (:meth:`fxfuse._dtypes.Lens.back`) → artifact check (:func:`fxfuse.artifact.inspect`)

A rewrite that fails either check is found by bisection over the applied rewrites and undone (a
:class:`~fxfuse.report.Rollback` with its :class:`~fxfuse.reasons.Reason`); the graph is rewritten again without
it. :class:`~fxfuse.errors.UnfaithfulTrace` when the captured graph itself does not reproduce the model."""

from __future__ import annotations

import itertools
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Dict, List, Optional, Sequence, Set, Tuple

import torch
from torch import fx

from . import _dtypes
from .artifact import Verdict, inspect, writes_state
from .capture import Call, propagate_shapes
from .capture.state import attributes_preserved
from .errors import FusionError, IllConditioned, UnfaithfulTrace
from .ir.graphs import fresh_copy
from .reasons import Reason
from .report import FusionReport, GraphStats, Rollback
from .rewrite import RewriteContext, Rule, run_rules
from .rewrite.driver import PassResult
from .verify import Comparison, compare, default_rtol, first_bad_rewrite

# A model whose float64 output moves by η under 1e-15 relative weight noise (the size of the rounding every exact
# fold makes) cannot be checked at 1e-9 when η is near or above that: the check is then run at
# CONDITIONED_FACTOR·η, as long as that stays at or below CONDITIONED_RTOL_CAP (2000x tighter than float32's own
# check, far below what a wrong fold changes); above it, or when the user set ``rtol``, the capture is refused
# with the figure (docs/dtypes.md, "Ill-conditioned models").
CONDITIONED_FACTOR = 10.0
CONDITIONED_RTOL_CAP = 1e-6


@dataclass
class Options:
    rules: List[Rule]
    verify: bool
    rtol: Optional[float]
    atol: float
    max_rollbacks: int


@dataclass
class Example:
    """The calls a graph is checked on, in the model's own dtypes: ``calls[i].output`` is what the original
    computed (``None`` where it does not run in its dtype: ``error``). ``float64_outputs`` (optional, lazy): the
    original run in float64, a second witness where the own-dtype output is decided by rounding."""

    calls: Sequence[Call]
    error: Optional[Exception] = None
    float64_outputs: Optional[Callable[[], Optional[List[Any]]]] = None


@dataclass
class _Judged:
    ok: bool
    code: Optional[Reason] = None
    detail: str = ""
    cmp: Comparison = field(default_factory=lambda: Comparison(True, 0.0, 0.0, 0.0))
    returned: Optional[_dtypes.Returned] = None
    verdict: Optional[Verdict] = None


def _run(gm: fx.GraphModule, args: Any, kwargs: Any) -> Any:
    with torch.no_grad(), attributes_preserved(gm):
        return gm(*args, **kwargs)


def weight_noise(gm: fx.GraphModule, args: Any, kwargs: Any, ref: Any, rtol: float, atol: float) -> Comparison:
    """``gm`` run with every floating parameter and buffer multiplied by ``1 + 1e-15·z`` (``z`` standard normal,
    fixed seed) against ``ref``: how far rounding-sized changes of the weights move the output. Where that fails the
    check itself, the check cannot tell an exact rewrite (whose folded weights differ from the original's by such
    rounding) from a wrong one."""
    gen = torch.Generator().manual_seed(0)
    noisy = {name: t * (1 + 1e-15 * torch.randn(t.shape, generator=gen, dtype=t.dtype)) if t.is_floating_point()
             else t for name, t in [*gm.named_parameters(), *gm.named_buffers()]}
    with torch.no_grad(), attributes_preserved(gm):
        out = torch.func.functional_call(gm, noisy, tuple(args), dict(kwargs or {}))
    return compare(ref, out, rtol, atol)


def _agrees(references: Sequence[Any], outputs: Sequence[Any], rtol: Optional[float]) -> bool:
    """Every output matches its reference (a missing reference matches nothing)."""
    return len(references) == len(outputs) and \
        all(r is not None and compare(r, o, rtol).ok for r, o in zip(references, outputs))


def _lens(gm: fx.GraphModule, example: Example, opts: Options, model_state: Set[int], report: FusionReport
          ) -> Tuple[_dtypes.Lens, List[Any]]:
    """The lens the rules rewrite, and its outputs on the example (the references of the float64 check).

    float64 where the lens runs and agrees with the original — in its own dtype at that dtype's tolerance, or with
    the original run in float64 at 1e-9 — else an own-dtype copy, which must agree with the original at its
    dtype's tolerance or the capture is unfaithful."""
    calls = example.calls
    own = [c.output for c in calls]
    if not opts.verify:  # nothing is checked in float64: fold from the model's own tensors (docs/dtypes.md)
        return _dtypes.Lens.of(gm, False, model_state, share_parameters=True), [None] * len(calls)
    try:
        lens = _dtypes.Lens.of(gm, True, model_state)
        refs = [_run(lens.gm, lens.inputs(c.args), lens.inputs(c.kwargs)) for c in calls]
        if _agrees(own, refs, None):
            return lens, refs
        witness = example.float64_outputs() if example.float64_outputs is not None else None
        if witness and _agrees(witness, refs, 1e-9):
            return lens, refs
        report.warnings.append("the float64 view of the captured graph does not reproduce the model in its dtype; "
                               "verified in the model's dtype")
    except Exception as exc:  # no float64 kernel, a dtype the graph cannot retarget, …
        report.warnings.append(f"float64 view impossible ({type(exc).__name__}: {str(exc)[:160]}); verified in the "
                               "model's dtype with a looser tolerance")
    lens = _dtypes.Lens.of(gm, False, model_state)
    try:
        refs = [_run(lens.gm, c.args, c.kwargs) for c in calls]
    except Exception as exc:
        raise UnfaithfulTrace(f"the captured graph does not run ({type(exc).__name__}: "
                              f"{str(exc).splitlines()[0][:200] if str(exc) else ''})") from exc
    if example.error is None and not _agrees(own, refs, None):
        bad = next(compare(r, o) for r, o in zip(own, refs) if not compare(r, o).ok)
        raise UnfaithfulTrace(f"the captured graph differs from the model ({bad.detail}); torch.fx did not capture "
                              "its semantics (e.g. `a += b` on an aliased tensor traces as an out-of-place add)")
    return lens, refs


def rewrite_verified(gm: fx.GraphModule, example: Example, opts: Options, model_state: Set[int]
                     ) -> Tuple[fx.GraphModule, FusionReport]:
    """Rewrite the captured graph ``gm`` (in the model's dtypes) and return the verified module in the model's
    dtypes with its report (see the module docstring)."""
    report = FusionReport()
    clock = time.perf_counter()
    report.before = GraphStats.of(gm)
    lens, refs = _lens(gm, example, opts, model_state, report)
    phases: Dict[str, float] = {"lens": time.perf_counter() - clock}
    target = lens.fused_target()
    calls = example.calls
    rtol = opts.rtol if opts.rtol is not None else default_rtol(torch.float64 if lens.float64 else
                                                                _dtypes.leaf_dtype(refs[0]) or torch.float32)
    drift_check = not writes_state(lens.gm)
    artifact_rtol = opts.rtol  # None: the returned model's dtype decides (raised with rtol for a sensitive model)

    def attempt(deny: Set[str], max_rewrites: Optional[int]) -> Tuple[fx.GraphModule, PassResult, RewriteContext]:
        start = time.perf_counter()
        fused = fresh_copy(lens.gm)
        first = calls[0]
        try:
            propagate_shapes(fused, Call(lens.inputs(first.args), lens.inputs(first.kwargs), None))
        except Exception as exc:  # the captured graph does not run on the recorded inputs
            raise UnfaithfulTrace(f"the traced graph does not run ({type(exc).__name__}: "
                                  f"{(str(exc).splitlines() or [''])[0][:200]})") from exc
        shapes = time.perf_counter() - start

        def reshape() -> None:
            nonlocal shapes
            clock = time.perf_counter()
            # An own-dtype lens runs in the model's dtypes, and its fused layers are held in float64 until the end
            # of the attempt (chained folds read them unrounded): shapes are propagated as if they were cast.
            cast = {} if lens.float64 else {
                id(t): dt for mod, dt in ctx.live_new_modules()
                for t in itertools.chain(mod.parameters(), mod.buffers()) if t.is_floating_point()}
            propagate_shapes(fused, Call(lens.inputs(first.args), lens.inputs(first.kwargs), None), cast)
            shapes += time.perf_counter() - clock

        ctx = RewriteContext(fused, target.dtypes, target.default_dtype, target.requires_grad, reshape=reshape)
        result = run_rules(ctx, opts.rules, deny=deny, max_rewrites=max_rewrites)
        fused.delete_all_unused_submodules()
        if not lens.float64:
            for mod, dt in ctx.live_new_modules():
                mod.to(dt)
        phases["shapes"] = phases.get("shapes", 0.0) + shapes
        phases["rules"] = phases.get("rules", 0.0) + time.perf_counter() - start - shapes
        return fused, result, ctx

    def judge(fused: fx.GraphModule, ctx: RewriteContext) -> _Judged:
        start = time.perf_counter()
        worst: Optional[Comparison] = None
        if opts.verify:
            for call, ref in zip(calls, refs):
                try:
                    out = _run(fused, lens.inputs(call.args), lens.inputs(call.kwargs))
                except Exception as exc:  # a rewrite that breaks execution is a failed check
                    return _Judged(False, Reason.OUTPUT_CHANGED, f"rewritten graph raised {exc!r}")
                cmp = compare(ref, out, rtol, opts.atol)
                if not cmp.ok:
                    return _Judged(False, Reason.OUTPUT_CHANGED, cmp.detail, cmp)
                worst = cmp if worst is None or cmp.max_rel >= worst.max_rel else worst
        phases["verify"] = phases.get("verify", 0.0) + time.perf_counter() - start
        start = time.perf_counter()
        returned = lens.back(fused, ctx.live_new_modules())
        phases["cast back"] = phases.get("cast back", 0.0) + time.perf_counter() - start
        start = time.perf_counter()
        first = calls[0]
        verdict = inspect(returned.gm, first.args, refs[0], first.output, example.error, artifact_rtol, opts.atol,
                          returned.overflowed, drift_check)
        phases["artifact"] = phases.get("artifact", 0.0) + time.perf_counter() - start
        return _Judged(verdict.ok, verdict.code, verdict.text, worst or Comparison(True, 0.0, 0.0, 0.0), returned,
                       verdict)

    deny: Set[str] = set()
    rollbacks: List[Rollback] = []
    conditioned = False  # the model's rounding sensitivity was measured (once, at the first failed check)
    for _ in range(opts.max_rollbacks + 1):
        fused, result, ctx = attempt(deny, None)
        judged = judge(fused, ctx)
        if judged.ok:
            break

        def passes(k: int) -> bool:
            candidate, _, candidate_ctx = attempt(deny, k)
            return judge(candidate, candidate_ctx).ok

        if not rollbacks and not conditioned and lens.float64 and judged.code is Reason.OUTPUT_CHANGED:
            noise = weight_noise(lens.gm, lens.inputs(calls[0].args), lens.inputs(calls[0].kwargs), refs[0], rtol,
                                 opts.atol)
            conditioned = True
            if not noise.ok:  # bisecting would blame rewrites for the network's own rounding sensitivity
                adapted = CONDITIONED_FACTOR * noise.max_rel
                if opts.rtol is not None or adapted > CONDITIONED_RTOL_CAP:
                    raise IllConditioned(
                        f"the model is ill-conditioned on this input: 1e-15 relative noise in its weights moves the "
                        f"output by {noise.max_rel:.3g} of max|y| (the check allows {rtol:g}"
                        f"{'' if opts.rtol is not None else f'; at most {CONDITIONED_RTOL_CAP:g} when adapted'}), so "
                        f"no rewrite can be verified (the rewritten graph: {judged.detail})", noise.max_rel)
                report.warnings.append(
                    f"the model is sensitive to rounding on this input (1e-15 relative noise in its weights moves the "
                    f"output by {noise.max_rel:.3g} of max|y|): verified in float64 at rtol {adapted:.3g} "
                    f"({CONDITIONED_FACTOR:g}x that) instead of {rtol:g}")
                rtol = artifact_rtol = adapted
                judged = judge(fused, ctx)
                if judged.ok:
                    break
        # Bisection needs the graph with no rewrite to pass; if it does not, no rollback can help.
        if not result.applied or (not rollbacks and not passes(0)):
            raise UnfaithfulTrace(f"the captured graph itself does not give the model's outputs ({judged.detail})")
        culprit = result.applied[first_bad_rewrite(result.applied, passes) - 1]
        deny.add(culprit)
        rollbacks.append(Rollback(culprit, judged.code or Reason.OUTPUT_CHANGED, judged.detail))
    else:
        raise FusionError(f"could not produce an equal model after {opts.max_rollbacks} rollbacks: {judged.detail}")

    assert judged.returned is not None and judged.verdict is not None
    returned, verdict = judged.returned, judged.verdict
    report.fused = result.fused
    report.unfused = result.unfused
    report.applied = result.applied
    report.rollbacks = rollbacks
    report.rolled_back = [r.key for r in rollbacks]
    report.weight_growth = ctx.weight_growth()
    report.after = GraphStats.of(returned.gm)
    report.frozen_constants = returned.frozen_names
    report.cast_attributes = returned.cast
    report.artifact_check = verdict.text
    report.artifact_max_rel_error = verdict.max_rel
    if verdict.warning:
        report.warnings.append(verdict.warning)
    if opts.verify:
        cmp = judged.cmp
        report.verified = True
        report.verify_dtype = _dtypes.dtype_name(_dtypes.leaf_dtype(refs[0]))
        report.max_abs_error, report.max_rel_error, report.tolerance = cmp.max_abs, cmp.max_rel, cmp.tolerance
    if rollbacks:
        report.warnings.append(f"{len(rollbacks)} rewrite(s) failed a check and were rolled back")
    report.phases = phases
    return returned.gm, report
