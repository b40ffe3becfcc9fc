"""``reparametrize``, the orchestration: float64 copy → capture → rules to a fixed point → verify (with rollback)
→ cast back → run the returned artifact in its own dtype."""

from __future__ import annotations

import dataclasses
import time
import warnings
from dataclasses import dataclass
from typing import Any, Callable, Dict, Iterable, List, Optional, Sequence, Set, Tuple

import torch
from torch import Tensor, fx, nn
from torch.utils._pytree import tree_leaves

from . import _dtypes
from . import rules as _builtin_rules  # noqa: F401  (importing it registers the built-in rules)
from .capture import Call, propagate_shapes, trace
from .capture.state import attributes_preserved
from .artifact import check_artifact, run_original
from .capture.submodules import rewrite_submodules
from .capture import export as _export
from .errors import FusionError, UnfaithfulTrace
from .ir.ops import module_kind
from .ir.read import Reader
from .report import FusionReport, GraphStats
from .rewrite import RewriteContext, Rule, RuleLike, resolve_rules, run_rules
from .rewrite.driver import PassResult
from .verify import Comparison, compare, first_bad_rewrite


@dataclass
class _Options:
    rules: List[Rule]
    verify: bool
    rtol: Optional[float]
    atol: float
    max_rollbacks: int
    in_float64: bool = True  # False when the model cannot run in float64: it is rewritten in its own dtypes
    # A fresh graph of the module for each rewrite attempt: symbolic tracing, or a copy of the exported graph.
    recapture: Callable[[Any], fx.GraphModule] = trace


CAPTURES = ("auto", "symbolic", "export")


def _normalize_inputs(example_input: Any) -> Tuple[Any, ...]:
    if isinstance(example_input, Tensor):
        return (example_input,)
    if isinstance(example_input, (tuple, list)):
        return tuple(example_input)
    raise TypeError("example_input must be a tensor or a tuple/list of the model's positional inputs, got "
                    f"{type(example_input).__name__}")


