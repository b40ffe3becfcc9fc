"""Diverse Branch Block as published: BN-and-pad by item assignment, an identity-based 1x1 conv."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .common import conv_bn


# ------------------------------------------------------------------------------ 1. DBB, as published
class BNAndPadLayer(nn.Module):
    """DBB's BN, then pad with what the BN maps 0 to, written with slice assignment."""

    def __init__(self, pad_pixels: int, num_features: int) -> None:
        super().__init__()
        self.bn = nn.BatchNorm2d(num_features)
        self.pad_pixels = pad_pixels

    def forward(self, input: Tensor) -> Tensor:
        output = self.bn(input)
        if self.pad_pixels > 0:
            # DBB's code reads the BN's running statistics as tensors (Optional[Tensor] in the stubs)
            pad_values = self.bn.bias.detach() - self.bn.running_mean * self.bn.weight.detach() / torch.sqrt(  # type: ignore[operator]
                self.bn.running_var + self.bn.eps)  # type: ignore[operator,arg-type]
            output = F.pad(output, [self.pad_pixels] * 4)
            pad_values = pad_values.view(1, -1, 1, 1)
            output[:, :, 0:self.pad_pixels, :] = pad_values
            output[:, :, -self.pad_pixels:, :] = pad_values
            output[:, :, :, 0:self.pad_pixels] = pad_values
            output[:, :, :, -self.pad_pixels:] = pad_values
        return output


class IdentityBasedConv1x1(nn.Conv2d):
    """DBB's 1x1 conv initialized at identity: the weight used is ``self.weight + id_tensor``."""

    def __init__(self, channels: int, groups: int = 1) -> None:
        super().__init__(channels, channels, 1, 1, 0, groups=groups, bias=False)
        input_dim = channels // groups
        id_value = torch.zeros(channels, input_dim, 1, 1)
        for i in range(channels):
            id_value[i, i % input_dim, 0, 0] = 1
        self.id_tensor = id_value.type_as(self.weight)
        nn.init.normal_(self.weight, std=0.1)

    def forward(self, input: Tensor) -> Tensor:
        kernel = self.weight + self.id_tensor.to(self.weight.device)
        return F.conv2d(input, kernel, None, stride=1, padding=0, dilation=self.dilation, groups=self.groups)


class DiverseBranchBlock(nn.Module):
    def __init__(self, cin: int, cout: int, k: int, stride: int = 1, padding: int = 0, groups: int = 1) -> None:
        super().__init__()
        self.dbb_origin = conv_bn(cin, cout, k, stride, padding, groups)
        self.dbb_avg = nn.Sequential()
        if groups < cout:
            self.dbb_avg.add_module("conv", nn.Conv2d(cin, cout, 1, 1, 0, groups=groups, bias=False))
            self.dbb_avg.add_module("bn", BNAndPadLayer(padding, cout))
            self.dbb_avg.add_module("avg", nn.AvgPool2d(k, stride, 0))
            self.dbb_1x1 = conv_bn(cin, cout, 1, stride, 0, groups)
        else:
            self.dbb_avg.add_module("avg", nn.AvgPool2d(k, stride, padding))
        self.dbb_avg.add_module("avgbn", nn.BatchNorm2d(cout))
        internal = cin if groups < cout else 2 * cin
        self.dbb_1x1_kxk = nn.Sequential()
        if internal == cin:
            self.dbb_1x1_kxk.add_module("idconv1", IdentityBasedConv1x1(cin, groups))
        else:
            self.dbb_1x1_kxk.add_module("conv1", nn.Conv2d(cin, internal, 1, 1, 0, groups=groups, bias=False))
        self.dbb_1x1_kxk.add_module("bn1", BNAndPadLayer(padding, internal))
        self.dbb_1x1_kxk.add_module("conv2", nn.Conv2d(internal, cout, k, stride, 0, groups=groups, bias=False))
        self.dbb_1x1_kxk.add_module("bn2", nn.BatchNorm2d(cout))
        self.nonlinear = nn.ReLU()

    def forward(self, inputs: Tensor) -> Tensor:
        out = self.dbb_origin(inputs)
        if hasattr(self, "dbb_1x1"):
            out += self.dbb_1x1(inputs)
        out += self.dbb_avg(inputs)
        out += self.dbb_1x1_kxk(inputs)
        return self.nonlinear(out)


class DBBNet(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.b1 = DiverseBranchBlock(3, 8, 3, 1, 1)
        self.b2 = DiverseBranchBlock(8, 8, 3, 2, 1, groups=2)
        self.fc = nn.Linear(8, 4)

    def forward(self, x: Tensor) -> Tensor:
        return self.fc(self.b2(self.b1(x)).mean((2, 3)))
