"""QARepVGG (Chu et al., arXiv 2212.01593): ``BN(BN(kxk) + 1x1 + x)`` — quantization-friendly RepVGG.

No BN on the 1x1 and identity branches and one BN after the sum, so the fused kernel is the main kernel plus
a plain 1x1 and Dirac term scaled by one shared per-channel factor: no branch-specific ``γ/σ`` can blow up a
channel's weight range (see ``FusionReport.weight_growth``). A conv without BN gets the BN-free branches only
(expand does not add normalization to a path that had none). 1x1 convs, and kernels whose 1x1 tap is not on
the kxk grid, get nothing: with ``init="preserve"`` the BN-free identity is cancelled by the 1x1 branch starting
at ``-I``."""

from __future__ import annotations

from ...ir.algebra import ConvGeometry
from ..scheme import Branch, Plan, PlanBuilder, register_scheme


@register_scheme("qarepvgg")
def qarepvgg(g: ConvGeometry) -> Plan:
    """kxk-BN + 1x1 + identity, then one BN after the sum."""
    if g.pointwise:
        return Plan(notes=("QARepVGG blocks are kxk: a 1x1 conv's BN-free identity would have no 1x1 branch to "
                           "start at -I against it",))
    reason = g.why_not_aligned((1, 1))
    if reason is not None:
        return Plan(notes=(f"no 1x1 branch: {reason}",))
    plan = PlanBuilder([Branch("conv", (1, 1), bn=False)])
    plan.identity(g, bn=False)
    return plan.plan(post_bn=True)  # a conv without BN gets none after the sum (Plan.post_bn)
