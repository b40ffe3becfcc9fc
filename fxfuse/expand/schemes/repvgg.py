"""RepVGG (Ding et al., arXiv 2101.03697): ``BN(kxk) + BN(1x1) + BN(x)``.

The 1x1 branch sits on the kxk kernel's centre tap (padding ``p - d(k-1)/2``, as RepVGG's ``padding - k // 2``);
the BN identity exists only where ``in == out`` and stride 1 (and the conv keeps the spatial size). A 1x1 conv
gets the identity only (a second 1x1 would just duplicate the main kernel)."""

from __future__ import annotations

from typing import List

from ..scheme import Branch, Geometry, Plan, register_scheme


@register_scheme("repvgg")
def repvgg(g: Geometry) -> Plan:
    """kxk-BN + 1x1-BN + identity-BN where the geometry allows."""
    branches: List[Branch] = []
    notes: List[str] = []
    if not g.pointwise:
        reason = g.why_not_aligned((1, 1))
        if reason is None:
            branches.append(Branch("conv", (1, 1)))
        else:
            notes.append(f"no 1x1 branch: {reason}")
    reason = g.why_no_identity()
    if reason is None:
        branches.append(Branch("identity"))
    else:
        notes.append(f"no identity branch: {reason}")
    return Plan(tuple(branches), notes=tuple(notes))
