"""``cat([conv_1(x), …, conv_n(x)], dim=1)`` ⇒ one conv with stacked output channels (DBB IV, Inception).

Consecutive operands that are dense (groups = 1) convs on the same input with equal stride and window centre
are placed on one tap grid and stacked along ``C_out``; other operands stay in place."""

from __future__ import annotations

from typing import List, Optional, Tuple

from torch import fx

from ..ir import folds
from ..ir.read import ConvRead
from ..rewrite import Rewrite, RewriteContext, register_rule


def _key(read: ConvRead) -> tuple:
    return (read.input, read.spec.stride, read.spec.centre())


@register_rule("concat")
def concat(ctx: RewriteContext, node: fx.Node) -> Optional[Rewrite]:
    """Stack sibling convs that feed one channel concat."""
    cat = ctx.read.cat(node)
    if cat is None:
        return None
    tensors, dim = cat
    shape = ctx.shape(node)
    if not isinstance(tensors, (list, tuple)) or shape is None or len(shape) < 3:
        return None
    if not isinstance(dim, int) or dim % len(shape) != 1:
        return None
    reads: List[Optional[ConvRead]] = []
    for t in tensors:
        r = ctx.read.conv(t) if isinstance(t, fx.Node) else None
        ok = (isinstance(r, ConvRead) and r.kind == "conv" and r.spec.groups == 1 and r.spec.padding_mode == "zeros"
              and list(t.users) == [node] and list(tensors).count(t) == 1)
        reads.append(r if ok and isinstance(r, ConvRead) else None)  # (isinstance again: for mypy)
    runs: List[Tuple[int, int, List[ConvRead]]] = []  # (start, stop, the convs of tensors[start:stop])
    i = 0
    while i < len(tensors):
        j = i + 1
        first = reads[i]
        members: List[ConvRead] = [] if first is None else [first]
        while first is not None and j < len(tensors) and (r := reads[j]) is not None and _key(r) == _key(first):
            members.append(r)
            j += 1
        if j - i > 1:
            runs.append((i, j, members))
        i = j
    if not runs:
        return None

    def rewrite() -> None:
        new_args: list = []
        consumed: List[fx.Node] = []
        pos = 0
        for start, stop, members in runs:
            new_args.extend(tensors[pos:start])
            spec = folds.stack_parallel([m.spec for m in members])
            new_args.append(ctx.insert_conv(spec, members[0].input, before=node, like=members[0].like,
                                            name=node.name, same_shape=len(runs) == 1 and stop - start == len(tensors)))
            consumed.extend(tensors[start:stop])
            pos = stop
        new_args.extend(tensors[pos:])
        if len(new_args) == 1:
            ctx.replace(node, new_args[0], consumed=consumed)
            return
        ctx.set_arg(node, 0, "tensors", new_args)
        for c in consumed:
            ctx.erase_if_dead(c)

    return rewrite
