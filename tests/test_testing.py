"""Tests of fxfuse.testing: the strategies draw valid configurations, and the checker passes correct fusions
and FAILS on wrong ones (broken rules, wrong structure expectations, mutated inputs, batch-dependent folds)."""

from __future__ import annotations

import operator
from typing import Iterator, List

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import fx, nn

import fxfuse
import fxfuse.testing as T
from fxfuse import RewriteContext
from fxfuse.ir import AffineRead, ConvRead, ConvSpec
from fxfuse.testing import (
    assert_close_f64,
    assert_reparametrizes,
    batchnorm_states,
    conv_geometries,
    op_counts,
    randomize_batchnorm_,
)


@pytest.fixture
def scratch_rules() -> Iterator[List[str]]:
    """Names appended here are unregistered after the test, so no other test sees them."""
    names: List[str] = []
    yield names
    for n in names:
        if any(r.name == n for r in fxfuse.registered_rules()):
            fxfuse.unregister_rule(n)


def test_public_surface() -> None:
    for name in T.__all__:
        assert hasattr(T, name), name
    assert T.randomize_batchnorm_ is fxfuse.models.randomize_batchnorm_


# ------------------------------------------------------------------------------------ strategies
@settings(max_examples=60)
@given(st.integers(1, 3).flatmap(lambda nd: conv_geometries(nd, asymmetric=True)))
def test_conv_geometries_are_valid(geo: T.ConvGeometry) -> None:
    assert geo.in_channels % geo.groups == 0 and geo.out_channels % geo.groups == 0
    assert all(k in (1, 3, 5) for k in geo.kernel_size)
    assert all(s in (1, 2) for s in geo.stride) and all(d in (1, 2) for d in geo.dilation)
    assert all(0 <= p <= d * (k - 1) // 2 for p, d, k in zip(geo.padding, geo.dilation, geo.kernel_size))
    conv = geo.conv()
    assert (conv.bias is not None) == geo.bias
    x = geo.example_input(batch=1)
    assert tuple(conv(x).shape[2:]) == geo.output_size(x.shape[2:])
    smallest = torch.zeros(1, geo.in_channels, *geo.min_input_size())
    assert all(n >= 1 for n in conv(smallest).shape[2:])


@settings(max_examples=30)
@given(conv_geometries(in_channels=6, out_channels=4, padding="same"))
def test_conv_geometries_fixed_channels(geo: T.ConvGeometry) -> None:
    assert (geo.in_channels, geo.out_channels) == (6, 4) and geo.groups in (1, 2)
    assert geo.centre() == (0,) * geo.ndim  # "same" padding centres every window


@settings(max_examples=30)
@given(batchnorm_states(5))
def test_batchnorm_states(state: T.BatchNormState) -> None:
    bn = state.module(ndim=2)
    assert not bn.training and bn.eps == state.eps and bn.affine == state.affine
    assert not torch.allclose(bn.running_mean, torch.zeros(5))
    assert bool((bn.running_var > 0).all()) and not torch.allclose(bn.running_var, torch.ones(5))
    if state.affine:
        assert not torch.allclose(bn.weight, torch.ones(5)) and not torch.allclose(bn.bias, torch.zeros(5))
    else:
        assert bn.weight is None and bn.bias is None
    again = state.module(ndim=2)
    assert torch.equal(again.running_mean, bn.running_mean)  # the state is deterministic


def test_batchnorm_state_without_running_stats() -> None:
    state = T.BatchNormState(True, 1e-5, 0.1, False, seed=3)
    bn = state.module(4, ndim=1)
    assert isinstance(bn, nn.BatchNorm1d) and bn.running_mean is None


# ------------------------------------------------------------------------------ checker: passes
@settings(max_examples=25)
@given(st.integers(1, 3).flatmap(lambda nd: st.tuples(conv_geometries(nd, asymmetric=True), batchnorm_states())))
def test_checker_passes_conv_bn(case) -> None:
    geo, state = case
    model = nn.Sequential(geo.conv(), state.module(geo.out_channels, ndim=geo.ndim))
    fused = assert_reparametrizes(model, geo.example_input(), expect_convs=1, expect_batch_norms=0,
                                  expect_fused={"conv_bn": 1}, randomize=False)
    assert op_counts(fused)["batch_norm"] == 0


def test_checker_factory_and_instance_untouched() -> None:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.BatchNorm2d(4), nn.ReLU(), nn.Conv2d(4, 4, 1),
                          nn.BatchNorm2d(4))
    before = {k: v.clone() for k, v in model.state_dict().items()}
    fused = assert_reparametrizes(model, torch.randn(2, 3, 7, 6), expect_convs=2, expect_batch_norms=0,
                                  expect_fused={"conv_bn": 2, "branch_sum": 0})
    assert isinstance(fused, fx.GraphModule)
    # the caller's instance was deep-copied before BN randomization and the float64 cast
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in before.items())
    assert next(model.parameters()).dtype == torch.float32
    assert_reparametrizes(lambda: nn.Sequential(nn.Conv1d(2, 3, 3), nn.BatchNorm1d(3)), torch.randn(1, 2, 9),
                          expect_convs=1)


