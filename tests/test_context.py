"""The rewrite context's surgery counters (``RewriteContext.counts``): every node a rule adds, reroutes or removes
goes through the context, so the counts agree with what the graph shows."""

from __future__ import annotations

import operator
from typing import Sequence, Tuple

import pytest
import torch
from torch import fx, nn
from torch.fx.passes.shape_prop import ShapeProp

from fxfuse.rewrite import RewriteContext, resolve_rules, run_rules
from fxfuse.rewrite.context import SurgeryCounts


class Branches(nn.Module):
    """A RepVGG block with an identity no-op on one branch: remove_noop, then branch_sum."""

    def __init__(self) -> None:
        super().__init__()
        self.c3 = nn.Conv2d(4, 4, 3, padding=1)
        self.c1 = nn.Conv2d(4, 4, 1)
        self.noop = nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.c3(x) + self.c1(x) - self.noop(x)


class Siblings(nn.Module):
    """Two convs on one input feeding different consumers: horizontal stacks them and splits the result."""

    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Conv2d(4, 3, 3, padding=1)
        self.b = nn.Conv2d(4, 5, 3, padding=1)

    def forward(self, x: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
        return torch.relu(self.a(x)), torch.sigmoid(self.b(x))


def _context(model: nn.Module, x: torch.Tensor) -> RewriteContext:
    gm = fx.symbolic_trace(model.eval())
    ShapeProp(gm).propagate(x)
    return RewriteContext(gm, {}, torch.float64, False, reshape=lambda: ShapeProp(gm).propagate(x))


def _run(model: nn.Module, rules: Sequence[str]) -> Tuple[RewriteContext, int, int]:
    model, x = model.double(), torch.randn(2, 4, 6, 6, dtype=torch.float64)  # the readers fold in float64
    ctx = _context(model, x)
    before = len(ctx.graph.nodes)
    expected = model(x)
    run_rules(ctx, resolve_rules(list(rules), ()))
    got = ctx.gm(x)
    torch.testing.assert_close(got, expected, rtol=1e-10, atol=1e-10)
    return ctx, before, len(ctx.graph.nodes)


def test_counts_match_the_graph_for_a_sum():
    ctx, before, after = _run(Branches(), ["remove_noop", "branch_sum"])
    # remove_noop: Identity bypassed (1 rerouted, 1 erased); branch_sum: one conv inserted, the sum rerouted to it,
    # both adds and both convs erased.
    assert ctx.counts == SurgeryCounts(inserted=1, replaced=2, erased=5)
    assert after - before == ctx.counts.inserted - ctx.counts.erased


def test_counts_match_the_graph_for_a_split():
    ctx, before, after = _run(Siblings(), ["horizontal"])
    # one stacked conv, one split, two pieces; both convs rerouted to their piece and erased.
    assert ctx.counts == SurgeryCounts(inserted=4, replaced=2, erased=2)
    assert after - before == ctx.counts.inserted - ctx.counts.erased


def test_insert_sum_spells_each_coefficient():
    ctx = _context(nn.Sequential(nn.ReLU()), torch.randn(2, 3))
    relu = next(n for n in ctx.graph.nodes if n.op == "call_module")
    x = next(n for n in ctx.graph.nodes if n.op == "placeholder")
    out = ctx.insert_sum([(1.0, x), (1.0, relu), (-1.0, relu), (0.5, relu)], before=relu.next)
    chain = [out, out.args[0], out.args[0].args[0]]
    assert [n.target for n in chain] == [torch.add, operator.sub, operator.add]
    assert out.kwargs == {"alpha": 0.5}
    assert ctx.counts == SurgeryCounts(inserted=3)
    with pytest.raises(ValueError, match="coefficient must be 1"):
        ctx.insert_sum([(2.0, x)], before=relu.next)
