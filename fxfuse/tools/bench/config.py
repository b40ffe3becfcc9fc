"""What one ``fxfuse bench`` run is asked to do (:class:`BenchConfig`) and what it returns (:class:`BenchResult`)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Dict, List, Optional, Tuple

from ..model_source import SpecError

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


def wanted_variants(cfg: BenchConfig) -> List[str]:
    """The variants to build, in :data:`ALL_VARIANTS` order; ``original`` is always first (the reference every
    ratio and error is taken against)."""
    if cfg.variants:
        unknown = [v for v in cfg.variants if v not in ALL_VARIANTS]
        if unknown:
            raise SpecError(f"unknown variant(s) {', '.join(unknown)}; choose from {', '.join(ALL_VARIANTS)}")
        wanted = [v for v in ALL_VARIANTS if v in cfg.variants or (cfg.compile and v in COMPILED_VARIANTS)]
    else:
        wanted = list(BASE_VARIANTS) + (list(COMPILED_VARIANTS) if cfg.compile else [])
    if "original" not in wanted:
        wanted.insert(0, "original")
    return wanted


def validate(cfg: BenchConfig, device_type: str) -> None:
    """Reject option values that cannot make a meaningful run (one-line :class:`SpecError`)."""
    if cfg.min_run_time <= 0:
        raise SpecError("--min-run-time must be > 0")
    if cfg.rounds < 1:
        raise SpecError("--rounds must be >= 1")
    if cfg.timer not in ("wall", "cpu"):
        raise SpecError(f"unknown timer {cfg.timer!r}; choose wall or cpu")
    if cfg.timer == "cpu" and device_type != "cpu":
        raise SpecError("--timer cpu measures this process's CPU time and is only meaningful with --device cpu")
