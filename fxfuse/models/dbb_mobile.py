"""A DBB-style depthwise MobileNet: every depthwise kxk conv trains as DBB's branches with an avg-pool branch.

One unit (training form)::

    ReLU(BN(dw kxk(x)) + BN(dw 1x1(x)) + BN(avg_pool_k(x)) [+ BN(x), stride 1])

(the 1x1 and the pool with the "centre" padding, ``k // 2``, so every branch sits on the kxk tap grid; stride 1
or 2), then a pointwise 1x1 conv-BN-ReLU. A perfect re-parameterizer turns each block into a depthwise kxk conv
and a 1x1 conv (``deploy_conv_specs``), which is what :func:`fxfuse.models.plain_twin` builds.
"""
from __future__ import annotations

from typing import Any, Sequence

import torch
from torch import nn

from .blocks import _BlockNet
from .repvgg_net import conv_bn, conv_spec

__all__ = ["DBBDepthwiseUnit", "DBBMobileBlock", "DBBMobileNet"]


class DBBDepthwiseUnit(nn.Module):
    """``ReLU(BN(dw kxk) + BN(dw 1x1) + BN(avg_pool k) [+ BN(x)])`` on ``channels`` channels."""

    def __init__(self, channels: int, kernel_size: int = 3, stride: int = 1, identity: bool = True) -> None:
        super().__init__()
        k, c = kernel_size, channels
        self.channels, self.kernel_size, self.stride = c, k, stride
        self.kxk = conv_bn(c, c, k, stride, k // 2, c)
        self.pointwise = conv_bn(c, c, 1, stride, 0, c)
        self.pool = nn.AvgPool2d(k, stride, k // 2)
        self.pool_bn = nn.BatchNorm2d(c)
        self.skip: nn.BatchNorm2d | None = nn.BatchNorm2d(c) if identity and stride == 1 else None
        self.act = nn.ReLU()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.kxk(x) + self.pointwise(x) + self.pool_bn(self.pool(x))
        if self.skip is not None:
            out = out + self.skip(x)
        return self.act(out)

    def deploy_conv_specs(self) -> list[dict[str, Any]]:
        k, c = self.kernel_size, self.channels
        return [conv_spec(c, c, k, self.stride, k // 2, c)]


class DBBMobileBlock(nn.Module):
    """Depthwise :class:`DBBDepthwiseUnit`, then a pointwise 1x1 conv-BN-ReLU."""

    def __init__(self, in_channels: int, out_channels: int, stride: int = 1, kernel_size: int = 3) -> None:
        super().__init__()
        self.in_channels, self.out_channels = in_channels, out_channels
        self.depthwise = DBBDepthwiseUnit(in_channels, kernel_size, stride)
        self.project = conv_bn(in_channels, out_channels, 1, 1, 0, 1)
        self.act = nn.ReLU()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.act(self.project(self.depthwise(x)))

    def deploy_conv_specs(self) -> list[dict[str, Any]]:
        return self.depthwise.deploy_conv_specs() + [conv_spec(self.in_channels, self.out_channels, 1, 1, 0, 1)]


class _Stem(nn.Module):
    """Dense 3x3 conv-BN-ReLU, stride 2."""

    def __init__(self, in_channels: int, out_channels: int) -> None:
        super().__init__()
        self.in_channels, self.out_channels = in_channels, out_channels
        self.conv = conv_bn(in_channels, out_channels, 3, 2, 1, 1)
        self.act = nn.ReLU()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.act(self.conv(x))

    def deploy_conv_specs(self) -> list[dict[str, Any]]:
        return [conv_spec(self.in_channels, self.out_channels, 3, 2, 1, 1)]


class DBBMobileNet(_BlockNet):
    """Stem (dense 3x3/2) + :class:`DBBMobileBlock` per width + optional head (a MobileNet-v1 shape)."""

    def __init__(
        self,
        in_channels: int = 3,
        stem_width: int = 16,
        widths: Sequence[int] = (32, 64, 64, 128, 128, 128),
        strides: Sequence[int] = (1, 2, 1, 2, 1, 1),
        kernel_size: int = 3,
        num_classes: int | None = 10,
    ) -> None:
        if len(widths) != len(strides):
            raise ValueError(f"widths and strides must have equal lengths, got {len(widths)} and {len(strides)}")
        super().__init__(
            in_channels, stem_width, widths,
            _Stem,
            lambda n, i, o: DBBMobileBlock(i, o, strides[n], kernel_size),
            num_classes,
        )
