"""``reparametrize``: trace → prove-in-float64 → rewrite to a fixed point → verify (with rollback) → cast back."""

from __future__ import annotations

import copy
import itertools
import time
import warnings
from dataclasses import dataclass
from typing import Any, Dict, Iterable, List, Optional, Sequence, Tuple

import torch
from torch import Tensor, fx, nn
from torch.utils._pytree import tree_map

from . import rules as _builtin_rules  # noqa: F401  (registers the built-in rules)
from ._errors import FusionError
from ._registry import RewriteContext, Rule, RuleLike, resolve_rules, run_rules
from ._report import FusionReport, GraphStats
from ._trace import Call, capture_calls, propagate_shapes, trace
from ._verify import Comparison, compare, first_bad_rewrite


class UnfaithfulTrace(FusionError):
    """The traced graph, unmodified, already computes something else than the module."""


@dataclass
class _Options:
    rules: List[Rule]
    verify: bool
    rtol: Optional[float]
    atol: float
    max_rollbacks: int


class _DtypePlan:
    """Target dtype of every floating tensor once the float64 computation is done (identity-keyed, with the
    tensor kept alive so ids cannot be reused)."""

    def __init__(self) -> None:
        self._plan: Dict[int, Tuple[Tensor, torch.dtype]] = {}

    def record(self, t: Tensor, dtype: torch.dtype) -> None:
        self._plan[id(t)] = (t, dtype)

    def as_id_map(self) -> Dict[int, torch.dtype]:
        return {k: d for k, (_, d) in self._plan.items()}

    def apply(self, root: nn.Module) -> None:
        done: Dict[int, Tensor] = {}
        for mod in root.modules():
            for store in (mod._parameters, mod._buffers):
                for key, t in list(store.items()):
                    if t is None or id(t) not in self._plan or self._plan[id(t)][0] is not t:
                        continue
                    dtype = self._plan[id(t)][1]
                    if t.dtype == dtype:
                        continue
                    if isinstance(t, nn.Parameter):
                        if id(t) not in done:
                            t.data = t.data.to(dtype)
                            done[id(t)] = t
                    else:
                        store[key] = done.setdefault(id(t), t.to(dtype))


def _cast_inputs(args: Any, dtype: torch.dtype) -> Any:
    return tree_map(lambda a: a.to(dtype) if isinstance(a, Tensor) and a.is_floating_point() else a, args)


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
    used with a looser, dtype-aware tolerance (:mod:`fxfuse._verify`). If the check fails, the rewrites that
    changed the output are found by bisection, undone and reported; :class:`FusionError` is raised only when no
    equal model can be produced. The input model is not modified unless ``inplace=True``.

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

    work = model if inplace else _float64_copy(model)
    work.eval()

    # float64 where the model allows it: the algebra is then exact to ~1e-13 and verification can be tight.
    plan = _DtypePlan()
    slot_dtypes = _slot_dtypes(model, work)
    # Always float64 (also with verify=False, which only skips the reference run): the readers produce float64
    # fused tensors, so a model left in its own dtype would mix dtypes mid-pass (shape propagation fails).
    reference = None
    work.double()
    run_args = _cast_inputs(args, torch.float64)
    try:
        if verify:
            with torch.no_grad():
                reference = work(*run_args)
    except Exception as exc64:  # noqa: BLE001 - any failure means float64 is not possible for this model
        _cast_slots(work, slot_dtypes)
        run_args = args
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
    for mod, key, t in _slots(work):
        plan.record(t, slot_dtypes[(id(mod), key)])

    try:
        gm = trace(work)
    except Exception as exc:  # noqa: BLE001
        if not fallback:
            raise FusionError(f"model does not trace with torch.fx ({type(exc).__name__}: {exc}); "
                              "pass fallback=True to rewrite its traceable sub-modules") from exc
        result = _rewrite_submodules(work, run_args, reference, opts, plan, report, exc)
    else:
        try:
            result, sub_report = _rewrite_graph_module(work, gm, [Call(run_args, {}, reference)], opts, plan)
            _merge_top(report, sub_report)
        except UnfaithfulTrace as exc:
            if not fallback:
                raise
            result = _rewrite_submodules(work, run_args, reference, opts, plan, report, exc)

    plan.apply(result)
    result.eval()
    report.pass_seconds = time.perf_counter() - start
    result.fxfuse_report = report
    if isinstance(result, fx.GraphModule):
        # GraphModule.__deepcopy__ rebuilds the module and drops plain attributes except those listed here.
        result.meta.setdefault("_user_preserved_attributes", {})["fxfuse_report"] = report
    return result


