"""Rule ``concat``: ``cat([conv_1(x), …, conv_n(x)], dim=1)`` ⇒ one conv with stacked output channels, for
consecutive dense convs on one input with equal stride and window centre (docs/patterns.md, `concat`)."""

import torch
from torch import nn

from _helpers import assert_not_fired, assert_wrong_rewrite_caught, fuse_and_check, fused_counts, stats


class Inception(nn.Module):
    def __init__(self, groups=1, stride_b=1):
        super().__init__()
        self.a = nn.Sequential(nn.Conv2d(4, 3, 1, stride_b), nn.BatchNorm2d(3))
        self.b = nn.Sequential(nn.Conv2d(4, 6, 3, stride_b, padding=1, groups=groups), nn.BatchNorm2d(6))
        self.c = nn.Sequential(nn.Conv2d(4, 2, 5, stride_b, padding=2), nn.BatchNorm2d(2))
        self.pool = nn.MaxPool2d(3, stride_b, 1)

    def forward(self, x):
        return torch.relu(torch.cat([self.a(x), self.b(x), self.pool(x), self.c(x)], dim=1))


class TwoOnly(nn.Module):
    """Two sibling convs, concatenated: the cat disappears."""

    def __init__(self, misaligned=False):
        super().__init__()
        if misaligned:  # 3x3/p1 and 2x2/p0 at stride 2: equal sizes on even inputs, different windows
            self.a, self.b = nn.Conv2d(3, 2, 3, 2, 1), nn.Conv2d(3, 4, 2, 2, 0)
        else:
            self.a, self.b = nn.Conv2d(3, 2, 3, padding=1), nn.Conv2d(3, 4, 1)

    def forward(self, x):
        return torch.cat([self.a(x), self.b(x)], dim=1)


# ----------------------------------------------------------------------------------------- fused
def test_concat_of_sibling_convs():
    fused = fuse_and_check(Inception(), torch.randn(2, 4, 7, 7), second=torch.randn(1, 4, 6, 9))
    assert fused_counts(fused)["concat"] == 1 and stats(fused).convs == 2  # [a, b] merged; pool breaks the run


def test_whole_cat_becomes_one_conv():
    fused = fuse_and_check(TwoOnly(), torch.randn(2, 3, 5, 5))
    assert fused_counts(fused) == {"concat": 1} and stats(fused).nodes == 1


# ----------------------------------------------------------------------------------- must NOT merge
def test_grouped_concat_member_is_not_densified():
    fused = fuse_and_check(Inception(groups=2), torch.randn(2, 4, 7, 7))
    assert stats(fused).convs == 3
    assert_not_fired(fused, "concat")


def test_misaligned_windows_are_not_stacked():
    fused = fuse_and_check(TwoOnly(misaligned=True), torch.randn(2, 3, 8, 8))
    assert stats(fused).convs == 2
    assert_not_fired(fused, "concat")


# ---------------------------------------------------------------------------------------- errors
def test_wrong_stack_is_rolled_back_and_fails_the_checker(monkeypatch):
    fused = assert_wrong_rewrite_caught(monkeypatch, "concat", TwoOnly(), torch.randn(2, 3, 5, 5))
    assert stats(fused).convs == 2
