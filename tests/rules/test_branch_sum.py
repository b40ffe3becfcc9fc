"""Rule ``branch_sum``: Σ parallel branches on one input ⇒ one conv, with every add spelling and the traps
(docs/patterns.md, `branch_sum`)."""


import pytest
import torch
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

SPELLINGS = ["a+b", "b+a", "iadd", "torch.add", "Tensor.add", "alpha", "sub"]


def combine(a, b, how):
    if how == "a+b":
        return a + b
    if how == "b+a":
        return b + a
    if how == "iadd":
        a += b
        return a
    if how == "torch.add":
        return torch.add(a, b)
    if how == "Tensor.add":
        return a.add(b)
    if how == "alpha":
        return torch.add(a, b, alpha=0.5)
    return a - b


class MultiBranch(nn.Module):
    """Σ of branches, each kind in {conv-BN kxk, conv-BN 1x1, BN identity, bare identity, avg-pool}."""

    def __init__(self, c_in, c_out, kinds, k, stride, groups, spellings, dilation=1):
        super().__init__()
        self.kinds, self.spellings = kinds, spellings
        self.branches = nn.ModuleList()
        for kind in kinds:
            if kind == "conv":
                pad = dilation * (k - 1) // 2
                self.branches.append(nn.Sequential(nn.Conv2d(c_in, c_out, k, stride, pad, dilation, groups, False),
                                                   nn.BatchNorm2d(c_out)))
            elif kind == "conv1x1":
                self.branches.append(nn.Sequential(nn.Conv2d(c_in, c_out, 1, stride, 0, 1, groups),
                                                   nn.BatchNorm2d(c_out)))
            elif kind == "bn":
                self.branches.append(nn.BatchNorm2d(c_in))
            elif kind == "avg":
                self.branches.append(nn.AvgPool2d(3, stride, 1))
            else:
                self.branches.append(nn.Identity())

    def forward(self, x):
        out = self.branches[0](x)
        for branch, how in zip(list(self.branches)[1:], self.spellings):
            out = combine(out, branch(x), how)
        return torch.relu(out)


@st.composite
def multi_branch(draw):
    groups = draw(st.integers(1, 3))
    per_group = draw(st.integers(1, 3))
    c = groups * per_group
    stride = draw(st.sampled_from([1, 1, 2]))
    k = draw(st.sampled_from([1, 3, 5]))
    dilation = draw(st.sampled_from([1, 1, 2])) if k > 1 else 1
    options = ["conv", "conv1x1", "avg"] + (["bn", "identity"] if stride == 1 else [])
    extra = draw(st.lists(st.sampled_from(options), min_size=1, max_size=3))
    if "avg" in extra:  # a 3x3 pool only merges for free into a kernel that already covers 3x3
        k, dilation = max(k, 3), 1
    kinds = ["conv"] + extra
    kinds = draw(st.permutations(kinds))
    spellings = [draw(st.sampled_from(SPELLINGS)) for _ in kinds[1:]]
    if kinds[0] in ("identity", "bn") and "iadd" in spellings[:1]:
        spellings[0] = "a+b"  # `x += ...` would mutate the block input itself
    size = draw(st.integers(5, 9))
    model = MultiBranch(c, c, kinds, k, stride, groups, spellings, dilation)
    return model, torch.randn(draw(st.integers(1, 2)), c, size, size), kinds


# ----------------------------------------------------------------------------------------- fused
@settings(max_examples=budget(15))  # the profile's 40 with --runslow
@given(multi_branch())
def test_any_branch_set_becomes_one_conv(case):
    model, x, kinds = case
    fused = fuse_and_check(model, x, second=torch.randn(3, *x.shape[1:]))
    s = stats(fused)
    assert s.convs == 1 and s.batch_norms == 0 and s.adds == 0 and s.pools == 0, (kinds, fused.code)
    assert fused_counts(fused)["branch_sum"] >= 1


