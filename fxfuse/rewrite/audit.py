"""Never silent: after the rules, every op of a fusable kind still in the graph is named in ``report.unfused``.

The rules report the candidates they look at (``ctx.skip``); this audit covers the rest, so that the property holds
by construction: every BatchNorm, every per-channel affine with a per-channel constant (``x·γ``, ``x + β`` with
``[C]``-shaped constants) and every avg-pool that is a term of a sum (directly or under per-channel affines) that is
left executing carries at least one entry. Entries it adds are attributed to the pseudo-rule :data:`AUDIT`, with
the code of the condition that keeps the op: the reader's refusal (batch statistics, a pool that is no conv …),
:attr:`Reason.NO_PARTNER` (no conv / linear layer to fold into, no conv branch beside a pool term) or
:attr:`Reason.NOT_MATCHED` (a layer is next to it, but no enabled rule matched).
"""

from __future__ import annotations

from typing import Dict, Optional, Sequence, Tuple

from torch import fx

from ..ir import ops
from ..ir.read import AffineRead, ConvRead, Refusal
from ..reasons import Reason
from ..report import Unfused
from .context import RewriteContext

AUDIT = "residue"  # the rule name of the entries the audit adds (not a registered rule)


def audit(ctx: RewriteContext, reported: Sequence[Unfused]) -> None:
    """Record (as rule :data:`AUDIT`, through ``ctx.skip``) every fusable-kind op left in the graph whose node no
    entry of ``reported`` (what the rules reported) names."""
    ctx.begin_rule(AUDIT)
    listed: Dict[str, Unfused] = {}
    for u in reported:
        listed.setdefault(u.node, u)
    for node in list(ctx.graph.nodes):
        if node.op not in ("call_module", "call_function", "call_method") or node.name in listed:
            continue
        found = _residue(ctx, node, listed)
        if found is not None:
            ctx.skip(node, *found)
            listed[node.name] = ctx.skips[(AUDIT, node.name)]


def _residue(ctx: RewriteContext, node: fx.Node, listed: Dict[str, Unfused]) -> Optional[Tuple[Reason, str]]:
    kind = ops.op_kind(node, ctx.read.modules)
    if kind == "avg_pool":
        return _pool_in_sum(ctx, node)
    if node.op == "call_function" and node.target is ops.GETITEM and isinstance(node.args[0], fx.Node) \
            and ops.op_kind(node.args[0], ctx.read.modules) == "batch_norm":
        return None  # the output of a tuple BatchNorm: the BatchNorm node itself is audited
    read = ctx.read.affine(node)
    if kind == "batch_norm":
        outputs = ops.tuple_outputs(node)
        if outputs and any(u.name in listed for u in outputs):  # a tuple BatchNorm whose output a rule reported
            return None
        if read is None and outputs:  # a tuple BatchNorm: the reader reads its output 0
            read = ctx.read.affine(outputs[0])
        if read is None:
            return Reason.NOT_MATCHED, (f"{node.name} is a BatchNorm fxfuse does not read (a subclass with its own "
                                        "forward, a hooked module, or an unusual call)")
    elif read is None or not _per_channel_constant(ctx, node):
        return None
    if isinstance(read, Refusal):
        return read.code, f"{node.name} is not a constant per-channel affine: {read.reason}"
    assert isinstance(read, AffineRead)
    before = read.input
    users = ops.real_users(node)
    layers = [n for n in (before, *users) if _is_layer(ctx, n)]
    for n in layers:  # a rule reported the pair on the layer's node (bn_conv skips the conv)
        if n.name in listed:
            u = listed[n.name]
            return u.code, f"{node.name} stays with {n.name}: [{u.rule}] {u.reason}"
    if layers:
        return Reason.NOT_MATCHED, (f"{node.name} is next to {', '.join(n.name for n in layers)}, but no enabled "
                                    "rule folds this pair")
    if ops.op_kind(before, ctx.read.modules) == "avg_pool":
        return Reason.NO_PARTNER, (f"{node.name} follows the avg-pool {before.name} outside a sum with a conv branch "
                                   "on the pool's input: pool and affine stay (not turned into a depthwise conv)")
    return Reason.NO_PARTNER, (f"no conv or linear layer before or after {node.name} to fold it into "
                               f"(it reads {before.name}, feeds {', '.join(u.name for u in users) or 'the output'})")


def _is_layer(ctx: RewriteContext, node: fx.Node) -> bool:
    return isinstance(ctx.read.conv(node), ConvRead) or ctx.read.linear(node) is not None


def _per_channel_constant(ctx: RewriteContext, node: fx.Node) -> bool:
    """An arithmetic affine whose constant has more than one element (a per-channel vector): a scalar factor is a
    scale, not a layer the report should name."""
    for a in node.args:
        c = ctx.read.constants.tensor(a) if isinstance(a, fx.Node) else None
        if c is not None and c.numel() > 1:
            return True
    return False


def _pool_in_sum(ctx: RewriteContext, node: fx.Node) -> Optional[Tuple[Reason, str]]:
    """An avg-pool whose output reaches a sum through single-user per-channel affines: a term ``branch_sum`` reads."""
    cur = node
    for _ in range(8):
        user = ctx.single_user(cur)
        if user is None:
            return None
        if ctx.read.sum(user) is not None:
            read = ctx.read.avg_pool(node)
            if isinstance(read, Refusal):
                return read.code, f"{node.name} is not a conv: {read.reason}"
            return Reason.NO_PARTNER, f"{node.name} is a term of the sum {user.name}, which no conv branch joins"
        if ctx.read.affine(user) is None:
            return None
        cur = user
    return None
