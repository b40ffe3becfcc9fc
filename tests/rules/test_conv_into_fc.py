"""Rule ``conv_into_fc``: a conv on a fixed-size input is a matrix — summed with an FC over the same rows (RepMLP's
local perceptrons), or flattened straight into a Linear, it becomes one FC (docs/patterns.md, `conv_into_fc`).
Every fused case has an unfusable twin asserting the skip code; both captures run (tests/rules/conftest.py)."""

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

from fxfuse import Reason
from fxfuse.models import RepMLPBlock, RepMLPNet, randomize_batchnorm_, repmlp_deploy
from fxfuse.testing import op_counts

from _helpers import assert_skipped, assert_wrong_rewrite_caught, budget, fuse_and_check, fused_counts


class FcPlusConv(nn.Module):
    """``fc(X.reshape(N, C·p·p)).reshape(N, O, p', p') + bn(conv(X))``: the FC as a Linear (``spelling="linear"``)
    or as a 1x1 conv of ``fc_groups`` on ``X.reshape(N, C·p·p, 1, 1)`` (``"fc_conv"``, RepMLP's code); the conv
    reads ``x`` itself (``view=False``) or ``x.reshape(-1, C, p, p)`` (``view=True``, literal sizes)."""

    def __init__(self, c: int, o: int, p: int, k: int, pad: int, stride: int, bn: bool, spelling: str,
                 view: bool, fc_groups: int = 1, conv_groups: int = 1, permuted: bool = False,
                 relu: bool = False) -> None:
        super().__init__()
        self.c, self.o, self.p, self.view, self.spelling = c, o, p, view, spelling
        self.q = (p + 2 * pad - k) // stride + 1
        self.conv = nn.Conv2d(c, o, k, stride, pad, groups=conv_groups, bias=not bn)
        self.bn = nn.BatchNorm2d(o) if bn else nn.Identity()
        f_in, f_out = c * p * p, o * self.q * self.q
        self.fc = (nn.Linear(f_in, f_out) if spelling == "linear"
                   else nn.Conv2d(f_in, f_out, 1, groups=fc_groups))
        self.permuted, self.relu = permuted, relu

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        rows = x.permute(0, 2, 3, 1) if self.permuted else x  # NHWC flatten: another element order
        if self.spelling == "linear":
            y = self.fc(rows.reshape(-1, self.c * self.p * self.p))
        else:
            y = self.fc(rows.reshape(-1, self.c * self.p * self.p, 1, 1))
        y = y.reshape(-1, self.o, self.q, self.q)
        z = self.bn(self.conv(x.reshape(-1, self.c, self.p, self.p) if self.view else x))
        return y + (torch.relu(z) if self.relu else z)


