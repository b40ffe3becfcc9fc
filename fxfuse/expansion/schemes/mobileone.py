"""MobileOne (Vasu et al., arXiv 2206.04040): ``Σ_k BN(kxk_i) + BN(1x1) + BN(x)``.

``num_conv_branches`` kxk conv-BN branches in all (the main one included; 4 in MobileOne-S0, the
over-parameterized variant, 1 in S1–S4), the 1x1 "scale" branch for kernels > 1 and the BN skip where
``in == out`` and stride 1."""

from __future__ import annotations

from ...ir.algebra import ConvGeometry
from ..scheme import Branch, Plan, PlanBuilder, register_scheme


@register_scheme("mobileone")
def mobileone(g: ConvGeometry, num_conv_branches: int = 4) -> Plan:
    """``num_conv_branches`` kxk-BN + 1x1-BN + identity-BN where the geometry allows."""
    if num_conv_branches < 1:
        raise ValueError(f"num_conv_branches must be >= 1, got {num_conv_branches}")
    plan = PlanBuilder([Branch("conv", name=f"conv_kxk_{i}") for i in range(1, num_conv_branches)])
    plan.pointwise(g)
    plan.identity(g)
    return plan.plan()
