"""conv / conv-transpose / linear → per-channel affine (BatchNorm, ``x * c + d``) ⇒ one layer.

``W' = a·W`` along output channels (group-mapped axis 1 for transposed convs), ``b' = a·b + c``.
Exact whenever the affine uses eval statistics and the layer's output has no other real user."""

from __future__ import annotations

from typing import Optional

from torch import fx

from ..ir import folds
from ..ir.read import AffineRead, ConvRead, Refusal
from ..reasons import Reason
from ..rewrite import Rewrite, RewriteContext, register_rule


@register_rule("conv_bn")
def conv_bn(ctx: RewriteContext, node: fx.Node) -> Optional[Rewrite]:
    """Fold a per-channel affine (BN, mul/add/sub/div by a per-channel constant) into the conv/linear before it."""
    read = ctx.read.affine(node)
    producer = node.args[0] if node.args and isinstance(node.args[0], fx.Node) else None
    if isinstance(read, Refusal):
        if producer is not None and (isinstance(ctx.read.conv(producer), ConvRead) or ctx.read.linear(producer)):
            ctx.skip(node, read.code, read.reason)
        return None
    if isinstance(read, AffineRead):
        permuted = ctx.read.permute(read.input)
        if permuted is not None:
            return _through_permute(ctx, node, read, *permuted)
    if read is None:
        shape = ctx.shape(node)
        if shape is None or len(shape) < 3:
            return None
        read = ctx.read.affine(node, axis=len(shape) - 1)  # e.g. Linear on [B, T, C] scaled per feature
        if not isinstance(read, AffineRead):
            return None
    producer = read.input
    conv = ctx.read.conv(producer)
    linear = ctx.read.linear(producer) if conv is None else None
    if not isinstance(conv, ConvRead) and linear is None:
        return None
    if linear is not None and read.axis != read.ndim - 1:
        read = ctx.read.affine(node, axis=read.ndim - 1)  # channel axis of a linear output is the last one
        if not isinstance(read, AffineRead) or read.kind == "batch_norm" and read.axis != read.ndim - 1:
            return ctx.skip(node, Reason.AXIS, "affine is not along the linear layer's output features")
    if conv is not None and read.axis != 1:
        return ctx.skip(node, Reason.AXIS, "the affine after this conv is not along its output channels")
    if ctx.single_user(producer) is not node:
        return ctx.skip(node, Reason.OTHER_USERS, f"{producer.name} has other users besides this affine "
                                                  f"({', '.join(u.name for u in ctx.real_users(producer))})")

    if isinstance(conv, ConvRead):
        spec = folds.conv_then_affine(conv.spec, read.affine)

        def rewrite() -> None:
            new = ctx.insert_conv(spec, conv.input, before=node, like=conv.like, name=producer.name)
            ctx.replace(node, new, consumed=[producer])

        return rewrite
    if linear is None:
        return None

    weight, bias = folds.linear_then_affine(linear.weight, linear.bias, read.affine)

    def rewrite_linear() -> None:
        new = ctx.insert_linear(weight, bias, linear.input, before=node, like=linear.like, name=producer.name)
        ctx.replace(node, new, consumed=[producer])

    return rewrite_linear


def _through_permute(ctx: RewriteContext, node: fx.Node, read: AffineRead, source: fx.Node,
                     dims: tuple) -> Optional[Rewrite]:
    """``affine(permute(layer(x)))`` where the affine's axis is the layer's channel axis before the permute
    (channels-last Linear → ``permute(0, 3, 1, 2)`` → BatchNorm2d): fold into the layer, keep the permute."""
    permute = read.input
    axis = dims[read.axis]
    conv = ctx.read.conv(source)
    linear = ctx.read.linear(source) if conv is None else None
    if isinstance(conv, ConvRead) and conv.kind == "conv" and axis == 1:
        spec = folds.conv_then_affine(conv.spec, read.affine)
    elif linear is not None and axis == len(dims) - 1:
        weight, bias = folds.linear_then_affine(linear.weight, linear.bias, read.affine)
    else:
        return None
    if ctx.single_user(permute) is not node or ctx.single_user(source) is not permute:
        return ctx.skip(node, Reason.OTHER_USERS,
                        f"{source.name} → {permute.name} has other users besides this affine")

    def rewrite() -> None:
        if isinstance(conv, ConvRead):  # (then linear is None: it is read only where conv is not)
            new = ctx.insert_conv(spec, conv.input, before=permute, like=conv.like, name=source.name,
                                  shape_of=source)
        else:
            assert linear is not None
            new = ctx.insert_linear(weight, bias, linear.input, before=permute, like=linear.like, name=source.name,
                                    shape_of=source)
        ctx.replace_input(permute, source, new)
        ctx.replace(node, permute, consumed=[source])

    return rewrite
