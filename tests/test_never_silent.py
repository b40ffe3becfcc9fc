"""Never silent, as a property: every BatchNorm left executing after the pass, and every avg-pool left executing as
(part of) a term of a sum, is named in ``report.unfused`` with a reason code (docs/patterns.md, "Reason codes").

What runs is counted as it runs (:func:`fxfuse.tools.executed_ops.run_counting` with
:func:`fxfuse.ir.ops.function_kind`), not read from the graph the pass returns; what the report names is read from
the report (entries whose target is a BatchNorm / avg-pool module of the model, or a ``batch_norm`` /
``avg_pool`` function). Random nets come from the fuzzer's generator (tests/test_fuzz.py) and, for pools, from a
DBB-style generator in which every pool is a term of a sum.
"""

from __future__ import annotations

import copy
from typing import Callable, Iterator

import pytest
import torch
from hypothesis import HealthCheck, given, reject, settings
from hypothesis import strategies as st
from test_fuzz import Case, random_nets
from torch import nn

import fxfuse
from fxfuse import FusionError
from fxfuse.ir.ops import function_kind
from fxfuse.testing import randomize_batchnorm_
from fxfuse.tools.executed_ops import run_counting

from _helpers import budget

CAPTURES = ("auto", "export")


@pytest.fixture(autouse=True, scope="module")
def _one_thread() -> Iterator[None]:
    old = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(old)


def _executed(model: nn.Module, x: torch.Tensor) -> dict:
    """BatchNorms and avg-pools one call executes, counted as they run."""
    counts = run_counting(model, x, key=lambda f: function_kind(f) if function_kind(f) in
                          ("batch_norm", "avg_pool") else None)[1]
    return {"batch_norm": counts["batch_norm"], "avg_pool": counts["avg_pool"]}


def _listed(report: fxfuse.FusionReport, original: nn.Module) -> dict:
    """Distinct nodes the report names, by kind: a target that is a BatchNorm / AvgPool module of the model, or a
    function named ``…batch_norm…`` / ``avg_pool…``."""
    modules = dict(original.named_modules())
    nodes: dict = {"batch_norm": set(), "avg_pool": set()}
    for u in report.unfused:
        mod = modules.get(u.target)
        if isinstance(mod, nn.modules.batchnorm._BatchNorm) or (mod is None and "batch_norm" in u.target):
            nodes["batch_norm"].add(u.node)
        elif isinstance(mod, nn.modules.pooling._AvgPoolNd) or (mod is None and u.target.startswith("avg_pool")):
            nodes["avg_pool"].add(u.node)
    return {k: len(v) for k, v in nodes.items()}


def _fuse(model: nn.Module, x: torch.Tensor, capture: str) -> nn.Module:
    model = copy.deepcopy(model).double().eval()
    try:
        return fxfuse.reparametrize(model, x.double(), capture=capture)
    except FusionError:
        reject()  # not capturable whole this way (e.g. export of an unfaithful in-place spelling)
        raise


# ------------------------------------------------------------------------------- the fuzzer's random nets
@pytest.mark.parametrize("capture", CAPTURES)
@settings(max_examples=budget(12, 60), deadline=None, suppress_health_check=list(HealthCheck))
@given(case=random_nets(max_blocks=3))
def test_every_batch_norm_left_is_listed(capture: str, case: Case) -> None:
    fused = _fuse(case.net, case.input, capture)
    report = fused.fxfuse_report
    if not report.traced_whole:
        reject()  # sub-module fallback: untraced parents execute BNs no graph holds
    executed = _executed(fused, case.input.double())
    listed = _listed(report, case.net)
    assert executed["batch_norm"] == listed["batch_norm"], f"{executed} {listed}\n{report}\n{fused.graph}"


# ------------------------------------------------------------------------- sums with pool terms (DBB-style)
class PoolSum(nn.Module):
    """``conv-BN(x) [+ 1x1-BN(x)] + Σ post(avg_pool(x)) [+ x]``; every pool is a term of the sum."""

    def __init__(self, conv: nn.Module, pointwise: nn.Module | None, pools: list, posts: list, identity: bool,
                 relu: bool) -> None:
        super().__init__()
        self.conv, self.pointwise = conv, pointwise
        self.pools, self.posts = nn.ModuleList(pools), nn.ModuleList(posts)
        self.identity, self.relu = identity, relu

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.conv(x)
        if self.pointwise is not None:
            out = out + self.pointwise(x)
        for pool, post in zip(self.pools, self.posts):
            out = out + post(pool(x))
        if self.identity:
            out = out + x
        return torch.relu(out) if self.relu else out


class Scale(nn.Module):
    def __init__(self, c: int) -> None:
        super().__init__()
        self.gamma, self.beta = nn.Parameter(torch.randn(1, c, 1, 1)), nn.Parameter(torch.randn(1, c, 1, 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * self.gamma + self.beta


@st.composite
def pool_sums(draw: Callable) -> tuple:
    groups = draw(st.integers(1, 3))
    c = groups * draw(st.integers(1, 2))
    stride = draw(st.sampled_from([1, 2]))
    k = draw(st.sampled_from([1, 3, 5]))
    size = draw(st.integers(6, 9))
    x = torch.randn(draw(st.integers(1, 2)), c, size, size)
    conv = nn.Sequential(nn.Conv2d(c, c, k, stride, k // 2, groups=draw(st.sampled_from([1, groups, c])),
                                   bias=False), nn.BatchNorm2d(c))
    pointwise = nn.Sequential(nn.Conv2d(c, c, 1, stride, 0, groups=groups), nn.BatchNorm2d(c)) \
        if draw(st.booleans()) else None
    want = conv(x).shape
    pools, posts = [], []
    for _ in range(draw(st.integers(1, 2))):
        pk = draw(st.sampled_from([2, 3]))
        pool = nn.AvgPool2d(pk, draw(st.sampled_from([stride, stride, 3 - stride])), draw(st.integers(0, pk // 2)),
                            ceil_mode=draw(st.sampled_from([False, False, True])),
                            count_include_pad=draw(st.sampled_from([True, True, False])))
        if pool(x).shape != want:  # a sum needs equal shapes: fall back to the aligned pool of this stride
            pool = nn.AvgPool2d(3, stride, 1, count_include_pad=pool.count_include_pad)
        pools.append(pool)
        kind = draw(st.sampled_from(["bn", "bn", "none", "scale", "bn_nostats", "bn_bn"]))
        post: nn.Module = {"bn": lambda: nn.BatchNorm2d(c), "none": nn.Identity, "scale": lambda: Scale(c),
                           "bn_nostats": lambda: nn.BatchNorm2d(c, track_running_stats=False),
                           "bn_bn": lambda: nn.Sequential(nn.BatchNorm2d(c), nn.BatchNorm2d(c))}[kind]()
        posts.append(post)
    model = PoolSum(conv, pointwise, pools, posts, stride == 1 and draw(st.booleans()), draw(st.booleans()))
    return randomize_batchnorm_(model, draw(st.integers(0, 2**16))).eval(), x


@pytest.mark.parametrize("capture", CAPTURES)
@settings(max_examples=budget(12, 60), deadline=None, suppress_health_check=list(HealthCheck))
@given(case=pool_sums())
def test_every_pool_term_and_batch_norm_left_is_listed(capture: str, case: tuple) -> None:
    model, x = case
    fused = _fuse(model, x, capture)
    report = fused.fxfuse_report
    assert report.rolled_back == [], report
    executed = _executed(fused, x.double())
    listed = _listed(report, model)
    assert executed == listed, (executed, listed, str(report))
