"""Σ parallel branches reading the same input ⇒ one conv (RepVGG, ACNet, MobileOne, DBB V).

A sum (``a + b``, ``b + a``, ``a += b``, ``torch.add(a, b, alpha=k)``, ``a.add(b)``, ``a - b`` and chains of
them) is flattened into terms ``coef · t``. Each term is read as a linear op of some input — a conv, an avg-pool,
a per-channel affine such as BatchNorm (depthwise 1x1), a BatchNorm / affine after an avg-pool (the pool's kernel
scaled per channel: DBB's pool branch), or the tensor itself (Dirac identity) — and terms on the same input with
equal stride and window centre are summed on one tap grid after expanding to ``gcd(groups)`` (docs/patterns.md,
`branch_sum`). Pool and affine terms merge only next to a conv branch. Terms that do not merge stay as they were,
and every pool or affine among them is reported with why."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Dict, List, Optional, Sequence, Tuple

import torch
from torch import Tensor, fx

from ..ir import folds
from ..ir.algebra import ChannelAffine, ConvSpec, Refusal
from ..ir.ops import returns_fresh_storage
from ..ir.read import AffineRead, ConvRead, LinearRead
from ..reasons import Reason
from ..rewrite import Rewrite, RewriteContext, register_rule


def _comes_after(node: fx.Node, anchor: fx.Node) -> bool:
    cur = anchor.next
    while cur.op != "root":
        if cur is node:
            return True
        cur = cur.next
    return False


@dataclass
class Term:
    """One term of the sum read as a conv of ``input`` (scaled by its coefficient ``coef``)."""

    input: fx.Node
    spec: ConvSpec
    is_conv: bool
    like: Optional[Tensor]
    node: Optional[fx.Node]  # the term node folded away (None for an identity term)
    coef: float
    kind: str = "identity"  # the read: conv, avg_pool, affine (BN / x·c + d as a 1x1), affine_pool, identity
    under: Tuple[fx.Node, ...] = ()  # nodes below ``node`` folded with it (the affines and pool of affine_pool)


def _flatten(ctx: RewriteContext, root: fx.Node) -> Optional[Tuple[List[Tuple[float, fx.Node]], List[fx.Node]]]:
    """Terms of the sum tree under ``root`` and its inner add nodes; ``None`` if an in-place add would be unsafe."""
    terms: List[Tuple[float, fx.Node]] = []
    inner: List[fx.Node] = []
    shape = ctx.shape(root)

    def visit(node: fx.Node, coef: float) -> bool:
        parsed = ctx.read.sum(node)
        assert parsed is not None
        operands, in_place = parsed.terms, parsed.in_place
        if in_place:
            target = operands[0][1]  # the written operand
            chain = [target]  # an in-place add on an in-place add's result writes the same storage
            while (p := ctx.read.sum(target)) is not None and p.in_place:
                target = p.terms[0][1]
                chain.append(target)
            if not returns_fresh_storage(target, ctx.read.modules):
                ctx.skip(root, Reason.ALIASING,
                         f"in-place add on {target.name}, which may alias a tensor read elsewhere")
                return False
            if any(u is not node and _comes_after(u, node) for t in chain for u in ctx.real_users(t)):
                ctx.skip(root, Reason.ALIASING, f"in-place add mutates {target.name}, which is read again later")
                return False
        for c, operand in operands:
            if (operand.op != "placeholder" and ctx.read.sum(operand) is not None
                    and ctx.single_user(operand) is node and ctx.shape(operand) == shape):
                inner.append(operand)
                if not visit(operand, coef * c):
                    return False
            else:
                terms.append((coef * c, operand))
        return True

    return (terms, inner) if visit(root, 1.0) else None


def _affine_over_pool(ctx: RewriteContext, coef: float, term: fx.Node) -> Optional[Term]:
    """``a_n(…a_1(avg_pool(x)))`` (per-channel affines along the channels — BN, ``x·c + d`` — each the only user
    of the one below) read as one depthwise conv on ``x``: the pool's ``1/∏k`` kernel scaled by the composed ``a``,
    bias the composed shift. Exact when the pool is a conv (``count_include_pad=True``, no ``ceil_mode`` or
    ``divisor_override``); a pool that is not is reported with its reader's code. ``None``: not this pattern."""
    affine: Optional[ChannelAffine] = None
    under: List[fx.Node] = []
    cur = term
    while True:
        read = ctx.read.affine(cur)
        if not isinstance(read, AffineRead) or read.axis != 1 or read.ndim < 3:
            break
        affine = read.affine if affine is None else folds.affine_then_affine(read.affine, affine)
        below = read.input
        if below.op == "placeholder" or ctx.single_user(below) is not cur:
            if below.op != "placeholder" and ctx.read.avg_pool(below) is not None:
                ctx.skip(term, Reason.OTHER_USERS, f"{term.name} reads {below.name}, which has other users "
                                                   f"({', '.join(u.name for u in ctx.real_users(below))})")
            return None
        cur = below
        under.append(cur)
    if affine is None or not under:
        return None
    pool = ctx.read.avg_pool(cur)
    if isinstance(pool, Refusal):
        for n in (cur, term):
            ctx.skip(n, pool.code, f"{term.name} reads {cur.name}, which is not a conv: {pool.reason}")
        return None
    if pool is None:
        return None
    spec = folds.scale_conv(folds.conv_then_affine(pool.spec, affine), coef)
    return Term(pool.input, spec, False, None, term, coef, "affine_pool", tuple(under))


