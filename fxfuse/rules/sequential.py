"""conv → conv with nothing in between ⇒ one conv (DBB 1x1→kxk and 1x1→avg-pool branches).

``W[n, c] = Σ_m W2[n, m] ⋆ W1[m, c]``, ``b = b2 + Σ W2·b1`` (see :func:`fxfuse.ir.folds.compose` for the
exactness conditions). Merged only when it does not add work, or when the merged conv lands in a sum next to a
sibling conv on the same input that already covers its kernel (then the branch-sum rule absorbs it)."""

from __future__ import annotations

import math
from typing import Optional

from torch import fx

from ..ir import folds
from ..ir.algebra import ConvSpec
from ..ir.ops import is_metadata_user
from ..ir.read import ConvRead
from ..reasons import Reason
from ..rewrite import Rewrite, RewriteContext, register_rule


def _spatial(ctx: RewriteContext, node: fx.Node) -> int:
    shape = ctx.shape(node)
    return math.prod(shape[2:]) if shape is not None else 1


def _absorbed_by_sibling(ctx: RewriteContext, node: fx.Node, merged: ConvSpec, source: fx.Node) -> bool:
    """Does ``node``'s output flow (through single-user affines) into a sum that has another conv term reading
    ``source`` (or what ``source`` zero-pads) with a kernel at least as large as ``merged``'s?"""
    pad = ctx.read.zero_pad(source)
    sources = {source, pad[0]} if pad else {source}
    cur = node
    for _ in range(8):
        user = ctx.single_user(cur)
        if user is None:
            return False
        if ctx.read.sum(user) is not None:
            break
        read = ctx.read.affine(user)
        if read is None or getattr(read, "input", None) is not cur:
            return False
        cur = user
    else:
        return False
    stack = [user]
    while stack:
        s = stack.pop()
        for operand in s.args:
            if not isinstance(operand, fx.Node) or operand is cur:
                continue
            if ctx.read.sum(operand) is not None:
                stack.append(operand)
                continue
            sib = ctx.read.conv(operand)
            if (isinstance(sib, ConvRead) and sib.kind == "conv" and sib.input in sources
                    and all(a >= b for a, b in zip(sib.spec.kernel_size, merged.kernel_size))
                    and merged.groups % sib.spec.groups == 0):
                return True
    return False


@register_rule("sequential")
def sequential(ctx: RewriteContext, node: fx.Node) -> Optional[Rewrite]:
    """Merge a conv/avg-pool that reads only the output of another conv/avg-pool into one conv."""
    second = ctx.read.as_conv(node)
    if not isinstance(second, ConvRead) or second.kind not in ("conv", "avg_pool"):
        return None
    mid = second.input
    first = ctx.read.as_conv(mid)
    if not isinstance(first, ConvRead) or first.kind not in ("conv", "avg_pool"):
        return None
    if first.kind == "avg_pool" and second.kind == "avg_pool":
        return None
    if ctx.single_user(mid) is not node:
        return ctx.skip(node, Reason.OTHER_USERS, f"intermediate {mid.name} has other users")
    if any(is_metadata_user(u, mid) for u in mid.users):
        return ctx.skip(node, Reason.OTHER_USERS, f"the shape of intermediate {mid.name} is read")
    refusal = folds.why_not_composable(first.spec, second.spec)
    if refusal is not None:
        return ctx.skip(node, refusal.code, refusal.reason)
    merged = folds.compose(first.spec, second.spec)
    # An avg-pool's own cost is memory traffic, not MACs: count it as free, and merge a conv with a pool only if
    # that strictly lowers the conv work (DenseNet's 1x1 conv -> 2x2/2 pool as one dense 2x2/2 conv has equal
    # MACs and runs 1.7x slower on CPU).
    separate = sum(r.spec.macs_per_output_pixel() * _spatial(ctx, n)
                   for r, n in ((first, mid), (second, node)) if r.kind != "avg_pool")
    merged_work = merged.macs_per_output_pixel() * _spatial(ctx, node)
    more = merged_work >= separate if "avg_pool" in (first.kind, second.kind) else merged_work > separate
    if more and not _absorbed_by_sibling(ctx, node, merged, first.input):
        return ctx.skip(node, Reason.MORE_WORK, "merging would increase the work and no sibling branch absorbs it")
    like = second.like if second.like is not None else first.like

    def rewrite() -> None:
        ctx.replace(node, ctx.insert_conv(merged, first.input, before=node, like=like, name=node.name),
                    consumed=[])
        ctx.erase_if_dead(mid)

    return rewrite
