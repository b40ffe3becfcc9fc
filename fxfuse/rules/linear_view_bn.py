"""Linear → (view to ``[N, C]``) → BatchNorm1d → (view back) ⇒ one Linear.

Transformer-style code normalizes a ``[B, T, C]`` Linear output as ``bn(y.flatten(0, 1)).reshape_as(y)``. The
views only merge the leading axes, so the BN is still a per-feature affine of the Linear's output:
``W' = a[:, None]·W``, ``b' = a·b + c``."""

from __future__ import annotations

import math
from typing import Optional

from torch import fx

from ..ir import folds
from ..ir.ops import is_view
from ..ir.read import AffineRead, arg_node
from ..reasons import Reason
from ..rewrite import Rewrite, RewriteContext, register_rule


@register_rule("linear_view_bn")
def linear_view_bn(ctx: RewriteContext, node: fx.Node) -> Optional[Rewrite]:
    """``view_back(bn(view(linear(x))))`` with views that only merge leading axes."""
    if not is_view(node) or not isinstance(node.args[0], fx.Node):
        return None
    bn_node = node.args[0]
    read = ctx.read.affine(bn_node)
    if not isinstance(read, AffineRead) or read.kind != "batch_norm" or not is_view(read.input):
        return None
    view = read.input
    producer = arg_node(view, 0)
    if producer is None:
        return None
    linear = ctx.read.linear(producer)
    if linear is None:
        return None
    out, flat, back = ctx.shape(producer), ctx.shape(view), ctx.shape(node)
    if out is None or flat is None or back is None or len(flat) != 2 or tuple(back) != tuple(out):
        return None
    if flat[1] != out[-1] or flat[0] != math.prod(out[:-1]):
        return None  # the view mixes the feature axis: not a per-feature affine
    if ctx.single_user(producer) is not view or ctx.single_user(view) is not bn_node \
            or ctx.single_user(bn_node) is not node:
        return ctx.skip(node, Reason.OTHER_USERS,
                        "an intermediate of the linear → view → BN → view chain has other users")
    weight, bias = folds.linear_then_affine(linear.weight, linear.bias, read.affine)

    def rewrite() -> None:
        new = ctx.insert_linear(weight, bias, linear.input, before=node, like=linear.like, name=producer.name)
        ctx.replace(node, new, consumed=[producer, view, bn_node])

    return rewrite
