"""Rule ``pad_values``: a zero pad whose whole border is overwritten with ``f(0)`` after a pointwise ``f`` (BN,
per-channel affine, 1x1 conv) ⇒ ``f`` after a zero pad (docs/patterns.md, `pad_values`). Slice assignment does
not trace symbolically, so these run through ``capture="export"``."""

import pytest
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from fxfuse import Reason

from _helpers import assert_skipped, fuse_and_check, fused_counts, stats

pytestmark = pytest.mark.fixed_capture("export: slice assignment does not trace symbolically")


def bn_zero(bn: nn.BatchNorm2d) -> Tensor:
    """What an eval BatchNorm maps 0 to, computed the way DBB's code does."""
    return (bn.bias - bn.running_mean * bn.weight / torch.sqrt(bn.running_var + bn.eps)).view(1, -1, 1, 1)


class BNPadConv(nn.Module):
    """DBB's BN-and-pad layer (``sides`` of the border written with ``values``), then a conv without padding."""

    def __init__(self, pad: int = 1, sides: int = 4, values: str = "bn") -> None:
        super().__init__()
        self.bn, self.conv = nn.BatchNorm2d(3), nn.Conv2d(3, 4, 2 * pad + 1)
        self.pad, self.sides, self.values = pad, sides, values

    def forward(self, x: Tensor) -> Tensor:
        p = self.pad
        out = F.pad(self.bn(x), [p] * 4)
        v = bn_zero(self.bn) if self.values == "bn" else 0.5
        for i, index in enumerate([(slice(None), slice(None), slice(0, p)), (slice(None), slice(None), slice(-p, None)),
                                   (Ellipsis, slice(0, p)), (Ellipsis, slice(-p, None))]):
            if i < self.sides:
                out[index] = v
        return self.conv(out)


class SeqConv(nn.Module):
    """ECBSR's 1x1 conv → pad with its own bias → 3x3 conv."""

    def __init__(self) -> None:
        super().__init__()
        self.k0, self.k1 = nn.Conv2d(3, 6, 1), nn.Conv2d(6, 4, 3)

    def forward(self, x: Tensor) -> Tensor:
        y0 = F.pad(self.k0(x), (1, 1, 1, 1), "constant", 0)
        b0 = self.k0.bias.view(1, -1, 1, 1)
        y0[:, :, 0:1, :] = b0
        y0[:, :, -1:, :] = b0
        y0[:, :, :, 0:1] = b0
        y0[:, :, :, -1:] = b0
        return self.k1(y0)


# ----------------------------------------------------------------------------------------- fused
def test_bn_then_pad_with_bn_of_zero_is_one_conv() -> None:
    for pad in (1, 2):
        fused = fuse_and_check(BNPadConv(pad), torch.randn(2, 3, 6, 6), capture="export")
        assert fused_counts(fused).get("pad_values") == 1
        assert (stats(fused).convs, stats(fused).batch_norms) == (1, 0)


def test_pointwise_conv_padded_with_its_bias_composes() -> None:
    fused = fuse_and_check(SeqConv(), torch.randn(1, 3, 5, 5), capture="export")
    assert fused_counts(fused).get("pad_values") == 1 and stats(fused).convs == 1


# ------------------------------------------------------------------------------------------ kept
def test_values_that_are_not_bn_of_zero_are_kept() -> None:
    """Filled with 0.5, not BN(0): not a zero pad of anything; left in place and reported."""
    fused = fuse_and_check(BNPadConv(values="const"), torch.randn(2, 3, 5, 5), capture="export")
    assert stats(fused).batch_norms == 1
    assert_skipped(fused, "pad_values", Reason.PADDING, "differ from the value")


def test_partial_border_write_is_not_a_valued_pad() -> None:
    """Only the top rows written: the other borders keep zeros, so the pad is not 'pad with BN(0)'."""
    fused = fuse_and_check(BNPadConv(sides=1), torch.randn(2, 3, 5, 5), capture="export")
    assert stats(fused).batch_norms == 1 and fused_counts(fused).get("pad_values", 0) == 0


def test_padded_tensor_read_before_the_writes_is_kept() -> None:
    class Logged(BNPadConv):
        def forward(self, x: Tensor) -> tuple:
            out = F.pad(self.bn(x), [1] * 4)
            before = out * 1.0  # reads the zero-padded map
            v = bn_zero(self.bn)
            out[:, :, 0:1, :] = v
            out[:, :, -1:, :] = v
            out[:, :, :, 0:1] = v
            out[:, :, :, -1:] = v
            return self.conv(out), before

    fused = fuse_and_check(Logged(), torch.randn(2, 3, 5, 5), capture="export")
    assert_skipped(fused, "pad_values", Reason.OTHER_USERS, "has other users")


class Overreach(BNPadConv):
    """The top write covers one interior row too (rows 0..p): not a border, so not a pad with values."""

    def forward(self, x: Tensor) -> Tensor:
        out = F.pad(self.bn(x), [1] * 4)
        v = bn_zero(self.bn)
        out[:, :, 0:2, :] = v
        out[:, :, -1:, :] = v
        out[:, :, :, 0:1] = v
        out[:, :, :, -1:] = v
        return self.conv(out)


def test_write_into_the_interior_is_not_a_valued_pad() -> None:
    fused = fuse_and_check(Overreach(), torch.randn(2, 3, 5, 5))
    assert stats(fused).batch_norms == 1 and fused_counts(fused).get("pad_values", 0) == 0


class SpatialThenPad(SeqConv):
    """A 3x3 conv padded with its own bias: not pointwise, so its border is not ``f(0)``."""

    def __init__(self) -> None:
        super().__init__()
        self.k0 = nn.Conv2d(3, 6, 3, padding=1)


def test_values_after_a_spatial_conv_are_kept() -> None:
    fused = fuse_and_check(SpatialThenPad(), torch.randn(1, 3, 5, 5))
    assert_skipped(fused, "pad_values", Reason.NOT_LINEAR, "not a pointwise")
    assert stats(fused).convs == 2


def test_pad_after_a_batch_statistics_bn_forwards_the_readers_code() -> None:
    """The op before the pad is a BatchNorm without running statistics: the reader's refusal (code and sentence)
    is what the skip reports, not a generic 'not a conv'."""
    model = BNPadConv(values="const")
    model.bn = nn.BatchNorm2d(3, track_running_stats=False)
    fused = fuse_and_check(model, torch.randn(2, 3, 5, 5), capture="export")
    assert stats(fused).batch_norms == 1
    assert_skipped(fused, "pad_values", Reason.BATCH_STATISTICS, "batch statistics")


class BNAlsoReturned(BNPadConv):
    def forward(self, x: Tensor) -> tuple:
        y = self.bn(x)
        out = F.pad(y, [1] * 4)
        v = bn_zero(self.bn)
        out[:, :, 0:1, :] = v
        out[:, :, -1:, :] = v
        out[:, :, :, 0:1] = v
        out[:, :, :, -1:] = v
        return self.conv(out), y


def test_padded_op_with_another_user_is_kept() -> None:
    """Moving the BN after the pad would compute it twice (once for the other user)."""
    fused = fuse_and_check(BNAlsoReturned(), torch.randn(2, 3, 5, 5))
    assert_skipped(fused, "pad_values", Reason.OTHER_USERS, "other users besides the pad")
