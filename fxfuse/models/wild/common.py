"""Pieces several corpus networks share: conv-BN, RepVGG's training-time block."""

from __future__ import annotations

from torch import Tensor, nn


def conv_bn(cin: int, cout: int, k: int, stride: int = 1, padding: int = 0, groups: int = 1) -> nn.Sequential:
    seq = nn.Sequential()
    seq.add_module("conv", nn.Conv2d(cin, cout, k, stride, padding, groups=groups, bias=False))
    seq.add_module("bn", nn.BatchNorm2d(cout))
    return seq


class RepVGGBlock(nn.Module):
    """RepVGG's training-time block: 3x3 conv-BN + 1x1 conv-BN (+ a BN identity branch where the shapes allow),
    summed, then ReLU. Deploy form: one 3x3 conv with bias + ReLU."""

    def __init__(self, cin: int, cout: int, stride: int = 1) -> None:
        super().__init__()
        self.rbr_identity = nn.BatchNorm2d(cin) if cin == cout and stride == 1 else None
        self.rbr_dense = conv_bn(cin, cout, 3, stride, 1)
        self.rbr_1x1 = conv_bn(cin, cout, 1, stride, 0)
        self.nonlinearity = nn.ReLU()

    def forward(self, inputs: Tensor) -> Tensor:
        id_out = 0 if self.rbr_identity is None else self.rbr_identity(inputs)
        return self.nonlinearity(self.rbr_dense(inputs) + self.rbr_1x1(inputs) + id_out)
