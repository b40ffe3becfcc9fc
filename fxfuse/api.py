"""``reparametrize``, the orchestration: float64 copy → capture → rules to a fixed point → verify (with rollback)
→ cast back → run the returned artifact in its own dtype."""

from __future__ import annotations

import time
import warnings
from dataclasses import dataclass
from typing import Any, Iterable, List, Optional, Sequence, Set, Tuple

import torch
from torch import Tensor, fx, nn
from torch.utils._pytree import tree_leaves

from . import _dtypes
from . import rules as _builtin_rules  # noqa: F401  (importing it registers the built-in rules)
from .capture import Call, propagate_shapes, trace
from .capture.submodules import rewrite_submodules
from .errors import FusionError, UnfaithfulTrace
from .report import FusionReport, GraphStats
from .rewrite import RewriteContext, Rule, RuleLike, resolve_rules, run_rules
from .rewrite.driver import PassResult
from .verify import Comparison, compare, default_rtol, first_bad_rewrite


@dataclass
class _Options:
    rules: List[Rule]
    verify: bool
    rtol: Optional[float]
    atol: float
    max_rollbacks: int
    in_float64: bool = True  # False when the model cannot run in float64: it is rewritten in its own dtypes


def _normalize_inputs(example_input: Any) -> Tuple[Any, ...]:
    if isinstance(example_input, Tensor):
        return (example_input,)
    if isinstance(example_input, (tuple, list)):
        return tuple(example_input)
    raise TypeError("example_input must be a tensor or a tuple/list of the model's positional inputs, got "
                    f"{type(example_input).__name__}")


def reparametrize(
    model: nn.Module,
    example_input: Any,
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
    ``enable`` / ``disable``: rule names added to / removed from that set.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"reparametrize expects a torch.nn.Module, got {type(model).__name__}")
    args = _normalize_inputs(example_input)
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
            with torch.no_grad():
                reference = work(*run_args)
    except Exception as exc64:  # any failure means float64 is not possible for this model
        _dtypes.restore_slot_dtypes(work, dtypes)
        run_args, opts.in_float64 = args, False
        try:
            with torch.no_grad():
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

    def rewrite_one(module: nn.Module, gm: fx.GraphModule, calls: Sequence[Call]) -> Tuple[nn.Module, FusionReport]:
        return _rewrite_graph_module(module, gm, calls, opts, plan)

    def check_whole(module: nn.Module) -> Comparison:
        return _check(module, [Call(run_args, {}, reference)], opts)

    result: nn.Module
    try:
        gm = trace(work)
    except Exception as exc:  # any tracing failure: rewrite the traceable sub-modules instead
        if not fallback:
            raise FusionError(f"model does not trace with torch.fx ({type(exc).__name__}: {exc}); "
                              "pass fallback=True to rewrite its traceable sub-modules") from exc
        result = rewrite_submodules(work, run_args, rewrite_one, check_whole if verify else None, report, exc)
        report.verify_dtype = _dtype_name(_dtypes.leaf_dtype(reference)) if verify else None
    else:
        try:
            result, sub_report = _rewrite_graph_module(work, gm, [Call(run_args, {}, reference)], opts, plan)
            report.take(sub_report)
        except UnfaithfulTrace as exc:
            if not fallback:
                raise
            result = rewrite_submodules(work, run_args, rewrite_one, check_whole if verify else None, report, exc)
            report.verify_dtype = _dtype_name(_dtypes.leaf_dtype(reference)) if verify else None

    cast = _dtypes.cast_back(result, plan)
    report.cast_attributes = cast.attributes
    report.frozen_constants = _frozen_constants(result)
    result.eval()
    _check_artifact(result, args, reference, opts, plan, report)
    report.pass_seconds = time.perf_counter() - start
    result.fxfuse_report = report  # type: ignore[assignment]
    if isinstance(result, fx.GraphModule):
        # GraphModule.__deepcopy__ rebuilds the module and drops plain attributes except those listed here.
        result.meta.setdefault("_user_preserved_attributes", {})["fxfuse_report"] = report
    return result


