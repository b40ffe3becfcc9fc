"""Rule ``shape_assert``: shape checks the fused graph guarantees are removed; others stay; ``keep_asserts``.

Under ``capture="export"`` these checks never reach the graph: non-strict export runs the Python, so
``torch._assert(y.ndim == 4)`` is evaluated on the example's static shapes while exporting, and the exported module
checks its input shapes in its guard (``_guards_fn``) instead. The tests say so per capture."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import fxfuse
from fxfuse.ir import ops
from fxfuse.testing import assert_reparametrizes


class CheckedConvBN(nn.Module):
    """conv → (rank / channel checks of kind ``check``) → functional BN, the zoo BN-subclass spelling."""

    def __init__(self, check: str, cout: int = 6) -> None:
        super().__init__()
        self.conv = nn.Conv2d(4, cout, 3, padding=1, bias=False)
        self.bn = nn.BatchNorm2d(cout)
        self.check = check

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.conv(x)
        c = self.bn.num_features
        if self.check == "ndim":
            torch._assert(y.ndim == 4, "expected NCHW")
        elif self.check == "dim":
            torch._assert(y.dim() == 4, "expected NCHW")
        elif self.check == "channels":
            torch._assert(y.shape[1] == c, "channels")
        elif self.check == "size":
            torch._assert(y.size(1) == c, "channels")
        elif self.check == "input-rank":  # on the graph input: the rank is not fixed by any op
            torch._assert(x.ndim == 4, "input")
        elif self.check == "spatial":  # spatial sizes are never guaranteed
            torch._assert(y.shape[2] == 8, "spatial")
        bn = self.bn
        return F.batch_norm(y, bn.running_mean, bn.running_var, bn.weight, bn.bias, False, 0.0, bn.eps)


def _asserts(model: nn.Module) -> int:
    return sum(n.op == "call_function" and n.target is torch._assert for n in model.graph.nodes)


@pytest.mark.parametrize("check", ["ndim", "dim", "channels", "size"])
def test_guaranteed_checks_are_removed(check: str, capture: str) -> None:
    exported = capture == "export"  # the check was evaluated while exporting: nothing in the graph to remove
    fused = assert_reparametrizes(CheckedConvBN(check), torch.randn(2, 4, 8, 8), expect_convs=1, capture=capture,
                                  expect_fused={"conv_bn": 1, "shape_assert": 0 if exported else 1})
    assert _asserts(fused) == 0
    report = fused.fxfuse_report
    assert report.after.asserts == 0 and report.after.metadata_reads == 0
    assert report.before.asserts == (0 if exported else 1)


@pytest.mark.parametrize("check", ["input-rank", "spatial"])
def test_unproven_checks_stay(check: str, capture: str) -> None:
    fused = assert_reparametrizes(CheckedConvBN(check), torch.randn(2, 4, 8, 8), expect_convs=1, capture=capture,
                                  expect_fused={"conv_bn": 1, "shape_assert": 0})
    assert fused.fxfuse_report.rolled_back == []
    if capture == "export":
        # No assertion in the graph; the exported input guard stays and still refuses another spatial size.
        assert _asserts(fused) == 0 and sum(ops.is_input_guard(n) for n in fused.graph.nodes) == 1
        with pytest.raises(Exception, match="Guard failed"):
            fused(torch.randn(2, 4, 9, 9, dtype=torch.float64))
    else:
        assert _asserts(fused) == 1 and fused.fxfuse_report.after.asserts == 1


@pytest.mark.fixed_capture("symbolic: an exported graph holds no such assertion to keep (module docstring)")
def test_keep_asserts_keeps_them() -> None:
    fused = assert_reparametrizes(CheckedConvBN("ndim"), torch.randn(2, 4, 8, 8), keep_asserts=True, capture="symbolic",
                                  expect_fused={"conv_bn": 1, "shape_assert": 0})
    assert _asserts(fused) == 1


def test_wrong_check_is_not_removed(capture: str) -> None:
    """A check the graph contradicts (the model always fails it) is never removed: the model must still raise."""

    class Wrong(CheckedConvBN):
        def forward(self, x: torch.Tensor) -> torch.Tensor:
            y = self.conv(x)
            torch._assert(y.ndim == 3, "never true")
            return y

    model = Wrong("none").eval()
    with pytest.raises(Exception, match="never true"):
        fxfuse.reparametrize(model, torch.randn(2, 4, 8, 8), capture=capture)
