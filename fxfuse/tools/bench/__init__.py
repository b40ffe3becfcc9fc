"""The benchmark harness behind ``fxfuse bench``.

What it measures, per model, batch size and variant (all in one process, interleaved):

* latency: ``torch.utils.benchmark.Timer.blocked_autorange`` (which synchronizes CUDA around every timed block),
  run in ``rounds`` chunks; the variants take turns within each round (the order rotates every round), so
  drift of a shared machine hits all variants alike. Reported: median and IQR of the per-call times of all
  blocks, throughput = batch / median, speed ratio = median(original) / median(variant);
* output error vs ``original`` on the same input, in the run dtype: ``max|y - y_ref|`` and that over
  ``max|y_ref|``;
* CUDA only: forward peak memory = ``max_memory_allocated()`` during one call minus ``memory_allocated()``
  right before it (after ``reset_peak_memory_stats()``; models and input already on the device);
* FLOPs per image from ``torch.utils.flop_counter.FlopCounterMode`` (batch-1 forward), parameters;
* preparation time: the reparametrize pass (fxfuse), ``torch.fx.experimental.optimization.fuse`` (fx_fuse),
  and for compiled variants the first call, which is the compile time.

Variants: ``original`` (eval model), ``fxfuse`` (:func:`fxfuse.reparametrize`), ``plain`` (the hand-written
deploy net, :func:`fxfuse.models.plain_twin`; reference nets only), ``fx_fuse`` (PyTorch's generic conv-BN
fuser), and with ``compile``: ``compiled_original`` / ``compiled_fxfuse`` (``torch.compile``).
"""

from __future__ import annotations

import contextlib
import csv
import datetime as _dt
import json
import math
import os
import platform
import statistics
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Dict, Iterator, List, Optional, Sequence, TextIO, Tuple

import torch
from torch import Tensor, nn

from ..model_source import SpecError, load_model, parse_dtype

__all__ = [
    "BASE_VARIANTS",
    "COMPILED_VARIANTS",
    "CSV_COLUMNS",
    "BenchConfig",
    "BenchResult",
    "run_bench",
    "format_table",
    "write_outputs",
    "default_batch_sizes",
    "cpu_model_name",
]

BASE_VARIANTS: Tuple[str, ...] = ("original", "fxfuse", "plain", "fx_fuse")
COMPILED_VARIANTS: Tuple[str, ...] = ("compiled_original", "compiled_fxfuse")
ALL_VARIANTS: Tuple[str, ...] = BASE_VARIANTS + COMPILED_VARIANTS

#: Columns of results.csv (and keys of every row in results.json), in order.
CSV_COLUMNS: Tuple[str, ...] = (
    "model", "variant", "batch_size", "image_size", "dtype", "device", "channels_last",
    "median_ms", "iqr_ms", "q1_ms", "q3_ms", "calls", "images_per_s", "speedup_vs_original",
    "max_abs_error", "max_rel_error", "peak_memory_bytes", "gflops", "params", "prepare_s",
)


@dataclass
class BenchConfig:
    """Options of one ``fxfuse bench`` run (the CLI flags, one to one)."""

    models: List[str] = field(default_factory=lambda: ["repvgg-article"])
    batch_sizes: Optional[List[int]] = None  # None: 1,2,4,...,128 on CUDA, 1,8 on CPU
    image_size: Optional[int] = None  # None: the model's default (224 for ImageNet-sized nets)
    dtype: str = "float32"
    channels_last: bool = False
    device: str = "auto"
    variants: Optional[List[str]] = None  # None: all base variants (+ compiled ones with compile=True)
    compile: bool = False
    compile_mode: Optional[str] = None
    min_run_time: float = 1.0  # seconds of timed calls per variant and batch size, split over the rounds
    rounds: int = 5
    warmup: Optional[int] = None  # untimed calls per variant and batch size; None: 3 on CUDA, 1 on CPU
    threads: Optional[int] = None
    seed: int = 0
    cudnn_benchmark: bool = True
    timer: str = "wall"  # "wall" (default) or "cpu": process CPU time, for CPU runs on a shared machine
    progress: bool = True
    command: str = ""


@dataclass
class BenchResult:
    """Rows (one per model × batch × variant, keys :data:`CSV_COLUMNS`), run metadata, per-model notes."""

    rows: List[Dict[str, Any]]
    metadata: Dict[str, Any]
    models: Dict[str, Dict[str, Any]]

    def to_json(self) -> Dict[str, Any]:
        return {"metadata": self.metadata, "models": self.models, "results": self.rows}


