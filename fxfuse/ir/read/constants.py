"""Constant values: parameter-only sub-graphs evaluated once (:class:`Constants`), and constants read as
per-channel vectors."""

from __future__ import annotations

from typing import Any, Dict, Optional, Sequence

import torch
from torch import Tensor, fx, nn

from .. import ops
from ..algebra import float64
from .args import attr_target, call_target


class Constants:
    """Evaluates sub-graphs that depend only on ``get_attr`` nodes and literals (e.g. a frozen BN's
    ``w * (rv + eps).rsqrt()``), memoized. Random and in-place ops are never evaluated."""

    _MISSING = object()

    def __init__(self, gm: fx.GraphModule) -> None:
        self.gm = gm
        self.memo: Dict[fx.Node, Any] = {}

    def value(self, a: Any) -> Any:
        """The constant value of an argument (node or literal), or ``Constants._MISSING``."""
        if not isinstance(a, fx.Node):
            return a
        if a in self.memo:
            return self.memo[a]
        result = self._MISSING
        if a.op == "get_attr":
            result = _fetch_attr(self.gm, attr_target(a))
        elif a.op in ("call_function", "call_method") and ops.is_pure(a, {}) \
                and (a.all_input_nodes or isinstance(a.target, ops.OpOverload)):
            args = fx.node.map_arg(a.args, self.value)
            kwargs = fx.node.map_arg(a.kwargs, self.value)
            flat = list(args) + list(kwargs.values())
            if not any(x is self._MISSING for x in _flatten(flat)):
                try:
                    with torch.no_grad():
                        if a.op == "call_function":
                            result = call_target(a)(*args, **kwargs)
                        else:
                            result = getattr(args[0], attr_target(a))(*args[1:], **kwargs)
                except Exception:  # not evaluable as a constant: treat as non-constant
                    result = self._MISSING
        self.memo[a] = result
        return result

    def tensor(self, a: Any) -> Optional[Tensor]:
        """The constant as a tensor (numbers become 0-d tensors), or ``None`` if not constant."""
        v = self.value(a)
        if isinstance(v, Tensor):
            return v.detach()
        if isinstance(v, (int, float)) and not isinstance(v, bool):
            return torch.tensor(float(v), dtype=torch.float64)
        return None


def _flatten(xs: Sequence[Any]) -> list:
    out = []
    for x in xs:
        if isinstance(x, (list, tuple)):
            out.extend(_flatten(x))
        elif isinstance(x, dict):
            out.extend(_flatten(list(x.values())))
        else:
            out.append(x)
    return out


def _fetch_attr(gm: nn.Module, target: str) -> Any:
    obj: Any = gm
    for part in target.split("."):
        obj = getattr(obj, part)
    return obj




def _uniform_along_all_but(c: Tensor, ndim: int, axis: int) -> Tensor:
    """``c`` (broadcasting against an ``ndim`` tensor) with every other axis along which it holds one value
    shrunk to size 1 (a constant already expanded to the written region's shape)."""
    if c.dim() > ndim:
        return c
    c = c.reshape([1] * (ndim - c.dim()) + list(c.shape))
    for i in range(ndim):
        if i != axis and c.shape[i] > 1 and bool((c == c.narrow(i, 0, 1)).all()):
            c = c.narrow(i, 0, 1)
    return c


def _per_channel(c: Tensor, ndim: int, axis: int, channels: int) -> Optional[Tensor]:
    """``c`` as a ``[channels]`` float64 vector if it broadcasts against an ``ndim`` tensor only along ``axis``
    without enlarging it; else ``None``."""
    if c.dim() > ndim:
        return None
    shape = [1] * (ndim - c.dim()) + list(c.shape)
    if any(s != 1 for i, s in enumerate(shape) if i != axis) or shape[axis] not in (1, channels):
        return None
    return float64(c).reshape(-1).expand(channels).clone()
