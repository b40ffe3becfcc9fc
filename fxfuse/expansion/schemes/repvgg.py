"""RepVGG (Ding et al., arXiv 2101.03697): ``BN(kxk) + BN(1x1) + BN(x)``.

The 1x1 branch sits on the kxk kernel's centre tap (padding ``p - d(k-1)/2``, as RepVGG's ``padding - k // 2``);
the BN identity exists only where ``in == out`` and stride 1 (and the conv keeps the spatial size). A 1x1 conv
gets the identity only (a second 1x1 would just duplicate the main kernel)."""

from __future__ import annotations

from ...ir.algebra import ConvGeometry
from ..scheme import Plan, PlanBuilder, register_scheme


@register_scheme("repvgg")
def repvgg(g: ConvGeometry) -> Plan:
    """kxk-BN + 1x1-BN + identity-BN where the geometry allows."""
    plan = PlanBuilder()
    plan.pointwise(g)
    plan.identity(g)
    return plan.plan()
