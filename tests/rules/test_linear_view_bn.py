"""Rule ``linear_view_bn``: Linear → (view to ``[N, C]``) → BatchNorm1d → (view back) ⇒ one Linear, when the views
only merge leading axes (docs/patterns.md, `linear_view_bn`)."""

import pytest
import torch
from torch import nn

from fxfuse import Reason

from _helpers import assert_not_fired, assert_skipped, assert_wrong_rewrite_caught, fuse_and_check, fused_counts, stats


class TokenMLP(nn.Module):
    """Linear on [B, T, C] normalized through views: bn(y.flatten(0, 1)).reshape_as(y)."""

    def __init__(self, mix_axes=False, spelling="flatten"):
        super().__init__()
        self.fc, self.bn, self.mix_axes = nn.Linear(6, 4), nn.BatchNorm1d(4 if not mix_axes else 3), mix_axes
        self.spelling = spelling

    def forward(self, x):
        y = self.fc(x)
        if self.mix_axes and self.spelling == "transpose":  # [B, T=3, C=4] as [B*4, 3]: BN over T, not C
            return self.bn(y.transpose(1, 2).reshape(-1, 3)).reshape(y.shape[0], 4, 3)
        if self.mix_axes:  # [B, 3, 4] viewed as [B*4, 3]: each BN "feature" mixes several C entries
            return self.bn(y.reshape(-1, 3)).reshape_as(y)
        if self.spelling == "reshape":
            return self.bn(y.reshape(-1, 4)).view(y.shape)
        return self.bn(y.flatten(0, 1)).reshape_as(y)


# ----------------------------------------------------------------------------------------- fused
def test_bn_through_views_after_linear():
    fused = fuse_and_check(TokenMLP(), torch.randn(2, 3, 6), second=torch.randn(5, 3, 6))
    assert fused_counts(fused) == {"linear_view_bn": 1} and stats(fused).nodes == 1


def test_reshape_view_spelling():
    fused = fuse_and_check(TokenMLP(spelling="reshape"), torch.randn(2, 3, 6), second=torch.randn(4, 3, 6))
    assert fused_counts(fused) == {"linear_view_bn": 1} and stats(fused).batch_norms == 0


# ----------------------------------------------------------------------------------- must NOT fold
@pytest.mark.parametrize("spelling", ["reshape", "transpose"])
def test_bn_through_axis_mixing_views_stays(spelling):
    fused = fuse_and_check(TokenMLP(mix_axes=True, spelling=spelling), torch.randn(2, 3, 6))
    assert stats(fused).batch_norms == 1
    assert_not_fired(fused, "linear_view_bn")


class ViewAlsoReturned(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc, self.bn = nn.Linear(6, 4), nn.BatchNorm1d(4)

    def forward(self, x):
        y = self.fc(x)
        flat = y.flatten(0, 1)
        return self.bn(flat).reshape_as(y), flat.sum()


def test_intermediate_with_other_user_stays():
    fused = fuse_and_check(ViewAlsoReturned(), torch.randn(2, 3, 6))
    assert stats(fused).batch_norms == 1
    assert_skipped(fused, "linear_view_bn", Reason.OTHER_USERS, "other users")


# ---------------------------------------------------------------------------------------- errors
def test_wrong_fold_is_rolled_back_and_fails_the_checker(monkeypatch):
    fused = assert_wrong_rewrite_caught(monkeypatch, "linear_view_bn", TokenMLP(), torch.randn(2, 3, 6))
    assert stats(fused).batch_norms == 1