def _read_term(ctx: RewriteContext, coef: float, term: fx.Node, chain: set, shape) -> Term:
    read = ctx.read.as_conv(term)
    usable = ctx.single_user(term) in chain and term.op != "placeholder"
    if usable and isinstance(read, Refusal) and ctx.read.avg_pool(term) is not None:
        ctx.skip(term, read.code, f"{term.name} is not a conv: {read.reason}")
    if usable and isinstance(read, ConvRead) and read.kind == "affine":
        pooled = _affine_over_pool(ctx, coef, term)
        if pooled is not None:
            return pooled
    if isinstance(read, ConvRead) and read.kind != "conv_transpose" and usable:
        source, spec = read.input, read.spec
        crop = ctx.read.crop(source)
        if crop is not None and ctx.single_user(source) is term:
            refusal = folds.why_not_uncrop(spec, crop[1])
            if refusal is None:  # a crop before the conv: the branch reads the uncropped tensor
                source, spec = crop[0], folds.uncrop(spec, crop[1])
            else:
                ctx.skip(term, refusal.code, refusal.reason)
        return Term(source, folds.scale_conv(spec, coef), read.kind == "conv", read.like, term, coef, read.kind)
    spec = folds.identity_as_conv(shape[1], len(shape) - 2, device=ctx.read.device)
    return Term(term, folds.scale_conv(spec, coef), False, None, None, coef)


def _report_leftovers(ctx: RewriteContext, leftovers: List[Tuple[Term, Reason, str]]) -> None:
    """Every pool or per-channel affine term that stays in the sum is named with why (never silent): the term, and
    for an affine over a pool the pool too."""
    for b, code, reason in leftovers:
        if b.node is None or b.kind not in ("avg_pool", "affine", "affine_pool"):
            continue
        for n in (b.node, *b.under[-1:]):
            if (ctx.rule, n.name) not in ctx.skips:  # a more specific reason given while reading the term stands
                ctx.skip(n, code, f"{b.node.name} stays a separate term of the sum: {reason}")


