"""``zero_pad(pointwise_conv(x))`` with a zero bias ⇒ ``pointwise_conv(zero_pad(x))``: a bias-free 1x1 conv maps
zeros to zeros. This moves DBB's "BN-and-pad" padding to the block input, where ``pad_into_conv`` absorbs it."""

from __future__ import annotations

from typing import Optional

from torch import fx

from ..ir.read import ConvRead
from ..rewrite import Rewrite, RewriteContext, register_rule


@register_rule("pad_through_pointwise")
def pad_through_pointwise(ctx: RewriteContext, node: fx.Node) -> Optional[Rewrite]:
    """``zero_pad(conv1x1(x))`` ⇒ ``conv1x1(zero_pad(x))`` when the 1x1 conv has no bias."""
    pad = ctx.read.zero_pad(node)
    if pad is None:
        return None
    conv_node, _ = pad
    conv = ctx.read.conv(conv_node)
    if not isinstance(conv, ConvRead) or conv.kind != "conv" or not conv.spec.is_pointwise:
        return None
    if bool((conv.spec.bias != 0).any()):
        return None
    if list(conv_node.users) != [node]:
        return None  # other users (or a shape read) need the unpadded conv output

    def rewrite() -> None:
        new_pad = ctx.copy_before(node, node, replacing=conv_node, by=conv.input)
        ctx.replace(node, ctx.insert_conv(conv.spec, new_pad, before=node, like=conv.like, name=conv_node.name),
                    consumed=[conv_node])

    return rewrite
