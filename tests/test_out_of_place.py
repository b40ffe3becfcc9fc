"""The export capture's cheap functionalization (``fxfuse.ir.graphs.out_of_place``): an in-place ATen op on a tensor
the program made and nothing aliases becomes its out-of-place twin; every other write is left for
``run_decompositions``. Checked on random programs of in-place ops against the eager model, and on the writes
that must be left alone."""

from __future__ import annotations

from typing import List, Tuple

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import Tensor, nn

from fxfuse.capture.export import graph_of
from fxfuse.ir import ops
from fxfuse.ir.graphs import fresh_copy, out_of_place

from _helpers import budget

Step = Tuple[str, int]  # (kind, index of an earlier value)
KINDS = ("relu_", "add_", "mul_", "view_then_relu_", "read_then_relu_", "conv", "clamp_")


class Program(nn.Module):
    """A straight-line program over values v0 = conv(x), v1, …; each step writes into or reads an earlier value."""

    def __init__(self, steps: List[Step]) -> None:
        super().__init__()
        self.steps = steps
        self.conv = nn.Conv2d(3, 3, 3, padding=1)

    def forward(self, x: Tensor) -> Tensor:
        values = [self.conv(x)]
        outs = []
        for kind, i in self.steps:
            v = values[i % len(values)]
            if kind == "relu_":
                values.append(F.relu(v, inplace=True))
            elif kind == "add_":
                values.append(v.add_(values[-1]))
            elif kind == "mul_":
                values.append(v.mul_(0.5))
            elif kind == "clamp_":
                values.append(v.clamp_(-0.3, 0.7))
            elif kind == "view_then_relu_":  # a view taken before the write sees it
                view = v.view(-1)
                v.relu_()
                outs.append(view.sum())
                values.append(v)
            elif kind == "read_then_relu_":  # a reader before the write does not
                before = v * 2
                v.relu_()
                values.append(before)
            else:
                values.append(self.conv(v))
        return torch.stack([*(t.sum() for t in values), *outs]) if outs else torch.stack([t.sum() for t in values])


def _mutable(gm) -> int:
    return sum(n.op == "call_function" and isinstance(n.target, ops.OpOverload) and n.target._schema.is_mutable
               for n in gm.graph.nodes)


@settings(max_examples=budget(25, 150), deadline=None)
@given(st.lists(st.tuples(st.sampled_from(KINDS), st.integers(0, 5)), min_size=1, max_size=7))
def test_random_inplace_programs_stay_equal(steps: List[Step]) -> None:
    torch.manual_seed(0)
    model = Program(steps).eval()
    x = torch.randn(2, 3, 5, 5)
    ep = torch.export.export(model, (x,), strict=False)
    gm = fresh_copy(ep.module())
    before = _mutable(gm)
    complete = out_of_place(gm)
    gm.recompile()
    torch.testing.assert_close(gm(x), model(x), rtol=1e-6, atol=1e-6)
    if complete:
        assert _mutable(gm) == 0
    else:  # only a write into a view-shared tensor is left
        assert any(k == "view_then_relu_" for k, _ in steps) and _mutable(gm) >= 1
    if before and not any(k == "view_then_relu_" for k, _ in steps):
        assert complete
    captured = graph_of(ep)  # the capture: out-of-place where it can, functionalized otherwise
    assert _mutable(captured) == 0
    torch.testing.assert_close(captured(x), model(x), rtol=1e-6, atol=1e-6)


class _ResidualBlock(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv, self.bn, self.relu = nn.Conv2d(4, 4, 3, padding=1), nn.BatchNorm2d(4), nn.ReLU(inplace=True)

    def forward(self, x: Tensor) -> Tensor:
        out = self.relu(self.bn(self.conv(x)))
        out += x
        return self.relu(out)


def test_resnet_style_writes_become_out_of_place() -> None:
    model = _ResidualBlock().eval()
    x = torch.randn(2, 4, 6, 6)
    gm = fresh_copy(torch.export.export(model, (x,), strict=False).module())
    assert _mutable(gm) == 3  # relu_, add_, relu_
    assert out_of_place(gm)
    gm.recompile()
    assert _mutable(gm) == 0
    targets = {str(n.target) for n in gm.graph.nodes if n.op == "call_function"}
    assert {"aten.relu.default", "aten.add.Tensor"} <= targets
    assert not any("scatter" in t for t in targets)  # not functionalized by decomposition
    torch.testing.assert_close(gm(x), model(x))


class _WritesInput(nn.Module):
    def forward(self, x: Tensor) -> Tensor:
        x.relu_()
        return x * 2


class _WritesBuffer(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.register_buffer("count", torch.zeros(1))

    def forward(self, x: Tensor) -> Tensor:
        self.count.add_(1)
        return x + self.count


@pytest.mark.parametrize("model", [_WritesInput(), _WritesBuffer()], ids=["input", "buffer"])
def test_writes_into_inputs_and_buffers_are_left(model: nn.Module) -> None:
    x = torch.randn(2, 3)
    gm = fresh_copy(torch.export.export(model, (x.clone(),), strict=False).module())
    if _mutable(gm) == 0:
        pytest.skip("this torch functionalizes the write at export already")
    assert not out_of_place(gm)
    assert _mutable(gm) >= 1


def test_later_readers_of_the_written_tensor_read_the_result() -> None:
    """Export records a later read of ``x`` as a read of ``relu_(x)``; a graph written by hand may read ``x`` itself
    after the write: that read must move to the out-of-place result, a read before the write must not."""
    aten = torch.ops.aten
    graph = torch.fx.Graph()
    a = graph.placeholder("a")
    x = graph.call_function(aten.mul.Tensor, (a, 2.0))
    before = graph.call_function(aten.sum.default, (x,))
    graph.call_function(aten.relu_.default, (x,))
    after = graph.call_function(aten.sum.default, (x,))
    graph.output((before, after))
    gm = torch.fx.GraphModule(nn.Module(), graph)
    inp = torch.tensor([-1.0, 2.0, -3.0, 4.0, 0.5])  # negatives: relu changes the sum
    expected = gm(inp.clone())
    assert out_of_place(gm)
    gm.recompile()
    assert _mutable(gm) == 0
    got = gm(inp.clone())
    torch.testing.assert_close(got, expected)
    assert not torch.allclose(got[0], got[1])  # the two reads differ: the test sees a misplaced read