class ACBlock(nn.Module):
    """ACNet: kxk + 1xk + kx1, each conv-BN."""

    def __init__(self, c, k=3, stride=1):
        super().__init__()
        self.square = nn.Sequential(nn.Conv2d(c, c, k, stride, k // 2, bias=False), nn.BatchNorm2d(c))
        self.hor = nn.Sequential(nn.Conv2d(c, c, (1, k), stride, (0, k // 2), bias=False), nn.BatchNorm2d(c))
        self.ver = nn.Sequential(nn.Conv2d(c, c, (k, 1), stride, (k // 2, 0), bias=False), nn.BatchNorm2d(c))

    def forward(self, x):
        return self.square(x) + self.hor(x) + self.ver(x)


@pytest.mark.parametrize(("k", "stride"), [(3, 1), (5, 2)])
def test_asymmetric_kernels(k, stride):
    fused = fuse_and_check(ACBlock(4, k, stride), torch.randn(2, 4, 10, 10))
    assert stats(fused).convs == 1 and stats(fused).batch_norms == 0


class MixedGrid(nn.Module):
    """5x5 + dilated 3x3 (d=2, same footprint) + 1x1: taps on one grid."""

    def __init__(self):
        super().__init__()
        self.a = nn.Conv2d(3, 4, 5, padding=2)
        self.b = nn.Conv2d(3, 4, 3, padding=2, dilation=2)
        self.c = nn.Conv2d(3, 4, 1)

    def forward(self, x):
        return self.a(x) + self.b(x) + self.c(x)


def test_mixed_dilation_on_one_grid():
    fused = fuse_and_check(MixedGrid(), torch.randn(1, 3, 9, 9))
    conv = next(m for m in fused.modules() if isinstance(m, nn.Conv2d))
    assert stats(fused).convs == 1 and conv.kernel_size == (5, 5) and conv.dilation == (1, 1)


class DilatedOnly(nn.Module):
    def __init__(self):
        super().__init__()
        self.a = nn.Conv2d(3, 4, 3, padding=2, dilation=2)
        self.b = nn.Conv2d(3, 4, 1)

    def forward(self, x):
        return self.a(x) + self.b(x)


def test_dilated_merge_keeps_dilation():
    fused = fuse_and_check(DilatedOnly(), torch.randn(1, 3, 9, 9))
    conv = next(m for m in fused.modules() if isinstance(m, nn.Conv2d))
    assert conv.kernel_size == (3, 3) and conv.dilation == (2, 2)


class GroupedPlusIdentity(nn.Module):
    """Grouped 3x3 + identity: the Dirac kernel must be W[o, o mod (C/g), centre] = 1
    (docs/patterns.md, `branch_sum`)."""

    def __init__(self, c=6, groups=3):
        super().__init__()
        self.conv = nn.Conv2d(c, c, 3, padding=1, groups=groups)

    def forward(self, x):
        return x + self.conv(x)


def test_grouped_identity_kernel():
    fused = fuse_and_check(GroupedPlusIdentity(), torch.randn(2, 6, 5, 5))
    conv = next(m for m in fused.modules() if isinstance(m, nn.Conv2d))
    assert conv.groups == 3 and stats(fused).adds == 0


class PartialSum(nn.Module):
    """conv(x) + conv1x1(x) + y (y from elsewhere): the two convs merge, y stays added."""

    def __init__(self):
        super().__init__()
        self.a, self.b, self.c = nn.Conv2d(3, 4, 3, padding=1), nn.Conv2d(3, 4, 1), nn.Conv2d(3, 4, 3, padding=1)

    def forward(self, x):
        y = torch.relu(self.c(x))
        return self.a(x) + y + self.b(x)


def test_partial_merge_keeps_other_terms():
    fused = fuse_and_check(PartialSum(), torch.randn(2, 3, 6, 6))
    assert stats(fused).convs == 2 and stats(fused).adds == 1


# ----------------------------------------------------------------------------- must NOT merge
class Misaligned(nn.Module):
    """3x3/p1 and 2x2/p0 at stride 2 give equal output sizes on even inputs but read different windows."""

    def __init__(self):
        super().__init__()
        self.a, self.b = nn.Conv2d(3, 4, 3, 2, 1), nn.Conv2d(3, 4, 2, 2, 0)

    def forward(self, x):
        return self.a(x) + self.b(x)


def test_misaligned_taps_stay_unfused():
    fused = fuse_and_check(Misaligned(), torch.randn(2, 3, 8, 8))
    assert stats(fused).convs == 2
    assert_skipped(fused, "branch_sum", Reason.TAP_GRID, "tap grid")


class ReluOnBranch(nn.Module):
    def __init__(self):
        super().__init__()
        self.a, self.b = nn.Conv2d(3, 3, 3, padding=1), nn.Conv2d(3, 3, 1)

    def forward(self, x):
        return self.a(x) + torch.relu(self.b(x))


def test_nonlinear_branch_stays():
    fused = fuse_and_check(ReluOnBranch(), torch.randn(2, 3, 5, 5))
    assert stats(fused).convs == 2 and stats(fused).adds == 1
    assert_not_fired(fused, "branch_sum")


class BranchAlsoReturned(nn.Module):
    def __init__(self):
        super().__init__()
        self.a, self.b = nn.Conv2d(3, 3, 3, padding=1), nn.Conv2d(3, 3, 1)

    def forward(self, x):
        y = self.b(x)
        return self.a(x) + y, y


def test_branch_with_other_user_stays_separate():
    fused = fuse_and_check(BranchAlsoReturned(), torch.randn(2, 3, 5, 5))
    assert stats(fused).convs == 2 and stats(fused).adds == 1
    assert_not_fired(fused, "branch_sum")


class BatchStatBranch(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv, self.bn = nn.Conv2d(3, 3, 3, padding=1), nn.BatchNorm2d(3, track_running_stats=False)

    def forward(self, x):
        return self.conv(x) + self.bn(x)


def test_bn_without_running_stats_branch_not_merged():
    fused = fuse_and_check(BatchStatBranch(), torch.randn(4, 3, 5, 5))
    assert stats(fused).batch_norms == 1 and stats(fused).adds == 1
    assert_not_fired(fused, "branch_sum")


class InplaceReadLater(nn.Module):
    """``y.add_(conv(y))`` mutates y; a later reader of y sees the sum. Merging must not change that."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 3, 3, padding=1)

    def forward(self, x):
        y = x * 1.0  # not the placeholder itself
        y.add_(self.conv(y))
        return y, y * 2


def test_inplace_add_with_later_reader(capture):
    fused = fuse_and_check(InplaceReadLater(), torch.randn(2, 3, 5, 5))
    assert stats(fused).convs == 1
    if capture == "export":
        # Functionalized, ``y.add_(conv(y))`` is ``s = y + conv(y)`` and the later reader reads ``s``: nothing is
        # written in place, so identity + conv merging into one conv is exact, and it is made.
        assert fused_counts(fused)["branch_sum"] == 1 and stats(fused).adds == 0
    else:
        assert_skipped(fused, "branch_sum", Reason.ALIASING, "read again later")


class AugmentedAssignOnAlias(nn.Module):
    """``y += conv(x)`` where y aliases x: fx records an out-of-place add, so the traced graph is not the
    model. fxfuse must notice (the unmodified trace fails verification) and fall back to sub-modules."""

    def __init__(self):
        super().__init__()
        self.body = nn.Sequential(nn.Conv2d(3, 3, 3, padding=1), nn.BatchNorm2d(3))
        self.conv = nn.Conv2d(3, 3, 3, padding=1)

    def forward(self, x):
        x = self.body(x)
        y = x
        y += self.conv(x)
        return y, x * 2


@pytest.mark.fixed_capture("symbolic: the unfaithful-trace fallback; export: the same model captured whole")
def test_unfaithful_trace_falls_back_to_submodules():
    fused = fuse_and_check(AugmentedAssignOnAlias(), torch.randn(2, 3, 5, 5), capture="symbolic")
    report = fused.fxfuse_report
    assert not report.traced_whole and "rewritten" in report.submodules["body"]
    assert fused_counts(fused) == {"conv_bn": 1}
    # torch.export runs the Python: the write through the alias is a functional add both outputs read, so the
    # graph is the model: the body's BN folds and x + conv(x) merges into one conv after the body's.
    fused = fuse_and_check(AugmentedAssignOnAlias(), torch.randn(2, 3, 5, 5), capture="export")
    assert fused.fxfuse_report.traced_whole
    assert fused_counts(fused) == {"conv_bn": 1, "branch_sum": 1} and stats(fused).convs == 2


class AvgNoPadCount(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 3, 3, padding=1)
        self.pool = nn.AvgPool2d(3, 1, 1, count_include_pad=False)

    def forward(self, x):
        return self.conv(x) + self.pool(x)


class PointwisePlusPool(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv, self.pool = nn.Conv2d(8, 8, 1), nn.AvgPool2d(3, 1, 1)

    def forward(self, x):
        return self.conv(x) + self.pool(x)


def test_merge_that_adds_work_is_skipped():
    """1x1 (64 MACs/px) + 3x3 pool (72) would become a dense 3x3 (576): not done, and said why."""
    fused = fuse_and_check(PointwisePlusPool(), torch.randn(1, 8, 6, 6))
    assert stats(fused).pools == 1
    assert_skipped(fused, "branch_sum", Reason.MORE_WORK, "increase the work")


def test_avgpool_without_count_include_pad_is_not_a_conv():
    fused = fuse_and_check(AvgNoPadCount(), torch.randn(2, 3, 6, 6))
    assert stats(fused).pools == 1 and stats(fused).adds == 1
    assert_skipped(fused, "branch_sum", Reason.POOL_NOT_LINEAR, "is not a conv", "count_include_pad")


# ------------------------------------------------------------------- BN(avg-pool) branches (DBB's pool branch)
def _bn(c):
    return nn.BatchNorm2d(c)  # statistics and affine parameters are randomized by fuse_and_check


class PoolBranchBlock(nn.Module):
    """``bn3(conv_k(x)) + bn1(conv1x1(x)) + post(avg_pool(x))``: DBB's pool branch, depthwise (MobileNet-style) or
    dense; ``post`` is ``bn`` (BN), ``none``, ``scale`` (BN then a per-channel ``x·γ + β``) or ``twice`` (BN, BN)."""

    def __init__(self, c, k, stride, depthwise, post, pool_k=3, pool_pad=None, cip=True, ceil=False,
                 pool_stride=None, spellings=("a+b", "a+b"), one_by_one=True):
        super().__init__()
        g = c if depthwise else 1
        self.spellings = spellings
        self.conv = nn.Sequential(nn.Conv2d(c, c, k, stride, k // 2, groups=g, bias=False), _bn(c))
        self.pw = nn.Sequential(nn.Conv2d(c, c, 1, stride, 0, groups=g, bias=False), _bn(c)) if one_by_one else None
        pad = pool_k // 2 if pool_pad is None else pool_pad
        self.pool = nn.AvgPool2d(pool_k, stride if pool_stride is None else pool_stride, pad, ceil_mode=ceil,
                                 count_include_pad=cip)
        self.post = post
        self.bns = nn.ModuleList([_bn(c) for _ in range({"none": 0, "bn": 1, "scale": 1, "twice": 2}[post])])
        self.gamma = nn.Parameter(torch.randn(1, c, 1, 1))
        self.beta = nn.Parameter(torch.randn(1, c, 1, 1))

    def forward(self, x):
        p = self.pool(x)
        for bn in self.bns:
            p = bn(p)
        if self.post == "scale":
            p = p * self.gamma + self.beta
        out = self.conv(x)
        if self.pw is not None:
            out = combine(out, self.pw(x), self.spellings[0])
        return combine(out, p, self.spellings[1])


@st.composite
def pool_blocks(draw):
    depthwise = draw(st.booleans())
    c = draw(st.integers(1, 4)) * (1 if depthwise else draw(st.integers(1, 2)))
    k = draw(st.sampled_from([3, 5]))
    stride = draw(st.sampled_from([1, 2]))
    post = draw(st.sampled_from(["bn", "bn", "none", "scale", "twice"]))
    pool_k = draw(st.sampled_from([3, k]))
    spellings = tuple(draw(st.sampled_from(["a+b", "b+a", "torch.add", "Tensor.add", "alpha", "sub"]))
                      for _ in range(2))
    size = draw(st.integers(5, 10))
    model = PoolBranchBlock(c, k, stride, depthwise, post, pool_k, spellings=spellings,
                            one_by_one=draw(st.booleans()))
    return model, torch.randn(draw(st.integers(1, 2)), c, size, size)


@settings(max_examples=budget(10), deadline=None)
@given(pool_blocks())
def test_bn_after_avg_pool_branch_merges(case):
    """BN(avg_pool(x)) (and BN·γ+β, BN∘BN, a bare pool) is the pool's 1/k² kernel scaled per channel: one conv."""
    model, x = case
    fused = fuse_and_check(model, x, second=torch.randn(1, *x.shape[1:3], x.shape[3] + 1))
    s = stats(fused)
    assert (s.convs, s.batch_norms, s.pools, s.adds) == (1, 0, 0, 0), fused.code
    assert fused_counts(fused)["branch_sum"] >= 1
    assert not list(fused.fxfuse_report.unfused), fused.fxfuse_report


def test_unpadded_pool_without_count_include_pad_is_a_conv():
    """Unpadded, count_include_pad=False divides every window by k²: exact as a conv, so it merges."""
    class Valid(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv, self.bn = nn.Conv2d(4, 4, 3, 2, 0, groups=4), _bn(4)
            self.pool, self.pbn = nn.AvgPool2d(3, 2, 0, count_include_pad=False), _bn(4)

        def forward(self, x):
            return self.bn(self.conv(x)) + self.pbn(self.pool(x))

    fused = fuse_and_check(Valid(), torch.randn(2, 4, 9, 9))
    s = stats(fused)
    assert (s.convs, s.batch_norms, s.pools, s.adds) == (1, 0, 0, 0)


UNFUSABLE_POOLS = [  # (id, PoolBranchBlock keyword arguments, code, fragment of the sentence)
    ("no-pad-count", {"cip": False}, Reason.POOL_NOT_LINEAR, "count_include_pad"),
    ("ceil-mode", {"ceil": True, "pool_k": 2, "pool_pad": 0, "stride": 2, "k": 3}, Reason.POOL_NOT_LINEAR, "ceil_mode"),
    # conv stride 1 (3x3, unpadded) and pool 2x2/2 padded 1: both give 4x4 on a 6x6 input, on different grids
    ("stride", {"pool_k": 2, "pool_pad": 1, "pool_stride": 2, "stride": 1, "k": 3}, Reason.TAP_GRID, "tap grid"),
]


@pytest.mark.parametrize(("kwargs", "code", "fragment"), [u[1:] for u in UNFUSABLE_POOLS],
                         ids=[u[0] for u in UNFUSABLE_POOLS])
def test_pool_branch_that_is_no_conv_stays_and_is_named(kwargs, code, fragment):
    args = {"c": 4, "k": 3, "stride": 1, "depthwise": True, "post": "bn"}
    args.update(kwargs)
    model = PoolBranchBlock(**args)
    if fragment == "tap grid":
        model.conv[0].padding, model.pw = (0, 0), None
    fused = fuse_and_check(model, torch.randn(2, 4, 6, 6))
    s = stats(fused)
    assert (s.pools, s.batch_norms) == (1, 1), fused.code
    report = fused.fxfuse_report
    assert report.rolled_back == []
    named = {u.node: u.code for u in report.unfused if u.rule == "branch_sum"}
    pool = next(n for n in fused.graph.nodes if stats_kind(fused, n) == "avg_pool")
    bn = next(n for n in fused.graph.nodes if stats_kind(fused, n) == "batch_norm")
    assert named.get(pool.name) is code and bn.name in named, report
    assert any(fragment in u.reason for u in report.unfused if u.node == pool.name), report


def stats_kind(gm, node):
    from fxfuse.ir.ops import op_kind

    return op_kind(node, dict(gm.named_modules()))


class ConvBnPoolChain(nn.Module):
    """DBB's 1x1 → avg-pool branch written without BN-and-pad: ``bn(avg(pre(conv1x1(x))))`` + a 3x3 conv-BN;
    ``pre`` a BN (its shift is read by the pool's zero padding: not one conv) or nothing (composes)."""

    def __init__(self, c=4, pre_bn=True):
        super().__init__()
        self.conv, self.bn = nn.Conv2d(c, c, 3, 1, 1, bias=False), _bn(c)
        self.pw = nn.Conv2d(c, c, 1, bias=False)
        self.pre = _bn(c) if pre_bn else nn.Identity()
        self.pool, self.pbn = nn.AvgPool2d(3, 1, 1), _bn(c)

    def forward(self, x):
        return self.bn(self.conv(x)) + self.pbn(self.pool(self.pre(self.pw(x))))


def test_pool_after_bias_free_pointwise_composes_into_the_sum():
    fused = fuse_and_check(ConvBnPoolChain(pre_bn=False), torch.randn(2, 4, 7, 7))
    s = stats(fused)
    assert (s.convs, s.batch_norms, s.pools, s.adds) == (1, 0, 0, 0), fused.code


def test_pool_after_conv_bn_with_padding_stays_and_is_named():
    """avg_pool(p=1) of conv1x1 + BN shift: the border windows average the shift with zeros, so this is no conv of
    x; the pool and its BN stay, and the report names both."""
    fused = fuse_and_check(ConvBnPoolChain(pre_bn=True), torch.randn(2, 4, 7, 7))
    s = stats(fused)
    assert (s.pools, s.batch_norms) == (1, 1), fused.code
    report = fused.fxfuse_report
    assert report.rolled_back == []
    assert_skipped(fused, "sequential", Reason.PADDING)
    bn = next(n for n in fused.graph.nodes if stats_kind(fused, n) == "batch_norm")
    assert any(u.node == bn.name for u in report.unfused), report


def test_lone_bn_after_pool_is_left_and_named():
    """Not in a sum: pool + BN stay (no depthwise conv is made of them), and the report says so."""
    class Lone(nn.Module):
        def __init__(self):
            super().__init__()
            self.pool, self.bn = nn.AvgPool2d(3, 1, 1), _bn(4)

        def forward(self, x):
            return torch.relu(self.bn(self.pool(torch.relu(x))))

    fused = fuse_and_check(Lone(), torch.randn(2, 4, 6, 6))
    assert (stats(fused).pools, stats(fused).batch_norms) == (1, 1)
    bn = next(n for n in fused.graph.nodes if stats_kind(fused, n) == "batch_norm")
    assert [u.code for u in fused.fxfuse_report.unfused if u.node == bn.name] == [Reason.NO_PARTNER]


# ---------------------------------------------------------------------------------------- errors
def test_wrong_merge_is_rolled_back_and_fails_the_checker(monkeypatch):
    fused = assert_wrong_rewrite_caught(monkeypatch, "branch_sum", ACBlock(4), torch.randn(2, 4, 6, 6))
    assert stats(fused).convs == 3 and stats(fused).adds == 2


def test_pool_branch_whose_pool_is_read_elsewhere_stays():
    """The pool's output is also returned: folding BN(pool) into the sum would not remove the pool; reported."""
    class Returned(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv, self.bn = nn.Conv2d(4, 4, 3, 1, 1, groups=4), _bn(4)
            self.pool, self.pbn = nn.AvgPool2d(3, 1, 1), _bn(4)

        def forward(self, x):
            p = self.pool(x)
            return self.bn(self.conv(x)) + self.pbn(p), p

    fused = fuse_and_check(Returned(), torch.randn(2, 4, 6, 6))
    assert (stats(fused).pools, stats(fused).batch_norms) == (1, 1)
    assert_skipped(fused, "branch_sum", Reason.OTHER_USERS, "has other users")