def reparametrize(
    model: nn.Module,
    example_input: Any = None,
    *,
    inplace: bool = False,
    verify: bool = True,
    rtol: Optional[float] = None,
    atol: float = 0.0,
    rules: Optional[Sequence[RuleLike]] = None,
    enable: Iterable[str] = (),
    disable: Iterable[str] = (),
    fallback: bool = True,
    max_rollbacks: int = 8,
    keep_asserts: bool = False,
    capture: str = "auto",
    dynamic_shapes: Any = None,
) -> nn.Module:
    """Return an eval-mode model equal to ``model`` with re-parameterizable structure collapsed into single convs.

    The rewrite is computed on a float64 copy, checked there on ``example_input`` (``rtol`` default 1e-9 of the
    output's max-abs), and cast back to each parameter's dtype; where float64 is impossible the model's dtype is
    used with a looser, dtype-aware tolerance (:func:`fxfuse.verify.default_rtol`). If the check fails, the
    rewrites that changed the output are found by bisection, undone and reported. The returned model is then run
    once on ``example_input`` in its own dtype and device and compared again (``report.artifact_check``).
    :class:`FusionError` is raised only when no equal model can be produced. The input model is not modified
    unless ``inplace=True``.

    Returns a ``torch.fx.GraphModule`` (or, for models that do not trace as a whole and ``fallback=True``, the
    model with every traceable sub-module rewritten) carrying ``.fxfuse_report`` (:class:`FusionReport`).

    ``rules``: the rules to run (names / :class:`Rule` / functions) instead of the enabled registered ones;
    ``enable`` / ``disable``: rule names added to / removed from that set. ``keep_asserts=True`` keeps shape
    assertions the fused graph already guarantees (rule ``shape_assert``, which removes them by default).

    ``capture``: how the model becomes a graph. ``"symbolic"``: ``torch.fx`` symbolic tracing. ``"export"``:
    ``torch.export`` (non-strict), rewritten on the functional ATen graph; it captures code symbolic tracing cannot
    (item assignment, ``int()`` of sizes, branches on shapes or devices, caches); the batch dim stays dynamic
    unless ``dynamic_shapes`` (``torch.export``'s argument) says otherwise. ``"auto"`` (default): symbolic
    tracing, then export when tracing fails or leaves BatchNorms / unfused candidates, keeping the result that
    executes fewer convs + BatchNorms (symbolic on a tie), never an export pinned to the example's batch size
    while a capture that keeps every batch size exists; the per-sub-module fallback comes last.
    ``report.capture`` / ``report.capture_reason`` say which was used and why. An ``ExportedProgram`` passed as
    ``model`` is rewritten by :func:`reparametrize_exported` and one is returned (``example_input`` then defaults
    to the inputs it was exported with).
    """
    if isinstance(model, torch.export.ExportedProgram):
        program: Any = reparametrize_exported(model, example_input, verify=verify, rtol=rtol, atol=atol, rules=rules,
                                              enable=enable, disable=disable, max_rollbacks=max_rollbacks,
                                              keep_asserts=keep_asserts, dynamic_shapes=dynamic_shapes)
        return program  # an ExportedProgram: the same kind of object that was passed
    if capture not in CAPTURES:
        raise ValueError(f"capture must be one of {CAPTURES}, got {capture!r}")
    if not isinstance(model, nn.Module):
        raise TypeError(f"reparametrize expects a torch.nn.Module, got {type(model).__name__}")
    if example_input is None:
        raise TypeError("reparametrize needs an example_input: the tensor (or tuple of positional inputs) the "
                        "model is traced and checked on")
    args = _normalize_inputs(example_input)
    disable = [*disable, "shape_assert"] if keep_asserts else disable
    opts = _Options(resolve_rules(rules, enable, disable), verify, rtol, atol, max_rollbacks)
    start = time.perf_counter()
    report = FusionReport()
    if model.training:
        warnings.warn("fxfuse.reparametrize: the model is in training mode; BatchNorm folding uses running "
                      "statistics, so the result is an eval-mode model (compare it with model.eval()).",
                      UserWarning, stacklevel=2)
        report.warnings.append("input model was in training mode; result is in eval mode")
    if not any(True for _ in model.parameters()) and not any(True for _ in model.buffers()) \
            and not any(True for _ in model.children()):
        warnings.warn("fxfuse.reparametrize: the model has no parameters or sub-modules; nothing to fuse",
                      UserWarning, stacklevel=2)

    plan = _dtypes.DtypePlan(_dtypes.dominant_dtype(model))
    plan.record_attributes(model)
    original = run_original(model, args) if verify else None  # (output, error) in the model's own dtypes
    work = model if inplace else _dtypes.float64_copy(model)
    dtypes = _dtypes.slot_dtypes(model, work)
    work.eval()

    # float64 where the model allows it: the algebra is then exact to ~1e-13 and verification can be tight.
    # Always float64 (also with verify=False, which only skips the reference run): the readers produce float64
    # fused tensors, so a model left in its own dtype would mix dtypes mid-pass.
    reference = None
    work.double()
    run_args = _dtypes.cast_inputs(args, torch.float64)
    try:
        if verify:
            with torch.no_grad(), attributes_preserved(work):  # trace from the state the user's model is in
                reference = work(*run_args)
    except Exception as exc64:  # any failure means float64 is not possible for this model
        _dtypes.restore_slot_dtypes(work, dtypes)
        run_args, opts.in_float64 = args, False
        try:
            with torch.no_grad(), attributes_preserved(work):
                reference = work(*run_args)
        except Exception as exc:
            raise ValueError(f"the model cannot run on example_input: {type(exc).__name__}: {exc}. Pass a tensor "
                             "or a tuple of positional inputs that model(*inputs) accepts.") from exc
        report.warnings.append(f"float64 copy impossible ({type(exc64).__name__}: {exc64}); verified in the "
                               "model's dtype with a looser tolerance")
    if verify and not _has_float_tensor(reference):
        raise FusionError(f"the model's output ({type(reference).__name__}) holds no floating-point tensor, so "
                          "fxfuse cannot check that the rewritten model is equal. Make forward return its tensors "
                          "(tensors nested in tuples/lists/dicts are fine) or pass verify=False.")
    plan.record_slots(work, dtypes)

    result = _capture_and_rewrite(work, Call(run_args, {}, reference), opts, plan, report, capture, dynamic_shapes,
                                  fallback)
    report.frozen_constants = _dtypes.frozen_constants(result, plan)
    cast = _dtypes.cast_back(result, plan)
    report.cast_attributes = cast.attributes
    if inplace:  # the model itself was the float64 working copy: its layers the result no longer uses as well
        _dtypes.restore_slot_dtypes(work, dtypes)
    result.eval()
    check_artifact(result, args, reference, original, opts.rtol, opts.atol, plan, report, cast.overflowed)
    report.pass_seconds = time.perf_counter() - start
    result.fxfuse_report = report  # type: ignore[assignment]
    if isinstance(result, fx.GraphModule):
        # GraphModule.__deepcopy__ rebuilds the module and drops plain attributes except those listed here.
        result.meta.setdefault("_user_preserved_attributes", {})["fxfuse_report"] = report
    return result


