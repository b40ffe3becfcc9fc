"""Rule ``pad_into_conv``: ``conv(zero_pad(x, q), padding=p)`` ⇒ ``conv(x, padding=p + q)`` for symmetric zero pads
and ``padding_mode='zeros'`` (docs/patterns.md, `pad_into_conv`)."""

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from _helpers import assert_not_fired, assert_wrong_rewrite_caught, fuse_and_check, fused_counts, stats


class PadConv(nn.Module):
    def __init__(self, pads, mode="constant", value=0.0, conv_mode="zeros"):
        super().__init__()
        self.pads, self.mode, self.value = pads, mode, value
        self.conv = nn.Conv2d(3, 4, 3, padding=1, padding_mode=conv_mode)

    def forward(self, x):
        return self.conv(F.pad(x, self.pads, mode=self.mode, value=self.value if self.mode == "constant" else None))


# ----------------------------------------------------------------------------------------- fused
def test_symmetric_zero_pad_is_absorbed():
    fused = fuse_and_check(PadConv([2, 2, 1, 1]), torch.randn(1, 3, 6, 6), second=torch.randn(2, 3, 7, 5))
    conv = next(m for m in fused.modules() if isinstance(m, nn.Conv2d))
    assert fused_counts(fused) == {"pad_into_conv": 1} and conv.padding == (2, 3) and stats(fused).nodes == 1


def test_zero_pad_module_is_absorbed():
    model = nn.Sequential(nn.ZeroPad2d(2), nn.Conv2d(3, 4, 3))
    fused = fuse_and_check(model, torch.randn(1, 3, 5, 5))
    conv = next(m for m in fused.modules() if isinstance(m, nn.Conv2d))
    assert fused_counts(fused) == {"pad_into_conv": 1} and conv.padding == (2, 2)


# ----------------------------------------------------------------------------------- must NOT fold
@pytest.mark.parametrize("kwargs", [{"pads": [0, 1, 0, 1]}, {"pads": [1, 1, 1, 1], "value": 1.0},
                                    {"pads": [1, 1, 1, 1], "mode": "reflect"},
                                    {"pads": [1, 1, 1, 1], "conv_mode": "reflect"}],
                         ids=["asymmetric", "nonzero-value", "reflect-pad", "reflect-conv"])
def test_other_pads_stay(kwargs, capture):
    fused = fuse_and_check(PadConv(**kwargs), torch.randn(1, 3, 6, 6))
    # ATen spells a reflect-padding conv as aten.pad(mode="reflect") → conv2d: one node more
    reflect_conv = capture == "export" and kwargs.get("conv_mode") == "reflect"
    assert stats(fused).nodes == (3 if reflect_conv else 2)
    assert_not_fired(fused, "pad_into_conv")


# ---------------------------------------------------------------------------------------- errors
def test_wrong_fold_is_rolled_back_and_fails_the_checker(monkeypatch):
    fused = assert_wrong_rewrite_caught(monkeypatch, "pad_into_conv", PadConv([1, 1, 1, 1]), torch.randn(1, 3, 6, 6))
    assert stats(fused).nodes == 2