def _has_float_tensor(output: Any) -> bool:
    """Whether a (nested) output has a floating/complex tensor leaf: the values verification compares."""
    from torch.utils._pytree import tree_leaves

    return any(isinstance(t, Tensor) and (t.is_floating_point() or t.is_complex()) for t in tree_leaves(output))


def _float64_copy(model: nn.Module) -> nn.Module:
    """``copy.deepcopy(model)`` with its floating parameters and buffers created in float64 directly: one new
    tensor per weight instead of a copy and then a cast (on big models the pass is bound by fresh memory)."""
    memo: Dict[int, Any] = {}
    for t in itertools.chain(model.parameters(), model.buffers()):
        if type(t) in (Tensor, nn.Parameter) and t.is_floating_point() and id(t) not in memo:
            t64 = t.detach().to(torch.float64, copy=True)
            memo[id(t)] = nn.Parameter(t64, t.requires_grad) if isinstance(t, nn.Parameter) else t64
    return copy.deepcopy(model, memo)


def _slot_dtypes(model: nn.Module, work: nn.Module) -> Dict[Tuple[int, str], torch.dtype]:
    """``(id(module of work), slot name) -> dtype`` of the matching slot of ``model`` (``work`` is ``model`` or
    its deepcopy, so the two module trees correspond one to one)."""
    return {(id(w), key): t.dtype for m, w in zip(model.modules(), work.modules())
            for store in (m._parameters, m._buffers) for key, t in store.items() if t is not None}


def _slots(module: nn.Module):
    """``(module, name, tensor)`` for every parameter and buffer slot."""
    for mod in module.modules():
        for store in (mod._parameters, mod._buffers):
            for key, t in store.items():
                if t is not None:
                    yield mod, key, t


def _cast_slots(module: nn.Module, dtypes: Dict[Tuple[int, str], torch.dtype]) -> None:
    """Give every slot back its recorded dtype (undoes ``.double()``; parameters keep their identity)."""
    for mod in module.modules():
        for store in (mod._parameters, mod._buffers):
            for key, t in list(store.items()):
                dtype = dtypes.get((id(mod), key))
                if t is None or dtype is None or t.dtype == dtype:
                    continue
                if isinstance(t, nn.Parameter):
                    t.data = t.data.to(dtype)
                else:
                    store[key] = t.to(dtype)


def _merge_top(report: FusionReport, sub: FusionReport) -> None:
    for name in ("fused", "unfused", "rolled_back", "applied", "before", "after", "verified", "verify_dtype",
                 "max_abs_error", "max_rel_error", "tolerance"):
        setattr(report, name, getattr(sub, name))
    report.warnings.extend(sub.warnings)


# ------------------------------------------------------------------------------------- one graph
@dataclass
class _Target:
    """What every attempt on one module shares: the dtype each tensor goes back to, the dtype for fused tensors
    without an original (most parameters' dtype), and whether fused parameters require grad."""

    dtypes: Dict[int, torch.dtype]
    default_dtype: torch.dtype
    requires_grad: bool

    @classmethod
    def of(cls, module: nn.Module, plan: _DtypePlan) -> "_Target":
        ids = plan.as_id_map()
        counts: Dict[torch.dtype, int] = {}
        for p in module.parameters():
            d = ids.get(id(p), p.dtype)
            if d.is_floating_point:
                counts[d] = counts.get(d, 0) + p.numel()
        default = max(counts, key=counts.get) if counts else torch.get_default_dtype()
        return cls(ids, default, any(p.requires_grad for p in module.parameters()))


