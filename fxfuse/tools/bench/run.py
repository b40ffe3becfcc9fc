"""Running a benchmark: per model build the variants, per batch size warm up, compare outputs, measure memory,
then time all variants in interleaved rounds (:mod:`.timing`)."""

from __future__ import annotations

import statistics
import sys
import time
from typing import Any, Callable, Dict, List, Optional, TextIO, Tuple

import torch

from ...verify import compare
from ..model_source import SpecError, load_model, parse_dtype
from .config import COMPILED_VARIANTS, BenchConfig, BenchResult, validate, wanted_variants
from .env import default_batch_sizes, load_average, resolve_device, run_metadata, sync
from .progress import Progress
from .timing import cold_inductor, interleaved_rounds, make_timer, peak_memory, per_call_times, quartiles, warm_compiler
from .variants import Prepared, make_input, prepare


def run_bench(cfg: BenchConfig, log: TextIO = sys.stderr) -> BenchResult:
    """Run the benchmark described by ``cfg`` (see :mod:`fxfuse.tools.bench` for what is measured).

    ``cfg.threads`` applies during the run only; torch's previous thread count is restored afterwards."""
    device = resolve_device(cfg.device)
    dtype = parse_dtype(cfg.dtype)
    old_threads = torch.get_num_threads()
    if cfg.threads:
        if cfg.threads < 1:
            raise SpecError("--threads must be >= 1")
        torch.set_num_threads(cfg.threads)
    try:
        return _run(cfg, device, dtype, log)
    finally:
        torch.set_num_threads(old_threads)


def _run(cfg: BenchConfig, device: torch.device, dtype: torch.dtype, log: TextIO) -> BenchResult:
    validate(cfg, device.type)
    batch_sizes = list(cfg.batch_sizes or default_batch_sizes(device))
    wanted = wanted_variants(cfg)
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = bool(cfg.cudnn_benchmark)
    metadata = run_metadata(cfg, device, batch_sizes)
    metadata["variants"] = wanted
    metadata["timer_kind"] = cfg.timer
    for spec in cfg.models:  # fail fast on a bad spec, before any progress output or measurement
        load_model(spec)
    progress = Progress(len(cfg.models) * len(batch_sizes) * len(wanted) * cfg.rounds, cfg.progress, log)
    rows: List[Dict[str, Any]] = []
    notes: Dict[str, Dict[str, Any]] = {}
    try:
        for spec in cfg.models:
            progress.note(f"{spec}: building variants ({', '.join(wanted)}) on {device.type} in {cfg.dtype}")
            prep = prepare(spec, cfg, device, dtype, wanted, progress)
            missing = len(wanted) - len(prep.variants)
            if missing:
                progress.grow(-missing * len(batch_sizes) * cfg.rounds)
            notes[spec] = prep.notes
            for bs in batch_sizes:
                rows.extend(measure_batch(prep, bs, cfg, device, dtype, progress))
            del prep
            if device.type == "cuda":
                torch.cuda.empty_cache()
    finally:
        progress.close()
    metadata["load_average_end"] = load_average()
    return BenchResult(rows, metadata, notes)


def _output_error(out: Any, ref: Any) -> Tuple[Optional[float], Optional[float]]:
    """``max|out - ref|`` and that over ``max|ref|`` in float64 from the run-dtype outputs
    (:func:`fxfuse.verify.compare`; ``inf`` when the output structure or a shape differs)."""
    c = compare(ref, out)
    return c.max_abs, c.max_rel


def _compile_variant(prep: Prepared, name: str, x: torch.Tensor, cfg: BenchConfig, device: torch.device,
                     progress: Progress, bs: int) -> Tuple[Optional[Callable[..., Any]], Optional[float]]:
    """``torch.compile`` the variant's eager model; the first call (cold Inductor caches) is the compile time."""
    fn = torch.compile(prep.variants[name].module, mode=cfg.compile_mode, dynamic=False)
    sync(device)
    t0 = time.perf_counter()
    try:
        with cold_inductor():
            fn(x)
        sync(device)
    except Exception as exc:  # a compiler failure skips this variant only
        progress.note(f"{prep.spec} bs={bs}: {name} failed to compile: {type(exc).__name__}: {exc}")
        prep.notes["skipped"][name] = f"torch.compile failed: {type(exc).__name__}: {exc}"
        return None, None
    return fn, time.perf_counter() - t0


def measure_batch(prep: Prepared, bs: int, cfg: BenchConfig, device: torch.device, dtype: torch.dtype,
                  progress: Progress) -> List[Dict[str, Any]]:
    """All variants of one model at one batch size: warm-up, errors, memory, then interleaved timing."""
    shape = (bs,) + tuple(prep.input_shape[1:])
    x = make_input(shape, device, dtype, cfg.channels_last, cfg.seed + bs)
    runnable: Dict[str, Callable[..., Any]] = {}
    prepare_s: Dict[str, Optional[float]] = {n: v.prepare_s for n, v in prep.variants.items()}
    if any(n in COMPILED_VARIANTS for n in prep.variants):
        warm_compiler(device, dtype)
        torch._dynamo.reset()  # each batch size compiles from scratch: the first call is the compile time
    with torch.inference_mode():
        for name, v in prep.variants.items():
            if name in COMPILED_VARIANTS:
                fn, seconds = _compile_variant(prep, name, x, cfg, device, progress, bs)
                if fn is None:
                    continue
                prepare_s[name] = seconds
                runnable[name] = fn
            else:
                runnable[name] = v.module
        warmup = cfg.warmup if cfg.warmup is not None else (3 if device.type == "cuda" else 1)
        for fn in runnable.values():
            for _ in range(max(0, warmup)):
                fn(x)
        sync(device)
        ref = runnable["original"](x)
        sync(device)
        errors: Dict[str, Tuple[Optional[float], Optional[float]]] = {}
        for name, fn in runnable.items():
            if name == "original":
                errors[name] = (0.0, 0.0)
            elif prep.variants[name].compared:
                errors[name] = _output_error(fn(x), ref)
            else:
                errors[name] = (None, None)
        del ref
        memory = {name: peak_memory(fn, x, device) for name, fn in runnable.items()}

        timers = {n: make_timer(fn, (x,), torch.get_num_threads(), cfg.timer) for n, fn in runnable.items()}
        rounds = max(1, cfg.rounds)
        measured = interleaved_rounds(
            timers, rounds, cfg.min_run_time / rounds,
            on_turn=lambda name, r: progress.step(f"{prep.spec} bs={bs} {name} round {r + 1}/{cfg.rounds}"))

    times = {name: per_call_times(ms) for name, ms in measured.items()}
    base_median = statistics.median(times["original"][0])
    rows = []
    for name in runnable:
        per_call, calls = times[name]
        q1, med, q3 = quartiles(per_call)
        v = prep.variants[name]
        abs_err, rel_err = errors[name]
        rows.append({
            "model": prep.spec, "variant": name, "batch_size": bs, "image_size": shape[-1], "dtype": cfg.dtype,
            "device": device.type, "channels_last": cfg.channels_last,
            "median_ms": med * 1e3, "iqr_ms": (q3 - q1) * 1e3, "q1_ms": q1 * 1e3, "q3_ms": q3 * 1e3,
            "calls": calls, "images_per_s": bs / med if med > 0 else None,
            "speedup_vs_original": base_median / med if med > 0 else None,
            "max_abs_error": abs_err, "max_rel_error": rel_err, "peak_memory_bytes": memory[name],
            "gflops": None if v.flops_per_image is None else v.flops_per_image * bs / 1e9,
            "params": v.params, "prepare_s": prepare_s.get(name),
        })
    return rows
