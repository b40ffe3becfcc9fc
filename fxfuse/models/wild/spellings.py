"""Re-parameterizable blocks in training form spelled the way tracing finds them: flat weights viewed with
``int()``, ``reshape(*x.size())``, MobileOne's branch on channel count, an in-place add on an alias, a forward hook,
kernels generated in forward, an Inception-style concat with a transposed-conv decoder, Linear → BatchNorm1d over
tokens."""

from __future__ import annotations

from typing import Dict, Tuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .common import conv_bn


# ----------------------------------------------------------- 2. weights stored flat, viewed with int()
class FlatWeightConvBN(nn.Module):
    """The weight is kept flat and viewed in forward with ``.size()`` unpacking and ``int()``."""

    def __init__(self, cin: int, cout: int, k: int, groups: int = 1) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.randn(cout, cin // groups * k * k) * 0.2)
        self.k, self.groups = k, groups
        self.bn = nn.BatchNorm2d(cout)

    def forward(self, x: Tensor) -> Tensor:
        o, n = self.weight.size()
        i = int(n / (self.k * self.k))
        w = self.weight.view(o, i, self.k, self.k)
        return F.relu(self.bn(F.conv2d(x, w, None, 1, self.k // 2, 1, self.groups)))


class FlatWeightNet(nn.Sequential):
    def __init__(self) -> None:
        super().__init__(FlatWeightConvBN(3, 8, 3), FlatWeightConvBN(8, 8, 3, groups=4))


# ------------------------------------------------------------------------ 4. reshape(*x.size())
class RepBlockReshape(nn.Module):
    def __init__(self, c: int) -> None:
        super().__init__()
        self.dense, self.one, self.idn = conv_bn(c, c, 3, 1, 1), conv_bn(c, c, 1), nn.BatchNorm2d(c)

    def forward(self, x: Tensor) -> Tensor:
        y = self.dense(x) + self.one(x) + self.idn(x)
        return F.relu(y.reshape(*x.size()))


class ReshapeNet(nn.Sequential):
    def __init__(self) -> None:
        super().__init__(conv_bn(3, 8, 3, 1, 1), RepBlockReshape(8), RepBlockReshape(8))


# --------------------------------------------------------------- 6. MobileOne, branch on channel count
class MobileOneBlock(nn.Module):
    def __init__(self, cin: int, cout: int, k: int, stride: int = 1, groups: int = 1, branches: int = 2) -> None:
        super().__init__()
        self.rbr_skip = nn.BatchNorm2d(cin) if cout == cin and stride == 1 else None
        self.rbr_conv = nn.ModuleList(conv_bn(cin, cout, k, stride, k // 2, groups) for _ in range(branches))
        self.rbr_scale = conv_bn(cin, cout, 1, stride, 0, groups) if k > 1 else None
        self.activation = nn.ReLU()

    def forward(self, x: Tensor) -> Tensor:
        identity_out = 0
        if self.rbr_skip is not None and x.shape[1] == self.rbr_skip.num_features:
            identity_out = self.rbr_skip(x)
        scale_out = 0
        if self.rbr_scale is not None:
            scale_out = self.rbr_scale(x)
        out = scale_out + identity_out
        for branch in self.rbr_conv:
            out += branch(x)
        return self.activation(out)


class MobileOneNet(nn.Sequential):
    def __init__(self) -> None:
        super().__init__(MobileOneBlock(3, 8, 3, 2), MobileOneBlock(8, 8, 3, groups=8),
                         MobileOneBlock(8, 16, 1), MobileOneBlock(16, 16, 3, 2, groups=16))


# ------------------------------------------------------------------ 7. in-place add on an alias
class AliasedInplaceAdd(nn.Module):
    """``y = x; y += conv(x)``: ``x`` is written too, so ``x * 2`` reads the sum (symbolic tracing records an
    out-of-place add and gets it wrong; export functionalizes it)."""

    def __init__(self) -> None:
        super().__init__()
        self.body = conv_bn(3, 6, 3, 1, 1)
        self.conv = nn.Conv2d(6, 6, 3, padding=1)

    def forward(self, x: Tensor) -> Tuple[Tensor, Tensor]:
        x = self.body(x)
        y = x
        y += self.conv(x)
        return y, x * 2


# -------------------------------------------------------------------- 8. a forward hook scales a conv
def hooked_conv_bn() -> nn.Module:
    model = nn.Sequential(nn.Conv2d(3, 6, 3), nn.BatchNorm2d(6), nn.ReLU(), nn.Conv2d(6, 6, 1), nn.BatchNorm2d(6))
    model[0].register_forward_hook(lambda m, i, o: o * 3.0)
    return model


# ---------------------------------------------- 9. large kernel with a small one padded in, in forward
class LargeKernelGenerated(nn.Module):
    """RepLKNet-like: the small kernel is zero-padded into the large one in forward, then conv + BN."""

    def __init__(self, c: int) -> None:
        super().__init__()
        self.large = nn.Parameter(torch.randn(c, 1, 5, 5) * 0.2)
        self.small = nn.Parameter(torch.randn(c, 1, 3, 3) * 0.2)
        self.bn = nn.BatchNorm2d(c)
        self.c = c

    def forward(self, x: Tensor) -> Tensor:
        kernel = self.large + F.pad(self.small, [1, 1, 1, 1])
        return self.bn(F.conv2d(x, kernel, None, 1, 2, 1, self.c))


# -------------------------------------------- 10. Inception-style concat + transposed-conv decoder, dict out
class CatDecoder(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.a, self.b = conv_bn(3, 4, 3, 1, 1), conv_bn(3, 6, 1)
        self.up = nn.ConvTranspose2d(10, 5, 2, stride=2)
        self.up_bn = nn.BatchNorm2d(5)

    def forward(self, x: Tensor) -> Dict[str, Tensor]:
        feat = torch.cat([self.a(x), self.b(x)], dim=1)
        return {"feat": feat, "out": self.up_bn(self.up(F.relu(feat)))}


# ---------------------------------------------- 11. Linear → BatchNorm1d over flattened tokens
class TokenMLP(nn.Module):
    def __init__(self, c: int = 6) -> None:
        super().__init__()
        self.fc, self.bn, self.out = nn.Linear(c, 2 * c), nn.BatchNorm1d(2 * c), nn.Linear(2 * c, c)

    def forward(self, x: Tensor) -> Tensor:
        y = self.fc(x)
        b, t, c = y.size()
        y = self.bn(y.view(b * t, c)).view(b, t, c)
        return self.out(F.gelu(y))
