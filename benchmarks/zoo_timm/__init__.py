"""Sweep ``fxfuse.reparametrize`` over the timm model zoo and write ``docs/zoo-timm.md``.

Every architecture of ``timm.list_models()`` (or those matching ``--filter``) with at most ``--max-params``
parameters (60 M; counted on the meta device, so bigger models are never built) is built without pretrained
weights, with ``img_size=--size`` (96) where the model takes it, BatchNorm statistics and affine randomized, in
eval mode and float32 (:mod:`.cases`). A model that does not build or run at that size is recorded as not
applicable, with the reason. Per model (:func:`.checks.check_model`):

* ``fused = fxfuse.reparametrize(model, x, capture="auto")``, x = 2 x 3 x size x size: status ``ok``, ``wrong``
  (relative output error beyond ``max(1e-4, 10 x the model's own float32 noise)``), ``FusionError`` (the pass
  refused; its message is kept) or ``crash`` (any other exception, a result that does not run, a check that died or
  timed out inside the pass); the capture (``report.capture``) and ``report.pass_seconds``;
* convs + BatchNorms executed (:func:`benchmarks.zoo.checks.run_counted`) by the original, fxfuse's result and
  timm's own deploy conversion (``timm.utils.model.reparameterize_model`` on a copy), and whether fxfuse's is at
  most timm's.

Goal: 0 wrong, 0 crash, 0 FusionError and fxfuse conv+BN <= timm deploy everywhere; the summary line counts them
and lists the violators (exit status 1 when there is one). Each model runs in a forked process with a time limit
(:mod:`.sweep`); every result is appended to a JSON-lines cache at once, so a stopped sweep resumes where it
stopped. :mod:`.render` writes the markdown.

From the repository root (``make zoo-timm ARGS="..."`` installs timm first)::

    python -m benchmarks.zoo_timm                                   # every model, writes docs/zoo-timm.md
    python -m benchmarks.zoo_timm --filter 'repvgg*,mobileone*' --out /tmp/t.md
    python -m benchmarks.zoo_timm --limit 50 --timeout-per-model 300  # the first 50 names
    python -m benchmarks.zoo_timm --render-only                     # the page again from the cache
    python -m benchmarks.zoo_timm --fresh --filter resnet18         # check again, ignoring the cache
"""

from .cases import ModelSource, build, count_params, create, example_input, parse_count, select, timm_source
from .checks import NA, STATUSES, TimmRow, check_model, classify, finish_dead, row_from_dict
from .render import counts, render, summary_line, violators
from .sweep import append_row, load_cache, reusable, run_isolated, run_sweep

__all__ = [
    "NA",
    "STATUSES",
    "ModelSource",
    "TimmRow",
    "append_row",
    "build",
    "check_model",
    "classify",
    "count_params",
    "counts",
    "create",
    "example_input",
    "finish_dead",
    "load_cache",
    "parse_count",
    "render",
    "reusable",
    "row_from_dict",
    "run_isolated",
    "run_sweep",
    "select",
    "summary_line",
    "timm_source",
    "violators",
]
