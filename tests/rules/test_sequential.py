"""Rule ``sequential``: conv → conv / conv → avg-pool with nothing in between ⇒ one conv, where exact and not more
work (docs/patterns.md, `sequential`)."""

import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

from fxfuse import Reason

from _helpers import (
    assert_skipped,
    assert_wrong_rewrite_caught,
    budget,
    codes,
    fuse_and_check,
    fused_counts,
    stats,
)


@st.composite
def pointwise_then_kxk(draw):
    groups = draw(st.integers(1, 2))
    cin, mid, cout = (groups * draw(st.integers(1, 3)) for _ in range(3))
    k = draw(st.sampled_from([1, 3, 5]))
    pad = draw(st.sampled_from([0, k // 2]))
    stride = draw(st.integers(1, 2))
    first_bias = draw(st.booleans())
    model = nn.Sequential(nn.Conv2d(cin, mid, 1, groups=groups, bias=first_bias), nn.BatchNorm2d(mid),
                          nn.Conv2d(mid, cout, k, stride, pad, groups=groups), nn.BatchNorm2d(cout))
    return model, torch.randn(2, cin, 7, 7), pad


# ----------------------------------------------------------------------------------------- fused
@settings(max_examples=budget(15))  # the profile's 40 with --runslow
@given(pointwise_then_kxk())
def test_pointwise_then_kxk(case):
    """Merged only where exact: the kxk reads no zero padding (a BN shift makes the 1x1 output nonzero)."""
    model, x, pad = case
    fused = fuse_and_check(model, x, second=torch.randn(1, *x.shape[1:]))
    assert stats(fused).batch_norms == 0
    if pad == 0:
        assert stats(fused).convs == 1 or Reason.MORE_WORK in codes(fused)
    else:
        assert stats(fused).convs == 2
        assert_skipped(fused, "sequential", Reason.PADDING, "zero-pads")


def test_kxk_then_kxk_without_padding_composes():
    model = nn.Sequential(nn.Conv2d(4, 4, 3, padding=1), nn.Conv2d(4, 4, 3, stride=2))
    fused = fuse_and_check(model, torch.randn(1, 4, 9, 9), second=torch.randn(2, 4, 10, 10))
    conv = next(m for m in fused.modules() if isinstance(m, nn.Conv2d))
    assert fused_counts(fused) == {"sequential": 1}
    assert stats(fused).convs == 1 and conv.kernel_size == (5, 5) and conv.stride == (2, 2)
    assert conv.padding == (1, 1)


def test_grouped_pair_composes_per_group():
    """groups 2 then 4: the merged conv has gcd(2, 4) = 2 groups."""
    model = nn.Sequential(nn.Conv2d(4, 8, 1, groups=2, bias=False), nn.Conv2d(8, 8, 3, groups=4))
    fused = fuse_and_check(model, torch.randn(2, 4, 6, 6), second=torch.randn(1, 4, 5, 7))
    conv = next(m for m in fused.modules() if isinstance(m, nn.Conv2d))
    assert fused_counts(fused) == {"sequential": 1} and conv.groups == 2


def test_bias_free_pointwise_before_padded_kxk_composes():
    """A bias-free 1x1 maps the zero border to zeros: the kxk's padding moves to the merged conv."""
    model = nn.Sequential(nn.Conv2d(3, 6, 1, bias=False), nn.Conv2d(6, 2, 3, padding=1))
    fused = fuse_and_check(model, torch.randn(2, 3, 5, 5))
    conv = next(m for m in fused.modules() if isinstance(m, nn.Conv2d))
    assert fused_counts(fused) == {"sequential": 1} and conv.padding == (1, 1)


# ----------------------------------------------------------------------------------- must NOT merge
def test_pointwise_then_avgpool_alone_is_not_merged():
    """1x1 → 3x3 pool would become a dense 3x3 conv: more work, and no sibling to absorb it."""
    model = nn.Sequential(nn.Conv2d(8, 8, 1), nn.AvgPool2d(3, 1, 0))
    fused = fuse_and_check(model, torch.randn(1, 8, 6, 6))
    assert stats(fused).pools == 1
    assert_skipped(fused, "sequential", Reason.MORE_WORK, "increase the work")


def test_intermediate_with_other_user_is_kept():
    class M(nn.Module):
        def __init__(self):
            super().__init__()
            self.a, self.b = nn.Conv2d(3, 3, 1), nn.Conv2d(3, 3, 3)

        def forward(self, x):
            y = self.a(x)
            return self.b(y), y.mean()

    fused = fuse_and_check(M(), torch.randn(1, 3, 6, 6))
    assert stats(fused).convs == 2
    assert_skipped(fused, "sequential", Reason.OTHER_USERS, "other users")


def test_strided_first_conv_with_bias_before_padding_is_not_composed():
    """(Strided first convs compose otherwise: tests/rules/test_sequential_strided.py.)"""
    model = nn.Sequential(nn.Conv2d(3, 3, 1, stride=2), nn.Conv2d(3, 3, 3, padding=1))
    fused = fuse_and_check(model, torch.randn(1, 3, 9, 9))
    assert stats(fused).convs == 2
    assert_skipped(fused, "sequential", Reason.PADDING, "nonzero bias")


def test_dilated_second_conv_is_not_composed():
    model = nn.Sequential(nn.Conv2d(3, 3, 1), nn.Conv2d(3, 3, 3, dilation=2))
    fused = fuse_and_check(model, torch.randn(1, 3, 9, 9))
    assert stats(fused).convs == 2
    assert_skipped(fused, "sequential", Reason.TAP_GRID, "dilation")


def test_padded_kxk_after_kxk_is_not_composed():
    """The second conv zero-pads the first conv's output, which is not zero at the border of the input even
    without a bias (a 3x3 reads real neighbours there). Merging would be less work (1→8→1 channels), so only the
    exactness condition stops it."""
    model = nn.Sequential(nn.Conv2d(1, 8, 3, bias=False), nn.Conv2d(8, 1, 3, padding=1))
    fused = fuse_and_check(model, torch.randn(1, 1, 8, 8))
    assert stats(fused).convs == 2
    assert_skipped(fused, "sequential", Reason.PADDING, "non-pointwise")


# ---------------------------------------------------------------------------------------- errors
def test_wrong_merge_is_rolled_back_and_fails_the_checker(monkeypatch):
    model = nn.Sequential(nn.Conv2d(4, 4, 3, padding=1), nn.Conv2d(4, 4, 3, stride=2))
    fused = assert_wrong_rewrite_caught(monkeypatch, "sequential", model, torch.randn(1, 4, 9, 9))
    assert stats(fused).convs == 2