def _has_float_tensor(output: Any) -> bool:
    """Whether a (nested) output has a floating/complex tensor leaf: the values verification compares."""
    return any(isinstance(t, Tensor) and (t.is_floating_point() or t.is_complex()) for t in tree_leaves(output))


# ------------------------------------------------------------------------------------- the capture choice
def _capture_and_rewrite(work: nn.Module, example: Call, opts: _Options, plan: _dtypes.DtypePlan,
                         report: FusionReport, capture: str, dynamic_shapes: Any, fallback: bool) -> nn.Module:
    """Capture ``work`` and rewrite it (docs/patterns.md, "capture="auto""): symbolic tracing; then
    ``torch.export`` where requested, where tracing fails or is unfaithful, or where the symbolic result leaves
    work only capture can explain — the result executing fewer convs + BatchNorms is kept (symbolic on a tie);
    the per-sub-module fallback last. Fills ``report`` (``capture`` / ``capture_reason`` say which and why)."""
    run_args, reference = example.args, example.output
    result: Optional[nn.Module] = None
    symbolic_error: Optional[Exception] = None
    chosen: Optional[FusionReport] = None
    export_note: Optional[str] = None
    if capture in ("auto", "symbolic"):
        try:
            gm = trace(work)
        except Exception as exc:  # any tracing failure: export (auto), else the traceable sub-modules
            symbolic_error = exc
        else:
            try:
                result, chosen = _rewrite_graph_module(work, gm, [example], opts, plan)
                report.capture, report.capture_reason = "symbolic", "traced whole by torch.fx"
            except UnfaithfulTrace as exc:
                symbolic_error = exc
    if capture == "export" or (capture == "auto" and (result is None or _export_may_improve(chosen, result))):
        try:
            exported, exp_report, captured = _rewrite_exported(work, run_args, reference, opts, plan,
                                                               dynamic_shapes)
        except Exception as exc:  # export failed, its graph differs from the model, or its rewrite failed
            if capture == "export" and isinstance(exc, FusionError) and not isinstance(exc, UnfaithfulTrace):
                raise  # the graph was captured; the rewrite could not be verified
            if capture == "export":
                raise FusionError(f"torch.export could not capture an equal graph of the model, or the rewrite of "
                                  f"the captured graph failed ({type(exc).__name__}: {_first_line(exc, 300)})"
                                  ) from exc
            export_note = f"torch.export failed ({_export.failure_text(exc)})"
            if result is not None:
                report.capture_reason += f"; export not used: {export_note}"
        else:
            how = f"torch.export in {captured.seconds:.2f} s, {captured.dynamic}"
            if capture == "auto" and captured.batch_pinned and dynamic_shapes is None \
                    and (result is not None or fallback):
                # A program pinned to the example's batch size would refuse batch sizes the model accepts:
                # auto keeps a capture that does not (symbolic, or the sub-module fallback).
                export_note = (f"export not used: it captured {captured.dynamic} — the result would run at the "
                               f"example's batch size only (capture=\"export\" returns that program)")
                if result is not None:
                    report.capture_reason += f"; {export_note}"
            elif result is None or chosen is None:
                why = "requested" if capture == "export" else (
                    f"symbolic tracing failed ({type(symbolic_error).__name__}: "
                    f"{_first_line(symbolic_error, 160) if symbolic_error is not None else ''})")
                result, chosen = exported, exp_report
                report.capture, report.capture_reason = "export", f"{why}; {how}"
            elif _executed(exp_report) < _executed(chosen):
                report.capture, report.capture_reason = "export", (
                    f"executes fewer convs + BatchNorms than the symbolic trace ({_executed(exp_report)} vs "
                    f"{_executed(chosen)}); {how}")
                result, chosen = exported, exp_report
            else:
                report.capture_reason += (f"; export reached no fewer convs + BatchNorms ({_executed(exp_report)} "
                                          f"vs {_executed(chosen)})")
    if chosen is not None:
        report.take(chosen)
    if result is None:
        assert symbolic_error is not None
        if not fallback:
            if isinstance(symbolic_error, UnfaithfulTrace):
                raise symbolic_error
            raise FusionError(f"model does not trace with torch.fx ({type(symbolic_error).__name__}: "
                              f"{symbolic_error}); pass fallback=True to rewrite its traceable sub-modules"
                              ) from symbolic_error

        def rewrite_one(module: nn.Module, gm: fx.GraphModule, calls: Sequence[Call]
                        ) -> Tuple[nn.Module, FusionReport]:
            return _rewrite_graph_module(module, gm, calls, opts, plan)

        def check_whole(module: nn.Module) -> Comparison:
            with attributes_preserved(module):  # each check starts from the state the reference run started from
                return _check(module, [example], opts)

        result = rewrite_submodules(work, run_args, rewrite_one, check_whole if opts.verify else None, report,
                                    symbolic_error)
        report.verify_dtype = _dtypes.dtype_name(_dtypes.leaf_dtype(reference)) if opts.verify else None
        report.capture = "submodules"
        report.capture_reason = "the model does not trace whole with torch.fx" + (f"; {export_note}" if export_note
                                                                                 else "")

    return result


