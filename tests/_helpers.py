"""Shared assertions for fusion tests: float64 equality and structure counts."""

from __future__ import annotations

from typing import Any, Dict, Tuple

import torchvision

import torch
from torch import fx, nn

import fxfuse
from fxfuse import GraphStats
from fxfuse.models import randomize_batchnorm_


def as_inputs(x: Any) -> Tuple[Any, ...]:
    return (x,) if isinstance(x, torch.Tensor) else tuple(x)


def max_rel_error(a: Any, b: Any) -> float:
    """max |a - b| / max |b| over (nested) tensor outputs."""
    la, lb = torch.utils._pytree.tree_leaves(a), torch.utils._pytree.tree_leaves(b)
    assert len(la) == len(lb)
    worst = 0.0
    for x, y in zip(la, lb):
        assert x.shape == y.shape, (x.shape, y.shape)
        scale = float(y.abs().max()) or 1.0
        worst = max(worst, float((x - y).abs().max()) / scale)
    return worst


def fuse_and_check(model: nn.Module, x: Any, *, seed: int = 0, rtol: float = 1e-10, second: Any = None,
                   **kwargs) -> fx.GraphModule:
    """Randomize BN stats, reparametrize a float64 copy, assert equal outputs (and on ``second``) and that the
    input model is untouched. Returns the fused model (float64)."""
    model = randomize_batchnorm_(model, seed).double().eval()
    inputs = tuple(t.double() if isinstance(t, torch.Tensor) else t for t in as_inputs(x))
    before = {k: v.clone() for k, v in model.state_dict().items()}
    fused = fxfuse.reparametrize(model, inputs, **kwargs)
    for k, v in model.state_dict().items():
        assert torch.equal(v, before[k]), f"input model changed: {k}"
    with torch.no_grad():
        assert max_rel_error(fused(*inputs), model(*inputs)) <= rtol
        if second is not None:
            second = tuple(t.double() for t in as_inputs(second))
            assert max_rel_error(fused(*second), model(*second)) <= rtol
    return fused


def stats(gm: fx.GraphModule) -> GraphStats:
    return GraphStats.of(gm)


def fused_counts(gm: nn.Module) -> Dict[str, int]:
    return dict(gm.fxfuse_report.fused)


def reasons(gm: nn.Module) -> str:
    return " | ".join(u.reason for u in gm.fxfuse_report.unfused)


# (convs, batch_norms, adds) the fused versions of the two "realistic" models keep.
EXPECTED = {"repvgg-tiny": (8, 0, 0), "resnet18": (20, 0, 8)}


def make(name: str = "repvgg-tiny", dtype: torch.dtype = torch.float64, seed: int = 0) -> Tuple[nn.Module, torch.Tensor]:
    """The reference RepVGG (``repvgg-tiny``, 2x3x32x32) or torchvision resnet18 (1x3x64x64), BN randomized."""
    from fxfuse.models import build

    torch.manual_seed(seed)
    if name == "resnet18":
        model, shape = torchvision.models.resnet18(num_classes=10), (1, 3, 64, 64)
    else:
        model, shape = build(name), (2, 3, 32, 32)
    randomize_batchnorm_(model, seed)
    x = torch.randn(shape, generator=torch.Generator().manual_seed(seed + 100), dtype=dtype)
    return model.eval().to(dtype), x
