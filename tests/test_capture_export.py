"""``capture="export"``: re-parameterization on the ATen graph ``torch.export`` captures (fxfuse.capture.export).

The corpus of small networks written the way training-form code is written in the wild (fxfuse/models/wild/: the
constructs that stop ``torch.fx`` symbolic tracing and weights generated in forward). Each must reach the structure
of its hand-written deploy form (convs / BatchNorms / Linears executed, counted by the op table), equal in float64
to 1e-10 of max|y| on the example and on another batch size (the batch dim stays dynamic), with BN statistics
randomized (``assert_reparametrizes``).
"""

from __future__ import annotations

import io
import os
import shutil
from typing import Tuple

import pytest
import torch
import torch.nn.functional as F
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from torch import Tensor, nn

import fxfuse
from fxfuse import GraphStats, Reason
from fxfuse.models import build, randomize_batchnorm_
from fxfuse.models.wild import CORPUS, DBBNet, ReshapeNet, conv_bn, make
from fxfuse.testing import assert_reparametrizes, batchnorm_states, conv_geometries, op_counts


@pytest.mark.parametrize("name", list(CORPUS))
def test_corpus_reaches_the_deploy_structure_through_export(name: str) -> None:
    model, x = make(name)
    convs, bns, linears = CORPUS[name][2]
    fused = assert_reparametrizes(model, x, capture="export", expect_convs=convs, expect_batch_norms=bns,
                                  expect_linears=linears)
    report = fused.fxfuse_report
    assert report.capture == "export" and report.traced_whole
    assert "dynamic" in report.capture_reason and "static" not in report.capture_reason
    assert not report.rolled_back


# The corpus models symbolic tracing captures whole: auto keeps symbolic unless export is strictly better.
SYMBOLIC_WHOLE = {"large_kernel_generated", "cat_decoder_dict_out", "token_mlp_bn1d"}


AUTO_FAST = ["ecb_eval_rebuild", "reshape_star_size", "aliased_inplace_add", "forward_hook", "large_kernel_generated"]


@pytest.mark.parametrize("name", [pytest.param(n, marks=() if n in AUTO_FAST else pytest.mark.slow) for n in CORPUS])
def test_auto_reaches_the_deploy_structure(name: str) -> None:
    """``capture="auto"`` (the default) gets there too: export when symbolic tracing fails, is unfaithful (the
    aliased in-place add) or leaves BatchNorms (the hook hides the conv from the symbolic trace)."""
    model, x = make(name)
    convs, bns, linears = CORPUS[name][2]
    fused = assert_reparametrizes(model, x, expect_convs=convs, expect_batch_norms=bns, expect_linears=linears)
    report = fused.fxfuse_report
    assert report.capture == ("symbolic" if name in SYMBOLIC_WHOLE else "export"), report.capture_reason
    assert report.traced_whole


def test_symbolic_alone_stays_short_of_the_deploy_structure() -> None:
    """The baseline the export front end improves on: the DBB block's BN-and-pad layer does not trace, so the
    per-sub-module fallback leaves its BatchNorms (counts asserted against the deploy form's 2 convs + 0 BN)."""
    model, x = make("dbb_bn_and_pad")
    fused = assert_reparametrizes(model, x, capture="symbolic", expect_batch_norms=None)
    counts = op_counts(fused)
    assert fused.fxfuse_report.capture == "submodules" and not fused.fxfuse_report.traced_whole
    assert counts["batch_norm"] > 0 and counts["conv"] > 2


# ------------------------------------------------------------------------ auto vs symbolic on models
@pytest.mark.parametrize("name", ["repvgg-tiny", pytest.param("dbb", marks=pytest.mark.slow)])
def test_auto_is_no_worse_than_symbolic_on_traceable_models(name: str) -> None:
    torch.manual_seed(0)
    model = randomize_batchnorm_(build(name), 0).eval().double()
    x = torch.randn(2, 3, 8, 8, dtype=torch.float64)
    symbolic = fxfuse.reparametrize(model, x, capture="symbolic")
    auto = fxfuse.reparametrize(model, x)
    s, a = GraphStats.of(symbolic), GraphStats.of(auto)
    assert (a.convs + a.batch_norms) <= (s.convs + s.batch_norms)
    assert auto.fxfuse_report.capture == "symbolic" and a.batch_norms == 0
    with torch.no_grad():
        assert (auto(x) - model(x)).abs().max() <= 1e-10 * model(x).abs().max()


