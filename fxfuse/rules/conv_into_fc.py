"""Linear maps across a reshape: a conv on a fixed-size input is a matrix (RepMLP's conv→FC conversion).

A conv on one ``[C, *size]`` sample is a linear map of the sample flattened in NCHW order: a matrix
``M[C_out·∏out, C·∏size]`` whose column ``j`` is the conv applied to the ``j``-th basis tensor (zero padding
included; :func:`fxfuse.ir.folds.conv_as_matrix`), bias ``b[o]`` at every output position. Reshapes that keep the
row-major order keep each sample's *row* (its ``F`` consecutive elements), so two spellings compose:

* **sum** (RepMLP's local perceptrons next to its FC): ``fc(X.reshape(N, C·p·p)).reshape(N, O, p, p) + conv(X)``
  (the FC also as a 1x1 / grouped conv on ``X.reshape(N, C·p·p, 1, 1)``; BNs, reshapes and per-feature affines
  on either side) is one FC: ``W = W_fc + M``, ``b = b_fc + b_conv`` broadcast over ``p·p`` — kept in the FC's
  spelling (a Linear, or the 1x1 conv with the FC's groups where the conv's groups nest in them);
* **chain**: ``fc(conv(X).flatten(1))`` (views and per-feature affines between, no nonlinearity) is one Linear on
  ``X.flatten(1)``: ``W = W_fc·M``, ``b = W_fc·b_conv + b_fc``.

Exact when both sides read rows of one tensor (views of the same node, equal features per row), the output rows
line up (equal features per row on both sides), every intermediate has no other real user, the tensors share a
dtype, and **the graph fixes the spatial size the conv sees** (``M`` is the conv on that size only): the conv's
input is a reshape to literal spatial sizes (RepMLP's ``partitions.reshape(-1, C, h, w)``) or an input of an
exported program, whose input guard checks its static shape on every call, or — in a sum — the
conv keeps the size (stride 1, ``2p = d(k−1)``), feeds the sum without a reshape, and the other side is a reshape
to literal sizes (a conv output of another size would not add up). Cost: merged only when the one layer executes
no more multiply-adds than the layers apart (docs/patterns.md, `conv_into_fc`)."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Optional, Sequence, Set, Tuple, Union

from torch import Tensor, fx

from ..ir import folds
from ..ir.algebra import ChannelAffine, ConvSpec, Refusal
from ..ir.ops import is_input_guard, is_metadata_user, is_value_copy, is_view
from ..ir.read import AffineRead, ConvRead, arg_node
from ..reasons import Reason
from ..rewrite import Rewrite, RewriteContext, register_rule

_MAX_CHAIN = 16


@dataclass(frozen=True)
class _Side:
    """``node`` = views and per-feature affines (``rows``, bottom up) of ``layer(input)``: a row map of the rows of
    ``input``, which is a view of ``root``. The map itself (:meth:`spec`) is built only once every condition
    holds: a conv's matrix has ``F_out·F_in/g`` entries, and every add of a ResNet has a conv below it."""

    node: fx.Node
    layer: fx.Node
    input: fx.Node
    root: fx.Node
    kind: str  # "linear", "fc_conv" (a 1x1 conv on a [R, F, 1, …] input), "conv"
    base: Optional[ConvSpec]  # a Linear's row map (None for a conv: its matrix is computed by spec())
    rows: Tuple[Tuple[ChannelAffine, Tuple[int, ...], int], ...]  # (affine, its tensor's shape, its axis)
    groups: int  # of the row map
    f_in: int
    f_out: int
    macs: int
    like: Tensor
    chain: Tuple[fx.Node, ...]  # node … layer, top down
    viewed: bool  # a view between the layer and node
    conv: Optional[ConvRead]
    size: Tuple[int, ...] = ()  # the conv's input spatial size

    def row_affine(self) -> Optional[ChannelAffine]:
        """The affines after the layer as one per-feature affine of its output rows (``None``: there are none)."""
        return _on_rows(self.rows, self.f_out) if self.rows else None

    def spec(self) -> ConvSpec:
        """The row map, the affines after the layer folded in (float64)."""
        if self.base is not None:
            spec = self.base
        else:
            assert self.conv is not None
            spec = folds.conv_as_matrix(self.conv.spec, self.size)
        row = self.row_affine()
        return spec if row is None else folds.conv_then_affine(spec, row)


_Affine = Tuple[ChannelAffine, Tuple[int, ...], int]  # (affine, its tensor's shape, its axis)


