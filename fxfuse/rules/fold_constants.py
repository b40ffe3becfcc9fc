"""Parameter-only sub-graphs ⇒ one constant, evaluated once in float64.

Training-form code often builds a weight in forward from parameters, buffers and constants: ``w.view(o, int(i /
g), h, w)``, ``w + identity``, fixed masks × a learnable scale, a kernel composed by convolving two kernels
(``F.conv2d(self.k1, self.k0.permute(1, 0, 2, 3))``), pad values recomputed from a BN. Each such value (the
outermost node that computes it, read by something that depends on the input) becomes a parameter of a new
module, so the conv that reads it is an ordinary conv that fuses like one and the deploy model does not
recompute it (docs/patterns.md, `fold_constants`). Sub-graphs that only alias a parameter (``w.t()``, a view)
are left as they are: they cost nothing."""

from __future__ import annotations

from typing import Optional, Set

from torch import Tensor, fx

from ..ir import ops
from ..ir.read import call_target
from ..reasons import Reason
from ..rewrite import Rewrite, RewriteContext, register_rule


def _computes(ctx: RewriteContext, node: fx.Node, seen: Set[fx.Node]) -> bool:
    """Whether the constant sub-graph under ``node`` does arithmetic (not only views / aliases of attributes)."""
    if node in seen or node.op == "get_attr":
        return False
    seen.add(node)
    if not ops.is_alias(node):
        return True
    return any(_computes(ctx, i, seen) for i in node.all_input_nodes)


def _written(ctx: RewriteContext, node: fx.Node) -> Optional[fx.Node]:
    """A user of ``node`` (or of a view of it) that may write into it in place (``w = p.clone(); w.add_(1)``), or
    None. Folded, the write would land in the new parameter on every call (a symbolic graph; an exported one is
    functional)."""
    todo, seen = [node], {node}
    while todo:
        for user in todo.pop().users:
            if ops.writes_input(user, ctx.read.modules):
                return user
            if ops.is_alias(user) and user not in seen:
                seen.add(user)
                todo.append(user)
    return None


def _origin(node: fx.Node, seen: Set[fx.Node]) -> Optional[fx.Node]:
    """The first ``get_attr`` the sub-graph under ``node`` reads (its dtype is the folded constant's)."""
    if node in seen:
        return None
    seen.add(node)
    if node.op == "get_attr":
        return node
    for i in node.all_input_nodes:
        found = _origin(i, seen)
        if found is not None:
            return found
    return None


@register_rule("fold_constants")
def fold_constants(ctx: RewriteContext, node: fx.Node) -> Optional[Rewrite]:
    """Replace a computed floating-point constant read by an input-dependent node with a parameter."""
    if node.op not in ("call_function", "call_method"):
        return None
    constants = ctx.read.constants
    if ops.op_kind(node, ctx.read.modules) == "assert":
        return _constant_assert(ctx, node)
    if not node.users:
        return None
    value = constants.value(node)
    if not isinstance(value, Tensor) or not value.is_floating_point():
        return None
    if all(constants.value(u) is not constants._MISSING for u in node.users):
        return None  # an inner node: the outermost constant is folded
    if not _computes(ctx, node, set()):
        return None
    writer = _written(ctx, node)
    if writer is not None:
        return ctx.skip(node, Reason.ALIASING, f"{writer.name} writes into it in place: it is not a constant")
    origin = _origin(node, set())
    like = constants.value(origin) if origin is not None else None
    folded = value.detach().clone()

    def rewrite() -> None:
        new = ctx.insert_constant(folded, before=node, like=like if isinstance(like, Tensor) else None,
                                  name=node.name)
        ctx.replace(node, new)

    return rewrite


def _constant_assert(ctx: RewriteContext, node: fx.Node) -> Optional[Rewrite]:
    """An assertion on constants only (``_assert_tensor_metadata`` of a lifted constant's dtype): checked once
    here; when it holds it is removed (a later ``.double()`` of the model would otherwise trip over it)."""
    constants = ctx.read.constants
    if node.users or not node.all_input_nodes:
        return None
    args = fx.node.map_arg(node.args, constants.value)
    kwargs = fx.node.map_arg(node.kwargs, constants.value)
    leaves = list(args) + list(kwargs.values())
    if any(v is constants._MISSING for v in leaves):
        return None
    try:
        call_target(node)(*args, **kwargs)
    except Exception:  # the assertion fails on the constants: it stays (the model raises there too)
        return None

    def rewrite() -> None:
        ctx.erase_unused(node)

    return rewrite
