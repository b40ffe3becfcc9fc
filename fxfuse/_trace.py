"""Tracing front-end: ``torch.fx`` symbolic tracing, and per-sub-module input capture for models that do not
trace as a whole (data-dependent control flow: detection heads, RAFT, …)."""

from __future__ import annotations

import collections
from dataclasses import dataclass
from typing import Any, Dict, List, Tuple

import torch
from torch import Tensor, fx, nn
from torch.fx.passes.shape_prop import ShapeProp
from torch.utils._pytree import tree_map

MAX_CALLS_KEPT = 2


@dataclass
class Call:
    """One recorded call of a module: positional and keyword inputs, and what it returned."""

    args: Tuple[Any, ...]
    kwargs: Dict[str, Any]
    output: Any


class _Tracer(fx.Tracer):
    """``fx.Tracer`` that keeps an ``OrderedDict`` (segmentation / backbone outputs) an ``OrderedDict``: plain fx
    turns it into a ``dict``, which changes the traced module's output type (and its pytree structure)."""

    def create_arg(self, a: Any) -> Any:
        if type(a) is collections.OrderedDict:
            return self.create_node("call_function", collections.OrderedDict, (self.create_arg(list(a.items())),), {})
        return super().create_arg(a)


def trace(module: nn.Module) -> fx.GraphModule:
    """``torch.fx.symbolic_trace`` (``OrderedDict`` values kept); ``torch.nn`` modules stay leaves, everything else
    is inlined."""
    tracer = _Tracer()
    graph = tracer.trace(module)
    return fx.GraphModule(tracer.root, graph, module.__class__.__name__)


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


def _mutable(a: Any) -> Any:
    """fx's immutable lists/dicts inside node arguments as plain ones (tuples stay tuples)."""
    if isinstance(a, (list, tuple)):
        items = [_mutable(v) for v in a]
        return items if isinstance(a, list) else (type(a)(*items) if hasattr(a, "_fields") else type(a)(items))
    if isinstance(a, dict):
        return {k: _mutable(v) for k, v in a.items()}
    return a


class _MetaShapeProp(ShapeProp):
    """``ShapeProp`` that (1) gives a BatchNorm module's output the input's meta tensor layout directly (its output
    is shaped like its input; PyTorch's meta BatchNorm is a Python decomposition costing milliseconds per call) and
    (2) passes list/dict arguments as mutable copies, as the generated code does (a traced helper may mutate a
    list it receives, e.g. torchvision's ``_get_window_and_shift_size``; fx's argument lists are immutable)."""

    def fetch_args_kwargs_from_env(self, n: fx.Node) -> Tuple[Tuple[Any, ...], Dict[str, Any]]:
        args, kwargs = super().fetch_args_kwargs_from_env(n)
        return _mutable(args), _mutable(kwargs)

    def call_module(self, target: Any, args: Any, kwargs: Any) -> Any:
        if len(args) == 1 and not kwargs and isinstance(args[0], Tensor) and args[0].is_meta \
                and isinstance(self.fetch_attr(target), nn.modules.batchnorm._BatchNorm):
            return torch.empty_like(args[0])
        return super().call_module(target, args, kwargs)


class _Holder(nn.Module):
    def __init__(self, gm: fx.GraphModule) -> None:
        super().__init__()
        self.gm = gm

    def forward(self, *args: Any) -> Any:
        return _MetaShapeProp(self.gm).propagate(*args)


def propagate_shapes(gm: fx.GraphModule, call: Call) -> None:
    """Fill ``node.meta['tensor_meta']`` for every node. Runs on the ``meta`` device (no arithmetic, no copies of
    the weights); falls back to a real run where an op has no meta kernel."""
    placeholders = [n for n in gm.graph.nodes if n.op == "placeholder"]
    values = list(call.args)
    for p in placeholders[len(values):]:
        values.append(call.kwargs.get(p.target, p.args[0] if p.args else None))
    to_meta = lambda t: torch.empty_like(t, device="meta") if isinstance(t, Tensor) else t  # noqa: E731
    try:
        state = {f"gm.{k}": to_meta(v) for k, v in
                 list(gm.named_parameters(remove_duplicate=False)) + list(gm.named_buffers(remove_duplicate=False))}
        with torch.no_grad():
            torch.func.functional_call(_Holder(gm), state, tuple(tree_map(to_meta, values)), tie_weights=False)
        return
    except Exception:  # noqa: BLE001 - some op lacks a meta kernel: do it for real
        pass
    with torch.no_grad():
        _MetaShapeProp(gm).propagate(*values)
