"""Rule ``conv_bn``: conv / conv-transpose / linear → BN or per-channel constant affine ⇒ one layer
(docs/patterns.md, `conv_bn`)."""

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

from fxfuse import Reason

from _helpers import (
    assert_not_fired,
    assert_skipped,
    assert_wrong_rewrite_caught,
    budget,
    fuse_and_check,
    fused_counts,
    stats,
)

CONV = {1: nn.Conv1d, 2: nn.Conv2d, 3: nn.Conv3d}
CONV_T = {1: nn.ConvTranspose1d, 2: nn.ConvTranspose2d, 3: nn.ConvTranspose3d}
BN = {1: nn.BatchNorm1d, 2: nn.BatchNorm2d, 3: nn.BatchNorm3d}


@st.composite
def conv_bn_case(draw, transposed=False):
    ndim = draw(st.sampled_from([1, 2, 2, 3]))
    groups = draw(st.integers(1, 3))
    cin, cout = groups * draw(st.integers(1, 3)), groups * draw(st.integers(1, 3))
    k = draw(st.sampled_from([1, 2, 3, 5]))
    s, d = draw(st.integers(1, 2)), draw(st.integers(1, 2))
    p = draw(st.integers(0, 2))
    bias, affine = draw(st.booleans()), draw(st.booleans())
    eps = draw(st.sampled_from([1e-5, 1e-3, 0.1]))
    batch = draw(st.integers(1, 2))
    size = (d * (k - 1) + 1) + draw(st.integers(0, 6))
    if transposed:
        p = min(p, d * (k - 1) // 2)  # output size (L-1)s - 2p + d(k-1) + op + 1 stays positive
        op = draw(st.integers(0, max(0, min(s, d) - 1)))
        conv = CONV_T[ndim](cin, cout, k, s, p, op, groups, bias, d)
    else:
        conv = CONV[ndim](cin, cout, k, s, p, d, groups, bias)
    model = nn.Sequential(conv, BN[ndim](cout, eps=eps, affine=affine))
    return model, torch.randn(batch, cin, *([size] * ndim))


# ----------------------------------------------------------------------------------------- fused
@settings(max_examples=budget(15))  # the profile's 40 with --runslow
@given(conv_bn_case())
def test_conv_bn_any_geometry(case):
    model, x = case
    fused = fuse_and_check(model, x)
    assert stats(fused).convs == 1 and stats(fused).batch_norms == 0
    assert fused_counts(fused) == {"conv_bn": 1}


@settings(max_examples=budget(15))
@given(conv_bn_case(transposed=True))
def test_conv_transpose_bn_grouped(case):
    model, x = case
    fused = fuse_and_check(model, x)
    assert stats(fused).convs == 1 and stats(fused).batch_norms == 0
    assert fused_counts(fused) == {"conv_bn": 1}
    assert isinstance(next(m for m in fused.modules() if isinstance(m, nn.modules.conv._ConvNd)),
                      nn.modules.conv._ConvTransposeNd)


def test_grouped_transposed_conv_scales_its_own_output_channels():
    """groups=2, C_in=4, C_out=6: the output channel of weight ``W[i, j]`` is ``group(i)·3 + j``."""
    model = nn.Sequential(nn.ConvTranspose2d(4, 6, 3, 2, 1, 1, groups=2), nn.BatchNorm2d(6))
    fused = fuse_and_check(model, torch.randn(2, 4, 5, 5))
    assert fused_counts(fused) == {"conv_bn": 1} and stats(fused).batch_norms == 0


class FunctionalConvBN(nn.Module):
    """What tracing through a non-torch.nn module looks like: F.conv2d / F.batch_norm on get_attr tensors, plus
    shape-assertion users of the intermediate (which must not block the fold)."""

    def __init__(self, cin=4, cout=6, groups=2):
        super().__init__()
        self.weight = nn.Parameter(torch.randn(cout, cin // groups, 3, 3))
        self.register_buffer("running_mean", torch.randn(cout))
        self.register_buffer("running_var", torch.rand(cout) + 0.5)
        self.gamma = nn.Parameter(torch.randn(cout))
        self.beta = nn.Parameter(torch.randn(cout))
        self.groups = groups

    def forward(self, x):
        y = F.conv2d(x, self.weight, None, 1, 1, 1, self.groups)
        torch._assert(y.ndim == 4, "expected NCHW")
        return F.relu(F.batch_norm(y, self.running_mean, self.running_var, self.gamma, self.beta, False, 0.1, 1e-4))


def test_functional_conv_bn_with_shape_assert():
    fused = fuse_and_check(FunctionalConvBN(), torch.randn(2, 4, 9, 9))
    assert fused_counts(fused)["conv_bn"] == 1
    assert stats(fused).batch_norms == 0 and stats(fused).convs == 1


class FrozenBN(nn.Module):
    """torchvision-style FrozenBatchNorm2d: buffers combined into x * scale + shift."""

    def __init__(self, c):
        super().__init__()
        for name, v in (("weight", torch.randn(c)), ("bias", torch.randn(c)), ("running_mean", torch.randn(c)),
                        ("running_var", torch.rand(c) + 0.5)):
            self.register_buffer(name, v)

    def forward(self, x):
        scale = self.weight * (self.running_var + 1e-5).rsqrt()
        shift = self.bias - self.running_mean * scale
        return x * scale.reshape(1, -1, 1, 1) + shift.reshape(1, -1, 1, 1)


def test_frozen_bn_constant_subgraph_folds(capture):
    model = nn.Sequential(nn.Conv2d(3, 5, 3, padding=1), FrozenBN(5), nn.ReLU())
    fused = fuse_and_check(model, torch.randn(2, 3, 8, 8))
    counts = fused_counts(fused)
    # Symbolic tracing evaluates the buffer-only scale and shift while tracing; the ATen graph holds their
    # sub-graphs, which fold_constants turns into one constant each before conv_bn reads them.
    assert counts.pop("fold_constants", 0) == (2 if capture == "export" else 0)
    assert counts == {"conv_bn": 2}  # the mul, then the add
    assert stats(fused).nodes == 2  # conv, relu


def test_linear_bn1d():
    model = nn.Sequential(nn.Flatten(), nn.Linear(12, 7), nn.BatchNorm1d(7), nn.ReLU())
    fused = fuse_and_check(model, torch.randn(4, 3, 2, 2), second=torch.randn(3, 3, 2, 2))
    assert fused_counts(fused) == {"conv_bn": 1} and stats(fused).batch_norms == 0


def test_linear_then_per_feature_scale_on_3d_output():
    class M(nn.Module):
        def __init__(self):
            super().__init__()
            self.fc = nn.Linear(6, 5)
            self.register_buffer("gamma", torch.randn(5))

        def forward(self, x):  # x: [B, T, 6]; the scale acts on the last (feature) axis
            return self.fc(x) * self.gamma

    fused = fuse_and_check(M(), torch.randn(2, 3, 6))
    assert fused_counts(fused) == {"conv_bn": 1}


class SharedConv(nn.Module):
    """One conv module called at two sites, each followed by its own BN."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(4, 4, 3, padding=1)
        self.bn1, self.bn2 = nn.BatchNorm2d(4), nn.BatchNorm2d(4)

    def forward(self, x):
        return self.bn2(self.conv(torch.relu(self.bn1(self.conv(x)))))


def test_shared_conv_gets_a_copy_per_call_site():
    fused = fuse_and_check(SharedConv(), torch.randn(2, 4, 6, 6))
    assert fused_counts(fused) == {"conv_bn": 2} and stats(fused).batch_norms == 0
    convs = [m for m in fused.modules() if isinstance(m, nn.Conv2d)]
    assert len(convs) == 2 and not torch.equal(convs[0].weight, convs[1].weight)


def test_sync_batchnorm_in_eval_folds():
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.SyncBatchNorm(4), nn.ReLU())
    fused = fuse_and_check(model, torch.randn(2, 3, 6, 6))
    assert fused_counts(fused) == {"conv_bn": 1} and stats(fused).batch_norms == 0


def test_lazy_modules_once_materialized():
    model = nn.Sequential(nn.LazyConv2d(4, 3), nn.LazyBatchNorm2d())
    model(torch.randn(1, 3, 6, 6))  # materialize
    fused = fuse_and_check(model, torch.randn(2, 3, 6, 6))
    assert fused_counts(fused) == {"conv_bn": 1}


class TiedWeights(nn.Module):
    """Two convs sharing one weight Parameter, each followed by its own BN."""

    def __init__(self):
        super().__init__()
        self.a, self.b = nn.Conv2d(3, 3, 3, padding=1), nn.Conv2d(3, 3, 3, padding=1)
        self.b.weight = self.a.weight
        self.bn_a, self.bn_b = nn.BatchNorm2d(3), nn.BatchNorm2d(3)

    def forward(self, x):
        return self.bn_a(self.a(x)) + self.b(torch.relu(self.bn_b(self.b(x))))


def test_tied_parameters_are_copied_not_mutated(capture):
    import fxfuse

    model = TiedWeights().double().eval()
    fused = fuse_and_check(model, torch.randn(2, 3, 5, 5))  # equal, and the checker's copy left untouched
    assert fused_counts(fused)["conv_bn"] == 2 and stats(fused).batch_norms == 0
    fxfuse.reparametrize(model, torch.randn(2, 3, 5, 5, dtype=torch.float64), capture=capture)
    assert model.a.weight is model.b.weight  # the input model keeps its tie


# ----------------------------------------------------------------------------------- must NOT fold
def test_bn_without_running_stats_is_not_folded():
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4, track_running_stats=False))
    fused = fuse_and_check(model, torch.randn(3, 3, 6, 6))
    assert stats(fused).batch_norms == 1
    assert_skipped(fused, "conv_bn", Reason.BATCH_STATISTICS, "running statistics")


class ConvOutputAlsoReturned(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv, self.bn = nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4)

    def forward(self, x):
        y = self.conv(x)
        return self.bn(y), y  # the pre-BN feature map is a second output


def test_conv_with_other_user_is_not_folded():
    fused = fuse_and_check(ConvOutputAlsoReturned(), torch.randn(2, 3, 7, 7))
    assert stats(fused).batch_norms == 1
    assert_skipped(fused, "conv_bn", Reason.OTHER_USERS, "other users")


def test_training_mode_functional_bn_is_not_folded():
    class M(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = nn.Conv2d(3, 4, 1)

        def forward(self, x):
            return F.batch_norm(self.conv(x), None, None, training=True)

    fused = fuse_and_check(M(), torch.randn(4, 3, 5, 5))
    assert stats(fused).batch_norms == 1
    assert_skipped(fused, "conv_bn", Reason.BATCH_STATISTICS, "batch statistics")


def test_bn_with_statistics_computed_from_the_input_is_not_folded():
    """Running statistics that are not constants of the graph (here computed from the conv's output): the BN is
    not a fixed affine, and the skip says ``not_constant`` (what ``capture="auto"`` reads to try export)."""
    class M(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = nn.Conv2d(3, 4, 1)

        def forward(self, x):
            y = self.conv(x)
            return F.batch_norm(y, y.mean((0, 2, 3)).detach(), y.var((0, 2, 3)).detach() + 1.0, training=False)

    fused = fuse_and_check(M(), torch.randn(2, 3, 5, 5))
    assert stats(fused).batch_norms == 1
    assert_skipped(fused, "conv_bn", Reason.NOT_CONSTANT, "non-constant")


def test_broadcasting_constant_is_not_a_per_channel_affine():
    class M(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = nn.Conv2d(3, 4, 1)
            self.register_buffer("pos", torch.randn(1, 1, 5, 5))  # varies over space: not per channel

        def forward(self, x):
            return self.conv(x) + self.pos

    fused = fuse_and_check(M(), torch.randn(2, 3, 5, 5))
    assert_not_fired(fused, "conv_bn")
    assert stats(fused).adds == 1


@pytest.mark.fixed_capture("symbolic: the hooked module is opaque; export: the hook is inlined")
def test_module_with_forward_hook_is_opaque():
    """A hook can change what the module returns: such a module is not read as a plain conv."""
    hooked = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4))
    hooked[0].register_forward_hook(lambda m, i, o: o * 3)
    fused = fuse_and_check(hooked, torch.randn(1, 3, 6, 6), capture="symbolic")
    assert stats(fused).batch_norms == 1
    assert_not_fired(fused, "conv_bn")
    # torch.export runs the hook: the graph is conv → ·3 → BN, two per-channel affines that both fold.
    fused = fuse_and_check(hooked, torch.randn(1, 3, 6, 6), capture="export")
    assert fused_counts(fused) == {"conv_bn": 2} and stats(fused).batch_norms == 0 and stats(fused).nodes == 1


def test_scale_along_a_non_channel_axis_is_not_folded():
    """``conv(x) * c`` with ``c`` of shape ``[W]`` scales columns, not channels."""
    class M(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = nn.Conv2d(3, 5, 1)
            self.register_buffer("c", torch.randn(5))

        def forward(self, x):
            return self.conv(x) * self.c

    fused = fuse_and_check(M(), torch.randn(2, 3, 5, 5))
    assert_skipped(fused, "conv_bn", Reason.AXIS, "not along its output channels")


# ---------------------------------------------------------------------------------------- errors
def test_wrong_fold_is_rolled_back_and_fails_the_checker(monkeypatch):
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.ReLU(), nn.Conv2d(4, 4, 1), nn.BatchNorm2d(4))
    fused = assert_wrong_rewrite_caught(monkeypatch, "conv_bn", model, torch.randn(2, 3, 6, 6))
    assert stats(fused).batch_norms == 2


def test_error_unknown_rule_name():
    with pytest.raises(ValueError, match="unknown rule"):
        fuse_and_check(nn.Sequential(nn.Conv2d(1, 1, 1), nn.BatchNorm2d(1)), torch.randn(1, 1, 2, 2),
                       disable=["no_such_rule"])
