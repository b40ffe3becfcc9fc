"""Ops that compute nothing in eval mode — ``nn.Identity``, eval ``nn.Dropout*``, ``F.dropout(training=False)`` —
are bypassed so that the patterns around them become adjacent (``conv(x) + Identity(x)`` is a RepVGG sum)."""

from __future__ import annotations

from typing import Optional

from torch import fx, nn

from ..ir.ops import DROPOUT_FUNCS, DROPOUT_MODULES
from ..ir.read import arg
from ..rewrite import Rewrite, RewriteContext, register_rule

@register_rule("remove_noop")
def remove_noop(ctx: RewriteContext, node: fx.Node) -> Optional[Rewrite]:
    """Bypass identity and eval-mode dropout nodes."""
    if not node.args or not isinstance(node.args[0], fx.Node):
        return None
    mod = ctx.read.module(node)
    if isinstance(mod, nn.Identity) and len(node.args) == 1 and not node.kwargs:
        pass
    elif isinstance(mod, DROPOUT_MODULES) and not mod.training and len(node.args) == 1:
        pass
    elif node.op == "call_function" and node.target in DROPOUT_FUNCS and arg(node, 2, "training", True) is False:
        pass
    else:
        return None
    source = node.args[0]

    def rewrite() -> None:
        node.replace_all_uses_with(source)
        ctx.erase_if_dead(node)

    return rewrite
