"""Checking one timm model (:func:`check_model`): build it (or say why it does not apply), reparametrize it, compare
outputs and count the convs / BatchNorms executed by the original, fxfuse's result and timm's deploy conversion.
The result is a :class:`TimmRow`, one line of the cache and of docs/zoo-timm.md."""

from __future__ import annotations

import copy
import math
import time
from dataclasses import dataclass, field, fields
from typing import Any, Callable, Dict, List, Optional

import torch
from torch import nn

import fxfuse
from fxfuse.verify import compare

from ..zoo.cases import cast_floats
from ..zoo.checks import FLOAT32_RTOL, export_failure, max_rel_error, run_counted
from .cases import ModelSource, build, count_params, create, deployed, example_input, first_line, prepare

NA = "n.a."
STATUSES = ("ok", "wrong", "crash", "FusionError", NA)
NOISE_FACTOR = 10.0  # a result is wrong beyond max(FLOAT32_RTOL, NOISE_FACTOR x the model's own float32 noise)

# The steps of one check, in order (``TimmRow.phase``: the last one started, where a hang or a dead child stopped).
PHASES: Dict[str, str] = {
    "params": "counting parameters on the meta device",
    "build": "building the model",
    "original": "running the original model",
    "reparametrize": "in fxfuse.reparametrize",
    "fxfuse result": "running fxfuse's result",
    "deploy": "in timm's deploy conversion",
    "float64": "running the float64 reference",
}
NOT_APPLICABLE_PHASES = ("params", "build", "original")  # a model that does not build or run is not applicable
FXFUSE_PHASES = ("reparametrize", "fxfuse result")  # a hang or a death here is fxfuse's crash

Phase = Callable[[str, "TimmRow"], None]
Fuse = Callable[..., nn.Module]


@dataclass
class TimmRow:
    """One model's result. ``convs`` / ``bns``: executed by [original, fxfuse result, timm deploy] (``None``: not
    measured)."""

    name: str
    size: int = 96
    max_params: int = 60_000_000
    status: str = ""  # ok | wrong | crash | FusionError | n.a.
    reason: str = ""  # why: n.a., the FusionError's message, the crash, the error beyond tolerance
    phase: str = ""  # the last step started (PHASES)
    params: Optional[int] = None
    build_kwargs: Dict[str, Any] = field(default_factory=dict)
    capture: str = ""  # report.capture: symbolic | export | submodules
    capture_reason: str = ""
    verified: Optional[bool] = None  # report.verified
    max_rel_error: float = math.nan  # fxfuse result vs original, float32
    deploy_rel_error: float = math.nan  # timm deploy vs original, float32
    float32_noise: float = math.nan  # original in float32 vs original in float64
    tolerance: float = math.nan
    convs: List[Optional[int]] = field(default_factory=lambda: [None, None, None])
    bns: List[Optional[int]] = field(default_factory=lambda: [None, None, None])
    pass_s: float = math.nan  # report.pass_seconds
    deploy_note: str = ""  # why the deploy columns are empty
    notes: List[str] = field(default_factory=list)
    seconds: float = 0.0
    # stamped by the sweep: when and with what it was measured
    date: str = ""
    source: str = ""
    versions: Dict[str, str] = field(default_factory=dict)
    threads: int = 0
    machine: str = ""

    def conv_bn(self, which: int) -> Optional[int]:
        """Convs + BNs executed by the original (0), fxfuse's result (1), timm's deploy conversion (2)."""
        c, b = self.convs[which], self.bns[which]
        return None if c is None or b is None else c + b

    @property
    def worse_than_deploy(self) -> bool:
        """fxfuse's result executes more convs + BNs than timm's deploy conversion (both measured)."""
        mine, theirs = self.conv_bn(1), self.conv_bn(2)
        return mine is not None and theirs is not None and mine > theirs

    def violations(self) -> List[str]:
        """What about this row misses the sweep's goal (empty: none)."""
        out = []
        if self.status in ("wrong", "crash", "FusionError"):
            out.append(f"{self.status}: {self.reason}")
        if self.worse_than_deploy:
            out.append(f"conv+BN {self.conv_bn(1)} > timm deploy {self.conv_bn(2)}")
        return out


def row_from_dict(data: Dict[str, Any]) -> TimmRow:
    """A :class:`TimmRow` back from its dict (cache line, child message); unknown keys are dropped, missing ones
    take their defaults."""
    known = {f.name for f in fields(TimmRow)}
    return TimmRow(**{k: v for k, v in data.items() if k in known})


def classify(row: TimmRow) -> TimmRow:
    """Set ``ok`` / ``wrong`` for a row whose status is not decided yet (n.a., FusionError and crash are set where
    they happen): wrong when the error exceeds ``max(FLOAT32_RTOL, NOISE_FACTOR x float32 noise)`` (the noise: how
    far the original's own float32 output is from its float64 one; where that is unknown, FLOAT32_RTOL)."""
    if row.status:
        return row
    noise = row.float32_noise
    row.tolerance = max(FLOAT32_RTOL, NOISE_FACTOR * noise) if math.isfinite(noise) else FLOAT32_RTOL
    if row.max_rel_error <= row.tolerance:
        row.status = "ok"
    else:
        row.status = "wrong"
        row.reason = (f"max relative error {row.max_rel_error:.2g} > tolerance {row.tolerance:.2g} (float32 noise "
                      f"{row.float32_noise:.2g}, timm deploy's error {row.deploy_rel_error:.2g})")
    return row


