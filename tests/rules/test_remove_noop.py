"""Rule ``remove_noop``: identity, eval dropout and neutral-number arithmetic are bypassed, so that the patterns
around them become adjacent (docs/patterns.md, `remove_noop`)."""

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from fxfuse import Reason
from fxfuse.ir import ops

from _helpers import assert_not_fired, assert_skipped, fuse_and_check, fused_counts, stats


class Between(nn.Module):
    """conv → ``noop`` → BN: the BN folds into the conv only once the no-op is out of the way."""

    def __init__(self, noop):
        super().__init__()
        self.conv, self.noop, self.bn = nn.Conv2d(3, 4, 3, padding=1), noop, nn.BatchNorm2d(4)

    def forward(self, x):
        return self.bn(self.noop(self.conv(x)))


NOOPS = {
    "Identity": nn.Identity(),
    "Dropout": nn.Dropout(0.5),
    "Dropout2d": nn.Dropout2d(0.3),
    "AlphaDropout": nn.AlphaDropout(0.2),
    "F.dropout": lambda t: F.dropout(t, 0.5, training=False),
    "plus-zero": lambda t: t + 0,
    "zero-plus": lambda t: 0 + t,
    "minus-zero": lambda t: t - 0,
    "times-one": lambda t: t * 1,
    "one-times": lambda t: 1.0 * t,
    "over-one": lambda t: t / 1,
}


@pytest.mark.parametrize("name", list(NOOPS))
def test_noop_is_bypassed_and_the_bn_folds(name, capture):
    fused = fuse_and_check(Between(NOOPS[name]), torch.randn(2, 3, 6, 6))
    # torch.export records no op for nn.Identity (it returns its input): nothing for remove_noop to bypass
    expected = {"conv_bn": 1} if capture == "export" and name == "Identity" else {"remove_noop": 1, "conv_bn": 1}
    assert fused_counts(fused) == expected
    assert stats(fused).nodes == 1 and stats(fused).batch_norms == 0


class IdentityBranch(nn.Module):
    """RepVGG's identity branch spelled with ``nn.Identity``: ``conv(x) + Identity(x)``."""

    def __init__(self):
        super().__init__()
        self.conv, self.identity = nn.Conv2d(4, 4, 3, padding=1), nn.Identity()

    def forward(self, x):
        return self.conv(x) + self.identity(x)


def test_identity_branch_becomes_part_of_the_sum(capture):
    fused = fuse_and_check(IdentityBranch(), torch.randn(2, 4, 5, 5))
    # export records no op for nn.Identity: the sum reads x directly
    expected = {"branch_sum": 1} if capture == "export" else {"remove_noop": 1, "branch_sum": 1}
    assert fused_counts(fused) == expected and stats(fused).nodes == 1


# ----------------------------------------------------------------------------- must NOT be bypassed
class NeutralThenInPlace(nn.Module):
    """``b = a + 0`` then ``b.add_(1)``: bypassing the add would make ``b`` alias ``a`` and mutate it too."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 3, 1)

    def forward(self, x):
        a = self.conv(x)
        b = a + 0
        b.add_(1.0)
        return a, b


def test_neutral_add_with_in_place_user_stays(capture):
    fused = fuse_and_check(NeutralThenInPlace(), torch.randn(2, 3, 4, 4))
    if capture == "export":
        # Functionalized, ``b.add_(1.0)`` is ``b2 = b + 1`` (a new tensor): no user writes into ``a + 0``, so
        # bypassing it is exact, and it is made; the ``+ 1`` stays.
        assert fused_counts(fused) == {"remove_noop": 1} and stats(fused).adds == 1
    else:
        assert_skipped(fused, "remove_noop", Reason.ALIASING, "in place")
        assert stats(fused).adds >= 1


@pytest.mark.parametrize("op", [lambda t: t * 2, lambda t: t + 1, lambda t: 0 - t, lambda t: 1 / (t + 3),
                                lambda t: t.long() * 1.0, lambda t: t * 0],
                         ids=["times-two", "plus-one", "zero-minus", "one-over", "dtype-changing", "times-zero"])
def test_non_neutral_arithmetic_stays(op, capture, request):
    class M(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = nn.Conv2d(3, 3, 1)

        def forward(self, x):
            return op(self.conv(x)).float()

    fused = fuse_and_check(M(), torch.randn(2, 3, 4, 4) * 4)
    if capture == "export" and "one-over" in request.node.callspec.id:
        # ATen records ``1 / t`` as ``reciprocal(t) * 1``: that ``* 1`` is neutral and is bypassed; the
        # reciprocal (the op under test) stays.
        assert fused_counts(fused).get("remove_noop") == 1 and not fused.fxfuse_report.rolled_back
        assert any("reciprocal" in str(n.target) for n in fused.graph.nodes)
    else:
        assert_not_fired(fused, "remove_noop")


# ----------------------------------------------------------------------------- error case
@pytest.mark.fixed_capture("symbolic: a wrong *module* table entry; ATen graphs hold no modules (see the next test)")
def test_wrong_bypass_is_rolled_back_and_fails_the_checker(monkeypatch):
    """An op table that wrongly calls AvgPool2d a dropout makes the rule bypass a pool: verification undoes
    exactly that rewrite and reports it, and the checker fails."""
    monkeypatch.setattr(ops, "DROPOUT_MODULES", (*ops.DROPOUT_MODULES, nn.AvgPool2d))
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.AvgPool2d(3, 1, 1), nn.ReLU(), nn.Conv2d(4, 2, 1))
    x = torch.randn(2, 3, 6, 6)
    fused = fuse_and_check(model, x, allow_rollback=True)
    report = fused.fxfuse_report
    assert report.rolled_back == ["remove_noop:_1"] and "remove_noop" not in report.fused
    assert any(u.rule == "remove_noop" and u.code is Reason.ROLLED_BACK for u in report.unfused)
    assert stats(fused).pools == 1
    with pytest.raises(AssertionError, match="rolled back"):
        fuse_and_check(model, x)


def test_wrong_arithmetic_entry_is_rolled_back_and_fails_the_checker(monkeypatch):
    """An op table that reads multiplication as addition makes ``t * 0`` look like ``t + 0``: the bypass is wrong,
    verification undoes exactly that rewrite and reports it, and the checker fails (both captures: the table holds
    ``operator.mul`` and ``aten.mul.Tensor``)."""
    for table in (ops.ARITH_FUNCS, ops.ARITH_METHODS):
        for target, (name, in_place) in list(table.items()):
            if name == "mul":
                monkeypatch.setitem(table, target, ("add", in_place))  # type: ignore[index]
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.ReLU(), Lambda(lambda t: t * 0), nn.ReLU(), nn.Conv2d(4, 2, 1))
    x = torch.randn(2, 3, 6, 6)
    fused = fuse_and_check(model, x, allow_rollback=True)
    report = fused.fxfuse_report
    assert len(report.rolled_back) == 1 and report.rolled_back[0].startswith("remove_noop:"), report
    assert "remove_noop" not in report.fused
    assert any(u.rule == "remove_noop" and u.code is Reason.ROLLED_BACK for u in report.unfused)
    with pytest.raises(AssertionError, match="rolled back"):
        fuse_and_check(model, x)


class Lambda(nn.Module):
    def __init__(self, fn):
        super().__init__()
        self.fn = fn

    def forward(self, x):
        return self.fn(x)
