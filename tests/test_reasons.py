"""Reason codes (``fxfuse.Reason``): stable, unique values; every candidate left unfused carries one (also through
the sub-module fallback's merge); each reader refusal site gives its code. The rule tests (tests/rules/) assert the
code of each rule's skips."""

from __future__ import annotations

import json
import re

import pytest
import torch
import torch.nn.functional as F
from torch import fx, nn

import fxfuse
from fxfuse import Reason, Unfused
from fxfuse.ir import Reader, Refusal
from fxfuse.models import randomize_batchnorm_
from fxfuse.testing import assert_reparametrizes


def test_reason_values_are_unique_stable_strings():
    values = [r.value for r in Reason]
    assert len(values) == len(set(values)), "two members share a value"
    assert all(re.fullmatch(r"[a-z][a-z0-9_]*", v) for v in values), values
    assert all(r.value == r.name.lower() for r in Reason)
    assert fxfuse.Reason is Reason and "Reason" in fxfuse.__all__
    # how the code reaches the CLI's text and JSON
    assert str(Reason.BATCH_STATISTICS) == f"{Reason.BATCH_STATISTICS}" == "batch_statistics"
    assert json.dumps({"code": Reason.OTHER_USERS}) == '{"code": "other_users"}'
    assert Reason("padding") is Reason.PADDING


class Several(nn.Module):
    """One model, four kinds of skip: batch statistics (bn1), other users (c2's output is returned), an affine
    along the width (c3 · col), a zero-padding conv after a BN shift (bn4 → c4)."""

    def __init__(self) -> None:
        super().__init__()
        self.c1, self.bn1 = nn.Conv2d(3, 5, 3, padding=1), nn.BatchNorm2d(5, track_running_stats=False)
        self.c2, self.bn2 = nn.Conv2d(5, 5, 3, padding=1), nn.BatchNorm2d(5)
        self.c3 = nn.Conv2d(5, 5, 1)
        self.register_buffer("col", torch.randn(5))  # broadcasts along the width: not per channel
        self.bn4, self.c4 = nn.BatchNorm2d(5), nn.Conv2d(5, 2, 3, padding=1)

    def forward(self, x: torch.Tensor):
        a = torch.relu(self.bn1(self.c1(x)))
        b = self.c2(a)
        z = self.c3(torch.relu(self.bn2(b))) * self.col
        return self.c4(self.bn4(z)), b


SEVERAL = {("conv_bn", Reason.BATCH_STATISTICS), ("conv_bn", Reason.OTHER_USERS), ("conv_bn", Reason.AXIS),
           ("bn_conv", Reason.PADDING)}


def _assert_all_coded(unfused: list) -> None:
    for u in unfused:
        assert isinstance(u, Unfused)
        assert type(u.code) is Reason, f"{u}: code {u.code!r} is not a Reason"
        assert u.reason and u.reason != u.code.value


def test_every_unfused_candidate_has_a_reason_code():
    fused = assert_reparametrizes(Several(), torch.randn(2, 3, 5, 5), expect_batch_norms=None)
    unfused = fused.fxfuse_report.unfused
    _assert_all_coded(unfused)
    assert {(u.rule, u.code) for u in unfused} >= SEVERAL, fused.fxfuse_report
    assert {u.code for u in unfused if u.node == "bn1"} == {Reason.BATCH_STATISTICS}


class Untraceable(nn.Module):
    """Data-dependent control flow around :class:`Several`: symbolic tracing fails, the sub-module fallback
    rewrites ``inner`` alone and merges its report (``FusionReport.merge``)."""

    def __init__(self) -> None:
        super().__init__()
        self.inner = Several()

    def forward(self, x: torch.Tensor):
        if x.sum() > -1e9:
            return self.inner(x)
        return self.inner(-x)


def test_codes_survive_the_submodule_merge():
    model = randomize_batchnorm_(Untraceable(), seed=0).eval()  # a fresh BN has no shift: bn4 → c4 would fold
    fused = fxfuse.reparametrize(model, torch.randn(2, 3, 5, 5), capture="symbolic")
    report = fused.fxfuse_report
    assert report.capture == "submodules", report
    _assert_all_coded(report.unfused)
    assert all(u.node.startswith("inner.") for u in report.unfused), report
    assert {(u.rule, u.code) for u in report.unfused} >= SEVERAL, report


