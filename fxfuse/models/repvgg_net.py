"""RepVGG (Ding et al., arXiv 2101.03697) in its multi-branch *training* form.

No conversion code lives here: collapsing the branches is fxfuse's job. Every re-parameterizable
block exposes ``deploy_conv_specs()``, the geometry of the plain conv(s) a perfect
re-parameterizer would turn it into (used by :func:`fxfuse.models.plain_twin`).
"""
from __future__ import annotations

from collections import OrderedDict
from typing import Any, Mapping, Sequence

import torch
from torch import nn

__all__ = [
    "REPVGG_CONFIGS",
    "RepVGG",
    "RepVGGBlock",
    "conv_bn",
    "conv_spec",
    "repvgg",
]

IntOrPair = int | tuple[int, int]


def _pair(v: IntOrPair) -> tuple[int, int]:
    """``3 -> (3, 3)``; pairs pass through as tuples of ints."""
    if isinstance(v, int):
        return (v, v)
    a, b = v
    return (int(a), int(b))


def conv_spec(
    in_channels: int,
    out_channels: int,
    kernel_size: IntOrPair,
    stride: IntOrPair = 1,
    padding: IntOrPair = 0,
    groups: int = 1,
) -> dict[str, Any]:
    """Geometry of one deploy conv as ``nn.Conv2d`` keyword arguments (pairs normalized to tuples)."""
    return {
        "in_channels": int(in_channels),
        "out_channels": int(out_channels),
        "kernel_size": _pair(kernel_size),
        "stride": _pair(stride),
        "padding": _pair(padding),
        "dilation": (1, 1),
        "groups": int(groups),
    }


def check_groups(in_channels: int, out_channels: int, groups: int) -> None:
    """Raise ``ValueError`` unless ``groups`` divides both channel counts."""
    if groups < 1 or in_channels % groups or out_channels % groups:
        raise ValueError(
            f"groups={groups} must divide in_channels={in_channels} and out_channels={out_channels}"
        )


def conv_bn(
    in_channels: int,
    out_channels: int,
    kernel_size: IntOrPair,
    stride: IntOrPair = 1,
    padding: IntOrPair = 0,
    groups: int = 1,
) -> nn.Sequential:
    """``Sequential(conv=Conv2d(..., bias=False), bn=BatchNorm2d(out_channels))``."""
    return nn.Sequential(
        OrderedDict(
            conv=nn.Conv2d(
                in_channels, out_channels, kernel_size, stride=stride, padding=padding,
                groups=groups, bias=False,
            ),
            bn=nn.BatchNorm2d(out_channels),
        )
    )


class RepVGGBlock(nn.Module):
    """``ReLU(BN(conv3x3(x)) + BN(conv1x1(x)) [+ BN(x)])``, training form.

    The identity-BN branch exists only when ``in_channels == out_channels`` and ``stride == 1``.
    """

    def __init__(self, in_channels: int, out_channels: int, stride: int = 1, groups: int = 1) -> None:
        super().__init__()
        check_groups(in_channels, out_channels, groups)
        self.in_channels = in_channels
        self.out_channels = out_channels
        self.stride = stride
        self.groups = groups
        self.dense = conv_bn(in_channels, out_channels, 3, stride, 1, groups)
        self.pointwise = conv_bn(in_channels, out_channels, 1, stride, 0, groups)
        self.identity: nn.BatchNorm2d | None = (
            nn.BatchNorm2d(in_channels) if in_channels == out_channels and stride == 1 else None
        )
        self.act = nn.ReLU()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Sum the branches, then ReLU."""
        if self.identity is not None:
            out = self.dense(x) + self.pointwise(x) + self.identity(x)
        else:
            out = self.dense(x) + self.pointwise(x)
        return self.act(out)

    def deploy_conv_spec(self) -> dict[str, Any]:
        """The single 3x3 conv (bias) this block collapses to."""
        return conv_spec(self.in_channels, self.out_channels, 3, self.stride, 1, self.groups)

    def deploy_conv_specs(self) -> list[dict[str, Any]]:
        """Deploy convs in order, each followed by ReLU."""
        return [self.deploy_conv_spec()]

    def extra_repr(self) -> str:
        return f"{self.in_channels}, {self.out_channels}, stride={self.stride}, groups={self.groups}"


class RepVGG(nn.Module):
    """RepVGG network, training form, following the official layout.

    * ``stage0``: one block ``in_channels -> min(64, 64a)``, stride 2 (omitted when ``stem=False``);
    * ``stage1..stage4``: ``num_blocks[i]`` blocks of widths ``64a, 128a, 256a, 512b``; the first
      block of each stage has stride 2;
    * head: ``AdaptiveAvgPool2d(1) -> flatten -> Linear``; ``num_classes`` None/0 means no head
      (the forward then returns the stage4 feature map).

    ``groups_map`` maps a layer index to its groups. Layers are counted from 1 at the first block
    after stage0 (stage0 is never grouped), as in the official code (``g2_map`` = even layers 2..26).
    ``width_multiplier`` is ``(a, b)`` or four per-stage factors.
    """

    def __init__(
        self,
        num_blocks: Sequence[int],
        width_multiplier: Sequence[float],
        groups_map: Mapping[int, int] | None = None,
        num_classes: int | None = 1000,
        in_channels: int = 3,
        stem: bool = True,
    ) -> None:
        super().__init__()
        num_blocks = tuple(int(n) for n in num_blocks)
        if len(num_blocks) != 4 or min(num_blocks) < 1:
            raise ValueError(f"num_blocks must be four positive ints, got {num_blocks}")
        wm = tuple(float(w) for w in width_multiplier)
        if len(wm) == 2:
            wm = (wm[0], wm[0], wm[0], wm[1])
        if len(wm) != 4:
            raise ValueError(f"width_multiplier must have 2 or 4 entries, got {width_multiplier}")
        groups_map = dict(groups_map or {})
        self.num_blocks = num_blocks
        self.width_multiplier = wm
        self.groups_map = groups_map
        self.widths = (int(64 * wm[0]), int(128 * wm[1]), int(256 * wm[2]), int(512 * wm[3]))

        cur = in_channels
        self.stage0: RepVGGBlock | None = None
        if stem:
            stem_width = min(64, int(64 * wm[0]))
            self.stage0 = RepVGGBlock(in_channels, stem_width, stride=2)
            cur = stem_width
        layer_idx = 1
        stages: list[nn.Sequential] = []
        for width, depth in zip(self.widths, num_blocks):
            blocks = []
            for j in range(depth):
                groups = groups_map.get(layer_idx, 1)
                blocks.append(RepVGGBlock(cur, width, stride=2 if j == 0 else 1, groups=groups))
                cur = width
                layer_idx += 1
            stages.append(nn.Sequential(*blocks))
        self.stage1, self.stage2, self.stage3, self.stage4 = stages
        self.out_channels = cur

        self.gap: nn.AdaptiveAvgPool2d | None = None
        self.linear: nn.Linear | None = None
        if num_classes:
            self.gap = nn.AdaptiveAvgPool2d(1)
            self.linear = nn.Linear(cur, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Stem, four stages, optional classification head."""
        if self.stage0 is not None:
            x = self.stage0(x)
        x = self.stage1(x)
        x = self.stage2(x)
        x = self.stage3(x)
        x = self.stage4(x)
        linear, gap = self.linear, self.gap
        if linear is None or gap is None:
            return x
        x = gap(x)
        x = torch.flatten(x, 1)
        return linear(x)


