"""The second check: what ``reparametrize`` returns is run in its own dtype and device on the example input and
compared again — with the float64 reference at that dtype's tolerance, and with the original model run in its own
dtype (docs/patterns.md, "Verification"). A failure is a :class:`Verdict` with a :class:`~fxfuse.reasons.Reason`:
the rewrite loop rolls back the rewrite that caused it (fxfuse.verified)."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Optional, Sequence, Tuple

import torch
from torch import Tensor, fx, nn
from torch.utils._pytree import tree_leaves, tree_map

from . import _dtypes
from .capture.state import attributes_preserved
from .ir import ops
from .reasons import Reason
from .verify import compare, default_rtol


def clone_inputs(args: Tuple[Any, ...]) -> Tuple[Any, ...]:
    """Fresh copies of the input tensors: a forward that writes its input must not change the user's example."""
    return tree_map(lambda a: a.clone() if isinstance(a, Tensor) else a, args)


def run_original(model: nn.Module, args: Tuple[Any, ...]) -> Tuple[Any, Optional[Exception]]:
    """``(output, None)`` of ``model`` (already a copy the caller may run) on the example input in its own dtypes and
    device, or ``(None, error)`` if it does not run there; its plain attributes are left as they were."""
    try:
        with torch.no_grad(), attributes_preserved(model):
            return model(*clone_inputs(args)), None
    except Exception as exc:  # e.g. no CPU kernel for this dtype: the float64 lens may still run
        return None, exc


@dataclass
class Verdict:
    """The artifact check's answer: ``ok``; otherwise ``code`` says why (a rollback reason). ``text`` is the
    report's sentence (``report.artifact_check``) or the failure's detail."""

    ok: bool
    text: str
    code: Optional[Reason] = None
    max_rel: Optional[float] = None
    warning: Optional[str] = None


def _rounding_noise(result: nn.Module, args: Tuple[Any, ...], out: Any, rtol: float, atol: float) -> float:
    """How far ``result``'s output moves when every floating input is scaled by ``1 ± eps`` of its dtype: the
    largest relative change, the resolution at which an output decided by rounding (top-k, NMS, thresholds) can be
    compared at all. ``inf`` when the nudge changes an integer output or a shape (detections kept or dropped), 0
    without floating inputs, NaN (no measure) when a nudged run fails or when a second run on the same input
    already differs: a model whose calls change its own state (a weight written in place) drifts between calls,
    which is no rounding and must not be excused as one."""
    if not any(isinstance(a, Tensor) and a.is_floating_point() for a in tree_leaves(args)):
        return 0.0
    try:
        with torch.no_grad(), attributes_preserved(result):
            if not compare(out, result(*clone_inputs(args)), rtol, atol).ok:
                return math.nan
    except Exception:
        return math.nan
    worst = 0.0
    for sign in (1.0, -1.0):
        nudged = tree_map(lambda a, s=sign: a * (1 + s * torch.finfo(a.dtype).eps)
                          if isinstance(a, Tensor) and a.is_floating_point() else a, args)
        try:
            with torch.no_grad(), attributes_preserved(result):
                worst = max(worst, compare(out, result(*nudged), rtol, atol).max_rel)
        except Exception:  # it ran on the example input; a failure here measures nothing
            return math.nan
    return worst


def _output_dtypes_differ(original: Any, out: Any) -> Optional[str]:
    """Which output tensor's dtype or device differs from the original model's (``None`` when all agree)."""
    for i, (r, a) in enumerate(zip(tree_leaves(original), tree_leaves(out))):
        if isinstance(r, Tensor) and isinstance(a, Tensor) and (r.dtype, r.device) != (a.dtype, a.device):
            return (f"output {i} is {_dtypes.dtype_name(a.dtype)} on {a.device}, the original model's is "
                    f"{_dtypes.dtype_name(r.dtype)} on {r.device}")
    return None


def writes_state(result: nn.Module) -> bool:
    """Whether ``result`` may write its own state in place (a call could change what the next one computes): a graph
    node that writes into a tensor the module holds (``get_attr``) or an input, or a module that is not a graph."""
    if not isinstance(result, fx.GraphModule):
        return True
    modules = dict(result.named_modules())
    return any(ops.writes_input(n, modules) and n.args and isinstance(n.args[0], fx.Node)
               and n.args[0].op in ("get_attr", "placeholder") for n in result.graph.nodes)