def _on_rows(affines: Sequence[_Affine], features: int) -> ChannelAffine:
    """``affines`` (bottom up, at least one, each checked by :func:`fxfuse.ir.folds.affine_on_rows`) as one
    per-feature affine of rows of ``features`` elements."""
    total: Optional[ChannelAffine] = None
    for one in affines:
        row = folds.affine_on_rows(*one, features)
        assert row is not None  # (checked by the caller)
        total = row if total is None else folds.affine_then_affine(total, row)
    assert total is not None
    return total


def _ints(shape: Any) -> Optional[Tuple[int, ...]]:
    if shape is None or not all(isinstance(s, int) for s in shape):
        return None
    return tuple(int(s) for s in shape)


def _root(node: fx.Node) -> fx.Node:
    """What ``node`` is a view of (views and value copies walked up: an exported ``permuted.reshape(…)`` is
    ``clone`` + ``_unsafe_view``, once per reshape)."""
    for _ in range(_MAX_CHAIN):
        below = arg_node(node, 0) if is_view(node) or is_value_copy(node) else None
        if below is None:
            return node
        node = below
    return node


def _walk(ctx: RewriteContext, top: fx.Node) -> Tuple[list, list, bool]:
    """Walk down from ``top`` through views and per-channel affines: ``(chain top down, affines bottom up as
    (AffineRead, its input's shape), viewed)``; the last chain node is where the walk stopped."""
    chain, affines, viewed, cur = [top], [], False, top
    for _ in range(_MAX_CHAIN):
        below = arg_node(cur, 0) if is_view(cur) else None
        if below is not None:
            viewed = True
        else:
            read = ctx.read.affine(cur)
            if not isinstance(read, AffineRead):
                break
            below = read.input
            affines.append((read, ctx.shape(below)))
        chain.append(below)
        cur = below
    affines.reverse()
    return chain, affines, viewed


def _read_side(ctx: RewriteContext, top: fx.Node) -> Union[_Side, Refusal, None]:
    """``top`` read as a row map of a linear / conv layer's input (see :class:`_Side`); a :class:`Refusal` when it
    is one but not exactly; ``None`` when no layer is below the views and affines."""
    chain, affines, viewed = _walk(ctx, top)
    layer = chain[-1]
    if layer.op == "placeholder":
        return None
    in_shape = out_shape = None
    conv: Optional[ConvRead] = None
    base: Optional[ConvSpec] = None
    size: Tuple[int, ...] = ()
    linear = ctx.read.linear(layer)
    if linear is not None:
        source, like = linear.input, linear.like
        f_out, f_in = linear.weight.shape
        base, kind, macs, groups = folds.linear_as_map(linear.weight, linear.bias), "linear", f_out * f_in, 1
    else:
        read = ctx.read.conv(layer)
        if not isinstance(read, ConvRead) or read.kind != "conv" or read.like is None:
            return read if isinstance(read, Refusal) else None
        refusal = folds.why_not_conv_as_matrix(read.spec)
        if refusal is not None:
            return refusal
        conv, source, like = read, read.input, read.like
        in_shape, out_shape = ctx.shape(source), ctx.shape(layer)
        if in_shape is None or out_shape is None:
            return None
        in_size, out_size = _ints(in_shape[2:]), _ints(out_shape[1:])
        if in_size is None or out_size is None:
            return Refusal(Reason.SPATIAL_SIZE, f"the spatial size {tuple(in_shape[2:])} that {layer.name} sees is "
                                                "symbolic: its matrix depends on it")
        size, groups = in_size, read.spec.groups
        f_out, f_in = math.prod(out_size), read.spec.in_channels * math.prod(size)
        pointwise = read.spec.is_pointwise and all(s == 1 for s in size)
        kind = "fc_conv" if pointwise else "conv"
        macs = read.spec.macs_per_output_pixel() * math.prod(out_size[1:])
    rows = []
    for read_affine, shape in affines:
        dims = _ints(shape[1:]) if shape is not None else None
        if dims is None or read_affine.axis < 1:
            return Refusal(Reason.AXIS, f"{read_affine.input.name}: an affine whose channels are not fixed per row")
        rows.append((read_affine.affine, (1, *dims), read_affine.axis))
        if folds.affine_on_rows(*rows[-1], f_out) is None:
            return Refusal(Reason.AXIS, f"the affine on {read_affine.input.name} is not one per-feature affine of "
                                        f"{layer.name}'s rows (its channel changes from row to row)")
    for upper, lower in zip(chain, chain[1:]):
        if ctx.single_user(lower) is not upper:
            users = ", ".join(u.name for u in ctx.real_users(lower))
            return Refusal(Reason.OTHER_USERS, f"intermediate {lower.name} has other users ({users})")
    return _Side(top, layer, source, _root(source), kind, base, tuple(rows), groups, f_in, f_out, macs, like,
                 tuple(chain), viewed, conv, size)


