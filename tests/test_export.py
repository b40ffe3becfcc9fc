"""The fused model is an ordinary deploy network: ``torch.export``, ``torch.compile(fullgraph=True)`` and ONNX
(run by onnxruntime) all take it and compute the same thing, and what they see is the fused graph (no BN,
RepVGG without adds).

Reference RepVGG (``repvgg-tiny``, 32x32) and torchvision resnet18 (64x64), random BN statistics. Numbers are
compared in float64 where the backend allows (export, compile): relative error ≤ 1e-9 of max|y| against the
*unfused* model. onnxruntime runs float32: its output is compared with the fused model in float32 (≤ 1e-5, the
exporter and runtime choose different kernels) and with the unfused float32 model (≤ 1e-4); the fusion
itself is checked in float64 by the other tests here.
The inductor (C++ codegen) compile is marked slow (~35 s on this CPU); the fast compile test uses dynamo with
the ``aot_eager`` backend, which is where graph breaks would show.
"""

from __future__ import annotations

import io
import warnings
from collections import Counter
from typing import Tuple

import pytest
import torch
from torch import Tensor, nn

import fxfuse
from fxfuse import GraphStats
from fxfuse.testing import assert_close_f64

from _helpers import EXPECTED, make

MODELS = list(EXPECTED)


def fused_and_checked(name: str, dtype: torch.dtype = torch.float64) -> Tuple[nn.Module, nn.Module, Tensor]:
    """``(model, fused, x)`` with the fused structure asserted (and, in float64, the outputs equal)."""
    model, x = make(name, dtype)
    fused = fxfuse.reparametrize(model, x)
    s = GraphStats.of(fused)
    assert (s.convs, s.batch_norms, s.adds) == EXPECTED[name] and not fused.fxfuse_report.rolled_back
    if dtype == torch.float64:
        with torch.no_grad():
            assert_close_f64(model(x), fused(x), rtol=1e-9)
    return model, fused, x


def aten_counts(gm: torch.fx.GraphModule) -> Counter:
    """How many conv / batch_norm / add ops an exported or captured graph calls."""
    counts: Counter = Counter()
    for node in gm.graph.nodes:
        if node.op != "call_function":
            continue
        name = str(node.target)
        for kind in ("conv", "batch_norm", "add"):
            if kind in name:
                counts[kind] += 1
    return counts


@pytest.mark.parametrize("name", MODELS)
def test_torch_export(name: str) -> None:
    model, fused, x = fused_and_checked(name)
    ep = torch.export.export(fused, (x,))
    counts = aten_counts(ep.graph_module)
    convs, _, adds = EXPECTED[name]
    assert counts["conv"] == convs and counts["batch_norm"] == 0 and counts["add"] == adds
    with torch.no_grad():
        y = ep.module()(x)
        assert_close_f64(model(x), y, rtol=1e-9)
        x2 = torch.randn_like(x)  # not the example input
        assert_close_f64(model(x2), ep.module()(x2), rtol=1e-9)


@pytest.mark.parametrize("name", MODELS)
def test_compile_fullgraph_no_graph_breaks(name: str) -> None:
    model, fused, x = fused_and_checked(name)
    torch._dynamo.reset()
    explanation = torch._dynamo.explain(fused)(x)
    assert explanation.graph_break_count == 0 and explanation.graph_count == 1
    captured = explanation.graphs[0]
    convs, _, adds = EXPECTED[name]
    assert sum(isinstance(m, nn.Conv2d) for m in captured.modules()) + aten_counts(captured)["conv"] == convs
    compiled = torch.compile(fused, fullgraph=True, backend="aot_eager")  # fullgraph: a break would raise
    with torch.no_grad():
        assert_close_f64(model(x), compiled(x), rtol=1e-9)
    torch._dynamo.reset()


@pytest.mark.slow
def test_compile_inductor_matches() -> None:
    """Default backend (inductor, C++ codegen on CPU), float32 as deployed."""
    model, fused, x = fused_and_checked("repvgg-tiny", torch.float32)
    torch._dynamo.reset()
    compiled = torch.compile(fused, fullgraph=True)
    with torch.no_grad():
        y, want = compiled(x), fused(x)
        assert_close_f64(want, y, rtol=1e-5)
        assert_close_f64(model(x), y, rtol=1e-5)
    torch._dynamo.reset()


@pytest.mark.parametrize("name", MODELS)
def test_onnx_export_runs_in_onnxruntime(name: str) -> None:
    onnx = pytest.importorskip("onnx")
    ort = pytest.importorskip("onnxruntime")
    model, fused, x = fused_and_checked(name, torch.float32)
    buf = io.BytesIO()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the TorchScript exporter's deprecation notice
        # dynamo=False: the TorchScript-based exporter; the dynamo one needs onnxscript, not a dependency here.
        torch.onnx.export(fused, (x,), buf, dynamo=False, input_names=["x"], output_names=["y"],
                          dynamic_axes={"x": {0: "batch"}, "y": {0: "batch"}})
    proto = onnx.load_from_string(buf.getvalue())
    onnx.checker.check_model(proto)
    ops = Counter(n.op_type for n in proto.graph.node)
    convs, _, adds = EXPECTED[name]
    assert ops["Conv"] == convs and ops["BatchNormalization"] == 0 and ops["Add"] == adds
    session = ort.InferenceSession(buf.getvalue(), providers=["CPUExecutionProvider"])
    for batch in (x, torch.randn(3, *x.shape[1:])):
        (y,) = session.run(None, {"x": batch.numpy()})
        with torch.no_grad():
            want = fused(batch)
            assert_close_f64(want, torch.from_numpy(y), rtol=1e-5)
            assert_close_f64(model(batch), torch.from_numpy(y), rtol=1e-4)
