"""ACNet (Ding et al., arXiv 1908.03930): ``BN(kxk) + BN(1xk) + BN(kx1)``, the asymmetric kernels on the square
kernel's centre row / column. Only kernels larger than 1 on both axes get them (for a 1xk or 1x1 conv the
"asymmetric" kernels would duplicate the main one or be a 1x1)."""

from __future__ import annotations

from ...ir.algebra import ConvGeometry
from ..scheme import Branch, Plan, PlanBuilder, register_scheme


@register_scheme("acnet")
def acnet(g: ConvGeometry) -> Plan:
    """kxk-BN + 1xk-BN + kx1-BN (kernels > 1 on both axes)."""
    kh, kw = g.kernel_size
    if kh == 1 or kw == 1:
        return Plan(notes=(f"no asymmetric branches for a {kh}x{kw} kernel",))
    plan = PlanBuilder()
    for kernel in ((1, kw), (kh, 1)):
        plan.add(f"{kernel[0]}x{kernel[1]}", Branch("conv", kernel), g.why_not_aligned(kernel))
    return plan.plan()
