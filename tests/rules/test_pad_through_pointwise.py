"""Rule ``pad_through_pointwise``: ``zero_pad(conv1x1(x))`` with a zero bias ⇒ ``conv1x1(zero_pad(x))`` (a bias-free
1x1 conv maps zeros to zeros), which moves DBB's "BN-and-pad" padding to the block input
(docs/patterns.md, `pad_through_pointwise`)."""

import torch
import torch.nn.functional as F
from torch import nn

from _helpers import assert_not_fired, assert_wrong_rewrite_caught, fuse_and_check, fused_counts, stats


class PadThenPointwise(nn.Module):
    """DBB's BN-and-pad: 1x1 → zero pad → BN → kxk (padding ``padding``) → BN.

    With ``padding=0`` the BN folds forward into the kxk and the pad into it (no need to move the pad); with
    ``padding=1`` the BN's shift must not be zero-padded by the kxk, so it can only fold backwards into the 1x1, which
    this rule makes possible by moving the pad before it."""

    def __init__(self, cin=3, cout=5, k=3, bias=False, kernel=1, padding=1):
        super().__init__()
        self.pw = nn.Conv2d(cin, cin, kernel, bias=bias)
        self.bn1 = nn.BatchNorm2d(cin)
        self.conv = nn.Conv2d(cin, cout, k, padding=padding, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        self.k = k

    def forward(self, x):
        return self.bn2(self.conv(self.bn1(F.pad(self.pw(x), [self.k // 2] * 4))))


# ----------------------------------------------------------------------------------------- fused
def test_pad_moves_before_the_pointwise_conv_and_the_bn_folds():
    fused = fuse_and_check(PadThenPointwise(), torch.randn(2, 3, 6, 6), second=torch.randn(1, 3, 5, 7))
    assert fused_counts(fused)["pad_through_pointwise"] == 1
    assert stats(fused).batch_norms == 0 and stats(fused).convs == 2 and stats(fused).nodes == 2


def test_bn_and_pad_branch_becomes_one_conv():
    fused = fuse_and_check(PadThenPointwise(padding=0), torch.randn(2, 3, 6, 6), second=torch.randn(1, 3, 5, 7))
    conv = next(m for m in fused.modules() if isinstance(m, nn.Conv2d))
    assert stats(fused).convs == 1 and stats(fused).nodes == 1 and conv.padding == (1, 1)


# ----------------------------------------------------------------------------------- must NOT move
def test_pad_after_biased_pointwise_stays():
    """``pad(conv1x1(x) + b)`` has zeros at the border, ``conv1x1(pad(x)) + b`` has ``b`` there."""
    fused = fuse_and_check(PadThenPointwise(bias=True), torch.randn(2, 3, 6, 6))
    assert_not_fired(fused, "pad_through_pointwise")
    assert stats(fused).batch_norms == 1


def test_pad_after_kxk_conv_stays():
    fused = fuse_and_check(PadThenPointwise(kernel=3), torch.randn(2, 3, 7, 7))
    assert_not_fired(fused, "pad_through_pointwise")
    assert stats(fused).batch_norms == 1


# ---------------------------------------------------------------------------------------- errors
def test_wrong_rewrite_is_rolled_back_and_fails_the_checker(monkeypatch):
    fused = assert_wrong_rewrite_caught(monkeypatch, "pad_through_pointwise", PadThenPointwise(),
                                        torch.randn(2, 3, 6, 6))
    assert stats(fused).batch_norms == 1
