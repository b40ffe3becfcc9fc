"""Horizontal fusion (off by default): sibling convs that read the same input with the same geometry but feed
different consumers (Inception) ⇒ one conv with stacked output channels followed by ``torch.split``.

Exact (each output channel is computed as before); whether it pays depends on the backend — see
docs/benchmarks.md. Enable per call with ``reparametrize(..., enable=["horizontal"])``. It runs in a late phase,
after every other rule has reached its fixed point, so it never hides a merge they would make."""

from __future__ import annotations

from typing import Dict, List, Optional

from torch import fx

from ..ir import folds
from ..ir.read import ConvRead
from ..rewrite import Rewrite, RewriteContext, register_rule


@register_rule("horizontal", enabled=False, phase="late")
def horizontal(ctx: RewriteContext, node: fx.Node) -> Optional[Rewrite]:
    """Stack dense sibling convs on one input into one conv + split."""
    groups: Dict[tuple, List[tuple]] = {}
    for user in node.users:
        read = ctx.read.conv(user)
        if (isinstance(read, ConvRead) and read.kind == "conv" and read.input is node and read.spec.groups == 1
                and read.spec.padding_mode == "zeros" and ctx.shape(user) is not None):
            key = (read.spec.stride, read.spec.centre(), read.spec.ndim)
            groups.setdefault(key, []).append((user, read))
    runs = [members for members in groups.values() if len(members) > 1]
    if not runs:
        return None

    def rewrite() -> None:
        for members in runs:
            reads = dict(members)
            users = ctx.in_graph_order(reads)
            first = users[0]
            spec = folds.stack_parallel([reads[u].spec for u in users])
            merged = ctx.insert_conv(spec, node, before=first, like=reads[first].like, name=first.name,
                                     same_shape=False)
            pieces = ctx.insert_split(merged, [reads[u].spec.out_channels for u in users], dim=1, before=first)
            for user, piece in zip(users, pieces):
                ctx.replace(user, piece)

    return rewrite