# ------------------------------------------------------------------------------------- one graph
def _attempt(module: nn.Module, calls: Sequence[Call], opts: _Options, target: _dtypes.FusedTarget,
             deny: Set[str], max_rewrites: Optional[int],
             gm: Optional[fx.GraphModule] = None) -> Tuple[fx.GraphModule, PassResult, RewriteContext]:
    gm = opts.recapture(module) if gm is None else gm  # the caller's fresh graph is used once, then captured anew
    try:
        propagate_shapes(gm, calls[0])
    except Exception as exc:  # the traced graph does not run on the recorded inputs
        raise UnfaithfulTrace(f"the traced graph does not run ({type(exc).__name__}: "
                              f"{str(exc).splitlines()[0][:200]})") from exc
    def reshape() -> None:
        if not opts.in_float64:  # the graph runs in the model's dtypes: so must the fused layers it now calls
            for mod, dt in ctx.live_new_modules():
                mod.to(dt)
        propagate_shapes(gm, calls[0])

    ctx = RewriteContext(gm, target.dtypes, target.default_dtype, target.requires_grad, reshape=reshape)
    result = run_rules(ctx, opts.rules, deny=deny, max_rewrites=max_rewrites)
    gm.delete_all_unused_submodules()
    if not opts.in_float64:
        # The model runs in its own dtypes, so the float64 fused layers must too.
        for mod, dt in ctx.live_new_modules():
            mod.to(dt)
    gm.recompile()
    return gm, result, ctx


def _check(gm: nn.Module, calls: Sequence[Call], opts: _Options) -> Comparison:
    worst: Optional[Comparison] = None
    for call in calls:
        with torch.no_grad():
            try:
                out = gm(*call.args, **call.kwargs)
            except Exception as exc:  # a rewrite that breaks execution is a failed check
                return Comparison(False, float("inf"), float("inf"), 0.0, f"rewritten model raised {exc!r}")
        cmp = compare(call.output, out, opts.rtol, opts.atol)
        if not cmp.ok:
            return cmp
        if worst is None or cmp.max_rel >= worst.max_rel:
            worst = cmp
    return worst or Comparison(True, 0.0, 0.0, 0.0)


