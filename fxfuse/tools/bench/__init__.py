"""The benchmark harness behind ``fxfuse bench``.

What it measures, per model, batch size and variant (all in one process, interleaved):

* latency: ``torch.utils.benchmark.Timer.blocked_autorange`` (which synchronizes CUDA around every timed block),
  one turn per variant in each of ``rounds`` rounds, the order rotating every round, so drift of a shared machine
  hits all variants alike (:mod:`.timing`). Reported: median and IQR of the per-call times of all blocks,
  throughput = batch / median, speed ratio = median(original) / median(variant);
* output error vs ``original`` on the same input, in the run dtype (:func:`fxfuse.verify.compare`):
  ``max|y - y_ref|`` and that over ``max|y_ref|``;
* CUDA only: forward peak memory = ``max_memory_allocated()`` during one call minus ``memory_allocated()``
  right before it (after ``reset_peak_memory_stats()``; models and input already on the device);
* FLOPs per image from ``torch.utils.flop_counter.FlopCounterMode`` (batch-1 forward), parameters;
* preparation time: the reparametrize pass (fxfuse), ``torch.fx.experimental.optimization.fuse`` (fx_fuse),
  and for compiled variants the first call, which is the compile time.

Variants (:mod:`.variants`): ``original`` (eval model), ``fxfuse`` (:func:`fxfuse.reparametrize`), ``plain`` (the
hand-written deploy net, :func:`fxfuse.models.plain_twin`; reference nets only), ``fx_fuse`` (PyTorch's generic
conv-BN fuser), and with ``compile``: ``compiled_original`` / ``compiled_fxfuse`` (``torch.compile``).

Modules: :mod:`.config` (options, result), :mod:`.env` (device, CPU, metadata), :mod:`.progress`,
:mod:`.variants`, :mod:`.timing`, :mod:`.run` (the loop), :mod:`.output` (table, CSV, JSON), :mod:`.plots`.
"""

from .config import ALL_VARIANTS, BASE_VARIANTS, COMPILED_VARIANTS, CSV_COLUMNS, BenchConfig, BenchResult
from .env import cpu_model_name, default_batch_sizes, resolve_device
from .output import format_table, write_outputs
from .progress import Progress
from .run import run_bench
from .timing import interleaved_rounds, make_timer, quartiles
from .variants import count_flops

__all__ = [
    "ALL_VARIANTS",
    "BASE_VARIANTS",
    "COMPILED_VARIANTS",
    "CSV_COLUMNS",
    "BenchConfig",
    "BenchResult",
    "Progress",
    "count_flops",
    "cpu_model_name",
    "default_batch_sizes",
    "format_table",
    "interleaved_rounds",
    "make_timer",
    "quartiles",
    "resolve_device",
    "run_bench",
    "write_outputs",
]
