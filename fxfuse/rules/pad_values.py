"""Pad with per-channel values ⇒ zero pad before the op that produced them (DBB's BN-and-pad layer).

DBB pads a BatchNorm's output with what the BN maps 0 to, written as
``out = F.pad(bn(x), [p] * 4); out[:, :, :p, :] = pad_values; …`` (an ATen graph holds it as a zero pad followed
by ``slice_scatter`` writes of one per-channel constant ``v`` covering the border). For a pointwise ``f`` (a
per-channel affine such as eval BN, or a 1x1 stride-1 unpadded conv) with ``f(0) = v``:
``pad_v(f(x)) = f(zero_pad(x))``. The rewrite puts the zero pad first and ``f`` (as a 1x1 conv) after it; the
other rules then fold ``f`` into its neighbours and the pad into the next conv (docs/patterns.md, `pad_values`)."""

from __future__ import annotations

from typing import List, Optional

from torch import fx

from ..ir import folds
from ..ir.read import ConvRead, Refusal
from ..reasons import Reason
from ..rewrite import Rewrite, RewriteContext, register_rule


@register_rule("pad_values")
def pad_values(ctx: RewriteContext, node: fx.Node) -> Optional[Rewrite]:
    """``pad_v(f(x))`` with ``f`` pointwise and ``f(0) = v`` ⇒ ``f(zero_pad(x))``."""
    vp = ctx.read.valued_pad(node)
    if vp is None:
        return None
    leak = _escaping(vp.pad, node)
    if leak is not None:
        return ctx.skip(node, Reason.OTHER_USERS,
                        f"{leak.name}, an intermediate of the pad-with-values, has other users")
    source = vp.input
    if ctx.single_user(source) is not vp.pad:
        return ctx.skip(node, Reason.OTHER_USERS, f"{source.name} has other users besides the pad")
    read = ctx.read.as_conv(source)
    if isinstance(read, Refusal):  # e.g. a BatchNorm normalizing by batch statistics
        return ctx.skip(node, read.code, read.reason)
    if not isinstance(read, ConvRead) or read.kind not in ("conv", "affine"):
        return ctx.skip(node, Reason.NOT_LINEAR,
                        "pad with per-channel values after an op that is not a conv or per-channel affine")
    refusal = folds.why_not_pad_values_through(read.spec, vp.values)
    if refusal is not None:
        return ctx.skip(node, refusal.code, refusal.reason)
    chain = _chain(ctx, read.input, source)
    if chain is None:
        return None

    def rewrite() -> None:
        # The pad now reads f's input, and f (its nodes copied as they are: a BN stays a BN) reads the pad.
        cur = ctx.copy_before(vp.pad, node, replacing=source, by=read.input)
        prev = read.input
        for n in chain:
            copy = ctx.copy_before(n, node, replacing=prev, by=cur)
            prev, cur = n, copy
        ctx.replace(node, cur, consumed=[source])

    return rewrite


def _chain(ctx: RewriteContext, start: fx.Node, end: fx.Node) -> Optional[List[fx.Node]]:
    """The nodes from ``start`` (exclusive) to ``end`` (inclusive), each reading the previous one as its only
    non-constant input (``getitem(batch_norm(x), 0)``, ``conv(x)``, ``x * c``), or None."""
    chain: List[fx.Node] = []
    cur = end
    while cur is not start and len(chain) < 4:
        chain.append(cur)
        inputs = [i for i in cur.all_input_nodes if ctx.read.constants.value(i) is ctx.read.constants._MISSING]
        if len(inputs) != 1:
            return None
        cur = inputs[0]
    return list(reversed(chain)) if cur is start else None


def _escaping(pad: fx.Node, node: fx.Node) -> Optional[fx.Node]:
    """A node computed from ``pad`` before ``node`` (the construct: writes, slices, copies) that is used by anything
    outside it, or None: the rewrite removes the construct, so nothing else may read it."""
    region = {pad}
    cur = pad.next
    while cur is not node and cur.op != "root":
        if any(i in region for i in cur.all_input_nodes):
            region.add(cur)
        cur = cur.next
    region.add(node)
    for n in region:
        if n is not node and any(u not in region for u in n.users):
            return n
    return None
