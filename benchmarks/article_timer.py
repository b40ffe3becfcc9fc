"""The seed article's timer next to an honest one, on the same models in the same process.

The article timed ``perf_counter()`` around one forward call per batch size, with no warm-up and no
``torch.cuda.synchronize()``. On CUDA the call returns once the kernels are *queued*, so that column measures
kernel launches (flat in the batch size) rather than the work. This script prints, per batch size and model
(original multi-branch "Default" vs fxfuse-reparametrized "Fast"):

* ``article_s``: one cold call, ``perf_counter`` without sync (the article's method);
* ``synced_s``: one warm call with ``synchronize()`` before the clock is read;
* ``timer_s``: median of ``torch.utils.benchmark.Timer.blocked_autorange`` (synchronizes, warms up);
* on CUDA, ``max_memory_allocated`` as the article read it (weights + input + forward) and the forward-only
  peak (after ``reset_peak_memory_stats()``, minus what was resident).

On a CPU the three timings agree up to warm-up and noise (CPU ops are synchronous); the gap is a GPU effect.

    python benchmarks/article_timer.py --device cuda --batch-sizes 1,2,4,8,16,32,64,128
"""

from __future__ import annotations

import argparse
import time
from typing import List, Optional

import torch

import fxfuse
from fxfuse import models
from fxfuse.tools.bench import cpu_model_name, make_timer
from fxfuse.tools.bench.env import sync as _sync
from fxfuse.tools.model_source import parse_int_list


def measure(model: torch.nn.Module, x: torch.Tensor, device: torch.device, min_run_time: float) -> dict:
    """The article's cold launch-only time, a synced single call, Timer's median, and CUDA memory."""
    row = {}
    if device.type == "cuda":
        _sync(device)
        torch.cuda.reset_peak_memory_stats(device)
        resident = torch.cuda.memory_allocated(device)
    t0 = time.perf_counter()
    out = model(x)  # article: no warm-up, no synchronize
    row["article_s"] = time.perf_counter() - t0
    _sync(device)
    if device.type == "cuda":
        row["article_mem_bytes"] = torch.cuda.max_memory_allocated(device)
        row["forward_mem_bytes"] = torch.cuda.max_memory_allocated(device) - resident
    del out
    t0 = time.perf_counter()
    model(x)
    _sync(device)
    row["synced_s"] = time.perf_counter() - t0
    row["timer_s"] = make_timer(model, (x,), torch.get_num_threads()).blocked_autorange(
        min_run_time=min_run_time).median
    return row


def main(argv: Optional[List[str]] = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default="repvgg-article")
    p.add_argument("--device", choices=["auto", "cpu", "cuda"], default="auto")
    p.add_argument("--batch-sizes", default=None, help="default: 1..128 on CUDA, 1,8 on CPU")
    p.add_argument("--min-run-time", type=float, default=0.5)
    args = p.parse_args(argv)
    device = torch.device("cuda" if args.device == "auto" and torch.cuda.is_available() else
                          ("cpu" if args.device == "auto" else args.device))
    sizes = parse_int_list(args.batch_sizes, "batch size") if args.batch_sizes else (
        [1, 2, 4, 8, 16, 32, 64, 128] if device.type == "cuda" else [1, 8])
    model = models.randomize_batchnorm_(models.build(args.model), seed=0).eval().to(device)
    shape = models.default_input_shape(args.model)
    fast = fxfuse.reparametrize(model, torch.randn(shape, device=device))
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else cpu_model_name()
    print(f"# {args.model} on {name} ({device.type}), torch {torch.__version__}, float32, "
          f"{torch.get_num_threads()} threads")
    cols = ["batch", "variant", "article_s", "synced_s", "timer_s"]
    if device.type == "cuda":
        cols += ["article_mem_bytes", "forward_mem_bytes"]
    print("| " + " | ".join(cols) + " |")
    print("|" + "---|" * len(cols))
    with torch.inference_mode():
        for bs in sizes:
            x = torch.randn((bs,) + tuple(shape[1:]), device=device)
            for label, m in (("Default", model), ("Fast", fast)):
                row = measure(m, x, device, args.min_run_time)
                vals = [str(bs), label] + [f"{row[c]:.6f}" for c in ("article_s", "synced_s", "timer_s")]
                if device.type == "cuda":
                    vals += [str(row["article_mem_bytes"]), str(row["forward_mem_bytes"])]
                print("| " + " | ".join(vals) + " |", flush=True)


if __name__ == "__main__":
    main()