def inspect(result: nn.Module, args: Tuple[Any, ...], reference: Any, own: Any, own_error: Optional[Exception],
            user_rtol: Optional[float], atol: float, overflowed: Sequence[str] = (), drift_check: bool = True
            ) -> Verdict:
    """Run ``result`` in its own dtype and device on ``args`` (its plain attributes are restored afterwards); it must
    run. With a ``reference`` (the float64 lens's output; ``None`` with ``verify=False``) its outputs must have the
    dtypes and devices of ``own`` (the original's own-dtype output) and match the reference: ``max|out − ref| ≤ tol
    · max|ref|`` with ``tol = max(rtol(dtype), 2 · e)``, ``e`` the original's own relative error in its dtype
    (:func:`fxfuse.verify.default_rtol`) — or, where that fails, equal ``own`` at ``rtol(dtype)`` (a float16 model
    that overflows to the same NaN/inf as the original), or, for an output decided by rounding (detection: which
    boxes NMS keeps), be within ``tol + 2·n``, ``n`` how far a one-ulp change of the input moves it
    (:func:`_rounding_noise`; unbounded where the nudge changes which detections come out). A model with integer
    outputs (selections) that differ is not comparable in its dtype and passes with a warning. A second call on
    the same input must give the same output where the graph writes in place and ``drift_check`` (the caller's
    word that the original does not write state: its captured graph writes nothing in place)."""
    if overflowed:
        return Verdict(False, f"fused tensors do not fit the model's dtype (finite in float64, inf once cast): "
                              f"{', '.join(overflowed[:8])}", Reason.ARTIFACT_OVERFLOW)
    try:
        with torch.no_grad(), attributes_preserved(result):
            out = result(*clone_inputs(args))
            again = result(*clone_inputs(args)) if drift_check and reference is not None and writes_state(result) \
                else None
    except Exception as exc:
        if own_error is not None:  # the original model does not run here either: nothing to compare with
            text = (f"not run: the original model does not run on the example input in its own dtype either "
                    f"({type(own_error).__name__}: {str(own_error)[:160]})")
            return Verdict(True, text, warning="the returned model was not run in its own dtype: " + text)
        return Verdict(False, f"the fused model does not run on the example input in its own dtype "
                              f"({type(exc).__name__}: {str(exc)[:300]})", Reason.ARTIFACT_RAISES)
    dtype = _dtypes.leaf_dtype(out)
    name = _dtypes.dtype_name(dtype)
    if reference is None or dtype is None:
        return Verdict(True, f"ran in {name} (not compared: verify=False)")
    if own is not None:
        differ = _output_dtypes_differ(own, out)
        if differ:
            return Verdict(False, f"the fused model, run in its own dtype, changed an output's dtype: {differ}",
                           Reason.ARTIFACT_DTYPE)
    rtol = max(user_rtol or 0.0, default_rtol(dtype))
    if again is not None and not compare(out, again, 0.0, 0.0).ok:
        return Verdict(False, "a second call on the same input differs from the first: the fused model writes "
                              "state it reads", Reason.ARTIFACT_DRIFT)
    # The original in its own dtype is itself only so close to the float64 reference (deep bfloat16 nets: ~5%);
    # the fused model may be as far, twice over (two roundings), but no farther.
    own_rel = compare(reference, own, rtol, atol).max_rel if own is not None else math.inf
    tol = max(rtol, 2 * own_rel) if math.isfinite(own_rel) else rtol
    cmp = compare(reference, out, tol, atol)
    same = "outputs of the original's dtypes; " if own is not None else "(the original does not run in its dtype) "
    if cmp.ok:
        own_note = f"; the original in its dtype: {own_rel:.3g}" if own is not None else ""
        return Verdict(True, f"ran in {name} {same}max relative error {cmp.max_rel:.3g} vs the reference "
                             f"(tolerance {tol:.3g} of max |ref|{own_note})", max_rel=cmp.max_rel)
    vs_own = compare(own, out, rtol, atol) if own is not None else None
    if vs_own is not None and vs_own.ok:  # e.g. float16 overflow: the original gives the same NaN/inf
        return Verdict(True, f"ran in {name} {same}equal to the original run in its dtype (max relative error "
                             f"{vs_own.max_rel:.3g}, tolerance {rtol:g}); vs the float64 reference: "
                             f"{cmp.max_rel:.3g} (the original's: {own_rel:.3g})", max_rel=cmp.max_rel,
                       warning=f"in {name} the returned model differs from the float64 computation by "
                               f"{cmp.max_rel:.3g} (relative; the original model by {own_rel:.3g}): it was "
                               f"accepted as equal to the original run in {name}")
    noise = _rounding_noise(result, args, out, rtol, atol)
    if noise > 0 and cmp.max_rel <= tol + 2 * noise:  # detection: what NMS / top-k keeps is decided by rounding
        moves = "changes which detections / integer outputs it gives" if noise == math.inf \
            else f"moves it by {noise:.3g}"
        return Verdict(True, f"ran in {name} {same}max relative error {cmp.max_rel:.3g} vs the reference; the "
                             f"output is ill-conditioned in {name} (a one-ulp change of the input {moves}): "
                             f"compared at that resolution", max_rel=cmp.max_rel,
                       warning=f"in {name} the output is decided by rounding (a one-ulp change of the input "
                               f"{moves}): the returned model was compared at that resolution only")
    if any(isinstance(r, Tensor) and not (r.is_floating_point() or r.is_complex()) for r in tree_leaves(reference)):
        # Integer outputs of a float model are selections (labels, indices, which boxes NMS keeps): rounding in
        # the model's dtype may change them, so only the float64 check can decide equality.
        return Verdict(True, f"ran in {name} {same}not comparable in {name}: its integer outputs (selections) "
                             f"differ from the float64 reference as rounding may make them ({cmp.detail})",
                       max_rel=cmp.max_rel,
                       warning=f"the returned model, run in {name}, selects differently from the float64 "
                               f"reference ({cmp.detail}): equal in float64, selections decided by rounding in "
                               f"{name}")
    return Verdict(False, f"the fused model, run in {name}, differs from the reference beyond that dtype's "
                          f"tolerance: {cmp.detail}", Reason.ARTIFACT_MISMATCH, max_rel=cmp.max_rel)
