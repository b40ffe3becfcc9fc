"""Zero-pad absorption (``pad_into_conv``), concat of sibling convs (``concat``), BN before conv (``bn_conv``)."""

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from _helpers import fuse_and_check, fused_counts, reasons, stats


class PadConv(nn.Module):
    def __init__(self, pads, mode="constant", value=0.0, conv_mode="zeros"):
        super().__init__()
        self.pads, self.mode, self.value = pads, mode, value
        self.conv = nn.Conv2d(3, 4, 3, padding=1, padding_mode=conv_mode)

    def forward(self, x):
        return self.conv(F.pad(x, self.pads, mode=self.mode, value=self.value if self.mode == "constant" else None))


def test_symmetric_zero_pad_is_absorbed():
    fused = fuse_and_check(PadConv([2, 2, 1, 1]), torch.randn(1, 3, 6, 6))
    conv = next(m for m in fused.modules() if isinstance(m, nn.Conv2d))
    assert fused_counts(fused) == {"pad_into_conv": 1} and conv.padding == (2, 3)


@pytest.mark.parametrize("kwargs", [dict(pads=[0, 1, 0, 1]), dict(pads=[1, 1, 1, 1], value=1.0),
                                    dict(pads=[1, 1, 1, 1], mode="reflect"),
                                    dict(pads=[1, 1, 1, 1], conv_mode="reflect")])
def test_other_pads_stay(kwargs):
    fused = fuse_and_check(PadConv(**kwargs), torch.randn(1, 3, 6, 6))
    assert not fused_counts(fused) and stats(fused).nodes == 2


class Inception(nn.Module):
    def __init__(self, groups=1):
        super().__init__()
        self.a = nn.Sequential(nn.Conv2d(4, 3, 1), nn.BatchNorm2d(3))
        self.b = nn.Sequential(nn.Conv2d(4, 6, 3, padding=1, groups=groups), nn.BatchNorm2d(6))
        self.c = nn.Sequential(nn.Conv2d(4, 2, 5, padding=2), nn.BatchNorm2d(2))
        self.pool = nn.MaxPool2d(3, 1, 1)

    def forward(self, x):
        return torch.relu(torch.cat([self.a(x), self.b(x), self.pool(x), self.c(x)], dim=1))


def test_concat_of_sibling_convs():
    fused = fuse_and_check(Inception(), torch.randn(2, 4, 7, 7))
    assert fused_counts(fused)["concat"] == 1 and stats(fused).convs == 2  # [a, b] merged; pool breaks the run


def test_grouped_concat_member_is_not_densified():
    fused = fuse_and_check(Inception(groups=2), torch.randn(2, 4, 7, 7))
    assert "concat" not in fused_counts(fused) and stats(fused).convs == 3


class BNConv(nn.Module):
    def __init__(self, padding):
        super().__init__()
        self.bn, self.conv = nn.BatchNorm2d(3), nn.Conv2d(3, 4, 3, padding=padding, groups=1)

    def forward(self, x):
        return self.conv(self.bn(torch.relu(x)))


def test_bn_before_unpadded_conv_folds():
    fused = fuse_and_check(BNConv(0), torch.randn(2, 3, 6, 6))
    assert fused_counts(fused) == {"bn_conv": 1} and stats(fused).batch_norms == 0


def test_bn_before_padded_conv_stays():
    fused = fuse_and_check(BNConv(1), torch.randn(2, 3, 6, 6))
    assert stats(fused).batch_norms == 1 and "nonzero shift" in reasons(fused)


def test_bn1d_before_linear_folds():
    model = nn.Sequential(nn.ReLU(), nn.BatchNorm1d(5), nn.Linear(5, 3))
    fused = fuse_and_check(model, torch.randn(4, 5))
    assert fused_counts(fused) == {"bn_conv": 1} and stats(fused).batch_norms == 0


def test_grouped_bn_before_conv():
    class M(nn.Module):
        def __init__(self):
            super().__init__()
            self.bn, self.conv = nn.BatchNorm2d(6), nn.Conv2d(6, 4, 1, groups=2)

        def forward(self, x):
            return self.conv(self.bn(torch.relu(x)))

    fused = fuse_and_check(M(), torch.randn(2, 6, 4, 4))
    assert fused_counts(fused) == {"bn_conv": 1}


class Siblings(nn.Module):
    """Three dense convs on one input feeding different consumers, plus a strided one that cannot join."""

    def __init__(self):
        super().__init__()
        self.a = nn.Sequential(nn.Conv2d(4, 3, 1), nn.BatchNorm2d(3))
        self.b = nn.Sequential(nn.Conv2d(4, 5, 3, padding=1), nn.BatchNorm2d(5))
        self.c = nn.Conv2d(4, 2, 5, padding=2)
        self.d = nn.Conv2d(4, 2, 3, stride=2, padding=1)

    def forward(self, x):
        return torch.relu(self.a(x)).sum() + torch.sigmoid(self.b(x)).mean() + self.c(x).amax() + self.d(x).sum()


def test_horizontal_is_off_by_default_and_exact_when_enabled():
    x = torch.randn(2, 4, 6, 6)
    plain = fuse_and_check(Siblings(), x)
    assert "horizontal" not in fused_counts(plain) and stats(plain).convs == 4
    fused = fuse_and_check(Siblings(), x, enable=["horizontal"], second=torch.randn(1, 4, 7, 7))
    assert fused_counts(fused)["horizontal"] == 1 and stats(fused).convs == 2
