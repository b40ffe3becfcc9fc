"""Ops that compute nothing in eval mode are bypassed, so that the patterns around them become adjacent:

* ``nn.Identity``, eval ``nn.Dropout*``, ``F.dropout(training=False)`` (``conv(x) + Identity(x)`` is a RepVGG sum);
* arithmetic with a neutral Python number — ``0 + t``, ``t + 0``, ``t - 0``, ``1 * t``, ``t * 1``, ``t / 1`` (an
  absent optional branch spelled ``out = 0 + bn(x)``) — when the result has ``t``'s shape and dtype and no user
  writes into it in place (the result would then alias ``t``).
"""

from __future__ import annotations

from typing import Optional

from torch import fx

from ..ir import ops
from ..ir.read import arg
from ..reasons import Reason
from ..rewrite import Rewrite, RewriteContext, register_rule

_NEUTRAL = {"add": (0, 0), "sub": (None, 0), "mul": (1, 1), "div": (None, 1)}  # (as left operand, as right)


def _neutral_operand(ctx: RewriteContext, node: fx.Node) -> Optional[fx.Node]:
    """``t`` if ``node`` is ``t`` combined with a neutral number (see the module docstring), else None."""
    parsed = ops.binary(node)
    if parsed is None or parsed.in_place or isinstance(parsed.alpha, bool) or parsed.alpha != 1:
        return None
    a, b = parsed.a, parsed.b
    left, right = _NEUTRAL[parsed.op]
    if isinstance(b, fx.Node) and not isinstance(a, bool) and isinstance(a, (int, float)) and a == left \
            and left is not None:
        tensor = b
    elif isinstance(a, fx.Node) and not isinstance(b, bool) and isinstance(b, (int, float)) and b == right:
        tensor = a
    else:
        return None
    mine, theirs = node.meta.get("tensor_meta"), tensor.meta.get("tensor_meta")
    if mine is None or theirs is None or mine.shape != theirs.shape or mine.dtype != theirs.dtype:
        return None
    if any(ops.writes_input(u, ctx.read.modules) for u in node.users):
        return ctx.skip(node, Reason.ALIASING,
                        "a user writes into the result in place; bypassing it would alias the operand")
    return tensor


@register_rule("remove_noop")
def remove_noop(ctx: RewriteContext, node: fx.Node) -> Optional[Rewrite]:
    """Bypass identity, eval-mode dropout and neutral-number arithmetic nodes."""
    mod = ctx.read.module(node)
    first = node.args[0] if node.args else None
    identity_module = len(node.args) == 1 and not node.kwargs \
        and (isinstance(mod, ops.IDENTITY_MODULES) or (isinstance(mod, ops.DROPOUT_MODULES) and not mod.training))
    eval_dropout = node.op == "call_function" and node.target in ops.DROPOUT_FUNCS \
        and arg(node, 2, "training", node.kwargs.get("train", True)) is False  # (ATen: `train`)
    computes_nothing = identity_module or eval_dropout
    source = first if isinstance(first, fx.Node) and computes_nothing else _neutral_operand(ctx, node)
    if source is None:
        return None
    kept = source

    def rewrite() -> None:
        ctx.bypass(node, kept)

    return rewrite
