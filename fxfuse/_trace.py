"""Tracing front-end: ``torch.fx`` symbolic tracing, and per-sub-module input capture for models that do not
trace as a whole (data-dependent control flow: detection heads, RAFT, …)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Dict, List, Tuple

import torch
from torch import Tensor, fx, nn
from torch.utils._pytree import tree_map

MAX_CALLS_KEPT = 2


@dataclass
class Call:
    """One recorded call of a module: positional and keyword inputs, and what it returned."""

    args: Tuple[Any, ...]
    kwargs: Dict[str, Any]
    output: Any


def trace(module: nn.Module) -> fx.GraphModule:
    """``torch.fx.symbolic_trace``; ``torch.nn`` modules stay leaves, everything else is inlined."""
    return fx.symbolic_trace(module)


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
        with torch.no_grad():
            model(*args)
    finally:
        for h in handles:
            h.remove()
    return calls