@st.composite
def sums(draw):
    spelling = draw(st.sampled_from(["linear", "fc_conv"]))
    fc_groups = draw(st.sampled_from([1, 2])) if spelling == "fc_conv" else 1
    conv_groups = draw(st.sampled_from([1, 2]))
    lcm = 2 if 2 in (fc_groups, conv_groups) else 1
    c, o = lcm * draw(st.integers(1, 3)), lcm * draw(st.integers(1, 3))
    p, k = draw(st.integers(2, 5)), draw(st.sampled_from([1, 3, 5]))
    view = draw(st.booleans())
    # a conv reading x itself is pinned by the FC side only when it keeps the size (stride 1, padding k//2)
    pad = draw(st.sampled_from([0, k // 2])) if view else k // 2
    stride = draw(st.sampled_from([1, 2])) if view else 1
    if (p + 2 * pad - k) < 0:
        pad = k // 2
    return FcPlusConv(c, o, p, k, pad, stride, draw(st.booleans()), spelling, view, fc_groups, conv_groups), p


# ----------------------------------------------------------------------------------------- fused: sum
@settings(max_examples=budget(8))
@given(sums())
def test_fc_plus_conv_is_one_fc(case):
    model, p = case
    f_in, f_out = model.c * p * p, model.o * model.q ** 2
    fc_groups = 1 if model.spelling == "linear" else model.fc.groups
    groups = 1 if model.spelling == "linear" else torch.gcd(torch.tensor(fc_groups),
                                                            torch.tensor(model.conv.groups)).item()
    conv_macs = model.conv.weight.numel() * model.q ** 2
    merges = f_out * f_in // groups <= f_out * f_in // fc_groups + conv_macs
    fused = fuse_and_check(model, torch.randn(3, model.c, p, p))
    report = fused.fxfuse_report
    assert not report.rolled_back
    counts = op_counts(fused)
    if merges:
        assert fused_counts(fused).get("conv_into_fc") == 1, report
        assert counts["batch_norm"] == 0 and counts["conv"] == (model.spelling == "fc_conv"), counts
        assert counts["linear"] == (model.spelling == "linear"), counts
    else:
        assert_skipped(fused, "conv_into_fc", Reason.MORE_WORK, "multiply-adds")
        assert counts["conv"] == 1 + (model.spelling == "fc_conv"), counts


def test_repmlp_block_keeps_only_the_fc():
    """The reference block (1x1 and 3x3 local perceptrons, fc_groups=2, 2x2 partitions with the global
    perceptron): every conv and BN folds into ``fc3`` (one grouped 1x1 conv) — the authors' deploy form."""
    block = RepMLPBlock(4, 4, 8, 8, 4, 4, (1, 3), globalperceptron_reduce=2, fc_groups=2)
    fused = fuse_and_check(block, torch.randn(2, 4, 8, 8), expect_batch_norms=0)
    counts, deploy_counts = op_counts(fused), op_counts(repmlp_deploy(block).eval())
    assert (counts["conv"], counts["linear"], counts["batch_norm"]) == (1, 2, 0), counts
    assert counts == deploy_counts
    assert fused_counts(fused)["conv_into_fc"] == 2  # the local perceptrons into fc3; the pool BN into fc1


def test_repmlp_deploy_is_the_authors_conversion():
    """The hand-written deploy form (conv on an identity tensor) computes the training form."""
    torch.manual_seed(0)
    net = randomize_batchnorm_(RepMLPNet(size=32, channels=8, partition=4, depth=2, fc_groups=2), 0).double().eval()
    x = torch.randn(2, 3, 32, 32, dtype=torch.float64)
    torch.testing.assert_close(repmlp_deploy(net)(x), net(x), rtol=1e-12, atol=1e-12)


# ----------------------------------------------------------------------------------------- sum: must NOT fold
def test_nonlinearity_between_stays():
    fused = fuse_and_check(FcPlusConv(2, 2, 4, 3, 1, 1, True, "linear", False, relu=True), torch.randn(2, 2, 4, 4))
    assert_skipped(fused, "conv_into_fc", Reason.NOT_LINEAR, "not a linear map")
    assert op_counts(fused)["conv"] == 1


def test_other_element_order_stays():
    """The FC reads ``x`` in NHWC order, the conv in NCHW: the same elements, other rows."""
    fused = fuse_and_check(FcPlusConv(2, 3, 3, 3, 1, 1, True, "linear", False, permuted=True),
                           torch.randn(2, 2, 3, 3))
    assert_skipped(fused, "conv_into_fc", Reason.VIEW_ORDER, "different element orders")


class ReturnsConv(FcPlusConv):
    def forward(self, x: torch.Tensor):
        z = self.bn(self.conv(x))
        return self.fc(x.reshape(-1, self.c * self.p * self.p)).reshape(-1, self.o, self.q, self.q) + z, z


def test_conv_with_other_user_stays():
    fused = fuse_and_check(ReturnsConv(2, 2, 4, 3, 1, 1, True, "linear", False), torch.randn(2, 2, 4, 4))
    assert op_counts(fused)["conv"] == 1 and not fused.fxfuse_report.rolled_back
    assert fused_counts(fused).get("conv_into_fc", 0) == 0


class FollowsConvShape(nn.Module):
    """``conv(x) + fc(x.flatten(1)).reshape_as(conv(x))``: nothing in the traced graph fixes x's spatial size — a
    4x8 model also runs on 8x4 inputs (the FC only needs C·H·W), where the conv's 4x8 matrix would be wrong. An
    exported graph is specialized (and guarded) to 4x8: there it folds."""

    def __init__(self) -> None:
        super().__init__()
        self.conv, self.fc = nn.Conv2d(2, 3, 3, padding=1), nn.Linear(2 * 32, 3 * 32)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        z = self.conv(x)
        return z + self.fc(x.flatten(1)).reshape_as(z)


# --------------------------------------------------------------------------------------- fused: chain
class ConvIntoFc(nn.Module):
    """``fc(bn(conv(x.reshape(-1, C, p, p))).flatten(1))`` (``view=False``: the conv reads ``x`` itself)."""

    def __init__(self, c: int, o: int, p: int, k: int, pad: int, stride: int, groups: int, bn: bool, f2: int,
                 view: bool = True, relu: bool = False) -> None:
        super().__init__()
        self.c, self.p, self.view, self.relu = c, p, view, relu
        self.conv = nn.Conv2d(c, o, k, stride, pad, groups=groups, bias=not bn)
        self.bn = nn.BatchNorm2d(o) if bn else nn.Identity()
        q = (p + 2 * pad - k) // stride + 1
        self.fc = nn.Linear(o * q * q, f2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        z = self.bn(self.conv(x.reshape(-1, self.c, self.p, self.p) if self.view else x))
        return self.fc((torch.relu(z) if self.relu else z).flatten(1))


@st.composite
def chains(draw):
    groups = draw(st.sampled_from([1, 2]))
    c, o = groups * draw(st.integers(1, 3)), groups * draw(st.integers(1, 3))
    p, k = draw(st.integers(2, 5)), draw(st.sampled_from([1, 3]))
    pad, stride = draw(st.sampled_from([0, k // 2])), draw(st.sampled_from([1, 2]))
    if p + 2 * pad < k:
        pad = k // 2
    return ConvIntoFc(c, o, p, k, pad, stride, groups, draw(st.booleans()), draw(st.integers(1, 6))), c, p


@settings(max_examples=budget(8))
@given(chains())
def test_conv_flattened_into_fc_is_one_linear(case):
    model, c, p = case
    q = (p + 2 * model.conv.padding[0] - model.conv.kernel_size[0]) // model.conv.stride[0] + 1
    f2, f_mid = model.fc.out_features, model.fc.in_features
    merges = f2 * c * p * p <= model.conv.weight.numel() * q * q + f2 * f_mid
    fused = fuse_and_check(model, torch.randn(3, c, p, p))
    counts = op_counts(fused)
    if merges:
        assert fused_counts(fused).get("conv_into_fc") == 1, fused.fxfuse_report
        assert (counts["conv"], counts["batch_norm"], counts["linear"]) == (0, 0, 1), counts
    else:
        assert_skipped(fused, "conv_into_fc", Reason.MORE_WORK, "multiply-adds")
        assert counts["conv"] == 1


# ----------------------------------------------------------------------------------------- chain: must NOT fold
def test_chain_nonlinearity_between_stays():
    fused = fuse_and_check(ConvIntoFc(2, 2, 4, 3, 1, 1, 1, True, 3, relu=True), torch.randn(2, 2, 4, 4))
    assert_skipped(fused, "conv_into_fc", Reason.NOT_LINEAR, "not a linear map")
    assert op_counts(fused)["conv"] == 1


@pytest.mark.parametrize("make", [FollowsConvShape, lambda: _unviewed()], ids=["sum", "chain"])
def test_spatial_size_not_fixed_stays(capture, make):
    """``conv(x) + fc(x.flatten(1)).reshape_as(…)`` and ``fc(conv(x).flatten(1))`` on a 4x8 input also run on 8x4:
    the traced graph does not fix what the conv sees. The exported program checks its input's static shape on
    every call (its input guard): there it folds."""
    x = torch.randn(2, 2, 4, 8)
    if capture == "export":
        fused = fuse_and_check(make(), x)
        assert fused_counts(fused)["conv_into_fc"] == 1 and op_counts(fused)["conv"] == 0
        return
    fused = fuse_and_check(make(), x, second=torch.randn(2, 2, 8, 4))  # the original runs on 8x4
    assert_skipped(fused, "conv_into_fc", Reason.SPATIAL_SIZE, "fixes the spatial size")
    assert op_counts(fused)["conv"] == 1


def _unviewed() -> nn.Module:
    model = ConvIntoFc(2, 2, 4, 3, 1, 1, 1, True, 3, view=False)
    model.fc = nn.Linear(2 * 32, 3)  # a 4x8 map
    return model


def test_chain_never_builds_the_conv_matrix(monkeypatch):
    """A small classifier (conv on a 28x28 map, flattened into a 10-way Linear): the merged Linear is small, the
    conv's matrix is not (C_out·784 × C_in·784; 20 GB for 64 channels). The chain is composed through the conv's
    adjoint (``folds.linear_after_conv``), never through the matrix."""
    import fxfuse.ir.folds as folds

    def refuse(*args, **kwargs):
        raise AssertionError("conv_as_matrix called for a chain")

    monkeypatch.setattr(folds, "conv_as_matrix", refuse)
    model = ConvIntoFc(1, 16, 28, 3, 1, 1, 1, True, 10)  # 12544 features into the FC
    fused = fuse_and_check(model, torch.randn(2, 1 * 28 * 28))
    assert fused_counts(fused).get("conv_into_fc") == 1, fused.fxfuse_report
    assert op_counts(fused)["conv"] == 0


class ConvFlatBnFc(nn.Module):
    """``fc(bn1d(conv(x.reshape(-1, 2, 5, 5)).flatten(1)))``: a per-feature affine between the view and the FC."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(2, 3, 3, padding=1)
        self.bn = nn.BatchNorm1d(3 * 25)
        self.fc = nn.Linear(3 * 25, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.bn(self.conv(x.reshape(-1, 2, 5, 5)).flatten(1)))


def test_chain_with_an_affine_after_the_view_is_one_linear():
    model = randomize_batchnorm_(ConvFlatBnFc(), 3).eval()
    fused = fuse_and_check(model, torch.randn(3, 50))
    counts = op_counts(fused)
    assert (counts["conv"], counts["batch_norm"], counts["linear"]) == (0, 0, 1), fused.fxfuse_report


def test_chain_more_work_stays():
    """A channel-reducing 1x1 conv before a wide FC: the merged Linear on the input would do more."""
    fused = fuse_and_check(ConvIntoFc(8, 1, 4, 1, 0, 1, 1, True, 64), torch.randn(2, 8, 4, 4))
    assert_skipped(fused, "conv_into_fc", Reason.MORE_WORK, "multiply-adds")


# ---------------------------------------------------------------------------------------------- errors
def test_wrong_fold_is_rolled_back_and_fails_the_checker(monkeypatch):
    model = FcPlusConv(2, 2, 4, 3, 1, 1, True, "linear", True)
    fused = assert_wrong_rewrite_caught(monkeypatch, "conv_into_fc", model, torch.randn(2, 2, 4, 4))
    assert op_counts(fused)["conv"] == 1


@pytest.mark.fixed_capture("checks the fused graph under both captures itself")
def test_both_captures_fuse_the_block_alike():
    block = RepMLPBlock(4, 4, 4, 4, 4, 4, (1, 3), fc_groups=1)
    for capture in ("symbolic", "export"):
        fused = fuse_and_check(block, torch.randn(2, 4, 4, 4), capture=capture)
        assert op_counts(fused)["conv"] == 1 and op_counts(fused)["batch_norm"] == 0, capture


class AuthorsInPlace(RepMLPBlock):
    """The reference code's spelling: ``conv_out = 0; conv_out += branch(x)`` and ``fc3_out += conv_out`` (in place,
    on a view of ``fc3_bn``'s output; exported, each reshape of the permuted partitions is its own ``clone``)."""

    def forward(self, inputs: torch.Tensor) -> torch.Tensor:
        partitions = self.partitions(inputs)
        fc3_out = self.fc3(partitions.reshape(-1, self.C * self.h * self.w, 1, 1))
        fc3_out = self.fc3_bn(fc3_out.reshape(-1, self.O * self.h * self.w))
        fc3_out = fc3_out.reshape(-1, self.h_parts, self.w_parts, self.O, self.h, self.w)
        conv_inputs = partitions.reshape(-1, self.C, self.h, self.w)
        conv_out = 0
        for k in self.reparam_conv_k:
            conv_out += getattr(self, f"repconv{k}")(conv_inputs)
        fc3_out += conv_out.reshape(-1, self.h_parts, self.w_parts, self.O, self.h, self.w)
        return fc3_out.permute(0, 3, 1, 4, 2, 5).reshape(-1, self.O, self.H, self.W)


def test_authors_in_place_spelling_keeps_only_the_fc():
    fused = fuse_and_check(AuthorsInPlace(4, 4, 8, 8, 4, 4, (1, 3), 2, 2), torch.randn(2, 4, 8, 8))
    counts = op_counts(fused)
    assert (counts["conv"], counts["batch_norm"]) == (1, 0), counts
    assert fused_counts(fused)["conv_into_fc"] == 2