# ----------------------------------------------------------------------------------------- environment
def cpu_model_name() -> str:
    """CPU model from /proc/cpuinfo (what lscpu prints as 'Model name'), else ``platform.processor()``."""
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as fh:
            for line in fh:
                if line.lower().startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine() or "unknown CPU"


def resolve_device(name: str) -> torch.device:
    """``auto`` → cuda if available else cpu; ``cuda`` without CUDA is an error."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise SpecError("--device cuda requested but CUDA is not available (torch.cuda.is_available() is False)")
    if name not in ("cpu", "cuda"):
        raise SpecError(f"unknown device {name!r}; choose auto, cpu or cuda")
    return torch.device(name)


def default_batch_sizes(device: torch.device) -> List[int]:
    """The article's 1..128 on CUDA; 1 and 8 on CPU (a 2-core CPU needs seconds per batch-128 call)."""
    return [1, 2, 4, 8, 16, 32, 64, 128] if device.type == "cuda" else [1, 8]


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _metadata(cfg: BenchConfig, device: torch.device, batch_sizes: List[int]) -> Dict[str, Any]:
    import fxfuse

    try:
        import torchvision

        tv = torchvision.__version__
    except ImportError:  # pragma: no cover - torchvision is a dependency
        tv = None
    gpu = torch.cuda.get_device_name(device) if device.type == "cuda" else None
    return {
        "device": device.type,
        "device_name": gpu if gpu else cpu_model_name(),
        "cpu_model": cpu_model_name(),
        "cpu_count": os.cpu_count(),
        "gpu_name": gpu,
        "cuda_version": torch.version.cuda if device.type == "cuda" else None,
        "cudnn_benchmark": bool(cfg.cudnn_benchmark) if device.type == "cuda" else None,
        # TF32 changes float32 conv/matmul accuracy (and speed) on Ampere and newer GPUs
        "cudnn_allow_tf32": torch.backends.cudnn.allow_tf32 if device.type == "cuda" else None,
        "matmul_allow_tf32": torch.backends.cuda.matmul.allow_tf32 if device.type == "cuda" else None,
        "threads": torch.get_num_threads(),
        "torch_version": torch.__version__,
        "torchvision_version": tv,
        "fxfuse_version": fxfuse.__version__,
        "python_version": platform.python_version(),
        "platform": platform.platform(),
        "dtype": cfg.dtype,
        "channels_last": cfg.channels_last,
        "models": list(cfg.models),
        "batch_sizes": batch_sizes,
        "image_size": cfg.image_size,
        "compile": cfg.compile,
        "compile_mode": cfg.compile_mode,
        "min_run_time_s": cfg.min_run_time,
        "rounds": cfg.rounds,
        "warmup": cfg.warmup,
        "seed": cfg.seed,
        "timer": ("torch.utils.benchmark.Timer.blocked_autorange, wall clock (synchronizes CUDA)"
                  if cfg.timer == "wall" else
                  "torch.utils.benchmark.Timer.blocked_autorange with timer=time.process_time (CPU time of "
                  "this process, summed over its threads)"),
        "grad_mode": "torch.inference_mode",
        "date": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "command": cfg.command or " ".join(sys.argv),
        "load_average_start": _loadavg(),
    }


def _loadavg() -> Optional[List[float]]:
    """1/5/15-minute load averages: other processes on a shared machine distort CPU timings."""
    try:
        return [round(v, 2) for v in os.getloadavg()]
    except (OSError, AttributeError):
        return None


# ------------------------------------------------------------------------------------------- progress
class _Progress:
    """tqdm on stderr when installed, else one text line per step; silent when disabled."""

    def __init__(self, total: int, enabled: bool, stream: TextIO = sys.stderr) -> None:
        self.total, self.done, self.enabled, self.stream = total, 0, enabled, stream
        self._bar = None
        if enabled:
            try:
                from tqdm import tqdm

                self._bar = tqdm(total=total, file=stream, unit="step", dynamic_ncols=True, leave=False)
            except ImportError:
                self._bar = None

    def grow(self, n: int) -> None:
        self.total += n
        if self._bar is not None:
            self._bar.total = self.total
            self._bar.refresh()

    def step(self, desc: str) -> None:
        self.done += 1
        if not self.enabled:
            return
        if self._bar is not None:
            self._bar.set_description_str(desc, refresh=False)
            self._bar.update(1)
        else:
            print(f"[{self.done:>4}/{self.total}] {desc}", file=self.stream, flush=True)

    def note(self, text: str) -> None:
        if not self.enabled:
            return
        if self._bar is not None:
            self._bar.write(text, file=self.stream)
        else:
            print(text, file=self.stream, flush=True)

    def close(self) -> None:
        if self._bar is not None:
            self._bar.close()


