"""An ill-conditioned model: its output is the small difference of two large branches, so rounding-sized changes of
the weights (what any exact fold makes) move it beyond the 1e-9 check. fxfuse measures that (1e-15 relative weight
noise against the check, ``fxfuse.verified.weight_noise``, figure η) instead of bisecting the rewrites one by one:
where 10·η stays at or below 1e-6 the check runs at 10·η (a sensitive model is fused, and a wrong rewrite is still
rolled back at that resolution); above it, or when the user set ``rtol``, the capture is refused with the figure
(``Reason.ILL_CONDITIONED``). The same structure with balanced branches is fused at 1e-9."""

from __future__ import annotations

import re
from typing import Iterator

import pytest
import torch
from torch import Tensor, fx, nn

import fxfuse
from fxfuse import Reason, RewriteContext
from fxfuse.ir.read import ConvRead
from fxfuse.models import randomize_batchnorm_
from fxfuse.verified import CONDITIONED_RTOL_CAP


class Cancelling(nn.Module):
    """``conv_a(x) - bn(conv_b(x))`` where both branches are ``scale`` times larger than their difference."""

    def __init__(self, scale: float) -> None:
        super().__init__()
        torch.manual_seed(0)  # built in float64: float32 would round the small difference away at a large scale
        self.conv_a = nn.Conv2d(3, 4, 3, padding=1, bias=False, dtype=torch.float64)
        self.conv_b = nn.Conv2d(3, 4, 3, padding=1, bias=False, dtype=torch.float64)
        self.bn = nn.BatchNorm2d(4, dtype=torch.float64)
        randomize_batchnorm_(self, 0)
        with torch.no_grad():  # conv_b·a_bn + c_bn = conv_a + a small difference, both `scale` times the difference
            self.conv_a.weight.mul_(scale)
            a = self.bn.weight / torch.sqrt(self.bn.running_var + self.bn.eps)
            self.conv_b.weight.copy_(self.conv_a.weight / a[:, None, None, None]
                                     + torch.randn_like(self.conv_a.weight))
            self.bn.bias.copy_(self.bn.running_mean * a)

    def forward(self, x: Tensor) -> Tensor:
        return self.conv_a(x) - self.bn(self.conv_b(x))


def test_ill_conditioned_capture_is_refused_with_the_figure() -> None:
    # float64: the check runs at 1e-9 (a float32 model this sensitive is checked in its own dtype, at its own noise)
    model = Cancelling(1e9).double().eval()
    x = torch.randn(2, 3, 8, 8, dtype=torch.float64)
    for capture in ("symbolic", "auto"):  # refused whole, then per sub-module (the root): returned as it is
        fused = fxfuse.reparametrize(model, x, capture=capture)
        report = fused.fxfuse_report
        attempts = {a.capture: a for a in report.captures}
        assert attempts["symbolic"].code is Reason.ILL_CONDITIONED
        assert re.search(r"ill-conditioned on this input: 1e-15 relative noise in its weights moves the output by "
                         r"[0-9.e-]+ of max\|y\| \(the check allows 1e-09; at most 1e-06 when adapted\)",
                         attempts["symbolic"].detail)
        assert report.total_fused == 0 and not report.rolled_back
        with torch.no_grad():
            torch.testing.assert_close(fused(x), model(x), rtol=0, atol=0)


def test_balanced_branches_are_fused() -> None:
    model = Cancelling(1.0).double().eval()
    x = torch.randn(2, 3, 8, 8, dtype=torch.float64)
    fused = fxfuse.reparametrize(model, x, capture="symbolic")
    report = fused.fxfuse_report
    assert report.after.batch_norms == 0 and report.after.convs == 1 and not report.rolled_back
    with torch.no_grad():
        torch.testing.assert_close(fused(x), model(x), rtol=1e-9, atol=1e-9)


SENSITIVE = 1e8  # η ≈ 1.6e-8: beyond the 1e-9 check, within the adapted one


def _sensitivity(report: fxfuse.FusionReport) -> float:
    found = [re.search(r"moves the output by ([0-9.e-]+) of max\|y\|\): verified in float64 at rtol ([0-9.e-]+) "
                       r"\(10x that\) instead of 1e-09", w) for w in report.warnings]
    match = next(m for m in found if m is not None)
    eta, adapted = float(match.group(1)), float(match.group(2))
    assert adapted == pytest.approx(10 * eta, rel=1e-2)
    return adapted


def test_sensitive_model_is_verified_at_its_measured_resolution() -> None:
    model = Cancelling(SENSITIVE).eval()
    x = torch.randn(2, 3, 8, 8, dtype=torch.float64)
    fused = fxfuse.reparametrize(model, x, capture="symbolic")
    report = fused.fxfuse_report
    adapted = _sensitivity(report)
    assert 1e-9 < adapted <= CONDITIONED_RTOL_CAP
    assert report.after.batch_norms == 0 and report.after.convs == 1 and not report.rolled_back
    assert report.fused == {"conv_bn": 1, "branch_sum": 1}
    with torch.no_grad():
        y, out = model(x), fused(x)
    assert float((out - y).abs().max()) <= adapted * float(y.abs().max())


def test_a_users_rtol_is_not_adapted() -> None:
    model = Cancelling(SENSITIVE).eval()
    x = torch.randn(2, 3, 8, 8, dtype=torch.float64)
    fused = fxfuse.reparametrize(model, x, capture="auto", rtol=1e-9)
    attempts = {a.capture: a for a in fused.fxfuse_report.captures}
    assert attempts["symbolic"].code is Reason.ILL_CONDITIONED
    assert "(the check allows 1e-09)" in attempts["symbolic"].detail
    assert fused.fxfuse_report.total_fused == 0 and not fused.fxfuse_report.rolled_back


@pytest.fixture
def nudge() -> Iterator[str]:
    """A wrong rule: conv_a's weight off by 1e-5 relative (an eps-sized mistake)."""

    @fxfuse.register_rule("nudge_conv_a", enabled=False, before="conv_bn")
    def nudge_conv_a(ctx: RewriteContext, node: fx.Node):
        read = ctx.read.conv(node) if node.op == "call_module" and node.target == "conv_a" else None
        if not isinstance(read, ConvRead):
            return None

        def rewrite() -> None:
            wrong = read.spec.with_(weight=read.spec.weight * (1 + 1e-5))
            ctx.replace(node, ctx.insert_conv(wrong, read.input, before=node, like=read.like))

        return rewrite

    yield "nudge_conv_a"
    fxfuse.unregister_rule("nudge_conv_a")


def test_a_wrong_rewrite_is_still_rolled_back_at_the_adapted_resolution(nudge: str) -> None:
    model = Cancelling(SENSITIVE).eval()
    x = torch.randn(2, 3, 8, 8, dtype=torch.float64)
    fused = fxfuse.reparametrize(model, x, capture="symbolic", enable=[nudge])
    report = fused.fxfuse_report
    _sensitivity(report)
    assert [r.key.split(":")[0] for r in report.rollbacks] == [nudge]
    assert report.rollbacks[0].code is Reason.OUTPUT_CHANGED
    assert report.fused == {"conv_bn": 1, "branch_sum": 1}  # the right rewrites stay
    with torch.no_grad():
        y, out = model(x), fused(x)
    assert float((out - y).abs().max()) <= CONDITIONED_RTOL_CAP * float(y.abs().max())
