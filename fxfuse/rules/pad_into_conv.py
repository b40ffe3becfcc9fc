"""Zero padding next to convs.

* ``conv(zero_pad(x, q), padding=p)`` ⇒ ``conv(x, padding=p + q)`` (symmetric pads, ``padding_mode='zeros'``).
* ``zero_pad(pointwise_conv(x))`` with a zero bias ⇒ ``pointwise_conv(zero_pad(x))``: a bias-free 1x1 conv maps
  zeros to zeros. This moves DBB's "BN-and-pad" padding to the block input, where the first rule absorbs it."""

from __future__ import annotations

from typing import Optional

from torch import fx

from .._graph import ConvRead
from .._registry import Rewrite, RewriteContext, register_rule


@register_rule("pad_into_conv", priority=30)
def absorb_zero_pad(ctx: RewriteContext, node: fx.Node) -> Optional[Rewrite]:
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


@register_rule("pad_through_pointwise", priority=31)
def move_pad_before_pointwise(ctx: RewriteContext, node: fx.Node) -> Optional[Rewrite]:
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
        new_pad = ctx.graph.node_copy(node, lambda n: conv.input if n is conv_node else n)
        node.prepend(new_pad)
        new_pad.meta = {}  # re-propagated before the next sweep
        ctx.replace(node, ctx.insert_conv(conv.spec, new_pad, before=node, like=conv.like, name=conv_node.name),
                    consumed=[conv_node])

    return rewrite
