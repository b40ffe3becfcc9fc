"""``conv(zero_pad(x, q), padding=p)`` ⇒ ``conv(x, padding=p + q)`` (symmetric pads, ``padding_mode='zeros'``)."""

from __future__ import annotations

from typing import Optional

from torch import fx

from ..ir.read import ConvRead
from ..rewrite import Rewrite, RewriteContext, register_rule


@register_rule("pad_into_conv")
def pad_into_conv(ctx: RewriteContext, node: fx.Node) -> Optional[Rewrite]:
    """Absorb a symmetric zero ``F.pad`` into the conv that reads it."""
    conv = ctx.read.conv(node)
    if not isinstance(conv, ConvRead) or conv.kind != "conv" or conv.spec.padding_mode != "zeros":
        return None
    pad = ctx.read.zero_pad(conv.input)
    if pad is None:
        return None
    source, extra = pad
    spec = conv.spec.with_(padding=tuple(p + q for p, q in zip(conv.spec.padding, extra)))

    def rewrite() -> None:
        pad_node = conv.input
        ctx.replace(node, ctx.insert_conv(spec, source, before=node, like=conv.like, name=node.name))
        ctx.erase_if_dead(pad_node)

    return rewrite
