"""per-channel affine (BatchNorm, ``x * c + d``) → conv / linear ⇒ one layer.

``W'[o, j] = W[o, j]·a[in(o, j)]``, ``b' = b + Σ W·c``. Exact only where the conv reads no zero padding or
the shift is zero (docs/patterns.md, `bn_conv`): zero-padding ``a·x + c`` is not ``a·``(zero-padded ``x``) ``+ c``.
Reflect / replicate / circular pads between them (or as the conv's ``padding_mode``) copy values within a channel
and commute with the affine: ``conv(pad(a·x + c)) = conv'(pad(x))``."""

from __future__ import annotations

from typing import List, Optional

from torch import fx

from ..ir import folds
from ..ir.read import AffineRead, ConvRead
from ..reasons import Reason
from ..rewrite import Rewrite, RewriteContext, register_rule


@register_rule("bn_conv")
def bn_conv(ctx: RewriteContext, node: fx.Node) -> Optional[Rewrite]:
    """Fold a per-channel affine into the conv/linear that is its only user."""
    conv = ctx.read.conv(node)
    linear = ctx.read.linear(node) if conv is None else None
    if isinstance(conv, ConvRead) and conv.kind in ("conv", "conv_transpose"):  # transposed: skipped, with why
        source = conv.input
    elif linear is not None:
        source = linear.input
    else:
        return None
    pads: List[fx.Node] = []  # copying pads between the affine and the conv, nearest the conv first
    padded = ctx.read.copying_pad(source) if conv is not None else None
    while padded is not None and ctx.single_user(source) is (pads[-1] if pads else node):
        pads.append(source)
        source, padded = padded, ctx.read.copying_pad(padded)
    read = ctx.read.affine(source)
    if linear is not None and isinstance(read, AffineRead) and read.axis != read.ndim - 1:
        read = ctx.read.affine(source, axis=read.ndim - 1)
        if isinstance(read, AffineRead) and read.axis != read.ndim - 1:
            return ctx.skip(node, Reason.AXIS, "the affine before this linear layer is not along its input features")
    if not isinstance(read, AffineRead):
        return None
    first = pads[-1] if pads else node  # what reads the affine's output
    if ctx.single_user(source) is not first:
        others = ", ".join(u.name for u in ctx.real_users(source) if u is not first)
        return ctx.skip(node, Reason.OTHER_USERS, f"the affine {source.name} before it also feeds {others}")
    if isinstance(conv, ConvRead):
        if read.axis != 1:
            return ctx.skip(node, Reason.AXIS, "the affine before this conv is not along its input channels")
        refusal = folds.why_not_affine_then_conv(read.affine, conv.spec)
        if refusal is not None:
            return ctx.skip(node, refusal.code, refusal.reason)
        spec = folds.affine_then_conv(read.affine, conv.spec)

        def rewrite() -> None:
            x = read.input
            for pad, reads in zip(reversed(pads), [source, *reversed(pads)]):  # the pads, now on the affine's input
                x = ctx.copy_before(pad, node, replacing=reads, by=x)
            new = ctx.insert_conv(spec, x, before=node, like=conv.like, name=node.name)
            ctx.replace(node, new, consumed=[*pads, source])

        return rewrite
    if linear is None:
        return None

    weight, bias = folds.affine_then_linear(read.affine, linear.weight, linear.bias)

    def rewrite_linear() -> None:
        new = ctx.insert_linear(weight, bias, read.input, before=node, like=linear.like, name=node.name)
        ctx.replace(node, new, consumed=[source])

    return rewrite_linear