def _unpermuted(ctx: RewriteContext, node: fx.Node) -> fx.Node:
    """What ``node`` is a view of, looking through one permute too."""
    permuted = ctx.read.permute(node)
    return _root(permuted[0]) if permuted is not None else node


def _blocked(ctx: RewriteContext, top: fx.Node) -> Optional[Refusal]:
    """Where the walk from ``top`` stops at a one-input op over a conv / linear layer (a ReLU, a permute between
    the layer and the reshape), why that is no row map."""
    chain, _, _ = _walk(ctx, top)
    stop = chain[-1]
    inputs = stop.all_input_nodes
    if stop.op not in ("call_function", "call_method", "call_module") or len(inputs) != 1:
        return None
    below = _walk(ctx, inputs[0])[0][-1]
    if ctx.read.linear(below) is None and not isinstance(ctx.read.conv(below), ConvRead):
        return None
    if ctx.read.permute(stop) is not None or stop.target in ("transpose", "t"):
        return Refusal(Reason.VIEW_ORDER, f"{stop.name} permutes {below.name}'s output: the rows are not in the "
                                          "order the other side reads")
    return Refusal(Reason.NOT_LINEAR, f"{stop.name} between {below.name} and the reshape is not a linear map")


def _pinned_by_view(ctx: RewriteContext, node: fx.Node) -> bool:
    """``node`` is a reshape whose spatial sizes (its target's entries past the channel axis) are literal and
    equal to its shape's: every run of the graph gives it this spatial size."""
    sizes, shape = ctx.read.view_sizes(node), ctx.shape(node)
    if sizes is None or shape is None or len(sizes) != len(shape) or len(shape) < 3:
        return False
    return all(isinstance(s, int) and s >= 0 and s == d for s, d in zip(sizes[2:], shape[2:]))


def _guarded(node: fx.Node) -> bool:
    """``node`` is an input of an exported program whose input guard checks its (static) shape on every call."""
    return node.op == "placeholder" and any(is_input_guard(u) for u in node.users)


def _why_not_fixed(ctx: RewriteContext, side: _Side, partner: Optional[fx.Node]) -> Optional[Refusal]:
    """``None`` when the graph fixes the spatial size ``side``'s conv sees (module docstring); else why not."""
    if _pinned_by_view(ctx, side.input) or _guarded(side.input):
        return None
    conv = side.conv
    assert conv is not None
    in_shape, out_shape = ctx.shape(side.input), ctx.shape(side.layer)
    keeps = (in_shape is not None and out_shape is not None and tuple(in_shape[2:]) == tuple(out_shape[2:])
             and all(s == 1 for s in conv.spec.stride))
    if partner is not None and keeps and not side.viewed and _pinned_by_view(ctx, partner):
        return None
    return Refusal(Reason.SPATIAL_SIZE,
                   f"nothing in the graph fixes the spatial size {tuple(in_shape[2:]) if in_shape else '?'} that "
                   f"{side.layer.name} sees (its input is no reshape to literal sizes"
                   + (", and the sum's other side does not pin a same-size conv's output)" if partner is not None
                      else ")") + ": another input size would run the original and not this matrix")


def _shape_reads_leave(ctx: RewriteContext, chains: Sequence[fx.Node]) -> Optional[Refusal]:
    """A shape read of a folded intermediate must die with the chain (``x.view(x.size(0), -1)``)."""
    inside: Set[fx.Node] = set(chains)

    def dies(u: fx.Node, depth: int = 0) -> bool:
        return u in inside or (depth < 4 and bool(u.users) and all(dies(v, depth + 1) for v in u.users))

    for n in chains[1:] if chains else ():
        for u in n.users:
            if is_metadata_user(u, n) and not dies(u):
                return Refusal(Reason.OTHER_USERS, f"the shape of intermediate {n.name} is read by {u.name}")
    return None


@register_rule("conv_into_fc")
def conv_into_fc(ctx: RewriteContext, node: fx.Node) -> Optional[Rewrite]:
    """A conv summed with, or flattened into, an FC over the same rows ⇒ one FC (module docstring)."""
    if ctx.read.sum(node) is not None:
        return _sum(ctx, node)
    if ctx.read.linear(node) is not None:
        return _chain(ctx, node)
    return None


