"""Checking a rewrite: output comparison with dtype-aware tolerances, and bisection over applied rewrites.

float64 copies are compared with ``rtol = 1e-9`` of the reference's max-abs (a correct fold of resnet152 differs
by ~1e-12 there, a wrong one by ≥ 1e-3). Where a float64 copy is impossible the model's own dtype is used, with
tolerances wide enough for a correct fold of a deep net (float32: measured 4e-4 relative on resnet152)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Optional, Sequence

import torch
from torch import Tensor
from torch.utils._pytree import tree_flatten

DEFAULT_RTOL = {torch.float64: 1e-9, torch.float32: 2e-3, torch.float16: 5e-2, torch.bfloat16: 8e-2}


def default_rtol(dtype: torch.dtype) -> float:
    return DEFAULT_RTOL.get(dtype, 2e-3)


@dataclass
class Comparison:
    ok: bool
    max_abs: float
    max_rel: float
    tolerance: float
    detail: str = ""


def compare(reference: Any, actual: Any, rtol: Optional[float] = None, atol: float = 0.0) -> Comparison:
    """Compare nested outputs. A tensor passes when ``max|a - r| <= atol + rtol · max|r|`` (NaN where the
    reference is NaN counts as equal); non-tensor leaves must be equal; structure must match."""
    ref_leaves, ref_spec = tree_flatten(reference)
    out_leaves, out_spec = tree_flatten(actual)
    if ref_spec != out_spec:
        return Comparison(False, float("inf"), float("inf"), 0.0, f"output structure changed: {out_spec}")
    worst_abs, worst_rel, worst_tol, ok, detail = 0.0, 0.0, 0.0, True, ""
    for i, (r, a) in enumerate(zip(ref_leaves, out_leaves)):
        if not isinstance(r, Tensor):
            if r != a:
                return Comparison(False, float("inf"), float("inf"), 0.0, f"output {i}: {a!r} != {r!r}")
            continue
        if not isinstance(a, Tensor) or a.shape != r.shape:
            shape = getattr(a, "shape", type(a).__name__)
            return Comparison(False, float("inf"), float("inf"), 0.0, f"output {i}: shape {shape} != {tuple(r.shape)}")
        if not r.is_floating_point() and not r.is_complex():
            if not torch.equal(r, a):
                return Comparison(False, float("inf"), float("inf"), 0.0, f"output {i}: integer values differ")
            continue
        r64, a64 = r.detach().to(torch.float64), a.detach().to(torch.float64)
        both_nan = torch.isnan(r64) & torch.isnan(a64)
        diff = torch.where(both_nan, torch.zeros_like(r64), (a64 - r64).abs())
        diff = torch.nan_to_num(diff, nan=float("inf"))
        err = float(diff.max()) if diff.numel() else 0.0
        scale = float(torch.nan_to_num(r64.abs(), nan=0.0, posinf=0.0).max()) if r64.numel() else 0.0
        tol = atol + (rtol if rtol is not None else default_rtol(r.dtype)) * scale
        rel = err / scale if scale > 0 else (0.0 if err == 0 else float("inf"))
        if err > tol:
            ok = False
            detail = detail or f"output {i}: max abs error {err:.3g} > tolerance {tol:.3g} (max |ref| {scale:.3g})"
        if rel >= worst_rel:
            worst_abs, worst_rel, worst_tol = err, rel, tol
    return Comparison(ok, worst_abs, worst_rel, worst_tol, detail)


def first_bad_rewrite(applied: Sequence[str], passes_with_prefix: Callable[[int], bool]) -> int:
    """Smallest ``k`` such that applying only the first ``k`` rewrites breaks the check (``passes_with_prefix(k)``
    is False), given that 0 passes and ``len(applied)`` fails; the culprit is ``applied[k - 1]``."""
    lo, hi = 0, len(applied)  # invariant: lo passes, hi fails
    while hi - lo > 1:
        mid = (lo + hi) // 2
        if passes_with_prefix(mid):
            lo = mid
        else:
            hi = mid
    return hi
