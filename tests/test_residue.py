"""No residue: the fused reference nets execute exactly the ops of their hand-written deploy form, and every
candidate left unfused is named in the report (docs/patterns.md).

Executed ops are counted with :func:`fxfuse.tools.executed_ops.executed_ops` (a ``TorchFunctionMode``: every torch
function, tensor method and tensor-attribute read the forward runs), independently of how fxfuse captured the
model, so a shape assertion, an ``x.ndim`` read or a stray ``add`` left behind shows up.
"""

from __future__ import annotations

from typing import List

import pytest
import torch
from torch import fx, nn

import fxfuse
from fxfuse import Reason, models
from fxfuse.ir import AffineRead, ConvRead, Reader
from fxfuse.testing import assert_reparametrizes
from fxfuse.tools.executed_ops import executed_ops

ZOO_SMALL = [n for n in models.zoo_names() if n != "repvgg-A0-zoo"]  # A0 (224²) is covered by `fxfuse bench`


def _model(name: str, seed: int = 0) -> nn.Module:
    return models.randomize_batchnorm_(models.build(name), seed).eval()


# ------------------------------------------------------------------------------- op for op vs plain twin
@pytest.mark.parametrize("name", ZOO_SMALL + ["repvgg-tiny", "acnet", "dbb", "mobileone", "bn-after-sum"])
def test_fused_executes_exactly_the_plain_twin_ops(name: str) -> None:
    model = _model(name)
    x = torch.randn(models.default_input_shape(name))
    fused = fxfuse.reparametrize(model, x)
    plain = models.plain_twin(model)
    assert executed_ops(fused, x) == executed_ops(plain, x), fused.fxfuse_report
    assert fused.fxfuse_report.after.asserts == 0 and fused.fxfuse_report.after.metadata_reads == 0


def test_zoo_form_has_the_residue_fxfuse_removes() -> None:
    """The zoo spelling really carries assertions, ndim reads and the ``0 +`` spelling (else the test above
    would prove nothing about them)."""
    model = _model("repvgg-tiny-zoo")
    x = torch.randn(models.default_input_shape("repvgg-tiny-zoo"))
    ops = executed_ops(model, x)
    assert ops["_assert"] == ops["ndim"] == ops["batch_norm"] > 0
    kept = fxfuse.reparametrize(model, x, keep_asserts=True)
    kept_ops = executed_ops(kept, x)
    assert kept_ops["_assert"] == ops["_assert"] and kept_ops["batch_norm"] == 0
    assert kept.fxfuse_report.after.asserts == ops["_assert"]
    assert kept.fxfuse_report.fused["remove_noop"] > 0  # the `0 + bn(x)` additions


# -------------------------------------------------------------------------------------- `0 +` branch
class ZeroPlus(nn.Module):
    """``out = 0 + bn(x); out = out + conv_bn(x)`` (identity branch present) or ``0 + conv_bn(x)``."""

    def __init__(self, identity: bool, inplace_user: bool = False) -> None:
        super().__init__()
        self.conv = nn.Conv2d(4, 4, 3, padding=1, bias=False)
        self.bn = nn.BatchNorm2d(4)
        self.id_bn = nn.BatchNorm2d(4) if identity else None
        self.inplace_user = inplace_user

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = 0
        if self.id_bn is not None:
            out = out + self.id_bn(x)
        out = out + self.bn(self.conv(x))
        if self.inplace_user:
            out.mul_(2.0)
        return out


@pytest.mark.parametrize("identity", [True, False])
def test_zero_plus_branch_merges(identity: bool) -> None:
    fused = assert_reparametrizes(ZeroPlus(identity), torch.randn(2, 4, 6, 6), expect_convs=1,
                                  expect_batch_norms=0)
    assert fused.fxfuse_report.fused["remove_noop"] == 1
    assert fused.fxfuse_report.fused.get("branch_sum", 0) == int(identity)
    assert fused.fxfuse_report.after.adds == 0


