"""What ``reparametrize`` returns is a deploy artifact under every capture (docs/dtypes.md, "A lean artifact"):
it holds what its forward reads and nothing else — the state of the hand-written plain twin, no dead ``get_attr``,
no buffers of folded layers, no orphan sub-module — its generated code fetches each tensor / module with one
attribute lookup, and an exported graph calls public bindings through fx's plain calling convention. Also here:
``capture="auto"`` is never worse than its best single capture on random nets, and a rewrite whose returned model
drifts between calls is rolled back with its reason code."""

from __future__ import annotations

import copy
from typing import Iterator

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from torch import fx, nn

import fxfuse
from fxfuse import Reason, RewriteContext
from fxfuse.ir import ops
from fxfuse.models import build, default_input_shape, plain_twin, randomize_batchnorm_
from fxfuse.testing import assert_close_f64, op_counts
from fxfuse.tools.executed_ops import executed_fusable

NETS = ["repvgg-tiny", "dbb", "mobileone", "acnet"]


def graph_modules(model: nn.Module) -> list:
    return [m for m in model.modules() if isinstance(m, fx.GraphModule)]


@pytest.mark.parametrize("capture", ["symbolic", "export"])
@pytest.mark.parametrize("name", NETS)
def test_returned_state_is_the_plain_twins(name: str, capture: str) -> None:
    torch.manual_seed(0)
    model = randomize_batchnorm_(build(name), 0).eval()
    x = torch.randn((2, *default_input_shape(name)[1:]), generator=torch.Generator().manual_seed(1))
    fused = fxfuse.reparametrize(model, x, capture=capture)
    twin = plain_twin(model)
    assert fused.fxfuse_report.capture == capture
    got, want = fused.state_dict(), twin.state_dict()
    assert len(got) == len(want), (sorted(got), sorted(want))
    nbytes = sum(t.numel() * t.element_size() for t in got.values())
    twin_bytes = sum(t.numel() * t.element_size() for t in want.values())
    assert abs(nbytes - twin_bytes) <= 0.01 * twin_bytes
    assert not any("num_batches_tracked" in k or "running_" in k for k in got)
    gm = fused
    assert isinstance(gm, fx.GraphModule)
    read = {str(n.target) for n in gm.graph.nodes if n.op in ("get_attr", "call_module")}
    assert all("." not in t for t in read), read  # one lookup per tensor / module
    assert all(n.users for n in gm.graph.nodes if n.op == "get_attr")  # no dead fetch
    assert set(dict(gm.named_children())) == {t for t in read if isinstance(getattr(gm, t), nn.Module)}
    code = gm.code
    assert "torch.ops.aten" not in code and "tree_flatten_spec" not in code, code
    # The input guard of an exported program stays: it refuses shapes the program was specialized to. It is called
    # as a plain function (not through torch.export's module, whose config-patch wrapper costs ~10 µs per call).
    assert "_guards_fn" not in code
    assert ("export_input_guard(" in code) == (capture == "export")
    assert sum(ops.is_input_guard(n) for n in gm.graph.nodes) == (capture == "export")
    with torch.no_grad():
        assert_close_f64(model(x), fused(x), rtol=1e-5)
        x3 = torch.randn((3, *default_input_shape(name)[1:]))
        assert_close_f64(model(x3), fused(x3), rtol=1e-5)  # the batch dim stays free
    assert op_counts(fused)["batch_norm"] == 0


def test_exported_program_round_trip_keeps_its_signature() -> None:
    """An ExportedProgram in, one out: the lean module is exported again with the program's signature."""
    torch.manual_seed(0)
    model = randomize_batchnorm_(build("repvgg-tiny"), 0).eval()
    x = torch.randn(2, 3, 32, 32)
    ep = torch.export.export(model, (x,), dynamic_shapes=({0: torch.export.Dim("b")},))
    out = fxfuse.reparametrize(ep)
    assert isinstance(out, torch.export.ExportedProgram)
    with torch.no_grad():
        assert_close_f64(model(x[:1]), out.module()(x[:1]), rtol=1e-5)


# ------------------------------------------------------------------ auto never worse than a single capture
def _random_nets():  # the fuzzer's strategy, imported lazily (tests/test_fuzz.py builds it at import)
    from test_fuzz import random_nets

    return random_nets(max_blocks=3)


@settings(max_examples=6, deadline=None, suppress_health_check=list(HealthCheck))
@given(_random_nets())
def test_auto_is_never_worse_than_a_single_capture(case) -> None:
    results = {}
    for capture in ("auto", "symbolic", "export"):
        try:
            results[capture] = fxfuse.reparametrize(copy.deepcopy(case.net), case.input, capture=capture)
        except fxfuse.FusionError:
            results[capture] = None
    auto = results["auto"]
    singles = [m for c, m in results.items() if c != "auto" and m is not None]
    assert auto is not None or not singles  # auto raises only when no capture gives a verified model
    if auto is None:
        return
    best = min(executed_fusable(m, case.input) for m in singles)
    assert executed_fusable(auto, case.input) <= best, auto.fxfuse_report
    kept = [c for c in auto.fxfuse_report.captures if c.kept]
    assert len(kept) == 1 and kept[0].capture == auto.fxfuse_report.capture
    assert all(c.code is not None for c in auto.fxfuse_report.captures if not c.kept)