class ConvAlsoReturned(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv, self.bn = nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4)

    def forward(self, x: Tensor) -> Tuple[Tensor, Tensor]:
        y = self.conv(x)
        return self.bn(y), y  # the pre-BN map is an output too: the BN stays in any capture


def test_auto_does_not_export_for_an_algebraic_refusal() -> None:
    """A BN left for an algebraic reason (the conv's output is also returned) is left by any capture: auto does
    not spend an export on it."""
    fused = assert_reparametrizes(ConvAlsoReturned(), torch.randn(2, 3, 5, 5), expect_convs=1, expect_batch_norms=1)
    report = fused.fxfuse_report
    assert (report.capture, report.capture_reason) == ("symbolic", "traced whole by torch.fx")
    assert any(u.code is Reason.OTHER_USERS for u in report.unfused if u.rule == "conv_bn")
    assert not any(u.code is Reason.NOT_CONSTANT for u in report.unfused)  # the code auto would export for


def test_auto_keeps_symbolic_on_a_tie() -> None:
    """A hooked conv is opaque to the symbolic graph, so auto tries export (which runs the hook); the BN still
    cannot fold (its input is also returned), export is no better, and the symbolic result is kept."""
    model = ConvAlsoReturned()
    model.conv.register_forward_hook(lambda m, i, o: o * 2.0)
    fused = assert_reparametrizes(model, torch.randn(2, 3, 5, 5), expect_convs=1, expect_batch_norms=1)
    report = fused.fxfuse_report
    assert report.capture == "symbolic"
    assert "export not used [executes_more]: executes 2 convs + BatchNorms + pools, the kept symbolic capture 2" \
        in report.capture_reason
    assert [(c.capture, c.kept, c.code, c.executed) for c in report.captures] == [
        ("symbolic", True, None, 2), ("export", False, Reason.EXECUTES_MORE, 2)]


# ------------------------------------------------------------------- rules on ATen graphs (properties)
@settings(max_examples=6)
@given(conv_geometries(max_channels_per_group=3, max_groups=2), batchnorm_states())
def test_conv_bn_property_on_aten_graphs(geo, bn) -> None:
    model = nn.Sequential(geo.conv(), bn.module(geo.out_channels, geo.ndim))
    assert_reparametrizes(model, geo.example_input(), capture="export", expect_convs=1, expect_batch_norms=0,
                          randomize=False)