def _attempt(module: nn.Module, calls: Sequence[Call], opts: _Options, target: _Target,
             deny: set, max_rewrites: Optional[int],
             gm: Optional[fx.GraphModule] = None) -> Tuple[fx.GraphModule, Any, RewriteContext]:
    gm = trace(module) if gm is None else gm  # the caller's fresh trace is used once, then traced anew
    try:
        propagate_shapes(gm, calls[0])
    except Exception as exc:  # noqa: BLE001 - the traced graph does not run on the recorded inputs
        raise UnfaithfulTrace(f"the traced graph does not run ({type(exc).__name__}: "
                              f"{str(exc).splitlines()[0][:200]})") from exc
    ctx = RewriteContext(gm, target.dtypes, target.default_dtype, target.requires_grad,
                         reshape=lambda: propagate_shapes(gm, calls[0]))
    result = run_rules(ctx, opts.rules, deny=deny, max_rewrites=max_rewrites)
    gm.delete_all_unused_submodules()
    if any(p.is_floating_point() and p.dtype != torch.float64 for p in module.parameters()):
        # float64 copy impossible: the model runs in its own dtypes, so the float64 fused layers must too.
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
            except Exception as exc:  # noqa: BLE001 - a rewrite that breaks execution is a failed check
                return Comparison(False, float("inf"), float("inf"), 0.0, f"rewritten model raised {exc!r}")
        cmp = compare(call.output, out, opts.rtol, opts.atol)
        if not cmp.ok:
            return cmp
        if worst is None or cmp.max_rel >= worst.max_rel:
            worst = cmp
    return worst or Comparison(True, 0.0, 0.0, 0.0)


def _rewrite_graph_module(module: nn.Module, gm: fx.GraphModule, calls: Sequence[Call], opts: _Options,
                          plan: _DtypePlan) -> Tuple[fx.GraphModule, FusionReport]:
    """Run the rules on ``module`` (already traceable), verify on ``calls``, roll back culprits."""
    report = FusionReport()
    report.before = GraphStats.of(gm)
    deny: set = set()
    rolled: List[str] = []
    dtype = _leaf_dtype(calls[0].output)
    first: Optional[fx.GraphModule] = gm
    target = _Target.of(module, plan)
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
        report.verify_dtype = str(dtype).replace("torch.", "")
        report.max_abs_error, report.max_rel_error, report.tolerance = cmp.max_abs, cmp.max_rel, cmp.tolerance
    if rolled:
        report.warnings.append(f"{len(rolled)} rewrite(s) changed the outputs and were rolled back")
    return fused, report


def _leaf_dtype(output: Any) -> Optional[torch.dtype]:
    from torch.utils._pytree import tree_leaves

    for leaf in tree_leaves(output):
        if isinstance(leaf, Tensor):
            return leaf.dtype
    return None


# ------------------------------------------------------------------------ untraceable models
def _keep_attributes(original: nn.Module, fused: nn.Module) -> None:
    """Give ``fused`` the public instance attributes of the module it replaces that it lacks (e.g. RAFT's
    ``self.update_block.hidden_state_size``): the untraced parent code may read them."""
    for key, value in vars(original).items():
        if not key.startswith("_") and key not in vars(fused) and not hasattr(type(fused), key):
            setattr(fused, key, value)


def _swap_module(root: nn.Module, old: nn.Module, new: nn.Module) -> None:
    """Put ``new`` wherever ``old`` is a child in ``root``'s module tree."""
    for mod in list(root.modules()):
        for name, child in list(mod.named_children()):
            if child is old:
                setattr(mod, name, new)


