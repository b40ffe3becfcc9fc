"""Rule ``fold_constants``: a value computed only from parameters, buffers and constants becomes one parameter,
evaluated once in float64 (docs/patterns.md, `fold_constants`)."""

import pytest
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from fxfuse import Reason
from fxfuse.ir import ops

from _helpers import assert_not_fired, assert_skipped, fuse_and_check, fused_counts, stats


class MaskedConv(nn.Module):
    """A fixed mask times a learnable kernel (ACNet / ECBSR style), no BN: only folding removes the multiply."""

    def __init__(self) -> None:
        super().__init__()
        self.w = nn.Parameter(torch.randn(4, 3, 3, 3))
        self.register_buffer("mask", (torch.rand(4, 3, 3, 3) > 0.4).double())

    def forward(self, x: Tensor) -> Tensor:
        return F.conv2d(x, self.w * self.mask, padding=1)


class ComposedKernel(nn.Module):
    """ECBSR's deploy kernel built in forward by convolving two kernels."""

    def __init__(self) -> None:
        super().__init__()
        self.k0 = nn.Parameter(torch.randn(5, 3, 1, 1))
        self.k1 = nn.Parameter(torch.randn(4, 5, 3, 3))

    def forward(self, x: Tensor) -> Tensor:
        return F.conv2d(x, F.conv2d(self.k1, self.k0.permute(1, 0, 2, 3)), padding=1)


def _ops(fused: nn.Module) -> list:
    return [n for n in fused.graph.nodes if n.op in ("call_function", "call_method") and not ops.is_input_guard(n)]


@pytest.mark.fixed_capture("loops over both captures itself")
def test_mask_times_kernel_becomes_a_parameter() -> None:
    for capture in ("symbolic", "export"):
        fused = fuse_and_check(MaskedConv(), torch.randn(2, 3, 5, 5), capture=capture)
        assert fused_counts(fused).get("fold_constants") == 1
        assert stats(fused).convs == 1 and len(_ops(fused)) == 1  # the conv; no multiply left


def test_kernel_composed_by_a_conv_is_evaluated_once() -> None:
    fused = fuse_and_check(ComposedKernel(), torch.randn(2, 3, 5, 5))
    assert stats(fused).convs == 1 and fused_counts(fused).get("fold_constants") == 1


def test_folded_constant_gets_the_model_dtype_back(capture: str) -> None:
    torch.manual_seed(0)
    model, x = MaskedConv().float().eval(), torch.randn(2, 3, 5, 5)
    import fxfuse

    fused = fxfuse.reparametrize(model, x, capture=capture)
    assert {p.dtype for p in fused.parameters()} == {torch.float32}
    with torch.no_grad():
        assert (fused(x) - model(x)).abs().max() <= 1e-5 * model(x).abs().max()


class WrittenAfter(nn.Module):
    """A computed weight then written in place: ``w = p.clone(); w.add_(1)`` (each call starts from ``p``)."""

    def __init__(self) -> None:
        super().__init__()
        self.w = nn.Parameter(torch.randn(4, 3, 3, 3))

    def forward(self, x: Tensor) -> Tensor:
        w = self.w.clone()
        w.view(-1).add_(1.0)
        return F.conv2d(x, w)


def test_constant_written_in_place_is_not_folded(capture: str) -> None:
    """Folding the clone would make the write land in the folded parameter on every call: the result would drift
    from call to call (fuse_and_check runs it several times)."""
    fused = fuse_and_check(WrittenAfter(), torch.randn(2, 3, 5, 5))
    if capture == "export":
        # functionalized: the write is an out-of-place add of the clone, and clone + 1 is one constant
        assert fused_counts(fused).get("fold_constants") == 1 and stats(fused).nodes == 1
    else:
        assert_skipped(fused, "fold_constants", Reason.ALIASING, "writes into it in place")


def test_a_view_of_a_parameter_is_not_copied() -> None:
    """``w.view(...)`` computes nothing: folding it would only duplicate the weight."""

    class Viewed(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.w = nn.Parameter(torch.randn(4, 27))

        def forward(self, x: Tensor) -> Tensor:
            return F.conv2d(x, self.w.view(4, 3, 3, 3))

    fused = fuse_and_check(Viewed(), torch.randn(2, 3, 5, 5))
    assert_not_fired(fused, "fold_constants")
