"""Shape propagation: ``node.meta['tensor_meta']`` for every node (``torch.fx.passes.shape_prop.ShapeProp``),
run on the ``meta`` device."""

from __future__ import annotations

import contextlib
import io
from typing import Any, Callable, Dict, Mapping, Optional, Tuple

import torch
from torch import Tensor, fx, nn
from torch.fx.passes.shape_prop import ShapeProp
from torch.utils._pytree import tree_leaves, tree_map

from ..ir import ops
from ..ir.read.args import SHAPED
from .submodules import Call

# BatchNorm spellings returning one tensor shaped like their input (the tuple-returning ATen ones are left to their
# meta kernels): the shortcut below applies to them in eval form (``training`` False).
_SINGLE_BATCH_NORM = (*ops.BATCH_NORM_FUNCS, ops.aten.batch_norm.default)


def _mutable(a: Any) -> Any:
    """fx's immutable lists/dicts inside node arguments as plain ones (tuples stay tuples)."""
    if isinstance(a, (list, tuple)):
        items = [_mutable(v) for v in a]
        return items if isinstance(a, list) else (type(a)(*items) if hasattr(a, "_fields") else type(a)(items))
    if isinstance(a, dict):
        return {k: _mutable(v) for k, v in a.items()}
    return a


class _MetaShapeProp(ShapeProp):
    """``ShapeProp`` that (1) gives an eval BatchNorm's output (module, ``F.batch_norm`` or ATen ``batch_norm``) the
    input's meta tensor layout directly (its output is shaped like its input; PyTorch's meta BatchNorm is a Python
    decomposition costing milliseconds per call: 4x the whole propagation of an exported ResNet) and
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

    def call_function(self, target: Any, args: Any, kwargs: Any) -> Any:
        if target in _SINGLE_BATCH_NORM and args and isinstance(args[0], Tensor) and args[0].is_meta \
                and not _training(args, kwargs):
            return torch.empty_like(args[0])
        return super().call_function(target, args, kwargs)


def _training(args: Any, kwargs: Any) -> bool:
    """The ``training`` flag of a single-output BatchNorm call (positional index 5 in every such spelling; True
    when it cannot be read as a plain bool, so the real meta kernel decides)."""
    flag = args[5] if len(args) > 5 else kwargs.get("training", False)
    return not isinstance(flag, bool) or flag


class _Holder(nn.Module):
    def __init__(self, gm: fx.GraphModule) -> None:
        super().__init__()
        self.gm = gm

    def forward(self, *args: Any) -> Any:
        return _MetaShapeProp(self.gm).propagate(*args)


def propagate_shapes(gm: fx.GraphModule, call: Call, dtypes: Optional[Mapping[int, torch.dtype]] = None) -> None:
    """Fill ``node.meta['tensor_meta']`` for every node. Runs on the ``meta`` device (no arithmetic, no copies of
    the weights); falls back to a real run where an op has no meta kernel. ``dtypes``: ``id(tensor) -> dtype`` for
    parameters / buffers to propagate as if cast to that dtype (fused layers held in float64 until the end of a
    rewrite, in a graph that runs in the model's dtype)."""
    placeholders = [n for n in gm.graph.nodes if n.op == "placeholder"]
    values = list(call.args)
    if getattr(gm.graph._codegen, "pytree_info", None) is not None:
        # A torch.export graph (fxfuse.capture.export): its placeholders are the flattened (args, kwargs) leaves.
        values = tree_leaves((tuple(call.args), dict(call.kwargs)))
    for p in placeholders[len(values):]:
        values.append(call.kwargs.get(p.target, p.args[0] if p.args else None))
    cast = dtypes or {}

    def to_meta(t: Any) -> Any:
        return torch.empty_like(t, device="meta", dtype=cast.get(id(t), t.dtype)) if isinstance(t, Tensor) else t

    def as_cast(t: Tensor) -> Tensor:
        return t.to(cast[id(t)]) if id(t) in cast else t

    def state(convert: Callable[[Tensor], Tensor]) -> Dict[str, Tensor]:
        return {f"gm.{k}": convert(v) for k, v in list(gm.named_parameters(remove_duplicate=False))
                + list(gm.named_buffers(remove_duplicate=False))}

    # ShapeProp prints a traceback before re-raising; failures here are reported by the caller, not on stderr.
    with contextlib.redirect_stderr(io.StringIO()), torch.no_grad():
        try:
            torch.func.functional_call(_Holder(gm), state(to_meta), tuple(tree_map(to_meta, values)),
                                       tie_weights=False)
        except Exception:  # some op lacks a meta kernel: do it for real
            torch.func.functional_call(_Holder(gm), state(as_cast), tuple(values), tie_weights=False)
    for node in gm.graph.nodes:
        node.meta[SHAPED] = True
