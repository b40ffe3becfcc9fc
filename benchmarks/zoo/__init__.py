"""Sweep ``fxfuse.reparametrize`` over the torchvision model zoo and write ``docs/zoo.md``.

Every model of ``torchvision.models.list_models()`` (classification, video, segmentation, detection, optical
flow; the ``quantized_*`` entries are built in float with ``quantize=False``) is built with ``weights=None`` (and
``weights_backbone=None``), its BatchNorm statistics randomized (:func:`fxfuse.models.randomize_batchnorm_`), put
in eval mode and cast to float64 (:mod:`.cases`). Then, per model (:func:`.checks.check_model`):

* ``fused = reparametrize(model, x)`` (``verify=True``, ``capture="auto"``): the pass time is measured, and which
  front end captured the model is recorded (``report.capture``: symbolic / export / submodules, and
  ``report.capture_reason``); for a sub-module fallback :func:`.checks.export_probe` records why ``torch.export``
  could not capture the whole model and at which line of the model's code it stopped;
* outputs equal (:func:`fxfuse.verify.compare`): ``max|fused(x) - model(x)| <= 1e-9 · max|model(x)|`` per output
  tensor, in float64, on ``x`` and on a second input of another batch size (``10·η``, at most 1e-6, for a model
  whose output moves by ``η`` > 1e-10 under rounding-sized weight noise: :func:`.checks.conditioned_tolerance`;
  integer outputs, e.g. detection
  labels, must be equal; output dtypes must not change);
* structure: no BatchNorm left whose input is a conv/linear node with no other real user
  (:func:`fxfuse.ir.ops.real_users`), in any fx graph of the result (:func:`.checks.unfused_conv_bn`); convs/BNs
  executed before → after are counted at run time (:func:`fxfuse.tools.executed_ops.run_counting`, classified by
  :func:`fxfuse.ir.ops.function_kind`, so models with untraced Python parts are counted too);
* the input model is untouched: a SHA-256 of every ``state_dict`` entry before and after;
* CPU speed at a small batch (:mod:`.speed`): the ``fxfuse bench`` timing (:mod:`fxfuse.tools.bench.timing`) on
  the float32 original and the float32 fused model (``fused.float()``: the float64-computed fused weights rounded
  once, as ``reparametrize`` does for a float32 model), side by side in one process, rounds interleaved.

A model ``reparametrize`` cannot handle at all must raise :class:`fxfuse.FusionError` (status ``refused``);
any other exception, a different output, a leftover conv→BN or a modified input model is a failure. Where the pass
refuses, or (fallback) undoes sub-module rewrites because the whole output changed, :func:`.checks.conditioning`
measures whether that output is decided by rounding noise (then no exact rewrite can keep it). A model that cannot
run in float64 at all (RAFT) is checked in float32 and each rewritten sub-module in float64
(:func:`.checks.float64_submodule_check`). :mod:`.render` writes the markdown.

From the repository root (``make zoo``)::

    python -m benchmarks.zoo                          # every model, writes docs/zoo.md
    python -m benchmarks.zoo --models resnet18,r3d_18 --out /tmp/zoo.md
    python -m benchmarks.zoo --pass-speed             # resnet152 pass time and resnet50/152 linearity only
    python -m benchmarks.zoo --json rows.json --note "Machine shared with other jobs."   # rows as JSON too
"""

from .cases import ZooCase, all_models, cast_floats, model_kind, zoo_case
from .checks import (
    DATA_DEPENDENT,
    FLOAT32_RTOL,
    IN_FXFUSE,
    RTOL,
    SubmoduleCheck,
    ZooRow,
    check_model,
    conditioning,
    export_failure,
    export_failure_kind,
    export_probe,
    float64_submodule_check,
    max_rel_error,
    remaining_bn_inputs,
    run_counted,
    state_fingerprint,
    unfused_conv_bn,
    untraced_batch_norms,
)
from .render import render, render_pass_speed
from .speed import pass_speed, speed_ratio

__all__ = [
    "DATA_DEPENDENT",
    "FLOAT32_RTOL",
    "IN_FXFUSE",
    "RTOL",
    "SubmoduleCheck",
    "ZooCase",
    "ZooRow",
    "all_models",
    "cast_floats",
    "check_model",
    "conditioning",
    "export_failure",
    "export_failure_kind",
    "export_probe",
    "float64_submodule_check",
    "max_rel_error",
    "model_kind",
    "pass_speed",
    "remaining_bn_inputs",
    "render",
    "render_pass_speed",
    "run_counted",
    "speed_ratio",
    "state_fingerprint",
    "unfused_conv_bn",
    "untraced_batch_norms",
    "zoo_case",
]
