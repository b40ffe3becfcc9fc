"""Training-form re-parameterizable blocks (ACNet, DBB, MobileOne, BN-after-sum) and small nets.

Every block ends in a ReLU and exposes ``deploy_conv_specs()``: the plain convs (with bias, each
followed by ReLU) that a perfect re-parameterizer turns it into. All kxk branches use the
"centre" padding ``k // 2``, so every branch of a block shares one tap grid.
"""
from __future__ import annotations

from collections import OrderedDict
from typing import Any, Callable, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from .repvgg_net import check_groups, conv_bn, conv_spec

__all__ = [
    "ACBlock",
    "ACNet",
    "BNAfterSumBlock",
    "BNAfterSumNet",
    "PadThenBN",
    "DBBBlock",
    "DBBNet",
    "MobileOneBlock",
    "MobileOneNet",
    "MobileOneUnit",
]


def _check_odd(kernel_size: int) -> None:
    """Centre-aligned branches need an odd kernel."""
    if kernel_size < 1 or kernel_size % 2 == 0:
        raise ValueError(f"kernel_size must be a positive odd int, got {kernel_size}")


class ACBlock(nn.Module):
    """ACNet block: ``ReLU(BN(conv kxk) + BN(conv 1xk) + BN(conv kx1))``, all with padding k//2."""

    def __init__(
        self, in_channels: int, out_channels: int, kernel_size: int = 3, stride: int = 1, groups: int = 1
    ) -> None:
        super().__init__()
        _check_odd(kernel_size)
        check_groups(in_channels, out_channels, groups)
        k, p = kernel_size, kernel_size // 2
        self.in_channels, self.out_channels = in_channels, out_channels
        self.kernel_size, self.stride, self.groups = k, stride, groups
        self.square = conv_bn(in_channels, out_channels, (k, k), stride, (p, p), groups)
        self.hor = conv_bn(in_channels, out_channels, (1, k), stride, (0, p), groups)
        self.ver = conv_bn(in_channels, out_channels, (k, 1), stride, (p, 0), groups)
        self.act = nn.ReLU()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Sum the three asymmetric branches, then ReLU."""
        return self.act(self.square(x) + self.hor(x) + self.ver(x))

    def deploy_conv_spec(self) -> dict[str, Any]:
        """The single kxk conv this block collapses to."""
        k = self.kernel_size
        return conv_spec(self.in_channels, self.out_channels, k, self.stride, k // 2, self.groups)

    def deploy_conv_specs(self) -> list[dict[str, Any]]:
        """Deploy convs in order, each followed by ReLU."""
        return [self.deploy_conv_spec()]


class PadThenBN(nn.Module):
    """``bn(F.pad(x, [pad] * 4))`` (zero padding) when ``pad > 0``, else ``bn(x)``: the eval-mode spelling of DBB's
    BN-and-pad (the trainable one is :class:`fxfuse.expansion.BNAndPad`).

    In eval mode this equals DBB's "BN, then pad with BN(0)" since BN is a per-channel affine map,
    so the padded border holds exactly what the following kxk conv would see in the original DBB.
    (In train mode the zero border enters the batch statistics; this module is for eval/fusion.)
    """

    def __init__(self, num_features: int, pad: int) -> None:
        super().__init__()
        self.pad = int(pad)
        self.bn = nn.BatchNorm2d(num_features)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Zero-pad all four sides by ``pad``, then BN."""
        if self.pad > 0:
            x = F.pad(x, [self.pad] * 4)
        return self.bn(x)

    def extra_repr(self) -> str:
        return f"pad={self.pad}"


