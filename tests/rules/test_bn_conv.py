"""Rule ``bn_conv``: a per-channel affine (BN, ``x * c + d``) before a conv / linear ⇒ one layer, exact only where
the conv reads no zero padding or the shift is zero (docs/patterns.md, `bn_conv`)."""

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from fxfuse import Reason

from _helpers import assert_not_fired, assert_skipped, assert_wrong_rewrite_caught, fuse_and_check, fused_counts, stats


class BNConv(nn.Module):
    def __init__(self, padding=0, groups=1, cin=3, cout=4, k=3):
        super().__init__()
        self.bn, self.conv = nn.BatchNorm2d(cin), nn.Conv2d(cin, cout, k, padding=padding, groups=groups)

    def forward(self, x):
        return self.conv(self.bn(torch.relu(x)))


# ----------------------------------------------------------------------------------------- fused
def test_bn_before_unpadded_conv_folds():
    fused = fuse_and_check(BNConv(0), torch.randn(2, 3, 6, 6))
    assert fused_counts(fused) == {"bn_conv": 1} and stats(fused).batch_norms == 0


def test_grouped_bn_before_conv():
    """groups=2, 3 inputs per group: weight ``W[o, j]`` reads input channel ``group(o)·3 + j``."""
    fused = fuse_and_check(BNConv(0, groups=2, cin=6, cout=4, k=3), torch.randn(2, 6, 5, 5))
    assert fused_counts(fused) == {"bn_conv": 1} and stats(fused).batch_norms == 0


def test_grouped_bn_before_pointwise_conv():
    fused = fuse_and_check(BNConv(0, groups=2, cin=6, cout=4, k=1), torch.randn(2, 6, 4, 4))
    assert fused_counts(fused) == {"bn_conv": 1}


def test_scale_only_before_padded_conv_folds():
    """A zero shift keeps zero padding zero: ``conv(pad(a·x)) = conv'(pad(x))``."""
    class M(nn.Module):
        def __init__(self):
            super().__init__()
            self.register_buffer("a", torch.randn(1, 3, 1, 1))
            self.conv = nn.Conv2d(3, 4, 3, padding=1)

        def forward(self, x):
            return self.conv(torch.relu(x) * self.a)

    fused = fuse_and_check(M(), torch.randn(2, 3, 5, 5))
    assert fused_counts(fused) == {"bn_conv": 1} and stats(fused).nodes == 2