def finish_dead(row: TimmRow, why: str) -> TimmRow:
    """The row of a check that stopped without a result (``why``: timed out / the process died), from what it had
    reported: not applicable while building or running the original, a crash inside fxfuse, and after that
    (timm's deploy, float64 reference) the fxfuse result stands and the missing part is noted."""
    where = PHASES.get(row.phase, row.phase or "before the first step")
    if row.phase in NOT_APPLICABLE_PHASES or not row.phase:
        row.status, row.reason = NA, f"{why} {where}"
    elif row.phase in FXFUSE_PHASES:
        row.status, row.reason = "crash", f"{why} {where}"
    else:
        if row.phase == "deploy":
            row.deploy_note = f"{why} {where}"
        else:
            row.notes.append(f"{why} {where}; tolerance without the float32 noise")
        classify(row)
    return row


def check_model(name: str, source: ModelSource, *, size: int = 96, max_params: int = 60_000_000,
                fuse: Optional[Fuse] = None, on_phase: Optional[Phase] = None) -> TimmRow:
    """Check ``name`` (see :mod:`benchmarks.zoo_timm`); never raises for a model's failure, which is its row's
    status. ``fuse``: the pass (``fxfuse.reparametrize``; tests pass stand-ins); ``on_phase(phase, row)`` is called
    as each step starts, with the row so far (the isolated runner forwards it to the parent)."""
    row = TimmRow(name, size, max_params)
    start = time.perf_counter()

    def phase(p: str) -> None:
        row.phase = p
        if on_phase is not None:
            on_phase(p, row)

    _check(row, source, fuse or fxfuse.reparametrize, phase)
    row.seconds = time.perf_counter() - start
    return classify(row)


def _check(row: TimmRow, source: ModelSource, fuse: Fuse, phase: Callable[[str], None]) -> None:
    name, size, limit = row.name, row.size, row.max_params
    too_big = "{:.1f} M parameters > {:g} M".format
    phase("params")
    meta_error = ""
    try:
        meta_model, row.build_kwargs, note = create(source, name, size, meta=True)
        row.params = count_params(meta_model)
        del meta_model
        if note:
            row.notes.append(note)
    except Exception as exc:  # e.g. init code that reads values (.item()) cannot run on the meta device
        meta_error = first_line(exc, 200)
    if row.params is not None and row.params > limit:
        row.status, row.reason = NA, f"{too_big(row.params / 1e6, limit / 1e6)} (counted on the meta device)"
        return

    phase("build")
    try:
        if meta_error:  # count after a real build
            built, row.build_kwargs, note = create(source, name, size, meta=False)
            row.params = count_params(built)
            row.notes.append(f"parameters counted after building (meta-device build failed: {meta_error})")
            if note:
                row.notes.append(note)
            if row.params > limit:
                row.status, row.reason = NA, f"{too_big(row.params / 1e6, limit / 1e6)} (counted after building)"
                return
            model = prepare(built)
        else:
            model = build(source, name, row.build_kwargs)
    except Exception as exc:
        row.status, row.reason = NA, f"does not build: {first_line(exc)}"
        return

    x = example_input(size)
    phase("original")
    try:
        ref, row.convs[0], row.bns[0] = run_counted(model, (x,))
    except Exception as exc:
        row.status, row.reason = NA, f"does not run at {size}x{size}: {first_line(exc)}"
        return

    phase("reparametrize")
    fused: Optional[nn.Module] = None
    try:
        fused = fuse(model.eval(), x, capture="auto")
    except fxfuse.FusionError as exc:
        row.status, row.reason = "FusionError", " ".join(str(exc).split())[:600]
    except Exception as exc:  # any other exception out of the pass is a crash
        row.status, row.reason = "crash", f"reparametrize raised {export_failure(exc)}"
    if fused is not None:
        report = getattr(fused, "fxfuse_report", None)
        if report is not None:
            row.capture, row.capture_reason = report.capture, report.capture_reason
            row.pass_s, row.verified = report.pass_seconds, report.verified
        phase("fxfuse result")
        try:
            out, row.convs[1], row.bns[1] = run_counted(fused, (x,))
            row.max_rel_error = max_rel_error(ref, out)
            del out
        except Exception as exc:
            row.status, row.reason = "crash", f"fxfuse's result does not run: {export_failure(exc)}"
        del fused

    phase("deploy")
    try:
        dep = deployed(source, model)
        out, row.convs[2], row.bns[2] = run_counted(dep, (x,))
        row.deploy_rel_error = max_rel_error(ref, out)
        del dep, out
    except Exception as exc:  # timm's conversion is the reference, not the subject: noted, not a failure
        row.deploy_note = f"{source.deploy_name} failed: {first_line(exc)}"

    if row.status:  # FusionError / crash: no error to judge
        return
    phase("float64")
    try:
        with torch.no_grad():
            ref64 = copy.deepcopy(model).double()(x.double())
        row.float32_noise = compare(ref64, cast_floats(ref, torch.float64)).max_rel
    except Exception as exc:
        row.notes.append(f"no float64 reference ({first_line(exc, 200)}): tolerance {FLOAT32_RTOL:g}")

