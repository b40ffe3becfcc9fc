"""Diverse Branch Block (Ding et al., arXiv 2103.13425): ``BN(kxk) + BN(1x1) + BN(kxk(BNpad(1x1)))
+ BN(avg(BNpad(1x1)))``.

``BNpad`` is DBB's BN whose border holds BN(0), so the chains equal one kxk conv. The 1x1→kxk chain is
``in_channels`` wide (twice that for a depthwise conv, as DBB) with an identity-initialised 1x1. The average pool
needs dilation 1 (a pool has no dilation); so does the 1x1→kxk chain (fxfuse's ``sequential`` rule composes
undilated convs only). A 1x1 conv gets the 1x1→1x1 chain only."""

from __future__ import annotations

from typing import List

from ..scheme import Branch, Geometry, Plan, register_scheme


@register_scheme("dbb")
def dbb(g: Geometry) -> Plan:
    """kxk-BN + 1x1-BN + (1x1→kxk)-BN + (1x1→avg)-BN where the geometry allows."""
    branches: List[Branch] = []
    notes: List[str] = []
    if not g.pointwise:
        reason = g.why_not_aligned((1, 1))
        if reason is None:
            branches.append(Branch("conv", (1, 1)))
        else:
            notes.append(f"no 1x1 branch: {reason}")
    if g.avg_pool_fits:
        branches.append(Branch("1x1_kxk"))
    else:
        notes.append(f"no 1x1→kxk branch: dilation {g.dilation} (fxfuse composes undilated chains only)")
    if not g.pointwise:
        if g.avg_pool_fits:
            branches.append(Branch("1x1_avg"))
        else:
            notes.append(f"no average-pool branch: dilation {g.dilation} (a pool has none)")
    return Plan(tuple(branches), notes=tuple(notes))
