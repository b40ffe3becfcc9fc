"""What :func:`fxfuse.expand` did: ``expanded_model.fxfuse_expand_report``."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any, Dict, List, Optional, Tuple


@dataclass(frozen=True)
class Expanded:
    """A conv replaced by an :class:`fxfuse.expansion.modules.ExpandedConv2d` (at the conv's module path).
    ``batch_norm``: the BatchNorm that followed it, moved into the block (its old path now holds ``nn.Identity``).
    ``notes``: branches the scheme left out for this geometry, and why. With ``expand(online=True)``: ``online``
    whether the block computes its kernel per forward (:class:`fxfuse.expansion.online.OnlineConv2d`),
    ``online_notes`` what was linearized, ``offline_reason`` why the block stayed offline."""

    name: str
    batch_norm: Optional[str]
    branches: Tuple[str, ...]
    notes: Tuple[str, ...] = ()
    online: bool = False
    online_notes: Tuple[str, ...] = ()
    offline_reason: Optional[str] = None


@dataclass(frozen=True)
class Skipped:
    """A conv left as it was, and why."""

    name: str
    reason: str


@dataclass
class ExpandReport:
    scheme: str
    init: str
    capture: str = "torch.fx symbolic trace"
    expanded: List[Expanded] = field(default_factory=list)
    skipped: List[Skipped] = field(default_factory=list)
    params_before: int = 0
    params_after: int = 0
    verified: Optional[bool] = None  # init="preserve": the expanded model (eval) equals the original
    verify_dtype: Optional[str] = None
    max_rel_error: Optional[float] = None
    warnings: List[str] = field(default_factory=list)
    online: bool = False  # expand(online=True) was asked for

    @property
    def expanded_names(self) -> List[str]:
        return [e.name for e in self.expanded]

    def to_dict(self) -> Dict[str, Any]:
        return asdict(self)

    def summary(self) -> str:
        mode = " online=True" if self.online else ""
        lines = [f"fxfuse.expand: scheme={self.scheme!r} init={self.init!r}{mode} ({self.capture}): "
                 f"{len(self.expanded)} convs expanded, {len(self.skipped)} skipped; parameters "
                 f"{self.params_before} -> {self.params_after}"]
        if self.verified is not None:
            lines.append(f"  eval-mode output equals the original in {self.verify_dtype}: {self.verified} "
                         f"(max relative error {self.max_rel_error:.3g})")
        for e in self.expanded:
            bn = f" + {e.batch_norm}" if e.batch_norm else ""
            lines.append(f"  expanded {e.name}{bn}: {', '.join(e.branches)}")
            if e.online:
                lines.append(f"    online: {'; '.join(e.online_notes)}")
            elif e.offline_reason:
                lines.append(f"    not online: {e.offline_reason}")
        lines.extend(f"  skipped {s.name}: {s.reason}" for s in self.skipped)
        lines.extend(f"  warning: {w}" for w in self.warnings)
        return "\n".join(lines)

    __str__ = summary