# ---------------------------------------------------------------------- a drifting result is rolled back
DRIFT = "test_writes_its_weight"


@pytest.fixture
def drifting_rule() -> Iterator[str]:
    """A user rule with a bug no check of one call can see: after a fused conv runs, it adds 1e-3 to that conv's
    weight *in place*. The first call is exact; every later call differs from the one before."""
    done = set()

    @fxfuse.register_rule(DRIFT, enabled=False, after="conv_bn")
    def writes_weight(ctx: RewriteContext, node: fx.Node):
        target = str(node.target)
        if node.op != "call_module" or not target.startswith("fused") or (id(ctx.gm), target) in done:
            return None

        def rewrite() -> None:
            done.add((id(ctx.gm), target))
            with ctx.graph.inserting_after(node):
                weight = ctx.graph.get_attr(f"{target}.weight")
            with ctx.graph.inserting_after(weight):
                ctx.graph.call_method("add_", (weight, 1e-3))

        return rewrite

    yield DRIFT
    fxfuse.unregister_rule(DRIFT)


def test_a_rewrite_that_drifts_between_calls_is_rolled_back(drifting_rule: str) -> None:
    torch.manual_seed(0)
    model = randomize_batchnorm_(nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4)), 0).eval()
    x = torch.randn(2, 3, 6, 6)
    fused = fxfuse.reparametrize(model, x, enable=[drifting_rule])
    report = fused.fxfuse_report
    assert [(r.key.split(":")[0], r.code) for r in report.rollbacks] == [(drifting_rule, Reason.ARTIFACT_DRIFT)]
    assert report.fused.get("conv_bn") == 1
    with torch.no_grad():
        first, second = fused(x), fused(x)
    assert torch.equal(first, second)
    assert_close_f64(model(x), first, rtol=1e-5)


@pytest.mark.parametrize("make", [lambda: nn.Conv2d(3, 4, 3, padding="same", padding_mode="reflect"),
                                  lambda: nn.BatchNorm2d(4), lambda: nn.Linear(3, 2), lambda: nn.ReLU(inplace=True)])
def test_copy_leaf_is_a_deep_copy_through_the_memo(make) -> None:
    """The copy a lens / the artifact holds of a torch.nn leaf: tensors swapped through the memo (or copied when
    not in it), every mutable attribute its own, hooks kept — what ``copy.deepcopy`` gives, without its cost."""
    from fxfuse.ir.graphs import copy_leaf

    mod = make()
    mod.register_forward_hook(lambda m, i, o: o)
    params = list(mod.parameters())
    memo = {id(params[0]): nn.Parameter(params[0].detach().double())} if params else {}
    new = copy_leaf(mod, memo)
    want = copy.deepcopy(mod)
    assert type(new) is type(mod) and vars(new).keys() == vars(want).keys()
    assert memo[id(mod)] is new and copy_leaf(mod, memo) is new
    for key, value in vars(new).items():
        if isinstance(value, (dict, set, list)):
            assert value is not vars(mod)[key], key
    if params:
        assert new.weight is memo[id(params[0])] and new.weight.dtype == torch.float64
        for (name, t), (_, t0) in zip(list(new.named_parameters())[1:], list(mod.named_parameters())[1:]):
            assert t is not t0 and torch.equal(t, t0), name
    for (_, b), (_, b0) in zip(new.named_buffers(), mod.named_buffers()):
        assert b is not b0 and torch.equal(b, b0)
    new._forward_hooks.clear()
    new.training = False
    assert len(mod._forward_hooks) == 1 and mod.training
    if isinstance(mod, nn.BatchNorm2d):
        new.running_mean.add_(1)
        assert torch.equal(mod.running_mean, torch.zeros(4))


def test_copy_leaf_defers_to_deepcopy_off_torch_nn() -> None:
    from fxfuse.ir.graphs import copy_leaf

    class Scale(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.factors = [torch.ones(2)]

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return x * self.factors[0]

    seq = nn.Sequential(nn.ReLU())
    for mod in (Scale(), seq):
        new = copy_leaf(mod, {})
        assert type(new) is type(mod) and new is not mod
    new_scale = copy_leaf(Scale(), {})
    assert isinstance(new_scale.factors, list) and new_scale.factors[0].shape == (2,)
    assert copy_leaf(seq, {})[0] is not seq[0]
