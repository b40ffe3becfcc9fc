"""The machine a benchmark runs on: device choice, CPU model, load average, and the run's metadata record."""

from __future__ import annotations

import datetime as _dt
import os
import platform
import sys
from typing import Any, Dict, List, Optional

import torch

from ..model_source import SpecError
from .config import BenchConfig


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


def sync(device: torch.device) -> None:
    """Wait for queued CUDA work (no-op on CPU, where ops are synchronous)."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def load_average() -> Optional[List[float]]:
    """1/5/15-minute load averages: other processes on a shared machine distort CPU timings."""
    try:
        return [round(v, 2) for v in os.getloadavg()]
    except (OSError, AttributeError):
        return None


def run_metadata(cfg: BenchConfig, device: torch.device, batch_sizes: List[int]) -> Dict[str, Any]:
    """Everything needed to read (and reproduce) the numbers: machine, versions, options, date, command."""
    from ... import __version__ as fxfuse_version

    try:
        import torchvision

        tv = torchvision.__version__
    except ImportError:  # pragma: no cover - torchvision is a dependency
        tv = None
    gpu = torch.cuda.get_device_name(device) if device.type == "cuda" else None
    cuda = device.type == "cuda"
    return {
        "device": device.type,
        "device_name": gpu if gpu else cpu_model_name(),
        "cpu_model": cpu_model_name(),
        "cpu_count": os.cpu_count(),
        "gpu_name": gpu,
        "cuda_version": torch.version.cuda if cuda else None,
        "cudnn_benchmark": bool(cfg.cudnn_benchmark) if cuda else None,
        # TF32 changes float32 conv/matmul accuracy (and speed) on Ampere and newer GPUs
        "cudnn_allow_tf32": torch.backends.cudnn.allow_tf32 if cuda else None,
        "matmul_allow_tf32": torch.backends.cuda.matmul.allow_tf32 if cuda else None,
        "threads": torch.get_num_threads(),
        "torch_version": torch.__version__,
        "torchvision_version": tv,
        "fxfuse_version": fxfuse_version,
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
        "load_average_start": load_average(),
    }
