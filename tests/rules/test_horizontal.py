"""Rule ``horizontal`` (off by default, late phase): sibling dense convs on one input with one geometry but different
consumers ⇒ one conv with stacked output channels + ``torch.split`` (docs/patterns.md, `horizontal`)."""

import torch
from torch import nn

from _helpers import assert_not_fired, assert_wrong_rewrite_caught, fuse_and_check, fused_counts, stats


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


class Heads(nn.Module):
    """Two heads on one feature map, returned separately."""

    def __init__(self, groups=1):
        super().__init__()
        self.a, self.b = nn.Conv2d(4, 3, 3, padding=1, groups=1), nn.Conv2d(4, 4, 3, padding=1, groups=groups)

    def forward(self, x):
        return torch.relu(self.a(x)), torch.sigmoid(self.b(x))


# ----------------------------------------------------------------------------------------- fused
def test_horizontal_is_off_by_default_and_exact_when_enabled():
    x = torch.randn(2, 4, 6, 6)
    plain = fuse_and_check(Siblings(), x)
    assert "horizontal" not in fused_counts(plain) and stats(plain).convs == 4
    fused = fuse_and_check(Siblings(), x, enable=["horizontal"], second=torch.randn(1, 4, 7, 7))
    assert fused_counts(fused)["horizontal"] == 1 and stats(fused).convs == 2


def test_two_heads_become_one_conv_and_a_split():
    fused = fuse_and_check(Heads(), torch.randn(2, 4, 5, 5), enable=["horizontal"])
    assert fused_counts(fused) == {"horizontal": 1} and stats(fused).convs == 1


# ----------------------------------------------------------------------------------- must NOT merge
def test_grouped_sibling_is_not_densified():
    fused = fuse_and_check(Heads(groups=2), torch.randn(2, 4, 5, 5), enable=["horizontal"])
    assert stats(fused).convs == 2
    assert_not_fired(fused, "horizontal")


# ---------------------------------------------------------------------------------------- errors
def test_wrong_stack_is_rolled_back_and_fails_the_checker(monkeypatch):
    fused = assert_wrong_rewrite_caught(monkeypatch, "horizontal", Heads(), torch.randn(2, 4, 5, 5),
                                        enable=["horizontal"])
    assert stats(fused).convs == 2