@settings(max_examples=4)
@given(st.sampled_from([1, 3]), st.integers(1, 2), st.booleans())
def test_branch_sum_property_on_aten_graphs(k: int, groups: int, identity: bool) -> None:
    """RepVGG-style sum (k x k + 1x1 + identity BN, all conv-BN) → one conv; the ATen add, BN tuple + getitem and
    conv2d spellings read by the same rules."""
    c = 4

    class Block(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.a, self.b = conv_bn(c, c, k, 1, k // 2, groups), conv_bn(c, c, 1, 1, 0, groups)
            self.idn = nn.BatchNorm2d(c) if identity else None

        def forward(self, x: Tensor) -> Tensor:
            out = self.a(x) + self.b(x)
            return out + self.idn(x) if self.idn is not None else out

    assert_reparametrizes(Block(), torch.randn(2, c, 5, 5), capture="export", expect_convs=1,
                          expect_batch_norms=0)


class DataDependentBranch(nn.Module):
    """A branch on a value computed from the input: neither symbolic tracing nor export captures it whole."""

    def __init__(self) -> None:
        super().__init__()
        self.body, self.head = conv_bn(3, 4, 3, 1, 1), conv_bn(4, 4, 1)

    def forward(self, x: Tensor) -> Tensor:
        y = self.body(x)
        return self.head(y) if bool(y.sum() > 0) else -y


def test_export_failure_is_a_fusion_error_and_auto_falls_back() -> None:
    torch.manual_seed(0)
    model, x = randomize_batchnorm_(DataDependentBranch(), 0).eval().double(), torch.randn(2, 3, 5, 5).double()
    with pytest.raises(fxfuse.FusionError, match="torch.export could not capture"):
        fxfuse.reparametrize(model, x, capture="export")
    fused = fxfuse.reparametrize(model, x)
    report = fused.fxfuse_report
    assert report.capture == "submodules" and "torch.export failed" in report.capture_reason
    assert report.submodules["body"].startswith("rewritten") and report.fused["conv_bn"] == 2
    with torch.no_grad():
        assert (fused(x) - model(x)).abs().max() <= 1e-10 * model(x).abs().max()
    with pytest.raises(ValueError, match="capture must be one of"):
        fxfuse.reparametrize(model, x, capture="dynamo")


# ------------------------------------------------------------------- batch size, user dynamic shapes
def test_static_batch_when_the_code_specializes_it() -> None:
    """``x.view(2, -1)`` pins the batch: export refuses a dynamic batch, the capture is static and says why."""

    class Pinned(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.body = conv_bn(3, 4, 3, 1, 1)

        def forward(self, x: Tensor) -> Tensor:
            return self.body(x).view(2, -1)

    fused = assert_reparametrizes(Pinned(), torch.randn(2, 3, 4, 4), capture="export", expect_convs=1,
                                  second_batch=False)
    assert "static shapes" in fused.fxfuse_report.capture_reason


class BatchOneSpecialCase(nn.Module):
    """A traceable body, then a branch on ``int()`` of the batch size: symbolic tracing fails at the root, and
    export can only capture the example's batch size (the dynamic graph takes the other branch)."""

    def __init__(self) -> None:
        super().__init__()
        self.body = conv_bn(3, 4, 3, 1, 1)

    def forward(self, x: Tensor) -> Tensor:
        y = self.body(x)
        return y * 2 if int(y.shape[0]) == 1 else y


def test_auto_does_not_return_a_program_pinned_to_the_example_batch() -> None:
    """``capture="auto"`` keeps every batch size the model accepts: a static export loses to the sub-module
    fallback (which still fuses the body) and the reason says so; ``capture="export"`` returns the static program."""
    torch.manual_seed(0)
    model = randomize_batchnorm_(BatchOneSpecialCase(), 0).eval().double()
    x = torch.randn(1, 3, 5, 5, dtype=torch.float64)
    fused = assert_reparametrizes(model, x, randomize=False, expect_batch_norms=0)  # also checked at batch 2
    report = fused.fxfuse_report
    assert report.capture == "submodules" and "export not used [batch_pinned]: it captured static shapes" in \
        report.capture_reason, report.capture_reason
    assert {c.capture: (c.kept, c.code) for c in report.captures} == {
        "symbolic": (False, Reason.TRACE_FAILED), "export": (False, Reason.BATCH_PINNED), "submodules": (True, None)}
    assert dict(report.fused) == {"conv_bn": 1}
    pinned = fxfuse.reparametrize(model, x, capture="export")
    assert "static shapes" in pinned.fxfuse_report.capture_reason
    with pytest.raises((AssertionError, RuntimeError)):  # torch's shape guard (the type depends on torch's version)
        pinned(torch.randn(3, 3, 5, 5, dtype=torch.float64))


def test_user_dynamic_shapes_make_spatial_dims_dynamic() -> None:
    model, x = make("reshape_star_size")
    dim = torch.export.Dim
    shapes = ({0: dim("b"), 2: dim("h", min=3, max=64), 3: dim("w", min=3, max=64)},)
    fused = assert_reparametrizes(model, x, capture="export", dynamic_shapes=shapes, expect_convs=3,
                                  extra_inputs=[torch.randn(3, 3, 9, 7)])
    assert fused.fxfuse_report.capture_reason.endswith("as given by dynamic_shapes")


# ------------------------------------------------------------------------- ExportedProgram in and out
def test_exported_program_in_and_out_round_trips() -> None:
    torch.manual_seed(0)
    model = randomize_batchnorm_(ReshapeNet(), 0).eval()
    x = torch.randn(2, 3, 6, 6)
    batch = torch.export.Dim("batch")
    ep = torch.export.export(model, (x,), dynamic_shapes=({0: batch},), strict=False)
    fused_ep = fxfuse.reparametrize(ep, x)
    assert isinstance(fused_ep, torch.export.ExportedProgram)
    assert fused_ep.call_spec.in_spec == ep.call_spec.in_spec
    assert fused_ep.call_spec.out_spec == ep.call_spec.out_spec
    counts = GraphStats.of(fused_ep.graph_module)
    assert (counts.convs, counts.batch_norms) == (3, 0)
    buffer = io.BytesIO()
    torch.export.save(fused_ep, buffer)
    buffer.seek(0)
    loaded = torch.export.load(buffer)
    for inp in (x, torch.randn(5, 3, 6, 6)):
        with torch.no_grad():
            ref = model.double()(inp.double()).float()
            model.float()
            out = loaded.module()(inp)
        assert (out - ref).abs().max() <= 1e-5 * ref.abs().max()


def test_exported_program_with_a_batch_of_one_stays_dynamic() -> None:
    """A dynamic-batch program fused with a batch-1 example (export would pin a dim whose example size is 1) keeps
    its dynamic batch; a program's own example inputs are used when none is passed."""
    torch.manual_seed(0)
    model = randomize_batchnorm_(ReshapeNet(), 0).eval()
    batch = torch.export.Dim("batch")
    ep = torch.export.export(model, (torch.randn(2, 3, 6, 6),), dynamic_shapes=({0: batch},), strict=False)
    for example in (torch.randn(1, 3, 6, 6), None):
        fused_ep = fxfuse.reparametrize(ep, example)
        assert [str(r) for r in fused_ep.range_constraints.values()] == \
            [str(r) for r in ep.range_constraints.values()]
        assert GraphStats.of(fused_ep.graph_module).batch_norms == 0
        for n in (1, 8):
            inp = torch.randn(n, 3, 6, 6)
            with torch.no_grad():
                ref, out = model(inp), fused_ep.module()(inp)
            assert (out - ref).abs().max() <= 1e-5 * ref.abs().max()


def test_static_exported_program_stays_static() -> None:
    torch.manual_seed(0)
    model = randomize_batchnorm_(ReshapeNet(), 0).eval()
    ep = torch.export.export(model, (torch.randn(1, 3, 6, 6),), strict=False)
    fused_ep = fxfuse.reparametrize(ep)
    assert not fused_ep.range_constraints
    with pytest.raises((AssertionError, RuntimeError)):  # the signature is the original's: batch 1 only
        fused_ep.module()(torch.randn(2, 3, 6, 6))


@pytest.mark.slow  # a C++ compile (~40 s on 2 cores): an integration check of the AOTInductor path, not a property
@pytest.mark.skipif(shutil.which(os.environ.get("CXX", "g++")) is None, reason="AOTInductor needs a C++ compiler")
def test_fused_program_runs_under_aot_inductor(tmp_path) -> None:
    """The returned program runs where the original did: AOTInductor compiles it into a package that, loaded back,
    gives the original's outputs at other batch sizes (~25 s: one C++ compile)."""
    torch.manual_seed(0)
    model = randomize_batchnorm_(DBBNet(), 0).eval()
    ep = torch.export.export(model, (torch.randn(2, 3, 8, 8),), dynamic_shapes=({0: torch.export.Dim("batch")},),
                             strict=False)
    fused_ep = fxfuse.reparametrize(ep)
    assert GraphStats.of(fused_ep.graph_module).batch_norms == 0
    path = torch._inductor.aoti_compile_and_package(fused_ep, package_path=str(tmp_path / "fused.pt2"))
    runner = torch._inductor.aoti_load_package(path)
    for n in (1, 3):
        inp = torch.randn(n, 3, 8, 8)
        with torch.no_grad():
            ref = model(inp)
        assert (runner(inp) - ref).abs().max() <= 1e-5 * ref.abs().max()


class BiasFreeHead(nn.Module):
    """conv-BN, pooled, then a bias-free Linear and a BatchNorm1d: core ATen spells the Linear ``permute`` + ``mm``."""

    def __init__(self) -> None:
        super().__init__()
        self.conv, self.bn = nn.Conv2d(3, 6, 3), nn.BatchNorm2d(6)
        self.fc, self.bn1d = nn.Linear(6, 5, bias=False), nn.BatchNorm1d(5)

    def forward(self, x: Tensor) -> Tensor:
        return self.bn1d(self.fc(self.bn(self.conv(x)).mean((2, 3))))


@pytest.mark.parametrize("name", ["repvgg-tiny", "bias-free-head"])
def test_program_decomposed_to_core_aten_fuses(name: str) -> None:
    """``reparametrize(ep.run_decompositions())``: BatchNorm as ``_native_batch_norm_legit_no_training`` with its
    unused statistics outputs (dropped as dead code), convs as ``convolution``, a bias-free Linear as ``mm``."""
    torch.manual_seed(0)
    model = randomize_batchnorm_(build(name) if name == "repvgg-tiny" else BiasFreeHead(), 0).eval().double()
    x = torch.randn(2, 3, 8, 8, dtype=torch.float64)
    ep = torch.export.export(model, (x,), dynamic_shapes=({0: torch.export.Dim("batch")},),
                             strict=False).run_decompositions()
    fused_ep = fxfuse.reparametrize(ep, x)
    stats = GraphStats.of(fused_ep.graph_module)
    assert stats.batch_norms == 0 and not fused_ep.fxfuse_report.rolled_back
    expected = {"repvgg-tiny": {"conv_bn": 16, "branch_sum": 8}, "bias-free-head": {"conv_bn": 2}}[name]
    assert dict(fused_ep.fxfuse_report.fused) == expected
    for n in (2, 5):
        inp = torch.randn(n, 3, 8, 8, dtype=torch.float64)
        with torch.no_grad():
            ref, out = model(inp), fused_ep.module()(inp)
        assert (out - ref).abs().max() <= 1e-10 * ref.abs().max()


class MixedPrecisionHead(nn.Module):
    """A float32 model with a float64 head: ``h.double()`` and ``.float()`` are traced on fxfuse's float64 working
    copy, where export records the dtypes it saw (``_assert_tensor_metadata``)."""

    def __init__(self) -> None:
        super().__init__()
        self.conv, self.bn = nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4)
        self.w = nn.Parameter(torch.randn(5, 4, dtype=torch.float64))
        self.register_buffer("mask", (torch.rand(5, 4) > 0.5).double())

    def forward(self, x: Tensor) -> Tensor:
        h = self.bn(self.conv(x)).mean((2, 3))
        return F.linear(h.double(), self.w * self.mask).float()


def test_mixed_precision_model_through_export_runs_in_its_dtypes() -> None:
    torch.manual_seed(0)
    model = randomize_batchnorm_(MixedPrecisionHead(), 0).eval()
    x = torch.randn(2, 3, 6, 6)
    fused = fxfuse.reparametrize(model, x, capture="export")
    report = fused.fxfuse_report
    assert report.capture == "export" and dict(report.fused) == {"fold_constants": 1, "conv_bn": 1}, report
    for n in (2, 3):
        inp = torch.randn(n, 3, 6, 6)
        with torch.no_grad():
            ref, out = model(inp), fused(inp)
        assert out.dtype == torch.float32 and (out - ref).abs().max() <= 1e-5 * ref.abs().max()


# -------------------------------------------------------------------------------- the compile path
def test_compile_path_runs_the_fused_model() -> None:
    torch.manual_seed(0)
    model = randomize_batchnorm_(ReshapeNet(), 0).eval().double()
    x = torch.randn(2, 3, 6, 6, dtype=torch.float64)
    compiled = fxfuse.compile(model, x, backend="aot_eager")
    assert op_counts(compiled._orig_mod)["batch_norm"] == 0
    with torch.no_grad():
        for inp in (x, torch.randn(3, 3, 6, 6, dtype=torch.float64)):
            assert (compiled(inp) - model(inp)).abs().max() <= 1e-10 * model(inp).abs().max()
    assert compiled.fxfuse_report.total_fused > 0


@pytest.mark.slow
def test_compile_path_with_inductor() -> None:
    torch.manual_seed(0)
    model = randomize_batchnorm_(DBBNet(), 0).eval()
    x = torch.randn(1, 3, 8, 8)
    compiled = fxfuse.compile(model, x, reparametrize_kwargs={"capture": "export"})
    with torch.no_grad():
        ref = model(x)
        assert (compiled(x) - ref).abs().max() <= 1e-4 * ref.abs().max()


# ------------------------------------------------------------------- the fuzzer's random nets, both captures
def check_random_net_both_captures(case) -> None:
    """One random net (tests/test_fuzz.py) through ``capture="export"`` and ``"symbolic"``: equal in float64 on
    two batch sizes, no rollback, and export never executes more convs + BatchNorms than symbolic capture where
    that traces whole."""
    kwargs = {"expect_batch_norms": None, "rtol": 1e-10, "atol": 1e-12, "randomize": False, "verify": case.verify,
              "enable": ["horizontal"] if case.horizontal else []}
    exported = assert_reparametrizes(case.net, case.input, capture="export", **kwargs)
    symbolic = assert_reparametrizes(case.net, case.input, capture="symbolic", **kwargs)
    e, s = op_counts(exported), op_counts(symbolic)
    if symbolic.fxfuse_report.traced_whole:
        assert e["conv"] + e["batch_norm"] <= s["conv"] + s["batch_norm"], (exported.fxfuse_report,
                                                                          symbolic.fxfuse_report)


@settings(max_examples=6, deadline=None, derandomize=True, suppress_health_check=list(HealthCheck))
@given(st.data())
def test_random_nets_export_is_exact_and_no_worse_than_symbolic(data) -> None:
    """A handful of random nets in the default run (~3 s a net); ``--runslow`` draws 100."""
    from test_fuzz import random_nets

    check_random_net_both_captures(data.draw(random_nets()))


@pytest.mark.slow
@settings(max_examples=100, deadline=None, suppress_health_check=list(HealthCheck))
@given(st.data())
def test_random_nets_export_sweep(data) -> None:
    from test_fuzz import random_nets

    check_random_net_both_captures(data.draw(random_nets()))
