"""Per-sub-module capture for models that do not trace as a whole (data-dependent control flow: detection
heads, RAFT, …): record what every sub-module receives and returns on the example input."""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Callable, Dict, List, Optional, Sequence, Tuple

import torch
from torch import Tensor, fx, nn
from torch.utils._pytree import tree_map

from ..errors import FusionError, UnfaithfulTrace
from .state import attributes_preserved
from .symbolic import trace

if TYPE_CHECKING:
    from ..report import FusionReport
    from ..verify import Comparison

MAX_CALLS_KEPT = 2


@dataclass
class Call:
    """One recorded call of a module: positional and keyword inputs, and what it returned."""

    args: Tuple[Any, ...]
    kwargs: Dict[str, Any]
    output: Any


def _snapshot(x: Any) -> Any:
    """Clone tensors so later in-place ops (``ReLU(inplace=True)``) cannot change what was recorded."""
    return tree_map(lambda t: t.detach().clone() if isinstance(t, Tensor) else t, x)


def capture_calls(model: nn.Module, args: Tuple[Any, ...]) -> Dict[int, List[Call]]:
    """Run ``model(*args)`` once, recording up to ``MAX_CALLS_KEPT`` calls of every sub-module (by ``id``)."""
    calls: Dict[int, List[Call]] = {}
    pending: Dict[int, List[Tuple[Tuple[Any, ...], Dict[str, Any]]]] = {}
    handles = []

    def pre_hook(mod: nn.Module, a: Tuple[Any, ...], kw: Dict[str, Any]) -> None:
        pending.setdefault(id(mod), []).append((_snapshot(a), _snapshot(kw)))

    def post_hook(mod: nn.Module, a: Tuple[Any, ...], kw: Dict[str, Any], out: Any) -> None:
        a_snap, kw_snap = pending[id(mod)].pop()
        kept = calls.setdefault(id(mod), [])
        if len(kept) < MAX_CALLS_KEPT:
            kept.append(Call(a_snap, kw_snap, _snapshot(out)))

    for mod in model.modules():
        if mod is model:
            continue
        handles.append(mod.register_forward_pre_hook(pre_hook, with_kwargs=True))
        handles.append(mod.register_forward_hook(post_hook, with_kwargs=True))
    try:
        with torch.no_grad(), attributes_preserved(model):  # a capture run leaves no cache / counter behind
            model(*args)
    finally:
        for h in handles:
            h.remove()
    return calls


# ------------------------------------------------------------------------------- the fallback walk
RewriteOne = Callable[[nn.Module, fx.GraphModule, Sequence[Call]], Tuple[nn.Module, "FusionReport"]]
Check = Callable[[nn.Module], "Comparison"]


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


def rewrite_submodules(work: nn.Module, run_args: Tuple[Any, ...], rewrite_one: RewriteOne,
                       check: Optional[Check], report: FusionReport, trace_error: Exception) -> nn.Module:
    """Descend the module tree of ``work``; replace every largest sub-module that traces by its rewritten
    GraphModule (``rewrite_one``, verified on the inputs it received while ``work`` ran on ``run_args``). With
    ``check``, the whole model is checked afterwards and sub-module rewrites that change it are undone."""
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
            except Exception as exc:  # any tracing failure: descend into the children
                report.submodules[path] = f"not traced: {type(exc).__name__}: {str(exc).splitlines()[0][:160]}"
                visit(child, path)
                continue
            try:
                fused, sub = rewrite_one(child, gm, calls[id(child)])
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
    if check is not None:
        cmp = check(work)
        if not cmp.ok:
            # A sub-module equal on its own recorded inputs and output can still change the whole model through
            # side effects (e.g. `a += b` on a tensor it also appends to a list argument). Undo one sub-module
            # rewrite if that suffices (trying each, latest first), else undo them latest first until the whole
            # model is equal again (the original model is, so this ends).
            detail, undo = cmp.detail, []
            for i in reversed(range(len(replaced))):
                _swap_module(work, done[id(replaced[i][1])], replaced[i][1])
                cmp = check(work)
                if cmp.ok:
                    undo = [i]
                    break
                _swap_module(work, replaced[i][1], done[id(replaced[i][1])])
            for i in reversed(range(len(replaced)) if not undo else []):
                _swap_module(work, done[id(replaced[i][1])], replaced[i][1])
                undo.append(i)
                cmp = check(work)
                if cmp.ok:
                    break
            for i in sorted(undo, reverse=True):
                path, original, _ = replaced.pop(i)
                done.pop(id(original))
                report.submodules[path] = f"rewrite undone: the whole model differed with it ({detail})"
                report.warnings.append(f"sub-module {path}: rewrite undone, the whole model differed with it")
        report.verified, report.max_abs_error, report.max_rel_error = cmp.ok, cmp.max_abs, cmp.max_rel
        report.tolerance = cmp.tolerance
        if not cmp.ok:
            raise FusionError(f"model with rewritten sub-modules differs from the original: {cmp.detail}")
    for path, _, sub in replaced:
        report.merge(path, sub)
    return work