def _sum(ctx: RewriteContext, node: fx.Node) -> Optional[Rewrite]:
    parsed = ctx.read.sum(node)
    assert parsed is not None
    (c1, a), (c2, b) = parsed.terms
    shape = ctx.shape(node)
    if shape is None or ctx.shape(a) != shape or ctx.shape(b) != shape or a is b:
        return None
    if ctx.single_user(a) is not node or ctx.single_user(b) is not node:
        return None  # a term also used elsewhere (branch_sum's case: it keeps the term)
    sides = [_read_side(ctx, a), _read_side(ctx, b)]
    flat = [s for s in sides if isinstance(s, _Side) and s.kind in ("linear", "fc_conv")]
    if not flat:
        return None
    if not all(isinstance(s, _Side) for s in sides):
        other = b if sides[0] is flat[0] else a
        read = sides[1] if other is b else sides[0]
        refusal = read if isinstance(read, Refusal) else _blocked(ctx, other)
        if refusal is not None:
            return ctx.skip(node, refusal.code, f"{other.name} is no linear map of {flat[0].root.name}'s rows next "
                                                f"to {flat[0].layer.name}: {refusal.reason}")
        return None
    first, second = sides
    assert isinstance(first, _Side) and isinstance(second, _Side)
    if first.root is not second.root:
        deep = [_unpermuted(ctx, first.root), _unpermuted(ctx, second.root)]
        if deep[0] is deep[1]:
            return ctx.skip(node, Reason.VIEW_ORDER, f"{first.layer.name} and {second.layer.name} read "
                                                     f"{deep[0].name} in different element orders (a permute on one "
                                                     "side)")
        return None
    if first.f_in != second.f_in or first.f_out != second.f_out:
        return ctx.skip(node, Reason.VIEW_ORDER,
                        f"{first.layer.name} and {second.layer.name} split {first.root.name} into rows of "
                        f"{first.f_in} and {second.f_in} features ({first.f_out} and {second.f_out} out)")
    if first.like.dtype != second.like.dtype:
        return ctx.skip(node, Reason.DTYPE, f"{first.layer.name} holds {first.like.dtype}, {second.layer.name} "
                                            f"{second.like.dtype}")
    for one, partner in ((first, second), (second, first)):
        if one.conv is not None:
            refusal = _why_not_fixed(ctx, one, partner.node)
            if refusal is not None:
                return ctx.skip(node, refusal.code, refusal.reason)
    out_dims = _ints(shape[1:])
    if out_dims is None:
        return ctx.skip(node, Reason.SPATIAL_SIZE, f"the shape of {node.name} past the batch is symbolic")
    emit = flat[0]
    groups = 1 if emit.kind == "linear" else math.gcd(first.groups, second.groups)
    merged_macs = first.f_out * first.f_in // groups
    if merged_macs > first.macs + second.macs:
        return ctx.skip(node, Reason.MORE_WORK, f"one FC of {merged_macs} multiply-adds per row (groups {groups}) "
                                                f"would do more than {first.layer.name} and {second.layer.name} "
                                                f"apart ({first.macs + second.macs})")
    refusal = _shape_reads_leave(ctx, [node, *first.chain, *second.chain])
    if refusal is not None:
        return ctx.skip(node, refusal.code, refusal.reason)
    merged = folds.regroup(folds.sum_parallel([folds.scale_conv(first.spec(), c1),
                                               folds.scale_conv(second.spec(), c2)]), groups)
    layer_shape = ctx.shape(emit.layer)
    in_shape = ctx.shape(emit.input)
    ndim = len(in_shape) - 2 if in_shape is not None else 0

    def rewrite() -> None:
        if emit.kind == "linear":
            new = ctx.insert_linear(merged.weight[:, :, 0], merged.bias, emit.input, before=node, like=emit.like,
                                    name=node.name, shape_of=emit.layer)
        else:
            new = ctx.insert_conv(folds.map_as_pointwise_conv(merged, ndim), emit.input, before=node,
                                  like=emit.like, name=node.name, shape_of=emit.layer)
        out = new if layer_shape == shape else ctx.insert_reshape(new, [-1, *out_dims], before=node, shape_of=node)
        ctx.replace(node, out, consumed=[])
        ctx.erase_unused(node)  # an in-place add (``fc3_out += conv_out``) is impure: erased once unused

    return rewrite


