"""What a pass did: fused patterns with counts, candidates left unfused with reasons, verification."""

from __future__ import annotations

from collections import Counter
from dataclasses import asdict, dataclass, field
from typing import Any, ClassVar, Dict, List, Optional, Tuple

import torch
from torch import Tensor, fx

from .ir.ops import op_kind
from .reasons import Reason


@dataclass(frozen=True)
class Unfused:
    """A candidate a rule looked at and left alone."""

    rule: str
    node: str
    target: str
    code: Reason  # stable: branch on this, never on ``reason``
    reason: str  # the same in a sentence, for people (may be reworded at any release)


@dataclass(frozen=True)
class Rollback:
    """A rewrite undone by verification: its key (``rule:node``), why (a :class:`Reason`), the failed check's detail."""

    key: str
    code: Reason
    detail: str


@dataclass(frozen=True)
class CaptureAttempt:
    """One capture ``reparametrize`` tried (``symbolic``, ``export``, ``submodules``): ``kept`` or not, why not (a
    :class:`Reason`, ``None`` for the kept one), the convs + BatchNorms + pools its result executes on the example
    input (``None`` where it gave no result), and a sentence."""

    capture: str
    kept: bool
    code: Optional[Reason]
    executed: Optional[int]
    detail: str


@dataclass(frozen=True)
class WeightGrowth:
    """Weight range of one fused conv vs its main branch's original kernel, per output channel:
    ``growth[o] = max|W_fused[o]| / max|W_main[o]|`` (folded BN scales and added branches both count). A channel
    whose growth exceeds ``OUTLIER_FACTOR`` × the median channel's is an outlier: one channel's range then sets a
    per-tensor int8 scale for all (docs/expand.md, quantization)."""

    module: str
    channels: int
    max_growth: float
    median_growth: float
    outliers: Tuple[int, ...] = ()

    OUTLIER_FACTOR: ClassVar[float] = 4.0

    @classmethod
    def of(cls, module: str, fused: Tensor, main: Tensor) -> Optional[WeightGrowth]:
        """``None`` when the kernels do not share their output-channel axis (e.g. a transposed conv)."""
        if fused.dim() != main.dim() or fused.dim() < 2 or fused.shape[0] != main.shape[0]:
            return None
        f = _max_abs_per_row(fused).to(torch.float64)
        m = _max_abs_per_row(main).to(torch.float64).to(f.device)
        growth = torch.where(m > 0, f / m.clamp_min(1e-300), torch.where(f > 0, torch.inf, 1.0))
        median = float(growth.median())
        outliers = tuple(int(i) for i in torch.nonzero(growth > cls.OUTLIER_FACTOR * median).flatten()) \
            if median > 0 else ()
        return cls(module, int(growth.numel()), float(growth.max()), median, outliers)


def _max_abs_per_row(w: Tensor) -> Tensor:
    """max |w| per output channel without a |w| temporary (amax and amin reduce fast; an inf-norm is ~4x slower)."""
    rows = w.detach().flatten(1)
    if rows.shape[1] == 0:
        return rows.new_zeros(rows.shape[0])
    return torch.maximum(rows.amax(dim=1), rows.amin(dim=1).neg())


# op kind (fxfuse.ir.ops.op_kind) -> the GraphStats field counting it
_COUNTED = {"conv": "convs", "batch_norm": "batch_norms", "avg_pool": "pools", "add": "adds", "assert": "asserts",
            "metadata": "metadata_reads"}


@dataclass
class GraphStats:
    """Op counts of a graph (module and functional spellings together)."""

    nodes: int = 0
    convs: int = 0
    batch_norms: int = 0
    pools: int = 0
    adds: int = 0
    asserts: int = 0  # torch._assert calls (shape assertions)
    metadata_reads: int = 0  # x.shape / x.ndim / x.size() … reads

    @classmethod
    def of(cls, gm: fx.GraphModule) -> GraphStats:
        modules = dict(gm.named_modules())
        stats = cls()
        for node in gm.graph.nodes:
            if node.op in ("placeholder", "output", "get_attr"):
                continue
            stats.nodes += 1
            counter = _COUNTED.get(op_kind(node, modules) or "")
            if counter is not None:
                setattr(stats, counter, getattr(stats, counter) + 1)
        return stats


