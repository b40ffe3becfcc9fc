"""Shape assertions that the graph already guarantees ⇒ removed (``keep_asserts=True`` keeps them).

Model-zoo layers check their input in forward (``torch._assert(x.ndim == 4, …)``, ``x.dim() == 4``,
``x.shape[1] == C``). Once their BatchNorm is folded the check stays behind on the conv output and costs a
tensor-attribute read and a Python call per block. A check is removed when its condition evaluates to True from
facts that hold for every input the fused graph accepts: the rank of a tensor computed from a convolution (the
conv fixes it: batched input; an unbatched input, which the original layer may have rejected, is then accepted)
and the channel count of a conv output (fixed by its weight). Checks on graph inputs, on batch or spatial sizes,
or on anything else are kept.
"""

from __future__ import annotations

from typing import Any, Optional

from torch import fx

from ..ir import ops
from ..ir.read import ConvRead, arg
from ..rewrite import Rewrite, RewriteContext, register_rule

_UNKNOWN = object()


def _after_conv(ctx: RewriteContext, node: fx.Node, seen: Optional[set] = None) -> bool:
    """Whether ``node`` is computed from the output of a convolution (so its rank is fixed)."""
    seen = set() if seen is None else seen
    stack = [node]
    while stack:
        n = stack.pop()
        if n in seen or n.op == "placeholder":
            continue
        seen.add(n)
        if ops.op_kind(n, ctx.read.modules) == "conv":
            return True
        stack.extend(n.all_input_nodes)
    return False


def _rank(ctx: RewriteContext, x: Any) -> Any:
    shape = ctx.shape(x)
    return len(shape) if shape is not None and _after_conv(ctx, x) else _UNKNOWN


def _channels(ctx: RewriteContext, x: Any) -> Any:
    shape = ctx.shape(x)
    fixed = isinstance(x, fx.Node) and isinstance(ctx.read.conv(x), ConvRead)
    return int(shape[1]) if fixed and shape is not None and len(shape) > 1 else _UNKNOWN


def _value(ctx: RewriteContext, a: Any) -> Any:
    """The value of ``a`` if the graph guarantees it for every accepted input, else ``_UNKNOWN``."""
    if not isinstance(a, fx.Node):
        return a if isinstance(a, (bool, int, float, str, tuple)) else _UNKNOWN
    if ops.is_attr_read(a, "ndim"):
        return _rank(ctx, a.args[0])
    if a.op == "call_method" and a.target in ops.RANK_METHODS and len(a.args) == 1:
        return _rank(ctx, a.args[0])
    if ops.is_size_call(a, 1):
        return _channels(ctx, a.args[0])
    if ops.is_getitem(a, 1):
        src = a.args[0]
        if isinstance(src, fx.Node) and (ops.is_attr_read(src, "shape") or ops.is_size_call(src)):
            return _channels(ctx, src.args[0])
        return _UNKNOWN
    if a.op == "call_function" and a.target in ops.COMPARE_FUNCS and len(a.args) == 2 and not a.kwargs:
        left, right = _value(ctx, a.args[0]), _value(ctx, a.args[1])
        if left is _UNKNOWN or right is _UNKNOWN:
            return _UNKNOWN
        return ops.COMPARE_FUNCS[a.target](left, right)
    if a.op == "call_function" and a.target in ops.NOT_FUNCS and len(a.args) == 1:
        inner = _value(ctx, a.args[0])
        return _UNKNOWN if inner is _UNKNOWN else not inner
    return _UNKNOWN


@register_rule("shape_assert")
def shape_assert(ctx: RewriteContext, node: fx.Node) -> Optional[Rewrite]:
    """Remove ``torch._assert(cond, msg)`` when the graph guarantees ``cond``."""
    if node.op != "call_function" or node.target not in ops.TORCH_ASSERT_FUNCS or node.users:
        return None
    cond = arg(node, 0, "condition")
    if not isinstance(cond, fx.Node) or _value(ctx, cond) is not True:
        return None

    def rewrite() -> None:
        ctx.erase_unused(node)

    return rewrite