def _rewrite_submodules(work: nn.Module, run_args: Tuple[Any, ...], reference: Any, opts: _Options,
                        plan: _DtypePlan, report: FusionReport, trace_error: Exception) -> nn.Module:
    """Descend the module tree; replace every largest sub-module that traces by its rewritten GraphModule,
    verified on the inputs it received while ``work`` ran on the example input."""
    report.traced_whole = False
    report.submodules["<root>"] = f"not traced: {type(trace_error).__name__}: {str(trace_error).splitlines()[0]}"
    calls = capture_calls(work, run_args)
    done: Dict[int, nn.Module] = {}
    replaced: List[Tuple[str, nn.Module, FusionReport]] = []  # (path, original sub-module, its report)

    def visit(parent: nn.Module, prefix: str) -> None:
        for name, child in list(parent.named_children()):
            path = f"{prefix}.{name}" if prefix else name
            if id(child) in done:
                setattr(parent, name, done[id(child)])
                continue
            if not any(True for _ in child.children()):
                continue  # a leaf: nothing inside to fuse
            if id(child) not in calls:
                if any(id(m) in calls for m in child.modules()):  # a container (ModuleList) whose items ran
                    visit(child, path)
                else:
                    report.submodules[path] = "not run on the example input; left as is"
                continue
            try:
                gm = trace(child)
            except Exception as exc:  # noqa: BLE001
                report.submodules[path] = f"not traced: {type(exc).__name__}: {str(exc).splitlines()[0][:160]}"
                visit(child, path)
                continue
            try:
                fused, sub = _rewrite_graph_module(child, gm, calls[id(child)], opts, plan)
            except UnfaithfulTrace as exc:
                report.submodules[path] = f"trace differs from the module: {str(exc)[:160]}"
                visit(child, path)
                continue
            except FusionError as exc:
                report.submodules[path] = f"left as is: {exc}"
                continue
            report.submodules[path] = f"rewritten: {sub.total_fused} rewrites"
            replaced.append((path, child, sub))
            _keep_attributes(child, fused)
            done[id(child)] = fused
            setattr(parent, name, fused)

    visit(work, "")
    if opts.verify:
        whole = [Call(run_args, {}, reference)]
        cmp = _check(work, whole, opts)
        if not cmp.ok:
            # A sub-module equal on its own recorded inputs and output can still change the whole model through
            # side effects (e.g. `a += b` on a tensor it also appends to a list argument). Undo one sub-module
            # rewrite if that suffices (trying each, latest first), else undo them latest first until the whole
            # model is equal again (the original model is, so this ends).
            detail, undo = cmp.detail, []
            for i in reversed(range(len(replaced))):
                _swap_module(work, done[id(replaced[i][1])], replaced[i][1])
                cmp = _check(work, whole, opts)
                if cmp.ok:
                    undo = [i]
                    break
                _swap_module(work, replaced[i][1], done[id(replaced[i][1])])
            for i in reversed(range(len(replaced)) if not undo else []):
                _swap_module(work, done[id(replaced[i][1])], replaced[i][1])
                undo.append(i)
                cmp = _check(work, whole, opts)
                if cmp.ok:
                    break
            for i in sorted(undo, reverse=True):
                path, original, _ = replaced.pop(i)
                done.pop(id(original))
                report.submodules[path] = f"rewrite undone: the whole model differed with it ({detail})"
                report.warnings.append(f"sub-module {path}: rewrite undone, the whole model differed with it")
        report.verified, report.max_abs_error, report.max_rel_error = cmp.ok, cmp.max_abs, cmp.max_rel
        report.tolerance, report.verify_dtype = cmp.tolerance, str(_leaf_dtype(reference)).replace("torch.", "")
        if not cmp.ok:
            raise FusionError(f"model with rewritten sub-modules differs from the original: {cmp.detail}")
    for path, _, sub in replaced:
        report.merge(path, sub)
    return work
