"""Speed in the zoo sweep: forward time original vs fused (the ``fxfuse bench`` timing), and the pass's own time
on big graphs."""

from __future__ import annotations

import gc
import os
import statistics
import time
from typing import Any, Dict, List, Sequence, Tuple

import torch
from torch import fx, nn

import fxfuse
from fxfuse.tools.bench import interleaved_rounds, make_timer

from .cases import zoo_case


def speed_ratio(original: nn.Module, fused: nn.Module, args: Tuple[Any, ...], min_run_time: float,
                rounds: int = 7, threads: int = 1) -> Tuple[float, float, float]:
    """``original(*args)`` time over ``fused(*args)`` time (>1: fused is faster), timed like ``fxfuse bench``
    (:func:`fxfuse.tools.bench.interleaved_rounds`: ``torch.utils.benchmark.Timer.blocked_autorange``, the two
    taking turns in ``rounds`` rounds, order alternating). Each round gives the ratio of the two medians measured
    next to each other; returns (median, min, max) of those paired ratios, so that drifting load on a shared
    machine cancels. One thread by default: on a shared 2-core machine a multi-threaded run stalls whenever
    another process takes a core."""
    timers = {"original": make_timer(original, args, threads), "fused": make_timer(fused, args, threads)}
    with torch.no_grad():
        for m in (original, fused):
            m(*args)  # warm-up
        measured = interleaved_rounds(timers, rounds, min_run_time)
    ratios = [o.median / f.median for o, f in zip(measured["original"], measured["fused"])]
    return statistics.median(ratios), min(ratios), max(ratios)


def graph_nodes(model: nn.Module) -> int:
    return sum(1 for n in fx.symbolic_trace(model).graph.nodes if n.op not in ("placeholder", "output", "get_attr"))


def pass_speed(repeats: int = 7, threads: Sequence[int] = (2, 1)) -> Dict[str, Any]:
    """Pass time of ``reparametrize(m, x, verify=False)`` (float32, x 1x3x64x64) for resnet50 and resnet152, per
    torch thread count: median / min / max of ``repeats`` runs after a warm-up, the two models alternating so that
    load on a shared machine hits both alike; plus graph node counts and the machine's load average. (The pass is
    one long call, so ``perf_counter`` around it is the timer.)"""
    models = {name: zoo_case(name).build() for name in ("resnet50", "resnet152")}
    x = torch.randn(1, 3, 64, 64)
    out: Dict[str, Any] = {"nodes": {name: graph_nodes(m) for name, m in models.items()}, "runs": {},
                           "load_before": os.getloadavg()}
    previous = torch.get_num_threads()
    try:
        for n in threads:
            torch.set_num_threads(n)
            times: Dict[str, List[float]] = {name: [] for name in models}
            for m in models.values():
                fxfuse.reparametrize(m, x, verify=False)  # warm-up (imports, first-touch allocations)
            for _ in range(repeats):
                for name, m in models.items():
                    gc.collect()
                    t = time.perf_counter()
                    fxfuse.reparametrize(m, x, verify=False)
                    times[name].append(time.perf_counter() - t)
            out["runs"][n] = {name: {"median_s": statistics.median(ts), "min_s": min(ts), "max_s": max(ts)}
                              for name, ts in times.items()}
    finally:
        torch.set_num_threads(previous)
    out["load_after"] = os.getloadavg()
    out["repeats"] = repeats
    out["node_ratio"] = out["nodes"]["resnet152"] / out["nodes"]["resnet50"]
    return out