def test_checker_tuple_output_and_input() -> None:
    class Two(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.conv = nn.Conv2d(3, 3, 3, padding=1)
            self.bn = nn.BatchNorm2d(3)

        def forward(self, x: torch.Tensor, y: torch.Tensor):
            return self.bn(self.conv(x)), y * 2

    assert_reparametrizes(Two(), (torch.randn(2, 3, 5, 5), torch.randn(2, 4)), expect_convs=1)


# ------------------------------------------------------------------------------ checker: fails
def _conv_bn_net() -> nn.Module:
    torch.manual_seed(1)
    return nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.BatchNorm2d(4, eps=1e-3), nn.ReLU(),
                         nn.Conv2d(4, 4, 3, padding=1), nn.BatchNorm2d(4))


def _register_wrong_eps(names: List[str], name: str = "wrong_eps_conv_bn") -> str:
    """conv → BN folded with ε + 0.5: runs, has the right structure, and is wrong."""

    @fxfuse.register_rule(name, enabled=False, before="conv_bn")
    def wrong_eps(ctx: RewriteContext, node: fx.Node):
        mod = ctx.read.module(node)
        if not isinstance(mod, nn.BatchNorm2d):
            return None
        conv = ctx.read.conv(node.args[0])
        if not isinstance(conv, ConvRead) or ctx.single_user(node.args[0]) is not node:
            return None
        a = ctx.read.affine(node)
        bad_scale = a.affine.scale * torch.sqrt((mod.running_var.double() + mod.eps) / (mod.running_var.double()
                                                                                         + mod.eps + 0.5))
        w = conv.spec.weight * bad_scale[:, None, None, None]
        spec = conv.spec.with_(weight=w, bias=bad_scale * conv.spec.bias + a.affine.shift)

        def rewrite() -> None:
            ctx.replace(node, ctx.insert_conv(spec, conv.input, before=node, like=conv.like),
                        consumed=[node.args[0]])

        return rewrite

    names.append(name)
    return name


def test_checker_fails_on_broken_rule_without_verification(scratch_rules: List[str]) -> None:
    name = _register_wrong_eps(scratch_rules)
    with pytest.raises(AssertionError, match="max abs error"):
        assert_reparametrizes(_conv_bn_net, torch.randn(2, 3, 6, 6), expect_convs=2, verify=False,
                              rules=[name])


def test_checker_fails_when_verification_rolls_back(scratch_rules: List[str]) -> None:
    name = _register_wrong_eps(scratch_rules)
    with pytest.raises(AssertionError, match="rolled back"):
        assert_reparametrizes(_conv_bn_net, torch.randn(2, 3, 6, 6), enable=[name])
    fused = assert_reparametrizes(_conv_bn_net, torch.randn(2, 3, 6, 6), enable=[name], allow_rollback=True,
                                  expect_convs=2, expect_fused={name: 0, "conv_bn": 2})
    assert sorted(fused.fxfuse_report.rolled_back) == [f"{name}:_1", f"{name}:_4"]


def test_checker_fails_on_wrong_structure() -> None:
    x = torch.randn(2, 3, 6, 6)
    with pytest.raises(AssertionError, match="expected 3 conv"):
        assert_reparametrizes(_conv_bn_net, x, expect_convs=3)
    with pytest.raises(AssertionError, match="batch_norm"):
        assert_reparametrizes(_conv_bn_net, x, disable=["conv_bn"])  # BNs remain; default expects 0
    with pytest.raises(AssertionError, match="'conv_bn' to fire 1"):
        assert_reparametrizes(_conv_bn_net, x, expect_fused={"conv_bn": 1})
    with pytest.raises(AssertionError, match="'branch_sum' to fire 1"):
        assert_reparametrizes(_conv_bn_net, x, expect_fused={"branch_sum": 1})


def test_checker_fails_when_input_model_is_modified(scratch_rules: List[str]) -> None:
    built: List[nn.Module] = []

    def factory() -> nn.Module:
        built.append(_conv_bn_net())
        return built[-1]

    @fxfuse.register_rule("vandal", enabled=False)
    def vandal(ctx: RewriteContext, node: fx.Node):
        """Mutates the caller's model (a rule must only ever create new modules)."""
        if node.op == "placeholder" or not built:
            return None
        with torch.no_grad():
            built[-1][1].running_mean.add_(1.0)
        return None

    scratch_rules.append("vandal")
    with pytest.raises(AssertionError, match="modified the input model: 1.running_mean"):
        assert_reparametrizes(factory, torch.randn(2, 3, 6, 6), expect_convs=2, enable=["vandal"])