def _rewrite_graph_module(module: nn.Module, gm: fx.GraphModule, calls: Sequence[Call], opts: _Options,
                          plan: _dtypes.DtypePlan) -> Tuple[fx.GraphModule, FusionReport]:
    """Run the rules on ``module`` (already traceable), verify on ``calls``, roll back culprits."""
    report = FusionReport()
    report.before = GraphStats.of(gm)
    deny: Set[str] = set()
    rolled: List[str] = []
    dtype = _dtypes.leaf_dtype(calls[0].output)
    first: Optional[fx.GraphModule] = gm
    target = _dtypes.FusedTarget.of(module, plan)
    cmp = Comparison(True, 0.0, 0.0, 0.0)
    for _ in range(opts.max_rollbacks + 1):
        fused, result, ctx = _attempt(module, calls, opts, target, deny, None, first)
        first = None
        if not opts.verify:
            break
        cmp = _check(fused, calls, opts)
        if cmp.ok:
            break

        def passes(k: int) -> bool:
            candidate, _, _ = _attempt(module, calls, opts, target, deny, k)
            return _check(candidate, calls, opts).ok

        # Bisection needs the graph with no rewrite to pass; if it does not, no rollback can help.
        if not result.applied or (not rolled and not passes(0)):
            raise UnfaithfulTrace(f"the traced graph itself differs from the model ({cmp.detail}); torch.fx did "
                                  "not capture its semantics (e.g. `a += b` on an aliased tensor traces as an "
                                  "out-of-place add)")
        culprit = result.applied[first_bad_rewrite(result.applied, passes) - 1]
        deny.add(culprit)
        rolled.append(culprit)
    else:
        raise FusionError(f"could not produce an equal model after {opts.max_rollbacks} rollbacks: {cmp.detail}")
    for mod, dt in ctx.live_new_modules():
        for t in mod.parameters():
            plan.record(t, dt)
    report.fused = result.fused
    report.unfused = result.unfused
    report.applied = result.applied
    report.rolled_back = rolled
    report.weight_growth = ctx.weight_growth()
    report.after = GraphStats.of(fused)
    if opts.verify:
        report.verified = True
        report.verify_dtype = _dtypes.dtype_name(dtype)
        report.max_abs_error, report.max_rel_error, report.tolerance = cmp.max_abs, cmp.max_rel, cmp.tolerance
    if rolled:
        report.warnings.append(f"{len(rolled)} rewrite(s) changed the outputs and were rolled back")
    return fused, report


# ------------------------------------------------------------------------------------- export capture
_first_line = _export._first_line


def _executed(report: FusionReport) -> int:
    """Convs + BatchNorms the rewritten graph executes: what ``capture="auto"`` minimizes."""
    return report.after.convs + report.after.batch_norms


def _export_may_improve(report: Optional[FusionReport], gm: Optional[nn.Module]) -> bool:
    """Whether an ATen graph could fuse more than the symbolic result did. Only where symbolic capture is the limit:
    a module the symbolic graph calls as an opaque leaf while it holds parameters (a forward hook, a ``torch.nn``
    leaf export inlines) when BatchNorms are left, or a skip because a weight / statistic was not a constant in
    the symbolic graph. BatchNorms left for algebraic reasons (batch statistics, a padded conv after a shift)
    stay in any capture, so they do not cost an export."""
    if report is None or not isinstance(gm, fx.GraphModule):
        return True
    if any("non-constant" in u.reason for u in report.unfused):
        return True
    if report.after.batch_norms == 0 and not report.unfused:
        return False
    reader = Reader(gm)
    return any(n.op == "call_module" and reader.module(n) is None and _opaque_layer(reader.modules[str(n.target)])
               for n in gm.graph.nodes if str(n.target) in reader.modules)