def _chain(ctx: RewriteContext, node: fx.Node) -> Optional[Rewrite]:
    linear = ctx.read.linear(node)
    assert linear is not None
    if ctx.single_user(linear.input) is not node:
        return None  # the Linear's input is used elsewhere too: nothing below it can be folded away
    side = _read_side(ctx, linear.input)
    if side is None:
        folded = _affines_into_linear(ctx, node)
        if folded is not None:
            return folded
        refusal = _blocked(ctx, linear.input)
        if refusal is not None and _walk(ctx, linear.input)[2]:
            return ctx.skip(node, refusal.code, f"{node.name} reads a flattened layer output: {refusal.reason}")
        return None
    if isinstance(side, Refusal):
        if not _walk(ctx, linear.input)[2]:
            return None  # a Linear on a layer's last axis, not on its flattened output
        return ctx.skip(node, side.code, side.reason)
    if side.conv is None or not side.viewed:
        return None  # linear → linear (not this rule), or a Linear over a conv output's last axis
    f2 = linear.weight.shape[0]
    in_shape = ctx.shape(linear.input)
    if in_shape is None or len(in_shape) != 2 or linear.weight.shape[1] != side.f_out:
        return ctx.skip(node, Reason.VIEW_ORDER, f"{node.name} does not read {side.layer.name}'s output one sample "
                                                 f"per row ({side.f_out} features)")
    if side.like.dtype != linear.like.dtype:
        return ctx.skip(node, Reason.DTYPE, f"{side.layer.name} holds {side.like.dtype}, {node.name} "
                                            f"{linear.like.dtype}")
    refusal = _why_not_fixed(ctx, side, None)
    if refusal is not None:
        return ctx.skip(node, refusal.code, refusal.reason)
    merged_macs, apart = f2 * side.f_in, side.macs + f2 * side.f_out
    if merged_macs > apart:
        return ctx.skip(node, Reason.MORE_WORK, f"one Linear on {side.input.name} flattened ({side.f_in} → {f2}: "
                                                f"{merged_macs} multiply-adds per sample) would do more than "
                                                f"{side.layer.name} and {node.name} apart ({apart})")
    refusal = _shape_reads_leave(ctx, [node, *side.chain])
    if refusal is not None:
        return ctx.skip(node, refusal.code, refusal.reason)
    assert side.conv is not None
    weight, bias = folds.linear_after_conv(side.conv.spec, side.size, side.row_affine(), linear.weight, linear.bias)

    def rewrite() -> None:
        flat = ctx.insert_reshape(side.input, [-1, side.f_in], before=node)
        new = ctx.insert_linear(weight, bias, flat, before=node, like=linear.like, name=node.name)
        ctx.replace(node, new, consumed=[])

    return rewrite


def _affines_into_linear(ctx: RewriteContext, node: fx.Node) -> Optional[Rewrite]:
    """``fc(bn(t).reshape(N, F))`` (per-channel affines, then views): the affines are per-feature affines of the
    rows ``fc`` reads, so ``W' = W·a``, ``b' = b + W·c`` (RepMLP's pool BN folded into ``fc1``); ``None`` when
    the chain below the Linear is not views over affines."""
    linear = ctx.read.linear(node)
    assert linear is not None
    chain, affines, viewed = _walk(ctx, linear.input)
    in_shape = ctx.shape(linear.input)
    if not affines or not viewed or in_shape is None or len(in_shape) != 2:
        return None
    f = linear.weight.shape[1]
    rows = []
    for read, shape in affines:
        dims = _ints(shape[1:]) if shape is not None else None
        rows.append((read.affine, (1, *dims) if dims else (), read.axis))
        if not dims or read.axis < 1 or folds.affine_on_rows(*rows[-1], f) is None:
            return ctx.skip(node, Reason.AXIS, f"the affine on {read.input.name} is not one per-feature affine of the "
                                               f"rows {node.name} reads")
    total = _on_rows(rows, f)
    for upper, lower in zip(chain, chain[1:-1]):
        if ctx.single_user(lower) is not upper:
            return ctx.skip(node, Reason.OTHER_USERS, f"intermediate {lower.name} has other users")
    refusal = _shape_reads_leave(ctx, [node, *chain[:-1]])
    if refusal is not None:
        return ctx.skip(node, refusal.code, refusal.reason)
    weight, bias = folds.affine_then_linear(total, linear.weight, linear.bias)
    stop = chain[-1]

    def rewrite() -> None:
        flat = ctx.insert_reshape(stop, [-1, f], before=node)
        ctx.replace(node, ctx.insert_linear(weight, bias, flat, before=node, like=linear.like, name=node.name),
                    consumed=[])

    return rewrite
