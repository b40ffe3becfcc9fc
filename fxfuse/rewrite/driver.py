"""The fixed-point driver: sweep the rules of each phase over the graph until nothing changes.

Each rewrite has a stable key ``rule:node``. Keys in ``deny`` and every rewrite after the first ``max_rewrites``
are skipped: verification bisects over the applied keys with these two knobs (:mod:`fxfuse.verify`).
"""

from __future__ import annotations

import warnings
from collections import Counter
from dataclasses import dataclass
from typing import AbstractSet, Dict, List, Optional, Sequence, Tuple

from ..reasons import Reason
from ..report import Unfused
from .audit import audit
from .context import RewriteContext
from .registry import PHASES, Rule

MAX_SWEEPS = 50


@dataclass
class PassResult:
    """What one run of the rules did: applied rewrite keys in order, counts per rule, candidates left alone."""

    applied: List[str]
    fused: Counter
    unfused: List[Unfused]


def run_rules(ctx: RewriteContext, rules: Sequence[Rule], *, deny: AbstractSet[str] = frozenset(),
              max_rewrites: Optional[int] = None, max_sweeps: int = MAX_SWEEPS) -> PassResult:
    """Apply ``rules`` phase by phase, each to a fixed point."""
    applied: List[str] = []
    fused: Counter = Counter()
    skips: Dict[Tuple[str, str], Unfused] = {}
    for phase in PHASES:
        members = [r for r in rules if r.phase == phase]
        if members:
            _sweep(ctx, members, deny, max_rewrites, max_sweeps, applied, fused)
            skips.update(ctx.skips)
    ctx.skips.clear()
    audit(ctx, list(skips.values()))  # never silent: name every fusable-kind op left (rewrite/audit.py)
    skips.update(ctx.skips)
    ctx.graph.lint()
    ctx.gm.recompile()
    return PassResult(applied, fused, list(skips.values()))


def _sweep(ctx: RewriteContext, rules: Sequence[Rule], deny: AbstractSet[str], max_rewrites: Optional[int],
           max_sweeps: int, applied: List[str], fused: Counter) -> None:
    for _ in range(max_sweeps):
        ctx.skips.clear()
        if ctx.reshape is not None and ctx.needs_shapes():
            ctx.reshape()
        changed = False
        for rule in rules:
            ctx.begin_rule(rule.name)
            for node in list(ctx.graph.nodes):
                if ctx.is_erased(node) or node.op == "output":
                    continue
                rewrite = rule.fn(ctx, node)
                if rewrite is None:
                    continue
                key = f"{rule.name}:{node.name}"
                if key in deny:
                    ctx.skip(node, Reason.ROLLED_BACK, "rolled back: this rewrite changed the model's outputs")
                    continue
                if max_rewrites is not None and len(applied) >= max_rewrites:
                    continue
                rewrite()
                applied.append(key)
                fused[rule.name] += 1
                changed = True
        if not changed:
            return
    warnings.warn(f"fxfuse: the rules {[r.name for r in rules]} still rewrote the graph after {max_sweeps} sweeps; "
                  "stopped there (the result is verified, but may not be fully fused). A rule that undoes another "
                  "rule's rewrite loops like this.", RuntimeWarning, stacklevel=3)
