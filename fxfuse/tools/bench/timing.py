"""Timing with ``torch.utils.benchmark`` (public API only): interleaved rounds, quartiles, CUDA peak memory, and
the compile-time helpers for ``torch.compile`` variants.

Interleaving: every variant gets one turn per round and the order rotates each round, so drift on a shared
machine (other jobs, thermal state) hits all variants alike. A turn is one ``Timer.blocked_autorange``: it picks
the block size (calls per timed block, so that timer and CUDA-sync overhead stay below 0.1%) with untimed calls
that also re-warm caches the previous variant evicted, then times whole blocks until the turn's share of
``min_run_time`` is used."""

from __future__ import annotations

import contextlib
import logging
import statistics
import time
import warnings
from typing import Any, Callable, Dict, Iterator, List, Mapping, Optional, Sequence, Set, Tuple

import torch
from torch import Tensor

from .env import sync


def _benchmark_module() -> Any:
    """``torch.utils.benchmark``, imported without its "No CUDA runtime is found" log line on CPU machines."""
    quiet = logging.getLogger("torch.utils.cpp_extension")
    level = quiet.level
    quiet.setLevel(logging.ERROR)
    try:
        from torch.utils import benchmark
    finally:
        quiet.setLevel(level)
    return benchmark


def make_timer(fn: Callable[..., Any], args: Sequence[Any], threads: int, kind: str = "wall") -> Any:
    """A ``torch.utils.benchmark.Timer`` for ``fn(*args)`` on ``threads`` torch threads. ``kind="cpu"`` times
    with ``time.process_time`` (CPU time of this process, summed over its threads) instead of the wall clock."""
    extra = {"timer": time.process_time} if kind == "cpu" else {}
    return _benchmark_module().Timer(stmt="m(*args)", globals={"m": fn, "args": tuple(args)}, num_threads=threads,
                                     label="fxfuse bench", description="", **extra)


def interleaved_rounds(timers: Mapping[str, Any], rounds: int, min_run_time: float,
                       on_turn: Optional[Callable[[str, int], None]] = None) -> Dict[str, List[Any]]:
    """One ``blocked_autorange(min_run_time)`` ``Measurement`` per timer and round. Round ``r`` starts with the
    ``r``-th timer (mod the count), so no timer always runs first; ``on_turn(name, r)`` is called after each
    turn (progress)."""
    order = list(timers)
    out: Dict[str, List[Any]] = {name: [] for name in order}
    for r in range(max(1, rounds)):
        k = r % len(order)
        for name in order[k:] + order[:k]:
            out[name].append(timers[name].blocked_autorange(min_run_time=min_run_time))
            if on_turn is not None:
                on_turn(name, r)
    return out


def per_call_times(measurements: Sequence[Any]) -> Tuple[List[float], int]:
    """Per-call seconds of every timed block of ``measurements`` (block time / calls in the block), and the number
    of timed calls behind them."""
    times = [t for m in measurements for t in m.times]
    calls = sum(int(m.number_per_run) * len(m.raw_times) for m in measurements)
    return times, calls


def quartiles(times: Sequence[float]) -> Tuple[float, float, float]:
    """(q1, median, q3), inclusive method; a single sample is all three."""
    if len(times) == 1:
        return times[0], times[0], times[0]
    q1, med, q3 = statistics.quantiles(times, n=4, method="inclusive")
    return q1, med, q3


def peak_memory(module: Callable[..., Any], x: Tensor, device: torch.device) -> Optional[int]:
    """Bytes the forward pass allocates on top of what is resident (models, input) — CUDA only:
    ``max_memory_allocated()`` during one call minus ``memory_allocated()`` right before it."""
    if device.type != "cuda":
        return None
    sync(device)
    torch.cuda.reset_peak_memory_stats(device)
    before = torch.cuda.memory_allocated(device)
    out = module(x)
    sync(device)
    peak = torch.cuda.max_memory_allocated(device) - before
    del out
    return int(peak)


# ------------------------------------------------------------------------------------- torch.compile
@contextlib.contextmanager
def cold_inductor() -> Iterator[None]:
    """Disable Inductor's on-disk caches so a compile time is a cold compile, not a cache hit."""
    try:
        import torch._inductor.config as inductor_config
    except Exception:  # no Inductor in this torch build: nothing to disable
        yield
        return
    old = getattr(inductor_config, "force_disable_caches", None)
    if old is not None:
        inductor_config.force_disable_caches = True
    quiet = logging.getLogger("torch.utils.cpp_extension")
    level = quiet.level
    quiet.setLevel(logging.ERROR)  # "No CUDA runtime is found" on CPU-only machines is noise here
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", UserWarning)  # "dynamo_pgo force disabled by ..."
            yield
    finally:
        quiet.setLevel(level)
        if old is not None:
            inductor_config.force_disable_caches = old


_COMPILER_WARM: Set[Tuple[str, torch.dtype]] = set()


def warm_compiler(device: torch.device, dtype: torch.dtype) -> None:
    """Compile a trivial function once per process and device, so one-time costs (imports, Inductor's worker
    pool, toolchain probing) are not billed to whichever variant happens to compile first."""
    key = (device.type, dtype)
    if key in _COMPILER_WARM:
        return
    with cold_inductor():
        fn = torch.compile(lambda t: torch.relu(t * 2.0 + 1.0), dynamic=False)
        with torch.inference_mode():
            fn(torch.ones(8, device=device, dtype=dtype))
    sync(device)
    _COMPILER_WARM.add(key)
