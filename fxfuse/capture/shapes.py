"""Shape propagation: ``node.meta['tensor_meta']`` for every node (``torch.fx.passes.shape_prop.ShapeProp``),
run on the ``meta`` device."""

from __future__ import annotations

import contextlib
import io
from typing import Any, Dict, Tuple

import torch
from torch import Tensor, fx, nn
from torch.fx.passes.shape_prop import ShapeProp
from torch.utils._pytree import tree_leaves, tree_map

from .submodules import Call


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
    if getattr(gm.graph._codegen, "pytree_info", None) is not None:
        # A torch.export graph (fxfuse.capture.export): its placeholders are the flattened (args, kwargs) leaves.
        values = tree_leaves((tuple(call.args), dict(call.kwargs)))
    for p in placeholders[len(values):]:
        values.append(call.kwargs.get(p.target, p.args[0] if p.args else None))

    def to_meta(t: Any) -> Any:
        return torch.empty_like(t, device="meta") if isinstance(t, Tensor) else t

    # ShapeProp prints a traceback before re-raising; failures here are reported by the caller, not on stderr.
    with contextlib.redirect_stderr(io.StringIO()):
        try:
            state = {f"gm.{k}": to_meta(v) for k, v in list(gm.named_parameters(remove_duplicate=False))
                     + list(gm.named_buffers(remove_duplicate=False))}
            with torch.no_grad():
                torch.func.functional_call(_Holder(gm), state, tuple(tree_map(to_meta, values)), tie_weights=False)
            return
        except Exception:  # some op lacks a meta kernel: do it for real
            pass
        with torch.no_grad():
            _MetaShapeProp(gm).propagate(*values)
