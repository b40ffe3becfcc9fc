"""Give BatchNorm layers random (non-identity) affine parameters and running statistics.

A freshly built BatchNorm in eval mode is the identity map, which hides every folding bug.
"""
from __future__ import annotations

import torch
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm
from torch.nn.parameter import UninitializedBuffer, UninitializedParameter

__all__ = ["randomize_batchnorm_"]


def _fill_(t: torch.Tensor | None, values: torch.Tensor) -> None:
    """Copy ``values`` (float64, CPU) into ``t`` keeping its dtype and device; skip missing tensors."""
    if t is None or isinstance(t, (UninitializedParameter, UninitializedBuffer)):
        return
    t.copy_(values.to(dtype=t.dtype, device=t.device))


@torch.no_grad()
def randomize_batchnorm_(model: nn.Module, seed: int = 0) -> nn.Module:
    """Randomize every BatchNorm (1d/2d/3d, SyncBatchNorm, subclasses) of ``model`` in place.

    * ``weight``: ``±U(0.5, 1.5)`` (random sign), ``bias``: ``N(0, 1)``;
    * ``running_mean``: ``N(0, 1)``, ``running_var``: ``U(0.5, 2.0)``.

    Tensors that do not exist (``affine=False`` or ``track_running_stats=False``) are skipped.
    Values come from a CPU ``torch.Generator`` seeded with ``seed``, drawn in module order, so the
    result is deterministic for a given seed and architecture. Returns ``model``.
    """
    gen = torch.Generator(device="cpu")
    gen.manual_seed(seed)
    f64 = torch.float64
    for module in model.modules():
        if not isinstance(module, _BatchNorm):
            continue
        n = module.num_features
        # Draw all four tensors unconditionally so one layer's flags do not shift the others' values.
        magnitude = torch.rand(n, generator=gen, dtype=f64) + 0.5
        sign = torch.randint(0, 2, (n,), generator=gen).to(f64) * 2 - 1
        bias = torch.randn(n, generator=gen, dtype=f64)
        mean = torch.randn(n, generator=gen, dtype=f64)
        var = torch.rand(n, generator=gen, dtype=f64) * 1.5 + 0.5
        _fill_(module.weight, magnitude * sign)
        _fill_(module.bias, bias)
        _fill_(module.running_mean, mean)
        _fill_(module.running_var, var)
    return model
