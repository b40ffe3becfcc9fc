"""Diverse Branch Block (Ding et al., arXiv 2103.13425): ``BN(kxk) + BN(1x1) + BN(kxk(BNpad(1x1)))
+ BN(avg(BNpad(1x1)))``.

``BNpad`` is DBB's BN whose border holds BN(0), so the chains equal one kxk conv. The 1x1→kxk chain is
``in_channels`` wide (twice that for a depthwise conv, as DBB) with an identity-initialised 1x1. The average pool
needs dilation 1 (a pool has no dilation); so does the 1x1→kxk chain (fxfuse's ``sequential`` rule composes
undilated convs only). A 1x1 conv gets the 1x1→1x1 chain only."""

from __future__ import annotations

from ...ir.algebra import ConvGeometry
from ..scheme import Branch, Plan, PlanBuilder, register_scheme


@register_scheme("dbb")
def dbb(g: ConvGeometry) -> Plan:
    """kxk-BN + 1x1-BN + (1x1→kxk)-BN + (1x1→avg)-BN where the geometry allows."""
    plan = PlanBuilder()
    plan.pointwise(g)
    plan.add("1x1→kxk", Branch("1x1_kxk"),
             None if g.avg_pool_fits else f"dilation {g.dilation} (fxfuse composes undilated chains only)")
    if not g.pointwise:
        plan.add("average-pool", Branch("1x1_avg"),
                 None if g.avg_pool_fits else f"dilation {g.dilation} (a pool has none)")
    return plan.plan()