def _dtype_name(dtype: Optional[torch.dtype]) -> str:
    return str(dtype).replace("torch.", "")


def _has_float_tensor(output: Any) -> bool:
    """Whether a (nested) output has a floating/complex tensor leaf: the values verification compares."""
    return any(isinstance(t, Tensor) and (t.is_floating_point() or t.is_complex()) for t in tree_leaves(output))


def _frozen_constants(result: nn.Module) -> List[str]:
    """Tensors that tracing evaluated into the graph (``_tensor_constantN``): loading new weights into the fused
    model does not update them."""
    out = []
    for path, mod in result.named_modules():
        if isinstance(mod, fx.GraphModule):
            for key, value in vars(mod).items():
                if key.startswith("_tensor_constant") and isinstance(value, Tensor):
                    name = f"{path}.{key}" if path else key
                    out.append(f"{name} {list(value.shape)}")
    return out


def _check_artifact(result: nn.Module, args: Tuple[Any, ...], reference: Any, opts: _Options,
                    plan: _dtypes.DtypePlan, report: FusionReport) -> None:
    """Run what is returned, in its own dtype and device, on the example input. With verification, compare it
    with the reference at the tolerance of its dtype; without, it must at least run."""
    leaks = _dtypes.float64_leaks(result, plan)
    if leaks:
        raise FusionError(f"float64 tensors left in the result of a {_dtype_name(plan.model_dtype)} model: "
                          f"{', '.join(leaks[:8])}")
    try:
        with torch.no_grad():
            out = result(*args)
    except Exception as exc:
        raise FusionError(f"the fused model does not run on the example input in its own dtype "
                          f"({type(exc).__name__}: {exc}); please report this model") from exc
    dtype = _dtypes.leaf_dtype(out)
    if reference is None or dtype is None:
        report.artifact_check = f"ran in {_dtype_name(dtype)} (not compared: verify=False)"
        return
    rtol = max(opts.rtol or 0.0, default_rtol(dtype))
    cmp = compare(reference, out, rtol, opts.atol)
    report.artifact_max_rel_error = cmp.max_rel
    if not cmp.ok:
        raise FusionError(f"the fused model, run in {_dtype_name(dtype)}, differs from the reference beyond that "
                          f"dtype's tolerance: {cmp.detail}")
    report.artifact_check = (f"ran in {_dtype_name(dtype)}: max relative error {cmp.max_rel:.3g} vs the reference "
                             f"(tolerance {rtol:g} of max |ref|)")


# ------------------------------------------------------------------------------------- one graph
def _attempt(module: nn.Module, calls: Sequence[Call], opts: _Options, target: _dtypes.FusedTarget,
             deny: Set[str], max_rewrites: Optional[int],
             gm: Optional[fx.GraphModule] = None) -> Tuple[fx.GraphModule, PassResult, RewriteContext]:
    gm = trace(module) if gm is None else gm  # the caller's fresh trace is used once, then traced anew
    try:
        propagate_shapes(gm, calls[0])
    except Exception as exc:  # the traced graph does not run on the recorded inputs
        raise UnfaithfulTrace(f"the traced graph does not run ({type(exc).__name__}: "
                              f"{str(exc).splitlines()[0][:200]})") from exc
    ctx = RewriteContext(gm, target.dtypes, target.default_dtype, target.requires_grad,
                         reshape=lambda: propagate_shapes(gm, calls[0]))
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
    report.after = GraphStats.of(fused)
    if opts.verify:
        report.verified = True
        report.verify_dtype = _dtype_name(dtype)
        report.max_abs_error, report.max_rel_error, report.tolerance = cmp.max_abs, cmp.max_rel, cmp.tolerance
    if rolled:
        report.warnings.append(f"{len(rolled)} rewrite(s) changed the outputs and were rolled back")
    return fused, report