def test_zero_plus_with_an_in_place_user_is_kept() -> None:
    """Bypassing ``0 + t`` would make ``out.mul_`` write into ``t`` (also returned): skipped, with the reason."""

    class M(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.conv = nn.Conv2d(4, 4, 3, padding=1)

        def forward(self, x: torch.Tensor):
            t = torch.relu(self.conv(x))
            out = 0 + t
            out.mul_(2.0)
            return out, t

    fused = assert_reparametrizes(M(), torch.randn(2, 4, 6, 6), expect_fused={"remove_noop": 0})
    report = fused.fxfuse_report
    assert report.rolled_back == []
    assert any(u.rule == "remove_noop" and u.code is Reason.ALIASING for u in report.unfused), report


# ------------------------------------------------------------------------------------- crop before conv
class CroppedAC(nn.Module):
    """ACNet branches written with crops: ``sq(x) + ver(x[..., c:-c]) + hor(x[..., c:-c, :])``."""

    def __init__(self, k: int = 3, pad: int = 0, channels: int = 4, groups: int = 1) -> None:
        super().__init__()
        c = channels
        self.sq = nn.Sequential(nn.Conv2d(c, c, k, padding=pad, groups=groups, bias=False), nn.BatchNorm2d(c))
        self.ver = nn.Sequential(nn.Conv2d(c, c, (k, 1), padding=(pad, 0), groups=groups, bias=False),
                                 nn.BatchNorm2d(c))
        self.hor = nn.Sequential(nn.Conv2d(c, c, (1, k), padding=(0, pad), groups=groups, bias=False),
                                 nn.BatchNorm2d(c))
        self.cut = k // 2 - pad

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        c = self.cut
        return self.sq(x) + self.ver(x[:, :, :, c:-c]) + self.hor(x[:, :, c:-c, :])


@pytest.mark.parametrize(("k", "groups"), [(3, 1), (5, 1), (3, 2)])
def test_crop_branches_merge_into_one_conv(k: int, groups: int) -> None:
    fused = assert_reparametrizes(CroppedAC(k, 0, groups=groups), torch.randn(2, 4, 11, 9), expect_convs=1,
                                  expect_fused={"branch_sum": 1, "conv_bn": 3})
    assert fused.fxfuse_report.after.adds == 0


def test_crop_into_a_padded_axis_is_not_absorbed() -> None:
    class M(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.a = nn.Conv2d(4, 4, 3, padding=0)
            self.b = nn.Conv2d(4, 4, 3, padding=(0, 1))

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.a(x) + self.b(x[:, :, :, 1:-1])

    fused = assert_reparametrizes(M(), torch.randn(2, 4, 9, 9), expect_convs=2)
    report = fused.fxfuse_report
    assert report.rolled_back == []
    assert any(u.code is Reason.PADDING and "zero-pads axis 3" in u.reason for u in report.unfused), report


# --------------------------------------------------------------------------- affine through a permute
class ChannelsLastLinear(nn.Module):
    """Linear on channels-last activations → permute(0, 3, 1, 2) → BatchNorm2d → layer scale."""

    def __init__(self, c_in: int = 5, c: int = 6, dims: tuple = (0, 3, 1, 2)) -> None:
        super().__init__()
        self.fc = nn.Linear(c_in, c)
        self.bn = nn.BatchNorm2d(c)
        self.gamma = nn.Parameter(torch.randn(c))
        self.dims = dims

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.bn(self.fc(x).permute(*self.dims))
        return self.gamma.view(1, -1, 1, 1) * y


def test_bn_and_layer_scale_after_permute_fold_into_the_linear() -> None:
    fused = assert_reparametrizes(ChannelsLastLinear(), torch.randn(2, 7, 3, 5), expect_linears=1,
                                  expect_fused={"conv_bn": 2})
    assert [n.target for n in fused.graph.nodes if n.op == "call_method"] == ["permute"]


def test_permute_that_moves_another_axis_to_channels_is_not_folded() -> None:
    """After ``permute(0, 2, 1, 3)`` axis 1 is the Linear's input rows, not its features: no fold, reason given."""

    class M(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.fc, self.bn = nn.Linear(5, 6), nn.BatchNorm2d(7)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.bn(self.fc(x).permute(0, 2, 1, 3))

    fused = assert_reparametrizes(M(), torch.randn(2, 3, 7, 5), expect_batch_norms=1, expect_linears=1)
    assert fused.fxfuse_report.rolled_back == []
    assert fused.fxfuse_report.fused.get("conv_bn", 0) == 0


# ---------------------------------------------------------------------------------------- never silent
def _adjacent_pairs(gm: fx.GraphModule) -> List[fx.Node]:
    """Nodes of ``gm`` that are an affine right after a conv/linear, or a conv/linear right after an affine."""
    read = Reader(gm)
    found = []
    for node in gm.graph.nodes:
        aff = read.affine(node)
        if isinstance(aff, AffineRead) and (isinstance(read.conv(aff.input), ConvRead)
                                            or read.linear(aff.input) is not None):
            found.append(node)
        conv = read.conv(node)
        if isinstance(conv, ConvRead) and isinstance(read.affine(conv.input), AffineRead):
            found.append(node)
    return found


class Traps(nn.Module):
    """Pairs that must stay, each for a reason the report has to give."""

    def __init__(self) -> None:
        super().__init__()
        self.c1, self.bn1 = nn.Conv2d(3, 4, 3, padding=1), nn.BatchNorm2d(4)  # conv output also returned
        self.bn2, self.c2 = nn.BatchNorm2d(4), nn.Conv2d(4, 4, 3, padding=1)  # BN shift read by zero padding
        self.c3 = nn.Conv2d(4, 4, 1)
        self.register_buffer("cols", torch.randn(6))  # a per-column scale: not per channel

    def forward(self, x: torch.Tensor):
        a = self.c1(x)
        b = self.bn1(a)
        c = self.c2(self.bn2(torch.relu(b)))
        d = self.c3(c) * self.cols
        return a, d


@pytest.mark.parametrize("name", ["repvgg-tiny-zoo", "dbb", "mobileone-zoo", "traps"])
def test_every_pair_left_is_named_in_the_report(name: str) -> None:
    if name == "traps":
        model, x = models.randomize_batchnorm_(Traps(), 0).eval(), torch.randn(2, 3, 6, 6)
    else:
        model, x = _model(name), torch.randn(models.default_input_shape(name))
    fused = fxfuse.reparametrize(model, x)
    named = {u.node for u in fused.fxfuse_report.unfused}
    left = _adjacent_pairs(fused)
    assert all(n.name in named for n in left), (left, fused.fxfuse_report)
    if name == "traps":
        # the traps are real: pairs are left, and each of the three candidates is explained
        assert len(left) >= 2 and len(fused.fxfuse_report.unfused) >= 3


def test_failed_shape_propagation_prints_nothing(capfd: pytest.CaptureFixture) -> None:
    """torch.fx's ShapeProp prints a traceback before it re-raises; fxfuse reports the failure (a sub-module
    falls back, with the reason in the report) and keeps stderr clean."""
    from fxfuse.capture import Call, propagate_shapes

    class BadView(nn.Module):
        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return x.view(5, -1)

    gm = fx.symbolic_trace(BadView())
    with pytest.raises(RuntimeError):
        propagate_shapes(gm, Call((torch.randn(2, 3),), {}, None))
    out, err = capfd.readouterr()
    assert out == "" and err == "", err


# ------------------------------------------------------------------------ DBB pool branches, depthwise
@pytest.mark.parametrize("capture", ["auto", "export"])
def test_dbb_mobile_net_executes_exactly_its_plain_twin_ops(capture: str) -> None:
    """Depthwise DBB units with BN(avg_pool) branches (stride 1 and 2): no pool, BN or add is left."""
    model = models.randomize_batchnorm_(models.DBBMobileNet(widths=(8, 16, 16), strides=(1, 2, 1)), 0).eval()
    x = torch.randn(2, 3, 32, 32)
    fused = fxfuse.reparametrize(model, x, capture=capture)
    def compute(m: nn.Module) -> dict:  # (an exported graph also runs its input-shape guard: _assert, size)
        return {k: v for k, v in executed_ops(m, x).items() if k not in ("_assert", "size")}

    assert compute(fused) == compute(models.plain_twin(model)), fused.fxfuse_report
    assert fused.fxfuse_report.unfused == [] and fused.fxfuse_report.rolled_back == []