@dataclass
class FusionReport:
    """Returned as ``fused.fxfuse_report``.

    ``fused`` counts applied rewrites per rule; ``unfused`` lists candidates left alone (with why);
    ``rolled_back`` lists rewrites undone by verification; ``submodules`` says, for models that do not trace
    as a whole, which sub-modules were rewritten and why others were not."""

    fused: Counter = field(default_factory=Counter)
    unfused: List[Unfused] = field(default_factory=list)
    rolled_back: List[str] = field(default_factory=list)  # keys of the rewrites undone (details: rollbacks)
    rollbacks: List[Rollback] = field(default_factory=list)
    applied: List[str] = field(default_factory=list)
    before: GraphStats = field(default_factory=GraphStats)
    after: GraphStats = field(default_factory=GraphStats)
    verified: Optional[bool] = None
    verify_dtype: Optional[str] = None
    max_abs_error: Optional[float] = None
    max_rel_error: Optional[float] = None
    tolerance: Optional[float] = None
    pass_seconds: float = 0.0
    traced_whole: bool = True
    # Which capture produced the result — "symbolic" (torch.fx), "export" (torch.export, ATen graph) or
    # "submodules" (per-sub-module fallback) — and why that one (reparametrize(capture=...)).
    capture: str = "symbolic"
    capture_reason: str = ""
    captures: List[CaptureAttempt] = field(default_factory=list)  # every capture tried, kept or dropped, and why
    # seconds per phase of the pass, in order: copy (of the model's structure), original run (the reference in the
    # model's dtype), capture, lens (float64 view + its reference run), shapes, rules, verify (float64 check), cast
    # back (the returned module), artifact (its check), total; rollback attempts add to their phases
    phases: Dict[str, float] = field(default_factory=dict)
    submodules: Dict[str, str] = field(default_factory=dict)
    warnings: List[str] = field(default_factory=list)
    artifact_check: Optional[str] = None  # the returned model, run once in its own dtype (see reparametrize)
    artifact_max_rel_error: Optional[float] = None
    cast_attributes: List[str] = field(default_factory=list)  # plain tensor attributes cast back from float64
    frozen_constants: List[str] = field(default_factory=list)  # trace-time constants: a snapshot of the weights
    weight_growth: List[WeightGrowth] = field(default_factory=list)  # per fused conv (quantization readiness)

    @property
    def total_fused(self) -> int:
        return sum(self.fused.values())

    def merge(self, prefix: str, other: FusionReport) -> None:
        """Fold a sub-module's report into this one (fallback mode)."""
        self.fused.update(other.fused)
        self.unfused.extend(Unfused(u.rule, f"{prefix}.{u.node}", u.target, u.code, u.reason)
                            for u in other.unfused)
        self.rolled_back.extend(f"{prefix}.{r}" for r in other.rolled_back)
        self.rollbacks.extend(Rollback(f"{prefix}.{r.key}", r.code, r.detail) for r in other.rollbacks)
        self.applied.extend(f"{prefix}.{a}" for a in other.applied)
        self.weight_growth.extend(WeightGrowth(f"{prefix}.{g.module}", g.channels, g.max_growth, g.median_growth,
                                               g.outliers) for g in other.weight_growth)
        for name in GraphStats.__dataclass_fields__:
            setattr(self.before, name, getattr(self.before, name) + getattr(other.before, name))
            setattr(self.after, name, getattr(self.after, name) + getattr(other.after, name))

    def to_dict(self) -> Dict[str, Any]:
        d = asdict(self)
        d["fused"] = dict(self.fused)
        return d

    def summary(self) -> str:
        lines = [f"fxfuse: {self.total_fused} rewrites "
                 + (", ".join(f"{k}={v}" for k, v in sorted(self.fused.items())) or "(none)")]
        b, a = self.before, self.after
        lines.append(f"  ops {b.nodes} -> {a.nodes}, convs {b.convs} -> {a.convs}, "
                     f"batch_norms {b.batch_norms} -> {a.batch_norms}, avg_pools {b.pools} -> {a.pools}, "
                     f"adds {b.adds} -> {a.adds}"
                     + ("" if self.traced_whole else " (in the rewritten sub-modules' graphs only)"))
        if self.verified is not None:
            lines.append(f"  verified={self.verified} in {self.verify_dtype}: max abs error {self.max_abs_error:.3g}"
                         f" (relative {self.max_rel_error:.3g}, tolerance {self.tolerance:.3g})")
        if self.capture_reason:
            lines.append(f"  capture: {self.capture} ({self.capture_reason})")
        if not self.traced_whole:
            lines.append("  model did not trace as a whole; sub-modules:")
            lines.extend(f"    {k}: {v}" for k, v in self.submodules.items())
        if self.rollbacks:
            lines.append("  rolled back:")
            lines.extend(f"    {r.key} [{r.code}]: {r.detail}" for r in self.rollbacks)
        dropped = [c for c in self.captures if not c.kept and c.code not in (Reason.NOT_TRIED, Reason.NOT_REQUESTED)]
        if dropped:
            lines.append("  captures not used: " + "; ".join(f"{c.capture} [{c.code}] {c.detail}" for c in dropped))
        if self.unfused:
            lines.append(f"  left unfused ({len(self.unfused)}):")
            lines.extend(f"    [{u.rule}] {u.node} ({u.target}) {u.code}: {u.reason}" for u in self.unfused)
        flagged = [g for g in self.weight_growth if g.outliers]
        if flagged:
            lines.append(f"  weight range outliers (channels grown > {WeightGrowth.OUTLIER_FACTOR:g}x the median "
                         f"channel's growth vs the main branch): "
                         + ", ".join(f"{g.module} {len(g.outliers)}/{g.channels}" for g in flagged))
        if self.artifact_check is not None:
            lines.append(f"  returned model {self.artifact_check}")
        if self.cast_attributes:
            lines.append(f"  cast back from the float64 working copy: {', '.join(self.cast_attributes)}")
        if self.frozen_constants:
            lines.append(f"  trace-time constants (a snapshot: loading new weights does not update them): "
                         f"{', '.join(self.frozen_constants)}")
        lines.extend(f"  warning: {w}" for w in self.warnings)
        return "\n".join(lines)

    __str__ = summary