# ------------------------------------------------------------------------------------------- variants
@dataclass
class _Variant:
    name: str
    module: Callable[..., Any]
    prepare_s: Optional[float] = None
    flops_per_image: Optional[float] = None
    params: Optional[int] = None
    compare: bool = True  # compare outputs with `original` (not for the plain twin: different weights)


@dataclass
class _Prepared:
    spec: str
    kind: str
    input_shape: Tuple[int, ...]  # batch-1 NCHW
    variants: Dict[str, _Variant]
    notes: Dict[str, Any]


def _count_params(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


def count_flops(module: Callable[..., Any], x: Tensor) -> Optional[float]:
    """Total FLOPs of one call (``FlopCounterMode``; a multiply-add counts as 2), or ``None`` if it fails."""
    from torch.utils.flop_counter import FlopCounterMode

    try:
        with torch.inference_mode(), FlopCounterMode(display=False) as counter:
            module(x)
        return float(counter.get_total_flops())
    except Exception:  # noqa: BLE001 - a model the counter cannot run through
        return None


def _plain_reinit_(plain: nn.Module, seed: int) -> None:
    """Kaiming-normal (ReLU gain) weights, zero biases for the plain twin's convs: keeps activations O(1)
    through depth so no variant runs into denormal numbers (which are slow on CPUs) by accident."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in plain.modules():
            if isinstance(m, nn.Conv2d):
                fan_in = m.weight[0].numel()
                w = torch.randn(m.weight.shape, generator=gen, dtype=torch.float32) * math.sqrt(2.0 / fan_in)
                m.weight.copy_(w.to(m.weight.dtype))
                if m.bias is not None:
                    m.bias.zero_()


def _make_input(shape: Sequence[int], device: torch.device, dtype: torch.dtype, channels_last: bool,
                seed: int) -> Tensor:
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(tuple(shape), generator=gen, dtype=torch.float32).to(device=device, dtype=dtype)
    if channels_last and x.dim() == 4:
        x = x.contiguous(memory_format=torch.channels_last)
    return x


def _prepare(spec: str, cfg: BenchConfig, device: torch.device, dtype: torch.dtype,
             wanted: Sequence[str], progress: _Progress) -> _Prepared:
    """Build ``spec``, randomize BN, and produce every wanted variant on ``device`` in ``dtype``."""
    import fxfuse
    from fxfuse import models as fxm

    loaded = load_model(spec)
    model = loaded.model
    fxm.randomize_batchnorm_(model, seed=cfg.seed)
    model.eval()
    base = loaded.default_shape or (1, 3, 224, 224)
    if len(base) != 4:
        raise SpecError(f"bench needs an image model (NCHW input); {spec!r} has default input {base}")
    size = cfg.image_size or base[2]
    shape = (1, base[1], size, size)
    model.to(device=device, dtype=dtype)
    if cfg.channels_last:
        model.to(memory_format=torch.channels_last)
    x1 = _make_input(shape, device, dtype, cfg.channels_last, cfg.seed)
    try:
        with torch.inference_mode():
            model(x1)
    except Exception as exc:  # noqa: BLE001
        raise SpecError(f"{spec!r} does not run on input {tuple(shape)} in {cfg.dtype} on {device.type}: "
                        f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}") from None

    variants: Dict[str, _Variant] = {"original": _Variant("original", model, prepare_s=0.0)}
    notes: Dict[str, Any] = {"kind": loaded.kind, "input_shape": list(shape), "skipped": {}}

    def skip(name: str, why: str) -> None:
        notes["skipped"][name] = why
        progress.note(f"{spec}: skipping {name}: {why}")

    fused = None
    if "fxfuse" in wanted or "compiled_fxfuse" in wanted:
        t0 = time.perf_counter()
        try:
            fused = fxfuse.reparametrize(model, x1)
        except Exception as exc:  # noqa: BLE001 - report and go on with the other variants
            skip("fxfuse", f"reparametrize failed: {type(exc).__name__}: {exc}")
            if "compiled_fxfuse" in wanted:
                skip("compiled_fxfuse", "no fxfuse model")
        else:
            elapsed = time.perf_counter() - t0
            if cfg.channels_last:
                fused.to(memory_format=torch.channels_last)
            rep = fused.fxfuse_report
            notes["reparametrize_s"] = elapsed
            notes["fusion"] = {
                "fused": dict(rep.fused), "unfused": len(rep.unfused), "rolled_back": list(rep.rolled_back),
                "verified": rep.verified, "verify_dtype": rep.verify_dtype,
                "max_rel_error": rep.max_rel_error, "convs": [rep.before.convs, rep.after.convs],
                "batch_norms": [rep.before.batch_norms, rep.after.batch_norms],
                "ops": [rep.before.nodes, rep.after.nodes],
            }
            if "fxfuse" in wanted:
                variants["fxfuse"] = _Variant("fxfuse", fused, prepare_s=elapsed)
    if "plain" in wanted:
        if fxm.reparam_blocks(model):
            t0 = time.perf_counter()
            plain = fxm.plain_twin(model).eval()
            _plain_reinit_(plain, cfg.seed + 1)
            plain.to(device=device, dtype=dtype)
            if cfg.channels_last:
                plain.to(memory_format=torch.channels_last)
            variants["plain"] = _Variant("plain", plain, prepare_s=time.perf_counter() - t0, compare=False)
        else:
            skip("plain", "no hand-written deploy twin (only fxfuse.models reference nets have one)")
    if "fx_fuse" in wanted:
        from torch.fx.experimental.optimization import fuse as fx_fuse

        t0 = time.perf_counter()
        try:
            generic = fx_fuse(model, inplace=False)
        except Exception as exc:  # noqa: BLE001
            skip("fx_fuse", f"torch.fx.experimental.optimization.fuse failed: {type(exc).__name__}: {exc}")
        else:
            if cfg.channels_last:
                generic.to(memory_format=torch.channels_last)
            variants["fx_fuse"] = _Variant("fx_fuse", generic, prepare_s=time.perf_counter() - t0)

    for v in variants.values():
        v.params = _count_params(v.module)
        v.flops_per_image = count_flops(v.module, x1)
    # compiled variants are (re)built per batch size in _measure_batch; they share the eager model's counts
    for name, src in (("compiled_original", "original"), ("compiled_fxfuse", "fxfuse")):
        if name in wanted and (src in variants or (src == "fxfuse" and fused is not None)):
            eager = variants[src].module if src in variants else fused
            variants[name] = _Variant(name, eager, params=_count_params(eager),
                                      flops_per_image=count_flops(eager, x1))
    notes["params"] = {k: v.params for k, v in variants.items()}
    notes["flops_per_image"] = {k: v.flops_per_image for k, v in variants.items()}
    return _Prepared(spec, loaded.kind, shape, variants, notes)


# ------------------------------------------------------------------------------------------ measuring
@contextlib.contextmanager
def _cold_inductor() -> Iterator[None]:
    """Disable Inductor's on-disk caches so a compile time is a cold compile, not a cache hit."""
    try:
        import torch._inductor.config as inductor_config
    except Exception:  # noqa: BLE001
        yield
        return
    import logging
    import warnings

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


_COMPILER_WARM: set = set()


def _warm_compiler(device: torch.device, dtype: torch.dtype) -> None:
    """Compile a trivial function once per process and device, so one-time costs (imports, Inductor's worker
    pool, toolchain probing) are not billed to whichever variant happens to compile first."""
    key = (device.type, dtype)
    if key in _COMPILER_WARM:
        return
    with _cold_inductor():
        fn = torch.compile(lambda t: torch.relu(t * 2.0 + 1.0), dynamic=False)
        with torch.inference_mode():
            fn(torch.ones(8, device=device, dtype=dtype))
    _sync(device)
    _COMPILER_WARM.add(key)


def _errors(out: Any, ref: Any) -> Tuple[Optional[float], Optional[float]]:
    """``max|out - ref|`` and that over ``max|ref|``, computed in float64 from the run-dtype outputs."""
    from torch.utils._pytree import tree_leaves

    a = [t for t in tree_leaves(out) if isinstance(t, Tensor)]
    b = [t for t in tree_leaves(ref) if isinstance(t, Tensor)]
    if len(a) != len(b) or not a:
        return None, None
    worst_abs, scale = 0.0, 0.0
    for x, y in zip(a, b):
        if x.shape != y.shape:
            return None, None
        worst_abs = max(worst_abs, (x.double() - y.double()).abs().max().item())
        scale = max(scale, y.double().abs().max().item())
    return worst_abs, (worst_abs / scale if scale > 0 else (0.0 if worst_abs == 0 else math.inf))


def _peak_memory(module: Callable[..., Any], x: Tensor, device: torch.device) -> Optional[int]:
    """Bytes the forward pass allocates on top of what is resident (models, input) — CUDA only."""
    if device.type != "cuda":
        return None
    _sync(device)
    torch.cuda.reset_peak_memory_stats(device)
    before = torch.cuda.memory_allocated(device)
    out = module(x)
    _sync(device)
    peak = torch.cuda.max_memory_allocated(device) - before
    del out
    return int(peak)


def _timer(module: Callable[..., Any], x: Tensor, threads: int, kind: str = "wall"):
    import logging

    quiet = logging.getLogger("torch.utils.cpp_extension")
    level = quiet.level
    quiet.setLevel(logging.ERROR)  # importing the benchmark utils logs "No CUDA runtime is found" on CPU boxes
    try:
        from torch.utils.benchmark import Timer
    finally:
        quiet.setLevel(level)

    extra = {"timer": time.process_time} if kind == "cpu" else {}
    return Timer(stmt="m(x)", globals={"m": module, "x": x}, num_threads=threads,
                 label="fxfuse bench", description="", **extra)


def _timed_chunk(timer: Any, number: Optional[int], min_run_time: float) -> Tuple[List[float], int]:
    """Per-call times of timed blocks adding up to ``min_run_time`` (at least one block).

    The first chunk of a variant is ``Timer.blocked_autorange``, which picks the block size (calls per timed
    block, so that timer and sync overhead stay below 0.1%) and warms up. Later chunks reuse that block size
    and time blocks the same way ``blocked_autorange`` does (``Timer._timeit``: the synchronizing timer around
    ``number`` calls) without re-estimating it, which would cost a full extra call per chunk on slow models."""
    if number is None or not hasattr(timer, "_timeit"):
        m = timer.blocked_autorange(min_run_time=min_run_time)
        return list(m.times), int(m.number_per_run)
    from torch.utils.benchmark.utils import common

    per_call: List[float] = []
    total = 0.0
    with common.set_torch_threads(timer._task_spec.num_threads):
        while total < min_run_time or not per_call:
            t = timer._timeit(number)
            total += t
            per_call.append(t / number)
    return per_call, number


def _quartiles(times: List[float]) -> Tuple[float, float, float]:
    if len(times) == 1:
        return times[0], times[0], times[0]
    q1, med, q3 = statistics.quantiles(times, n=4, method="inclusive")
    return q1, med, q3


def _measure_batch(prep: _Prepared, bs: int, cfg: BenchConfig, device: torch.device, dtype: torch.dtype,
                   progress: _Progress) -> List[Dict[str, Any]]:
    """All variants of one model at one batch size: warm-up, errors, memory, then interleaved timing."""
    shape = (bs,) + tuple(prep.input_shape[1:])
    x = _make_input(shape, device, dtype, cfg.channels_last, cfg.seed + bs)
    runnable: Dict[str, Callable[..., Any]] = {}
    prepare_s: Dict[str, Optional[float]] = {n: v.prepare_s for n, v in prep.variants.items()}
    threads = torch.get_num_threads()
    compiled = [n for n in prep.variants if n in COMPILED_VARIANTS]
    if compiled:
        _warm_compiler(device, dtype)
        torch._dynamo.reset()  # each batch size compiles from scratch: the first call is the compile time
    with torch.inference_mode():
        for name, v in prep.variants.items():
            if name in COMPILED_VARIANTS:
                fn = torch.compile(v.module, mode=cfg.compile_mode, dynamic=False)
                _sync(device)
                t0 = time.perf_counter()
                try:
                    with _cold_inductor():
                        fn(x)
                    _sync(device)
                except Exception as exc:  # noqa: BLE001
                    progress.note(f"{prep.spec} bs={bs}: {name} failed to compile: {type(exc).__name__}: {exc}")
                    prep.notes["skipped"][name] = f"torch.compile failed: {type(exc).__name__}: {exc}"
                    continue
                prepare_s[name] = time.perf_counter() - t0
                runnable[name] = fn
            else:
                runnable[name] = v.module
        warmup = cfg.warmup if cfg.warmup is not None else (3 if device.type == "cuda" else 1)
        for fn in runnable.values():
            for _ in range(max(0, warmup)):
                fn(x)
        _sync(device)
        ref = runnable["original"](x)
        _sync(device)
        errors = {}
        memory = {}
        for name, fn in runnable.items():
            if name == "original":
                errors[name] = (0.0, 0.0)
            elif prep.variants[name].compare:
                errors[name] = _errors(fn(x), ref)
            else:
                errors[name] = (None, None)
        del ref
        for name, fn in runnable.items():
            memory[name] = _peak_memory(fn, x, device)

        times: Dict[str, List[float]] = {n: [] for n in runnable}
        calls: Dict[str, int] = {n: 0 for n in runnable}
        timers = {n: _timer(fn, x, threads, cfg.timer) for n, fn in runnable.items()}
        block: Dict[str, int] = {}
        order = list(runnable)
        chunk = cfg.min_run_time / max(1, cfg.rounds)
        for r in range(max(1, cfg.rounds)):
            k = r % len(order)
            for name in order[k:] + order[:k]:  # rotate so no variant always runs first
                per_call, number = _timed_chunk(timers[name], block.get(name), chunk)
                block[name] = number
                times[name].extend(per_call)
                calls[name] += number * len(per_call)
                progress.step(f"{prep.spec} bs={bs} {name} round {r + 1}/{cfg.rounds}")

    rows = []
    base_median = statistics.median(times["original"])
    for name in runnable:
        q1, med, q3 = _quartiles(times[name])
        v = prep.variants[name]
        abs_err, rel_err = errors[name]
        rows.append({
            "model": prep.spec, "variant": name, "batch_size": bs, "image_size": shape[-1], "dtype": cfg.dtype,
            "device": device.type, "channels_last": cfg.channels_last,
            "median_ms": med * 1e3, "iqr_ms": (q3 - q1) * 1e3, "q1_ms": q1 * 1e3, "q3_ms": q3 * 1e3,
            "calls": calls[name], "images_per_s": bs / med if med > 0 else None,
            "speedup_vs_original": base_median / med if med > 0 else None,
            "max_abs_error": abs_err, "max_rel_error": rel_err, "peak_memory_bytes": memory[name],
            "gflops": None if v.flops_per_image is None else v.flops_per_image * bs / 1e9,
            "params": v.params, "prepare_s": prepare_s.get(name),
        })
    return rows


def _wanted_variants(cfg: BenchConfig) -> List[str]:
    if cfg.variants:
        unknown = [v for v in cfg.variants if v not in ALL_VARIANTS]
        if unknown:
            raise SpecError(f"unknown variant(s) {', '.join(unknown)}; choose from {', '.join(ALL_VARIANTS)}")
        wanted = [v for v in ALL_VARIANTS if v in cfg.variants or (cfg.compile and v in COMPILED_VARIANTS)]
    else:
        wanted = list(BASE_VARIANTS) + (list(COMPILED_VARIANTS) if cfg.compile else [])
    if "original" not in wanted:
        wanted.insert(0, "original")  # the reference every ratio and error is taken against
    return wanted


def run_bench(cfg: BenchConfig, log: TextIO = sys.stderr) -> BenchResult:
    """Run the benchmark described by ``cfg``; see the module docstring for what is measured.

    ``cfg.threads`` applies during the run only; torch's previous thread count is restored afterwards."""
    device = resolve_device(cfg.device)
    dtype = parse_dtype(cfg.dtype)
    old_threads = torch.get_num_threads()
    if cfg.threads:
        if cfg.threads < 1:
            raise SpecError("--threads must be >= 1")
        torch.set_num_threads(cfg.threads)
    try:
        return _run_bench(cfg, device, dtype, log)
    finally:
        torch.set_num_threads(old_threads)


def _run_bench(cfg: BenchConfig, device: torch.device, dtype: torch.dtype, log: TextIO) -> BenchResult:
    if cfg.min_run_time <= 0:
        raise SpecError("--min-run-time must be > 0")
    if cfg.rounds < 1:
        raise SpecError("--rounds must be >= 1")
    if cfg.timer not in ("wall", "cpu"):
        raise SpecError(f"unknown timer {cfg.timer!r}; choose wall or cpu")
    if cfg.timer == "cpu" and device.type != "cpu":
        raise SpecError("--timer cpu measures this process's CPU time and is only meaningful with --device cpu")
    batch_sizes = list(cfg.batch_sizes or default_batch_sizes(device))
    wanted = _wanted_variants(cfg)
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = bool(cfg.cudnn_benchmark)
    metadata = _metadata(cfg, device, batch_sizes)
    metadata["variants"] = wanted
    metadata["timer_kind"] = cfg.timer
    for spec in cfg.models:  # fail fast on a bad spec, before any progress output or measurement
        load_model(spec)
    progress = _Progress(len(cfg.models) * len(batch_sizes) * len(wanted) * cfg.rounds, cfg.progress, log)
    rows: List[Dict[str, Any]] = []
    notes: Dict[str, Dict[str, Any]] = {}
    try:
        for spec in cfg.models:
            progress.note(f"{spec}: building variants ({', '.join(wanted)}) on {device.type} in {cfg.dtype}")
            prep = _prepare(spec, cfg, device, dtype, wanted, progress)
            missing = len(wanted) - len(prep.variants)
            if missing:
                progress.grow(-missing * len(batch_sizes) * cfg.rounds)
            notes[spec] = prep.notes
            for bs in batch_sizes:
                rows.extend(_measure_batch(prep, bs, cfg, device, dtype, progress))
            del prep
            if device.type == "cuda":
                torch.cuda.empty_cache()
    finally:
        progress.close()
    metadata["load_average_end"] = _loadavg()
    return BenchResult(rows, metadata, notes)


# -------------------------------------------------------------------------------------------- output
def _fmt(v: Any, spec: str) -> str:
    if v is None or (isinstance(v, float) and math.isnan(v)):
        return "-"
    return format(v, spec)


def format_table(result: BenchResult) -> str:
    """The terminal table: one line per model × batch × variant, then the run's device line."""
    mw = max([5] + [len(r["model"]) for r in result.rows])
    head = (f"{'model':<{mw}} {'batch':>5} {'variant':<18} {'median ms':>10} {'IQR ms':>8} {'img/s':>9} "
            f"{'speedup':>8} {'max rel err':>11} {'GFLOP':>8} {'peak MiB':>9} {'prep s':>7}")
    lines = [head, "-" * len(head)]
    for r in result.rows:
        mem = None if r["peak_memory_bytes"] is None else r["peak_memory_bytes"] / 2 ** 20
        lines.append(
            f"{r['model']:<{mw}} {r['batch_size']:>5} {r['variant']:<18} {_fmt(r['median_ms'], '10.3f')} "
            f"{_fmt(r['iqr_ms'], '8.3f')} {_fmt(r['images_per_s'], '9.1f')} "
            f"{_fmt(r['speedup_vs_original'], '7.2f')}x {_fmt(r['max_rel_error'], '11.2e')} "
            f"{_fmt(r['gflops'], '8.3g')} {_fmt(mem, '9.1f')} {_fmt(r['prepare_s'], '7.2f')}")
    md = result.metadata
    if md.get("timer_kind") == "cpu":
        lines.append("times are CPU time of this process (time.process_time, summed over its threads), not wall "
                     "clock")
    lines.append(f"device: {md['device_name']} ({md['device']}), torch {md['torch_version']}, dtype {md['dtype']}"
                 f"{', channels_last' if md['channels_last'] else ''}, threads {md['threads']}, {md['date']}"
                 + (f", load average (1 min) {md['load_average_start'][0]} -> {md['load_average_end'][0]}"
                    if md.get("load_average_start") and md.get("load_average_end") else ""))
    lines.append("speedup = median(original) / median(variant); IQR = q3 - q1 of per-call times; "
                 "max rel err = max|y - y_original| / max|y_original| in the run dtype")
    busy = [v[0] for v in (md.get("load_average_start"), md.get("load_average_end")) if v]
    cores = md.get("cpu_count") or 1
    if md["device"] == "cpu" and busy and max(busy) > 0.75 * cores:
        if md.get("timer_kind") == "cpu":
            lines.append(f"note: the machine was busy (1-minute load average up to {max(busy)} on {cores} CPUs); "
                         "CPU time ignores time-slicing but caches and memory bandwidth were shared")
        else:
            lines.append(f"warning: the machine was busy (1-minute load average up to {max(busy)} on {cores} "
                         "CPUs): other processes distort wall-clock timings, and thread contention penalizes "
                         "models with many small ops (the unfused ones) most; re-run on an idle machine, or use "
                         "--threads 1 --timer cpu")
    for spec, note in result.models.items():
        for name, why in note.get("skipped", {}).items():
            lines.append(f"{spec}: {name} skipped: {why}")
    return "\n".join(lines)


def write_outputs(result: BenchResult, out_dir: str | Path, log: TextIO = sys.stderr) -> List[Path]:
    """Write results.csv, results.json and (with matplotlib) latency.png + speedup.png; return the paths."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    written = []
    csv_path = out / "results.csv"
    with open(csv_path, "w", newline="", encoding="utf-8") as fh:
        writer = csv.DictWriter(fh, fieldnames=list(CSV_COLUMNS))
        writer.writeheader()
        for r in result.rows:
            writer.writerow({k: ("" if r.get(k) is None else r.get(k)) for k in CSV_COLUMNS})
    written.append(csv_path)
    json_path = out / "results.json"
    with open(json_path, "w", encoding="utf-8") as fh:
        json.dump(result.to_json(), fh, indent=2, default=_json_default)
        fh.write("\n")
    written.append(json_path)
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt  # noqa: F401
    except ImportError:
        print("fxfuse bench: matplotlib is not installed; skipping latency.png and speedup.png "
              "(pip install 'fxfuse[plot]')", file=log)
        return written
    written.extend(_plots(result, out))
    return written


def _json_default(o: Any) -> Any:
    if isinstance(o, float) and (math.isinf(o) or math.isnan(o)):
        return str(o)
    if isinstance(o, (torch.dtype, torch.device, Path)):
        return str(o)
    raise TypeError(f"not JSON serializable: {type(o).__name__}")


def _plots(result: BenchResult, out: Path) -> List[Path]:
    import matplotlib.pyplot as plt

    specs = list(dict.fromkeys(r["model"] for r in result.rows))
    md = result.metadata
    subtitle = f"{md['device_name']} · torch {md['torch_version']} · {md['dtype']}"
    paths = []

    fig, axes = plt.subplots(1, len(specs), figsize=(6 * len(specs), 4.5), squeeze=False)
    for ax, spec in zip(axes[0], specs):
        rows = [r for r in result.rows if r["model"] == spec]
        for variant in dict.fromkeys(r["variant"] for r in rows):
            vr = sorted((r for r in rows if r["variant"] == variant), key=lambda r: r["batch_size"])
            bs = [r["batch_size"] for r in vr]
            med = [r["median_ms"] for r in vr]
            err = [[r["median_ms"] - r["q1_ms"] for r in vr], [r["q3_ms"] - r["median_ms"] for r in vr]]
            ax.errorbar(bs, med, yerr=err, marker="o", capsize=3, label=variant)
        ax.set_xscale("log", base=2)
        ax.set_yscale("log")
        all_bs = sorted({r["batch_size"] for r in rows})
        ax.set_xticks(all_bs, [str(b) for b in all_bs])
        ax.xaxis.set_minor_locator(plt.NullLocator())
        ax.set_xlabel("batch size")
        ax.set_ylabel(("median CPU time" if md.get("timer_kind") == "cpu" else "median latency")
                      + " per call (ms), bars = IQR")
        ax.set_title(spec)
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(fontsize="small")
    fig.suptitle(f"latency\n{subtitle}")
    fig.tight_layout()
    p = out / "latency.png"
    fig.savefig(p, dpi=110)
    plt.close(fig)
    paths.append(p)

    fig, axes = plt.subplots(1, len(specs), figsize=(6 * len(specs), 4.5), squeeze=False)
    for ax, spec in zip(axes[0], specs):
        rows = [r for r in result.rows if r["model"] == spec and r["variant"] != "original"]
        variants = list(dict.fromkeys(r["variant"] for r in rows))
        batches = sorted({r["batch_size"] for r in rows})
        width = 0.8 / max(1, len(variants))
        for i, variant in enumerate(variants):
            vals = {r["batch_size"]: r["speedup_vs_original"] for r in rows if r["variant"] == variant}
            xs = [j + (i - (len(variants) - 1) / 2) * width for j in range(len(batches))]
            ax.bar(xs, [vals.get(b) or 0.0 for b in batches], width=width, label=variant)
        ax.axhline(1.0, color="black", linewidth=0.8)
        ax.set_xticks(range(len(batches)), [str(b) for b in batches])
        ax.set_xlabel("batch size")
        ax.set_ylabel("speed vs original (median ratio)")
        ax.set_title(spec)
        ax.grid(True, axis="y", alpha=0.3)
        ax.legend(fontsize="small")
    fig.suptitle(f"speed ratio vs the original model\n{subtitle}")
    fig.tight_layout()
    p = out / "speedup.png"
    fig.savefig(p, dpi=110)
    plt.close(fig)
    paths.append(p)
    return paths
