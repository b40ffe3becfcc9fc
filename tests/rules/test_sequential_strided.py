"""Rule ``sequential`` with a strided first conv: ``conv2(conv1(x))``, conv1 of stride ``s1``, is one conv of stride
``s1·s2``, kernel ``k1 + s1·(k2 − 1)`` (dilation ``s1`` where ``k1 = 1``) and padding ``p1 + s1·p2`` — exact when the
second conv reads no zero padding, or the first is a bias-free 1x1 (docs/patterns.md, `sequential`)."""

import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

from fxfuse import Reason

from _helpers import assert_skipped, budget, codes, fuse_and_check, fused_counts, stats


def _convs(fused):
    return [m for m in fused.modules() if isinstance(m, nn.Conv2d)]


@st.composite
def strided_pairs(draw):
    """Either order (kxk → 1x1 or 1x1 → kxk), the first strided, a BN (random statistics) after each conv or not;
    the second conv padded only where that is exact (bias-free 1x1 first, no BN after it)."""
    groups = draw(st.integers(1, 2))
    cin, mid, cout = (groups * draw(st.integers(1, 3)) for _ in range(3))
    stride = (draw(st.integers(2, 3)), draw(st.integers(1, 2)))
    k = draw(st.sampled_from([2, 3, 5]))
    pointwise_first = draw(st.booleans())
    k1, k2 = (1, k) if pointwise_first else (k, 1)
    p1 = draw(st.integers(0, k1 // 2))
    bias1, bn1, bn2 = draw(st.booleans()), draw(st.booleans()), draw(st.booleans())
    padded = pointwise_first and not bias1 and not bn1 and draw(st.booleans())
    p2 = k2 // 2 if padded else 0
    s2 = draw(st.integers(1, 2))
    layers = [nn.Conv2d(cin, mid, k1, stride, p1, groups=groups, bias=bias1)]
    layers += [nn.BatchNorm2d(mid)] if bn1 else []
    layers += [nn.Conv2d(mid, cout, k2, s2, p2, groups=draw(st.sampled_from([1, groups])))]
    layers += [nn.BatchNorm2d(cout)] if bn2 else []
    size = draw(st.integers(22, 25)), draw(st.integers(22, 25))  # every output dim > 1 (export specializes 1)
    return nn.Sequential(*layers), torch.randn(2, cin, *size), torch.randn(1, cin, size[0] + 3, size[1] + 1)


# ----------------------------------------------------------------------------------------- fused
@settings(max_examples=budget(15))
@given(strided_pairs())
def test_strided_first_conv_composes_exactly(case):
    """Outputs equal (float64, two batch sizes, another spatial size); one conv unless merging adds work."""
    model, x, other = case
    fused = fuse_and_check(model, x, second=other)
    assert stats(fused).batch_norms == 0
    assert stats(fused).convs == 1 or Reason.MORE_WORK in codes(fused)


def test_strided_stem_then_pointwise_is_one_conv():
    """Stem 3x3/2 (3 → 16) + BN → 1x1 (16 → 32) + BN: one 3x3/2 conv 3 → 32 (less work than the pair)."""
    model = nn.Sequential(nn.Conv2d(3, 16, 3, 2, 1, bias=False), nn.BatchNorm2d(16),
                          nn.Conv2d(16, 32, 1, bias=False), nn.BatchNorm2d(32), nn.ReLU())
    fused = fuse_and_check(model, torch.randn(2, 3, 17, 17), second=torch.randn(1, 3, 20, 14))
    (conv,) = _convs(fused)
    assert fused_counts(fused) == {"conv_bn": 2, "sequential": 1}
    assert (conv.in_channels, conv.out_channels, conv.kernel_size, conv.stride, conv.padding) == \
        (3, 32, (3, 3), (2, 2), (1, 1))


def test_strided_pointwise_then_kxk_is_a_dilated_conv():
    """1x1/2 → 3x3: only every second tap of the 5x5 composite is nonzero, so the merged conv is a 3x3 of
    dilation 2 and stride 2; the 1x1's padding (bias-free: its border is zero) and the 3x3's compose."""
    model = nn.Sequential(nn.Conv2d(4, 8, 1, 2, 1, bias=False), nn.Conv2d(8, 8, 3, padding=1))
    fused = fuse_and_check(model, torch.randn(2, 4, 11, 11), second=torch.randn(1, 4, 8, 13))
    (conv,) = _convs(fused)
    assert fused_counts(fused) == {"sequential": 1}
    assert (conv.kernel_size, conv.dilation, conv.stride, conv.padding) == ((3, 3), (2, 2), (2, 2), (3, 3))


def test_strided_kxk_then_strided_pointwise():
    """3x3/2 → 1x1/2: stride 4, kernel 3 (the 1x1 only picks every second output of the 3x3)."""
    model = nn.Sequential(nn.Conv2d(3, 8, 3, 2, 1), nn.BatchNorm2d(8), nn.Conv2d(8, 8, 1, 2))
    fused = fuse_and_check(model, torch.randn(2, 3, 15, 15), second=torch.randn(1, 3, 12, 9))
    (conv,) = _convs(fused)
    assert (conv.kernel_size, conv.stride, conv.padding) == ((3, 3), (4, 4), (1, 1))


# ----------------------------------------------------------------------------------- must NOT merge
def test_padded_second_after_strided_kxk_is_not_composed():
    """The 3x3's zero border is not what the strided 3x3 computes there (it reads real neighbours)."""
    model = nn.Sequential(nn.Conv2d(4, 4, 3, 2, bias=False), nn.Conv2d(4, 2, 3, padding=1))
    fused = fuse_and_check(model, torch.randn(1, 4, 11, 11))
    assert stats(fused).convs == 2
    assert_skipped(fused, "sequential", Reason.PADDING, "non-pointwise")


def test_padded_second_after_strided_pointwise_with_shift_is_not_composed():
    """A BN after the strided 1x1 gives it a nonzero shift: the 3x3's zero border would become the shift."""
    model = nn.Sequential(nn.Conv2d(4, 8, 1, 2, bias=False), nn.BatchNorm2d(8), nn.Conv2d(8, 4, 3, padding=1))
    fused = fuse_and_check(model, torch.randn(1, 4, 10, 10))
    assert stats(fused).convs == 2
    assert_skipped(fused, "sequential", Reason.PADDING, "nonzero bias")


def test_strided_dilated_first_is_not_composed():
    model = nn.Sequential(nn.Conv2d(3, 3, 3, 2, dilation=2), nn.Conv2d(3, 3, 1))
    fused = fuse_and_check(model, torch.randn(1, 3, 13, 13))
    assert stats(fused).convs == 2
    assert_skipped(fused, "sequential", Reason.TAP_GRID, "dilation")


def test_strided_kxk_then_kxk_that_adds_work_is_not_composed():
    """3x3/2 → 3x3 over 16 channels would be a dense 7x7/2: more multiply-adds than the pair."""
    model = nn.Sequential(nn.Conv2d(16, 16, 3, 2), nn.Conv2d(16, 16, 3))
    fused = fuse_and_check(model, torch.randn(1, 16, 15, 15))
    assert stats(fused).convs == 2
    assert_skipped(fused, "sequential", Reason.MORE_WORK, "increase the work")