@register_rule("branch_sum")
def branch_sum(ctx: RewriteContext, node: fx.Node) -> Optional[Rewrite]:
    """Merge the terms of a sum that read the same input into one conv (or one linear layer)."""
    if ctx.read.sum(node) is None:
        return None
    shape = ctx.shape(node)
    if shape is None or len(shape) < 2:
        return None
    user = ctx.single_user(node)
    if user is not None and ctx.read.sum(user) is not None and ctx.shape(user) == shape:
        return None  # an inner node of a larger sum: handled from the root
    flat = _flatten(ctx, node)
    if flat is None:
        return None
    terms, inner = flat
    chain = {node, *inner}
    linear_merges, terms = _merge_linears(ctx, terms, chain, shape)

    groups: Dict[fx.Node, List[Term]] = {}
    others: List[Tuple[float, fx.Node]] = []
    for coef, term in terms:
        if ctx.shape(term) != shape or len(shape) < 3:
            others.append((coef, term))  # broadcasting term: not a branch
            continue
        b = _read_term(ctx, coef, term, chain, shape)
        groups.setdefault(b.input, []).append(b)

    merges: List[Tuple[ConvSpec, fx.Node, Optional[Tensor], List[Term]]] = []
    leftovers: List[Tuple[Term, Reason, str]] = []  # with the code and sentence of why each stays
    for source, branches in groups.items():
        by_geometry: Dict[tuple, List[Term]] = {}
        for b in branches:
            by_geometry.setdefault((b.spec.stride, b.spec.centre(), b.spec.padding_mode), []).append(b)
        geos = ", ".join(f"stride {s} centre {c}" for s, c, _ in by_geometry)
        if len(branches) > 1 and any(b.is_conv for b in branches) and len(by_geometry) > 1:
            ctx.skip(node, Reason.TAP_GRID, f"branches on {source.name} do not share one tap grid ({geos})")
        for part in by_geometry.values():
            if len(part) < 2 or not any(b.is_conv for b in part):
                if any(b.is_conv for b in branches):
                    why = (Reason.TAP_GRID, f"its window is not on the tap grid of the convs on {source.name} "
                                            f"({geos})")
                else:
                    why = (Reason.NO_PARTNER, f"no conv branch reads {source.name}")
                leftovers.extend((b, *why) for b in part)
                continue
            refusal = folds.why_not_on_one_grid([b.spec for b in part])
            if refusal is not None:
                ctx.skip(node, refusal.code, refusal.reason)
                leftovers.extend((b, refusal.code, refusal.reason) for b in part)
                continue
            merged = folds.sum_parallel([b.spec for b in part])
            if merged.weight.numel() > sum(b.spec.weight.numel() for b in part):
                more = f"merging these branches would increase the work (groups expand to {merged.groups})"
                ctx.skip(node, Reason.MORE_WORK, more)
                # Branches of identical geometry still merge for free (the merged kernel is the size of one).
                same: Dict[tuple, List[Term]] = {}
                for b in part:
                    same.setdefault((b.spec.kernel_size, b.spec.dilation, b.spec.padding, b.spec.groups), []).append(b)
                for sub in same.values():
                    if len(sub) > 1 and any(b.is_conv for b in sub):
                        merges.append((folds.sum_parallel([b.spec for b in sub]), source,
                                       next(b.like for b in sub if b.is_conv), sub))
                    else:
                        leftovers.extend((b, Reason.MORE_WORK, more) for b in sub)
                continue
            like = next(b.like for b in part if b.is_conv)
            merges.append((merged, source, like, part))
    _report_leftovers(ctx, leftovers)
    if not merges and not linear_merges:
        return None

    def rewrite() -> None:
        pieces: List[Tuple[float, fx.Node]] = []
        consumed: List[fx.Node] = list(inner)
        for weight, bias, source, like, nodes in linear_merges:
            pieces.append((1.0, ctx.insert_linear(weight, bias, source, before=node, like=like, name=node.name)))
            consumed.extend(nodes)
        for _i, (spec, source, like, part) in enumerate(merges):
            pieces.append((1.0, ctx.insert_conv(spec, source, before=node, like=like, name=node.name)))
            consumed.extend(b.node for b in part if b.node is not None)
            consumed.extend(n for b in part for n in b.under)
        pieces.extend((b.coef, b.node if b.node is not None else b.input) for b, _, _ in leftovers)
        pieces.extend(others)
        result = ctx.insert_sum(pieces, before=node)  # merged layers first: their coefficient is 1
        ctx.replace(node, result, consumed=consumed)
        # In-place adds (``a.add_(b)``) are impure, so replace() keeps them; left in the graph they would still
        # mutate a term the new sum reads (counting it twice) and be matched again next sweep. _flatten proved
        # their targets are not read afterwards, so once unused they are erased.
        for n in (node, *inner):
            ctx.erase_unused(n)

    return rewrite


LinearMerge = Tuple[Tensor, Tensor, fx.Node, Optional[Tensor], List[fx.Node]]


def _merge_linears(ctx: RewriteContext, terms: List[Tuple[float, fx.Node]], chain: set,
                   shape: Sequence[int]) -> Tuple[List[LinearMerge], List[Tuple[float, fx.Node]]]:
    """Linear terms on one input with one weight shape: ``Σ c_i·(x W_iᵀ + b_i) = x (Σ c_i W_i)ᵀ + Σ c_i b_i``
    (two heads averaged, ``(head(x) + head_dist(x)) / 2``, the division then folds as a scalar affine)."""
    by_input: Dict[tuple, List[Tuple[float, fx.Node, LinearRead]]] = {}
    rest: List[Tuple[float, fx.Node]] = []
    for coef, term in terms:
        read = ctx.read.linear(term) if term.op != "placeholder" else None
        if read is None or ctx.shape(term) != shape or ctx.single_user(term) not in chain:
            rest.append((coef, term))
            continue
        by_input.setdefault((read.input, tuple(read.weight.shape)), []).append((coef, term, read))
    merges: List[LinearMerge] = []
    for members in by_input.values():
        if len(members) < 2:
            rest.extend((coef, term) for coef, term, _ in members)
            continue
        weight = torch.stack([c * r.weight for c, _, r in members]).sum(0)
        bias = torch.stack([c * r.bias for c, _, r in members]).sum(0)
        merges.append((weight, bias, members[0][2].input, members[0][2].like, [t for _, t, _ in members]))
    return merges, rest