_GROUPWISE_LAYERS = tuple(range(2, 27, 2))
_G2 = dict.fromkeys(_GROUPWISE_LAYERS, 2)
_G4 = dict.fromkeys(_GROUPWISE_LAYERS, 4)
_A = (2, 4, 14, 1)
_B = (4, 6, 16, 1)

#: Named RepVGG configurations: keyword arguments for :class:`RepVGG`.
REPVGG_CONFIGS: dict[str, dict[str, Any]] = {
    "A0": {"num_blocks": _A, "width_multiplier": (0.75, 0.75, 0.75, 2.5)},
    "A1": {"num_blocks": _A, "width_multiplier": (1, 1, 1, 2.5)},
    "A2": {"num_blocks": _A, "width_multiplier": (1.5, 1.5, 1.5, 2.75)},
    "B0": {"num_blocks": _B, "width_multiplier": (1, 1, 1, 2.5)},
    "B1": {"num_blocks": _B, "width_multiplier": (2, 2, 2, 4)},
    "B1g2": {"num_blocks": _B, "width_multiplier": (2, 2, 2, 4), "groups_map": _G2},
    "B1g4": {"num_blocks": _B, "width_multiplier": (2, 2, 2, 4), "groups_map": _G4},
    "B2": {"num_blocks": _B, "width_multiplier": (2.5, 2.5, 2.5, 5)},
    "B2g2": {"num_blocks": _B, "width_multiplier": (2.5, 2.5, 2.5, 5), "groups_map": _G2},
    "B2g4": {"num_blocks": _B, "width_multiplier": (2.5, 2.5, 2.5, 5), "groups_map": _G4},
    "B3": {"num_blocks": _B, "width_multiplier": (3, 3, 3, 5)},
    "B3g2": {"num_blocks": _B, "width_multiplier": (3, 3, 3, 5), "groups_map": _G2},
    "B3g4": {"num_blocks": _B, "width_multiplier": (3, 3, 3, 5), "groups_map": _G4},
    # The seed article's net: four stages of two blocks (64, 128, 256, 512), each stage opening
    # with a stride-2 block, no stem block, no head (returns the feature map).
    "article": {"num_blocks": (2, 2, 2, 2), "width_multiplier": (1, 1, 1, 1), "stem": False, "num_classes": None},
    # Small nets for fast tests: widths 16/32/64/256, identity blocks in stages 1-3.
    "tiny": {"num_blocks": (2, 2, 2, 1), "width_multiplier": (0.25, 0.25, 0.25, 0.5), "num_classes": 10},
    # Groups 2 on layers 2, 4, 6 (identity blocks) and 3 (a stride-2 stage opener).
    "tiny_g2": {
        "num_blocks": (2, 2, 2, 1), "width_multiplier": (0.25, 0.25, 0.25, 0.5),
        "groups_map": {2: 2, 3: 2, 4: 2, 6: 2}, "num_classes": 10,
    },
}


def repvgg(config: str, **overrides: Any) -> RepVGG:
    """Build ``RepVGG`` from ``REPVGG_CONFIGS[config]``; ``overrides`` replace config entries."""
    if config not in REPVGG_CONFIGS:
        raise ValueError(f"unknown RepVGG config {config!r}; valid: {', '.join(REPVGG_CONFIGS)}")
    kwargs = dict(REPVGG_CONFIGS[config])
    kwargs.update(overrides)
    return RepVGG(**kwargs)