def test_second_batch_catches_batch_dependent_fold(scratch_rules: List[str]) -> None:
    """A rule that bakes the example's batch size into the graph passes verification on the example input
    (so reparametrize accepts it) but not the checker's second batch."""

    class SumOverBatch(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.conv = nn.Conv2d(2, 2, 1)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.conv(x).sum(0, keepdim=True)

    @fxfuse.register_rule("sum_as_scaled_mean", enabled=False)
    def sum_as_scaled_mean(ctx: RewriteContext, node: fx.Node):
        if node.op != "call_method" or node.target != "sum" or ctx.shape(node.args[0]) is None:
            return None
        batch = ctx.shape(node.args[0])[0]

        def rewrite() -> None:
            with ctx.graph.inserting_before(node):
                mean = ctx.graph.call_method("mean", node.args, node.kwargs)
                new = ctx.graph.call_function(operator.mul, (mean, float(batch)))
            ctx.replace(node, new)

        return rewrite

    scratch_rules.append("sum_as_scaled_mean")
    x = torch.randn(2, 2, 4, 4)
    fused = assert_reparametrizes(SumOverBatch(), x, expect_convs=1, expect_batch_norms=None,
                                  enable=["sum_as_scaled_mean"], second_batch=False)
    assert fused.fxfuse_report.fused["sum_as_scaled_mean"] == 1  # verification on the example accepted it
    with pytest.raises(AssertionError, match="other batch"):
        assert_reparametrizes(SumOverBatch(), x, expect_convs=1, expect_batch_norms=None,
                              enable=["sum_as_scaled_mean"])
    with pytest.raises(AssertionError, match=r"input 1 \(extra input\)"):  # extra inputs are compared too
        assert_reparametrizes(SumOverBatch(), x, expect_convs=1, expect_batch_norms=None,
                              enable=["sum_as_scaled_mean"], second_batch=False,
                              extra_inputs=[torch.randn(3, 2, 5, 5)])


def test_assert_close_f64() -> None:
    """It is :func:`fxfuse.verify.compare` with a test tolerance: relative to ``max|ref|``, NaN only where the
    reference has NaN, structure and non-tensor leaves equal."""
    r = torch.tensor([1.0, -2.0], dtype=torch.float64)
    assert assert_close_f64(r, r + 1e-12) <= 1e-10
    with pytest.raises(AssertionError, match="max abs error"):
        assert_close_f64(r, r + 1e-6)
    assert_close_f64(r, r + 1e-6, rtol=1e-6)  # 1e-6 ≤ 1e-6 · max|r| = 2e-6
    with pytest.raises(AssertionError, match="max abs error"):
        assert_close_f64(torch.zeros(2, dtype=torch.float64), torch.full((2,), 1e-300, dtype=torch.float64))
    assert_close_f64(torch.zeros(2), torch.full((2,), 1e-7), atol=1e-6)
    with pytest.raises(AssertionError, match="structure"):
        assert_close_f64((r, r), r)
    with pytest.raises(AssertionError, match="shape"):
        assert_close_f64(r, r[:1])
    with pytest.raises(AssertionError, match="'a' != 'b'"):
        assert_close_f64((r, "b"), (r, "a"))
    nan = torch.tensor([float("nan"), -2.0], dtype=torch.float64)
    with pytest.raises(AssertionError, match="max abs error inf"):
        assert_close_f64(r, nan)  # NaN where the reference has none
    with pytest.raises(AssertionError, match="max abs error inf"):
        assert_close_f64(nan, r)  # a NaN that disappeared
    assert assert_close_f64(nan, nan.clone()) == 0.0
    with pytest.raises(AssertionError, match="integer values differ"):
        assert_close_f64(torch.arange(3), torch.arange(3) + 1)


def test_checker_rejects_inplace() -> None:
    with pytest.raises(TypeError, match="inplace"):
        assert_reparametrizes(_conv_bn_net, torch.randn(1, 3, 4, 4), inplace=True)


def test_randomized_bn_is_not_identity() -> None:
    bn = randomize_batchnorm_(nn.Sequential(nn.BatchNorm2d(3)), seed=2)[0].eval()
    x = torch.randn(2, 3, 2, 2)
    assert not torch.allclose(bn(x), x)


def test_op_counts_functional_and_shared() -> None:
    class Net(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.conv = nn.Conv2d(2, 2, 3, padding=1)
            self.fc = nn.Linear(2, 3)

        def forward(self, x):
            y = self.conv(self.conv(x))
            y = torch.nn.functional.conv2d(y, self.conv.weight)
            y = torch.nn.functional.batch_norm(y, torch.zeros(2), torch.ones(2))
            return self.fc(y.mean((2, 3)))

    counts = op_counts(fx.symbolic_trace(Net()))
    assert (counts["conv"], counts["batch_norm"], counts["linear"]) == (3, 1, 1)
    assert op_counts(Net())["conv"] == 1  # plain modules: counted by instance
    assert isinstance(ConvSpec, type) and isinstance(AffineRead, type)