class DBBBlock(nn.Module):
    """Diverse Branch Block (arXiv 2103.13425), training form, sum of:

    * ``origin``: kxk conv-BN (padding k//2);
    * ``branch_1x1``: 1x1 conv-BN (only when k > 1);
    * ``branch_avg``: 1x1 conv (bias-free, groups) -> PadThenBN(k//2) -> AvgPool2d(k, stride, 0) -> BN;
    * ``branch_1x1_kxk``: 1x1 conv (in -> internal, groups, bias-free) -> PadThenBN(k//2)
      -> kxk conv (padding 0, stride, groups, bias-free) -> BN;

    then ReLU. ``internal_channels`` defaults to ``in_channels``. Unlike the official code the
    avg branch always has its 1x1 conv (also for depthwise), which keeps shapes valid for any
    ``in_channels``/``out_channels``/``groups``.
    """

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        kernel_size: int = 3,
        stride: int = 1,
        groups: int = 1,
        internal_channels: int | None = None,
    ) -> None:
        super().__init__()
        _check_odd(kernel_size)
        check_groups(in_channels, out_channels, groups)
        internal = in_channels if internal_channels is None else internal_channels
        check_groups(internal, out_channels, groups)
        k, p = kernel_size, kernel_size // 2
        self.in_channels, self.out_channels = in_channels, out_channels
        self.kernel_size, self.stride, self.groups = k, stride, groups
        self.internal_channels = internal
        self.origin = conv_bn(in_channels, out_channels, k, stride, p, groups)
        self.branch_1x1: nn.Sequential | None = (
            conv_bn(in_channels, out_channels, 1, stride, 0, groups) if k > 1 else None
        )
        self.branch_avg = nn.Sequential(
            OrderedDict(
                conv=nn.Conv2d(in_channels, out_channels, 1, groups=groups, bias=False),
                bn=PadThenBN(out_channels, p),
                avg=nn.AvgPool2d(k, stride=stride, padding=0),
                avgbn=nn.BatchNorm2d(out_channels),
            )
        )
        self.branch_1x1_kxk = nn.Sequential(
            OrderedDict(
                conv1=nn.Conv2d(in_channels, internal, 1, groups=groups, bias=False),
                bn1=PadThenBN(internal, p),
                conv2=nn.Conv2d(internal, out_channels, k, stride=stride, padding=0, groups=groups, bias=False),
                bn2=nn.BatchNorm2d(out_channels),
            )
        )
        self.act = nn.ReLU()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Sum the four branches, then ReLU."""
        out = self.origin(x)
        if self.branch_1x1 is not None:
            out = out + self.branch_1x1(x)
        out = out + self.branch_avg(x) + self.branch_1x1_kxk(x)
        return self.act(out)

    def deploy_conv_spec(self) -> dict[str, Any]:
        """The single kxk conv this block collapses to."""
        k = self.kernel_size
        return conv_spec(self.in_channels, self.out_channels, k, self.stride, k // 2, self.groups)

    def deploy_conv_specs(self) -> list[dict[str, Any]]:
        """Deploy convs in order, each followed by ReLU."""
        return [self.deploy_conv_spec()]


class MobileOneUnit(nn.Module):
    """One MobileOne re-parameterizable conv (arXiv 2206.04040), training form:

    ``ReLU(sum_i BN(conv_i kxk) [+ BN(conv 1x1) "scale", k > 1] [+ BN(x), in == out, stride 1])``
    with ``num_conv_branches`` parallel kxk conv-BN branches (padding k//2).
    """

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        kernel_size: int,
        stride: int = 1,
        groups: int = 1,
        num_conv_branches: int = 1,
    ) -> None:
        super().__init__()
        _check_odd(kernel_size)
        check_groups(in_channels, out_channels, groups)
        if num_conv_branches < 1:
            raise ValueError(f"num_conv_branches must be >= 1, got {num_conv_branches}")
        k, p = kernel_size, kernel_size // 2
        self.in_channels, self.out_channels = in_channels, out_channels
        self.kernel_size, self.stride, self.groups = k, stride, groups
        self.convs = nn.ModuleList(
            conv_bn(in_channels, out_channels, k, stride, p, groups) for _ in range(num_conv_branches)
        )
        self.scale: nn.Sequential | None = (
            conv_bn(in_channels, out_channels, 1, stride, 0, groups) if k > 1 else None
        )
        self.skip: nn.BatchNorm2d | None = (
            nn.BatchNorm2d(in_channels) if in_channels == out_channels and stride == 1 else None
        )
        self.act = nn.ReLU()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Sum the conv, scale and skip branches, then ReLU."""
        out = self.convs[0](x)
        for conv in self.convs[1:]:
            out = out + conv(x)
        if self.scale is not None:
            out = out + self.scale(x)
        if self.skip is not None:
            out = out + self.skip(x)
        return self.act(out)

    def deploy_conv_spec(self) -> dict[str, Any]:
        """The single kxk conv this unit collapses to."""
        k = self.kernel_size
        return conv_spec(self.in_channels, self.out_channels, k, self.stride, k // 2, self.groups)

    def deploy_conv_specs(self) -> list[dict[str, Any]]:
        """Deploy convs in order, each followed by ReLU."""
        return [self.deploy_conv_spec()]


class MobileOneBlock(nn.Module):
    """MobileOne block: a depthwise kxk unit (stride, with 1x1 scale branch and BN skip when
    stride 1) followed by a pointwise 1x1 unit (BN skip when in == out). Deploys to two convs."""

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        stride: int = 1,
        kernel_size: int = 3,
        num_conv_branches: int = 1,
    ) -> None:
        super().__init__()
        self.in_channels, self.out_channels, self.stride = in_channels, out_channels, stride
        self.depthwise = MobileOneUnit(
            in_channels, in_channels, kernel_size, stride, groups=in_channels,
            num_conv_branches=num_conv_branches,
        )
        self.pointwise = MobileOneUnit(
            in_channels, out_channels, 1, 1, groups=1, num_conv_branches=num_conv_branches,
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Depthwise unit, then pointwise unit."""
        return self.pointwise(self.depthwise(x))

    def deploy_conv_specs(self) -> list[dict[str, Any]]:
        """Depthwise kxk conv, then pointwise 1x1 conv, each followed by ReLU."""
        return self.depthwise.deploy_conv_specs() + self.pointwise.deploy_conv_specs()


class BNAfterSumBlock(nn.Module):
    """``ReLU(BN(conv3x3(x) + conv1x1(x) [+ x]))`` (RepViT / QARepVGG style).

    The two convs are plain ``nn.Conv2d`` *with bias* and no BN of their own; the single BN
    follows the sum. The identity term exists only when ``in == out`` and ``stride == 1``.
    """

    def __init__(self, in_channels: int, out_channels: int, stride: int = 1, groups: int = 1) -> None:
        super().__init__()
        check_groups(in_channels, out_channels, groups)
        self.in_channels, self.out_channels = in_channels, out_channels
        self.stride, self.groups = stride, groups
        self.has_identity = in_channels == out_channels and stride == 1
        self.conv3x3 = nn.Conv2d(in_channels, out_channels, 3, stride=stride, padding=1, groups=groups)
        self.conv1x1 = nn.Conv2d(in_channels, out_channels, 1, stride=stride, padding=0, groups=groups)
        self.bn = nn.BatchNorm2d(out_channels)
        self.act = nn.ReLU()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Sum conv3x3, conv1x1 (and x), then BN, then ReLU."""
        out = self.conv3x3(x) + self.conv1x1(x)
        if self.has_identity:
            out = out + x
        return self.act(self.bn(out))

    def deploy_conv_spec(self) -> dict[str, Any]:
        """The single 3x3 conv this block collapses to."""
        return conv_spec(self.in_channels, self.out_channels, 3, self.stride, 1, self.groups)

    def deploy_conv_specs(self) -> list[dict[str, Any]]:
        """Deploy convs in order, each followed by ReLU."""
        return [self.deploy_conv_spec()]


# ----------------------------------------------------------------------------------------- nets

_WIDTHS = (16, 32, 32, 64, 64)
_STRIDES = (1, 2, 1, 2, 1)
_GROUPS = (1, 1, 2, 2, 1)  # a grouped identity-shaped block and a grouped stride-2 block


def _same_length(**seqs: Sequence[Any]) -> int:
    """Length shared by all per-block sequences; ``ValueError`` if they differ."""
    lengths = {name: len(s) for name, s in seqs.items()}
    if len(set(lengths.values())) != 1:
        raise ValueError(f"per-block sequences must have equal lengths, got {lengths}")
    return next(iter(lengths.values()))


class _BlockNet(nn.Module):
    """``stem`` block (stride 2) -> ``body`` blocks -> optional GAP/flatten/Linear head."""

    def __init__(
        self,
        in_channels: int,
        stem_width: int,
        widths: Sequence[int],
        make_stem: Callable[[int, int], nn.Module],
        make_block: Callable[[int, int, int], nn.Module],
        num_classes: int | None,
    ) -> None:
        super().__init__()
        self.stem = make_stem(in_channels, stem_width)
        blocks = []
        cur = stem_width
        for i, width in enumerate(widths):
            blocks.append(make_block(i, cur, width))
            cur = width
        self.body = nn.Sequential(*blocks)
        self.out_channels = cur
        self.gap: nn.AdaptiveAvgPool2d | None = None
        self.linear: nn.Linear | None = None
        if num_classes:
            self.gap = nn.AdaptiveAvgPool2d(1)
            self.linear = nn.Linear(cur, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Stem, blocks, optional head."""
        x = self.stem(x)
        x = self.body(x)
        linear, gap = self.linear, self.gap
        if linear is None or gap is None:
            return x
        x = gap(x)
        x = torch.flatten(x, 1)
        return linear(x)


class ACNet(_BlockNet):
    """Small ACNet: ACBlock stem (stride 2) + ``len(widths)`` ACBlocks + optional head."""

    def __init__(
        self,
        in_channels: int = 3,
        stem_width: int = 16,
        widths: Sequence[int] = _WIDTHS,
        strides: Sequence[int] = _STRIDES,
        groups: Sequence[int] = _GROUPS,
        kernel_sizes: Sequence[int] = (3, 3, 5, 3, 3),
        num_classes: int | None = 10,
    ) -> None:
        _same_length(widths=widths, strides=strides, groups=groups, kernel_sizes=kernel_sizes)
        super().__init__(
            in_channels, stem_width, widths,
            lambda i, o: ACBlock(i, o, 3, stride=2),
            lambda n, i, o: ACBlock(i, o, kernel_sizes[n], strides[n], groups[n]),
            num_classes,
        )


class DBBNet(_BlockNet):
    """Small DBB net: DBBBlock stem (stride 2) + ``len(widths)`` DBBBlocks + optional head."""

    def __init__(
        self,
        in_channels: int = 3,
        stem_width: int = 16,
        widths: Sequence[int] = _WIDTHS,
        strides: Sequence[int] = _STRIDES,
        groups: Sequence[int] = _GROUPS,
        kernel_sizes: Sequence[int] = (3, 3, 5, 3, 3),
        num_classes: int | None = 10,
    ) -> None:
        _same_length(widths=widths, strides=strides, groups=groups, kernel_sizes=kernel_sizes)
        super().__init__(
            in_channels, stem_width, widths,
            lambda i, o: DBBBlock(i, o, 3, stride=2),
            lambda n, i, o: DBBBlock(i, o, kernel_sizes[n], strides[n], groups[n]),
            num_classes,
        )


class MobileOneNet(_BlockNet):
    """Small MobileOne: dense 3x3 MobileOneUnit stem (stride 2) + ``len(widths)`` MobileOneBlocks
    (depthwise + pointwise, ``num_conv_branches`` parallel convs each) + optional head."""

    def __init__(
        self,
        in_channels: int = 3,
        stem_width: int = 16,
        widths: Sequence[int] = _WIDTHS,
        strides: Sequence[int] = _STRIDES,
        num_conv_branches: int = 2,
        kernel_size: int = 3,
        num_classes: int | None = 10,
    ) -> None:
        _same_length(widths=widths, strides=strides)
        super().__init__(
            in_channels, stem_width, widths,
            lambda i, o: MobileOneUnit(i, o, 3, stride=2, num_conv_branches=num_conv_branches),
            lambda n, i, o: MobileOneBlock(i, o, strides[n], kernel_size, num_conv_branches),
            num_classes,
        )


class BNAfterSumNet(_BlockNet):
    """Small net of BNAfterSumBlocks: stem block (stride 2) + ``len(widths)`` blocks + optional head."""

    def __init__(
        self,
        in_channels: int = 3,
        stem_width: int = 16,
        widths: Sequence[int] = _WIDTHS,
        strides: Sequence[int] = _STRIDES,
        groups: Sequence[int] = _GROUPS,
        num_classes: int | None = 10,
    ) -> None:
        _same_length(widths=widths, strides=strides, groups=groups)
        super().__init__(
            in_channels, stem_width, widths,
            lambda i, o: BNAfterSumBlock(i, o, stride=2),
            lambda n, i, o: BNAfterSumBlock(i, o, strides[n], groups[n]),
            num_classes,
        )