def test_number_minus_input_before_conv_folds():
    """``2 - t`` is the per-channel affine ``-1·t + 2`` (ATen spells it ``rsub(t, 2)``, operands swapped)."""
    class M(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = nn.Conv2d(3, 4, 3)

        def forward(self, x):
            return self.conv(2.0 - torch.relu(x))

    fused = fuse_and_check(M(), torch.randn(2, 3, 5, 5))
    assert fused_counts(fused) == {"bn_conv": 1} and stats(fused).nodes == 2  # relu, conv


def test_bn1d_before_linear_folds():
    model = nn.Sequential(nn.ReLU(), nn.BatchNorm1d(5), nn.Linear(5, 3))
    fused = fuse_and_check(model, torch.randn(4, 5))
    assert fused_counts(fused) == {"bn_conv": 1} and stats(fused).batch_norms == 0


# ----------------------------------------------------------------------------------- must NOT fold
def test_bn_before_padded_conv_stays():
    fused = fuse_and_check(BNConv(1), torch.randn(2, 3, 6, 6))
    assert stats(fused).batch_norms == 1
    assert_skipped(fused, "bn_conv", Reason.PADDING, "nonzero shift")


@pytest.mark.parametrize("mode", ["reflect", "replicate", "circular"])
def test_bn_before_conv_with_a_copying_padding_mode_folds(mode):
    """``padding_mode`` reflect / replicate / circular copies values within a channel: it commutes with the BN's
    ``a·x + c`` for any shift (ATen spells it ``aten.pad(mode)`` → ``conv2d(padding=0)``: the pad chain below)."""
    class M(nn.Module):
        def __init__(self):
            super().__init__()
            self.bn, self.conv = nn.BatchNorm2d(3), nn.Conv2d(3, 4, 3, padding=1, padding_mode=mode)

        def forward(self, x):
            return self.conv(self.bn(torch.relu(x)))

    fused = fuse_and_check(M(), torch.randn(2, 3, 6, 6), second=torch.randn(1, 3, 7, 5))
    assert fused_counts(fused) == {"bn_conv": 1} and stats(fused).batch_norms == 0


class CopyPadChain(nn.Module):
    """BN → copying pads (module or ``F.pad(mode=…)``, asymmetric) → conv, optionally with another user of a pad."""

    def __init__(self, spellings, leak: bool = False):
        super().__init__()
        self.bn, self.conv, self.spellings, self.leak = nn.BatchNorm2d(3), nn.Conv2d(3, 4, 3), spellings, leak
        self.pads = nn.ModuleList(nn.ReflectionPad2d((1, 0, 2, 1)) if s == "module" else nn.Identity()
                                  for s in spellings)

    def forward(self, x):
        y = self.bn(torch.relu(x))
        for spelling, pad in zip(self.spellings, self.pads):
            y = pad(y) if spelling == "module" else F.pad(y, [1, 2, 0, 1], mode=spelling)
        out = self.conv(y)
        return (out, y) if self.leak else out


@pytest.mark.parametrize("spellings", [("reflect",), ("replicate",), ("circular",), ("module",),
                                       ("reflect", "module", "replicate")])
def test_bn_before_copying_pads_then_conv_folds(spellings):
    """``conv(pad(a·x + c)) = conv'(pad(x))`` for pads that copy values within a channel; the pads stay, now on
    the BN's input."""
    fused = fuse_and_check(CopyPadChain(spellings), torch.randn(2, 3, 6, 6), second=torch.randn(1, 3, 5, 7))
    assert fused_counts(fused) == {"bn_conv": 1} and stats(fused).batch_norms == 0


def test_bn_before_copying_pad_with_another_user_stays():
    fused = fuse_and_check(CopyPadChain(("reflect",), leak=True), torch.randn(2, 3, 6, 6))
    assert stats(fused).batch_norms == 1
    assert_not_fired(fused, "bn_conv")  # the pad has two users: no chain from the conv reaches the BN


def test_bn_before_zero_pad_then_conv_stays():
    """A zero (constant) pad is not a copying pad: zero-padding ``a·x + c`` is not ``a·pad(x) + c``."""
    class M(nn.Module):
        def __init__(self):
            super().__init__()
            self.bn, self.conv = nn.BatchNorm2d(3), nn.Conv2d(3, 4, 3)

        def forward(self, x):
            return self.conv(F.pad(self.bn(torch.relu(x)), [1, 1, 1, 1]))

    fused = fuse_and_check(M(), torch.randn(2, 3, 6, 6))
    assert stats(fused).batch_norms == 1
    assert_skipped(fused, "bn_conv", Reason.PADDING, "nonzero shift")


def test_bn_before_transposed_conv_stays():
    model = nn.Sequential(nn.ReLU(), nn.BatchNorm2d(3), nn.ConvTranspose2d(3, 4, 3, stride=2))
    fused = fuse_and_check(model, torch.randn(2, 3, 4, 4))
    assert stats(fused).batch_norms == 1
    assert_skipped(fused, "bn_conv", Reason.NOT_LINEAR, "transposed")


def test_bn_with_other_users_stays():
    class M(nn.Module):
        def __init__(self):
            super().__init__()
            self.bn, self.conv = nn.BatchNorm2d(3), nn.Conv2d(3, 4, 1)

        def forward(self, x):
            y = self.bn(torch.relu(x))
            return self.conv(y), y

    fused = fuse_and_check(M(), torch.randn(2, 3, 4, 4))
    assert stats(fused).batch_norms == 1
    assert_skipped(fused, "bn_conv", Reason.OTHER_USERS, "also feeds")


# ---------------------------------------------------------------------------------------- errors
def test_wrong_fold_is_rolled_back_and_fails_the_checker(monkeypatch):
    fused = assert_wrong_rewrite_caught(monkeypatch, "bn_conv", BNConv(0), torch.randn(2, 3, 6, 6))
    assert stats(fused).batch_norms == 1


def test_wrong_fold_through_copying_pads_is_rolled_back(monkeypatch):
    fused = assert_wrong_rewrite_caught(monkeypatch, "bn_conv", CopyPadChain(("reflect", "module")),
                                        torch.randn(2, 3, 6, 6))
    assert stats(fused).batch_norms == 1