def test_skip_requires_a_reason_code():
    from fxfuse.rewrite import RewriteContext

    gm = fx.symbolic_trace(nn.Sequential(nn.ReLU()))
    ctx = RewriteContext(gm, {}, torch.float32, False)
    ctx.begin_rule("mine")
    node = next(n for n in gm.graph.nodes if n.op == "call_module")
    with pytest.raises(TypeError, match="Reason"):
        ctx.skip(node, "other_users", "a plain string is not a code")
    ctx.skip(node, Reason.OTHER_USERS, "its input has other users")
    assert list(ctx.skips.values()) == [Unfused("mine", node.name, node.target, Reason.OTHER_USERS,
                                                "its input has other users")]


# ------------------------------------------------------------------------------ reader refusal sites
class FunctionalConvOfInput(nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.conv2d(x, x[:2], padding=1)  # the weight is computed from the input


class FunctionalBN(nn.Module):
    def __init__(self, training: bool) -> None:
        super().__init__()
        self.training_flag = training
        self.register_buffer("rm", torch.zeros(3))
        self.register_buffer("rv", torch.ones(3))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.training_flag:
            return F.batch_norm(x, self.rm, self.rv, training=True)
        return F.batch_norm(x, x.mean((0, 2, 3)), self.rv, training=False)  # a statistic computed from x


def _unhooked(mod: nn.Module) -> nn.Module:
    """An unmaterialized lazy module without its materializing pre-hook: with the hook, readers see it as opaque
    (``Reader.module`` is None) before they could refuse it, so reparametrize never reaches this refusal."""
    mod._forward_pre_hooks.clear()
    return mod


REFUSALS = [
    ("bn-training", lambda: nn.BatchNorm2d(3).train(), "affine", Reason.BATCH_STATISTICS, "training mode"),
    ("bn-no-stats", lambda: nn.BatchNorm2d(3, track_running_stats=False).eval(), "affine",
     Reason.BATCH_STATISTICS, "running statistics"),
    ("f-bn-training", lambda: FunctionalBN(training=True), "affine", Reason.BATCH_STATISTICS, "training=True"),
    ("f-bn-non-constant", lambda: FunctionalBN(training=False), "affine", Reason.NOT_CONSTANT, "non-constant"),
    ("lazy-bn", lambda: _unhooked(nn.LazyBatchNorm2d()), "affine", Reason.NOT_MATERIALIZED, "not materialized"),
    ("lazy-conv", lambda: _unhooked(nn.LazyConv2d(4, 3)), "conv", Reason.NOT_MATERIALIZED, "not materialized"),
    ("same-even", lambda: nn.Conv2d(3, 4, 2, padding="same"), "conv", Reason.PADDING, "same"),
    ("f-conv-non-constant", FunctionalConvOfInput, "conv", Reason.NOT_CONSTANT, "non-constant"),
    ("avg-pool-no-pad-count", lambda: nn.AvgPool2d(3, 1, 1, count_include_pad=False), "avg_pool",
     Reason.POOL_NOT_LINEAR, "count_include_pad"),
    ("avg-pool-ceil", lambda: nn.AvgPool2d(2, 2, ceil_mode=True), "as_conv", Reason.POOL_NOT_LINEAR, "ceil_mode"),
]


@pytest.mark.parametrize(("make", "reader", "code", "fragment"), [r[1:] for r in REFUSALS],
                         ids=[r[0] for r in REFUSALS])
def test_reader_refusal_codes(make, reader, code, fragment):
    """Each refusal site of the readers (module and functional spellings; the ATen spellings are covered by the
    rule tests under ``capture="export"``) gives its code with its sentence."""
    gm = fx.symbolic_trace(nn.Sequential(make()))  # (a leaf module: traced as one call_module node)
    read = Reader(gm)
    node = [n for n in gm.graph.nodes if n.op in ("call_module", "call_function")][-1]  # the op under test
    refusal = getattr(read, reader)(node)
    assert isinstance(refusal, Refusal), refusal
    assert refusal.code is code and fragment in refusal.reason, refusal