def _opaque_layer(mod: nn.Module) -> bool:
    """A conv / BN / linear-kind leaf (:func:`fxfuse.ir.ops.module_kind`) the symbolic graph cannot read — a
    subclass overriding ``forward``, or hooked — or any hooked leaf with parameters: export runs its Python and may
    expose a fusable layer. Other ``torch.nn`` leaves (LayerNorm, GroupNorm, attention) stay unfusable in any
    capture, so they cost no export."""
    hooked = bool(mod._forward_hooks or mod._forward_pre_hooks)
    return module_kind(mod) is not None or (hooked and any(True for _ in mod.parameters()))


def _rewrite_exported(work: nn.Module, run_args: Tuple[Any, ...], reference: Any, opts: _Options,
                      plan: _dtypes.DtypePlan, dynamic_shapes: Any
                      ) -> Tuple[fx.GraphModule, FusionReport, _export.ExportCapture]:
    """Capture ``work`` with ``torch.export`` (:func:`fxfuse.capture.export.capture`) and rewrite that graph; each
    rewrite attempt starts from a fresh copy of the captured graph."""

    def faithful(gm: fx.GraphModule) -> bool:
        if reference is None:
            return True
        with torch.no_grad(), attributes_preserved(gm):
            return compare(reference, gm(*run_args), opts.rtol, opts.atol).ok

    with attributes_preserved(work):
        captured = _export.capture(work, run_args, dynamic_shapes, faithful)
    export_opts = dataclasses.replace(opts, recapture=_export.fresh_copy)
    fused, report = _rewrite_graph_module(captured.gm, _export.fresh_copy(captured.gm),
                                          [Call(run_args, {}, reference)], export_opts, plan)
    return fused, report, captured


def reparametrize_exported(ep: torch.export.ExportedProgram, example_input: Any = None, *,
                           dynamic_shapes: Any = None, **kwargs: Any) -> torch.export.ExportedProgram:
    """``reparametrize`` for an ``ExportedProgram``: rewrites ``ep.module()`` on its ATen graph and exports the
    result again with ``ep``'s signature (same inputs and outputs, same dynamic dims unless ``dynamic_shapes``
    says otherwise), so ``torch.export.save`` / ``load`` and whatever ran ``ep`` run it. ``example_input``
    defaults to the inputs ``ep`` was exported with. The report is ``result.fxfuse_report`` (not saved)."""
    if example_input is None:
        if ep.example_inputs is None:
            raise ValueError("this ExportedProgram carries no example inputs: pass example_input")
        args, call_kwargs = ep.example_inputs
        if call_kwargs:
            raise ValueError("the ExportedProgram was exported with keyword inputs; pass example_input "
                             "(positional inputs) for a program without them")
    else:
        args = _normalize_inputs(example_input)
    shapes = dynamic_shapes if dynamic_shapes is not None else _export.dynamic_shapes_of(ep)
    module = ep.module()
    for mod in module.modules():  # the program's mode is fixed in its graph; its eval() raises NotImplementedError
        mod.training = False
    fused = reparametrize(module, args, capture="export", dynamic_shapes=shapes, **kwargs)
    program = _export.to_exported_program(fused, args, dynamic_shapes=shapes)
    program.fxfuse_report = fused.fxfuse_report  # type: ignore[attr-defined]
    return program


def compile(model: nn.Module, example_input: Any, *, reparametrize_kwargs: Optional[Dict[str, Any]] = None,
            **compile_kwargs: Any) -> Callable[..., Any]:
    """Re-parameterize, then ``torch.compile``: ``torch.compile(reparametrize(model, example_input,
    **reparametrize_kwargs), **compile_kwargs)``. The compiled function carries the pass's report as
    ``.fxfuse_report``. Timings against compiling the original: docs/benchmarks.md (``benchmarks/compile_path.py``)."""
    fused = reparametrize(model, example_input, **(reparametrize_kwargs or {}))
    compiled = torch.compile(fused, **compile_kwargs)
    compiled.fxfuse_report = fused.fxfuse_report  # type: ignore[attr-defined]
    return compiled

