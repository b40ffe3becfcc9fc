"""Shape propagation (fxfuse/capture/shapes.py) and what the pass saves with it.

* The eval-BatchNorm shortcut (module, ``F.batch_norm``, ATen ``batch_norm``: output shaped like the input, no
  Python meta decomposition) records exactly what PyTorch's own ``ShapeProp`` records on the meta device, on
  random graphs of both captures — shapes, dtypes, strides, memory format.
* Every node a propagation ran over is marked, also nodes with no tensor output (export's input guard), so a
  rewrite loop does not propagate the whole graph again after every sweep.
* ``dtypes``: fused layers held in float64 propagate as their target dtype.
* ``verify=False`` rewrites the model's own parameters (no float64 copy) and still returns, bit for bit, the
  tensors of the verified pass (the folds run in float64; fused layers stay float64 until the end)."""

from __future__ import annotations

from typing import Any, Dict, Tuple

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import fx, nn
from torch.fx.passes.shape_prop import ShapeProp

import fxfuse
from fxfuse.capture import Call, propagate_shapes
from fxfuse.capture.export import capture as export_capture
from fxfuse.ir.read.args import SHAPED
from fxfuse.models import build, default_input_shape, randomize_batchnorm_
from fxfuse.rewrite import RewriteContext


class BNStack(nn.Module):
    """conv → BN (module) → relu → conv → F.batch_norm (functional, eval) → a residual add."""

    def __init__(self, c: int, k: int, affine: bool) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(c, c, k, padding=k // 2)
        self.bn1 = nn.BatchNorm2d(c, affine=affine)
        self.conv2 = nn.Conv2d(c, c, 1)
        self.register_buffer("mean", torch.randn(c))
        self.register_buffer("var", torch.rand(c) + 0.5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = torch.relu(self.bn1(self.conv1(x)))
        z = F.batch_norm(self.conv2(y), self.mean, self.var, None, None, False, 0.1, 1e-5)
        return z + x


def _meta_of(gm: fx.GraphModule) -> Dict[str, Tuple[Any, ...]]:
    out = {}
    for node in gm.graph.nodes:
        tm = node.meta.get("tensor_meta")
        if tm is not None and hasattr(tm, "shape"):
            out[node.name] = (tuple(tm.shape), tm.dtype, tuple(tm.stride), tm.memory_format)
    return out


def _graph(model: nn.Module, x: torch.Tensor, capture: str) -> fx.GraphModule:
    if capture == "symbolic":
        return fx.symbolic_trace(model)
    return export_capture(model, (x,)).gm


@settings(max_examples=12, deadline=None)
@given(c=st.integers(1, 6), k=st.sampled_from([1, 3]), affine=st.booleans(), size=st.integers(3, 9),
       batch=st.integers(1, 3), capture=st.sampled_from(["symbolic", "export"]),
       channels_last=st.booleans())
def test_batchnorm_shortcut_records_what_shapeprop_records(c: int, k: int, affine: bool, size: int, batch: int,
                                                           capture: str, channels_last: bool) -> None:
    model = randomize_batchnorm_(BNStack(c, k, affine), seed=c).eval()
    x = torch.randn(batch, c, size, size)
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    gm = _graph(model, x, capture)
    kinds = {str(n.target) for n in gm.graph.nodes}
    assert capture == "symbolic" or "aten.batch_norm.default" in kinds  # the ATen spelling is what is tested
    propagate_shapes(gm, Call((x,), {}, None))
    ours = _meta_of(gm)
    _pytorch_shape_prop_on_meta(gm, x)
    assert ours == _meta_of(gm)
    assert len(ours) >= 6


class _PlainHolder(nn.Module):
    def __init__(self, gm: fx.GraphModule) -> None:
        super().__init__()
        self.gm = gm

    def forward(self, *args: Any) -> Any:
        return ShapeProp(self.gm).propagate(*args)


def _pytorch_shape_prop_on_meta(gm: fx.GraphModule, x: torch.Tensor) -> None:
    """PyTorch's ``ShapeProp`` with every tensor on the meta device (its meta kernels: a conv's meta output is
    contiguous even where the CPU kernel keeps channels-last, so the CPU run is not the reference)."""
    def meta(t: torch.Tensor) -> torch.Tensor:
        return torch.empty_like(t, device="meta")

    state = {f"gm.{k}": meta(v) for k, v in [*gm.named_parameters(), *gm.named_buffers()]}
    with torch.no_grad():
        torch.func.functional_call(_PlainHolder(gm), state, (meta(x),))


def test_every_propagated_node_is_marked_so_rewrites_do_not_repropagate() -> None:
    model = randomize_batchnorm_(BNStack(3, 3, True), seed=0).eval()
    x = torch.randn(2, 3, 8, 8)
    gm = export_capture(model, (x,)).gm
    no_tensor = [n for n in gm.graph.nodes if n.op == "call_module"]  # export's input guard returns None
    assert no_tensor
    ctx = RewriteContext(gm, {}, torch.float32, False)
    assert ctx.needs_shapes()
    propagate_shapes(gm, Call((x,), {}, None))
    assert all("tensor_meta" not in n.meta and n.meta[SHAPED] for n in no_tensor)
    assert not ctx.needs_shapes()
    with gm.graph.inserting_before(next(iter(no_tensor))):  # a node a rule inserted: it waits for propagation
        gm.graph.call_function(torch.relu, (next(n for n in gm.graph.nodes if n.op == "placeholder"),))
    assert ctx.needs_shapes()


def test_dtypes_override_propagates_float64_layers_as_their_target_dtype() -> None:
    conv = nn.Conv2d(2, 4, 3).double()
    gm = fx.symbolic_trace(nn.Sequential(nn.Conv2d(2, 2, 1), conv))
    x = torch.randn(1, 2, 6, 6)
    with pytest.raises(RuntimeError):  # float32 input into a float64 layer: does not run as it is
        propagate_shapes(gm, Call((x,), {}, None))
    propagate_shapes(gm, Call((x,), {}, None), {id(conv.weight): torch.float32, id(conv.bias): torch.float32})
    out = next(n for n in gm.graph.nodes if n.op == "output").args[0]
    assert out.meta["tensor_meta"].dtype == torch.float32 and tuple(out.meta["tensor_meta"].shape) == (1, 4, 4, 4)
    assert conv.weight.dtype == torch.float64  # nothing was cast


@pytest.mark.parametrize("name", ["dbb", "repvgg-tiny", "mobileone", "acnet"])
@pytest.mark.parametrize("capture", ["symbolic", "export"])
def test_verify_false_returns_the_verified_tensors_bit_for_bit(name: str, capture: str) -> None:
    """DBB chains folds (conv-BN, 1x1→kxk, pad, sum): rounding the intermediate would differ in the last bit."""
    model = randomize_batchnorm_(build(name), seed=3).eval()
    x = torch.randn(*default_input_shape(name))
    before = {k: v.clone() for k, v in model.state_dict().items()}
    verified = fxfuse.reparametrize(model, x, capture=capture)
    fast = fxfuse.reparametrize(model, x, capture=capture, verify=False)
    want, got = verified.state_dict(), fast.state_dict()
    assert list(got) == list(want)
    assert all(v.dtype == want[k].dtype and torch.equal(v, want[k]) for k, v in got.items())
    assert verified.fxfuse_report.fused == fast.fxfuse_report.fused and fast.fxfuse_report.fused
    # the returned model owns its tensors; the input model is untouched
    mine = {t.untyped_storage().data_ptr() for t in model.state_dict().values()}
    assert not mine & {t.untyped_storage().data_ptr() for t in got.values()}
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())
