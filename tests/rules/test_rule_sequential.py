"""conv → conv / conv → avg-pool with nothing in between (rule ``sequential``), and the padding traps."""

import torch
import torch.nn.functional as F
from hypothesis import given
from hypothesis import strategies as st
from torch import nn

from _helpers import fuse_and_check, fused_counts, reasons, stats


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


@given(pointwise_then_kxk())
def test_pointwise_then_kxk(case):
    """Merged only where exact: the kxk reads no zero padding (a BN shift makes the 1x1 output nonzero)."""
    model, x, pad = case
    fused = fuse_and_check(model, x, second=torch.randn(1, *x.shape[1:]))
    assert stats(fused).batch_norms == 0
    if pad == 0:
        assert stats(fused).convs == 1 or "increase the work" in reasons(fused)
    else:
        assert stats(fused).convs == 2 and "zero-pads" in reasons(fused)


def test_kxk_then_kxk_without_padding_composes():
    model = nn.Sequential(nn.Conv2d(4, 4, 3, padding=1), nn.Conv2d(4, 4, 3, stride=2))
    fused = fuse_and_check(model, torch.randn(1, 4, 9, 9), second=torch.randn(2, 4, 10, 10))
    conv = next(m for m in fused.modules() if isinstance(m, nn.Conv2d))
    assert stats(fused).convs == 1 and conv.kernel_size == (5, 5) and conv.stride == (2, 2)


class PadThenPointwise(nn.Module):
    """DBB's BN-and-pad: 1x1 (no bias) → zero pad → BN → kxk (padding 0) → BN."""

    def __init__(self, cin=3, cout=5, k=3):
        super().__init__()
        self.pw = nn.Conv2d(cin, cin, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(cin)
        self.conv = nn.Conv2d(cin, cout, k, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        self.k = k

    def forward(self, x):
        return self.bn2(self.conv(self.bn1(F.pad(self.pw(x), [self.k // 2] * 4))))


def test_bn_and_pad_branch_becomes_one_conv():
    fused = fuse_and_check(PadThenPointwise(), torch.randn(2, 3, 6, 6))
    conv = next(m for m in fused.modules() if isinstance(m, nn.Conv2d))
    assert stats(fused).convs == 1 and stats(fused).nodes == 1 and conv.padding == (1, 1)


def test_pointwise_then_avgpool_alone_is_not_merged():
    """1x1 → 3x3 pool would become a dense 3x3 conv: more work, and no sibling to absorb it."""
    model = nn.Sequential(nn.Conv2d(8, 8, 1), nn.AvgPool2d(3, 1, 0))
    fused = fuse_and_check(model, torch.randn(1, 8, 6, 6))
    assert stats(fused).pools == 1 and "increase the work" in reasons(fused)


def test_intermediate_with_other_user_is_kept():
    class M(nn.Module):
        def __init__(self):
            super().__init__()
            self.a, self.b = nn.Conv2d(3, 3, 1), nn.Conv2d(3, 3, 3)

        def forward(self, x):
            y = self.a(x)
            return self.b(y), y.mean()

    fused = fuse_and_check(M(), torch.randn(1, 3, 6, 6))
    assert stats(fused).convs == 2 and "other users" in reasons(fused)


def test_strided_first_conv_is_not_composed():
    model = nn.Sequential(nn.Conv2d(3, 3, 1, stride=2), nn.Conv2d(3, 3, 3))
    fused = fuse_and_check(model, torch.randn(1, 3, 9, 9))
    assert stats(fused).convs == 2 and "stride" in reasons(fused)
