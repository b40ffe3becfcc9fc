"""An ill-conditioned model: its output is the small difference of two large branches, so rounding-sized changes of
the weights (what any exact fold makes) move it beyond the 1e-9 check. Verification cannot certify any rewrite there;
fxfuse measures that (1e-15 relative weight noise against the check, ``fxfuse.verified.weight_noise``) and refuses
the capture with the figure (``Reason.ILL_CONDITIONED``) instead of bisecting the rewrites one by one. The same
structure with balanced branches is fused."""

from __future__ import annotations

import re

import torch
from torch import Tensor, nn

import fxfuse
from fxfuse import Reason
from fxfuse.models import randomize_batchnorm_


class Cancelling(nn.Module):
    """``conv_a(x) - bn(conv_b(x))`` where both branches are ``scale`` times larger than their difference."""

    def __init__(self, scale: float) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.conv_a = nn.Conv2d(3, 4, 3, padding=1, bias=False)
        self.conv_b = nn.Conv2d(3, 4, 3, padding=1, bias=False)
        self.bn = nn.BatchNorm2d(4)
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
                         r"[0-9.e-]+ of max\|y\| \(the check allows 1e-09\)", attempts["symbolic"].detail)
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
