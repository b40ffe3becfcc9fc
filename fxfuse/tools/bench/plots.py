"""latency.png and speedup.png (matplotlib, imported only when plotting): one panel per model, batch size on x."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Callable, Dict, List, Tuple

from .config import BenchResult

Row = Dict[str, Any]
Panel = Callable[[Any, List[Row], Dict[str, Any]], None]


def _latency_panel(ax: Any, rows: List[Row], md: Dict[str, Any]) -> None:
    """Median time per call against batch size (log-log), one line per variant, IQR as error bars."""
    import matplotlib.pyplot as plt

    for variant in dict.fromkeys(r["variant"] for r in rows):
        vr = sorted((r for r in rows if r["variant"] == variant), key=lambda r: r["batch_size"])
        err = [[r["median_ms"] - r["q1_ms"] for r in vr], [r["q3_ms"] - r["median_ms"] for r in vr]]
        ax.errorbar([r["batch_size"] for r in vr], [r["median_ms"] for r in vr], yerr=err, marker="o", capsize=3,
                    label=variant)
    ax.set_xscale("log", base=2)
    ax.set_yscale("log")
    batches = sorted({r["batch_size"] for r in rows})
    ax.set_xticks(batches, [str(b) for b in batches])
    ax.xaxis.set_minor_locator(plt.NullLocator())
    ax.set_ylabel(("median CPU time" if md.get("timer_kind") == "cpu" else "median latency")
                  + " per call (ms), bars = IQR")
    ax.grid(True, which="both", alpha=0.3)


def _speedup_panel(ax: Any, rows: List[Row], md: Dict[str, Any]) -> None:
    """Speed ratio median(original) / median(variant) per batch size, grouped bars, a line at 1."""
    rows = [r for r in rows if r["variant"] != "original"]
    variants = list(dict.fromkeys(r["variant"] for r in rows))
    batches = sorted({r["batch_size"] for r in rows})
    width = 0.8 / max(1, len(variants))
    for i, variant in enumerate(variants):
        vals = {r["batch_size"]: r["speedup_vs_original"] for r in rows if r["variant"] == variant}
        xs = [j + (i - (len(variants) - 1) / 2) * width for j in range(len(batches))]
        ax.bar(xs, [vals.get(b) or 0.0 for b in batches], width=width, label=variant)
    ax.axhline(1.0, color="black", linewidth=0.8)
    ax.set_xticks(range(len(batches)), [str(b) for b in batches])
    ax.set_ylabel("speed vs original (median ratio)")
    ax.grid(True, axis="y", alpha=0.3)


PANELS: Dict[str, Tuple[str, Panel]] = {
    "latency.png": ("latency", _latency_panel),
    "speedup.png": ("speed ratio vs the original model", _speedup_panel),
}


def plot(result: BenchResult, path: Path, title: str, panel: Panel) -> Path:
    """One figure: a panel per model (``panel(ax, that model's rows, metadata)``), titled with the machine."""
    import matplotlib.pyplot as plt

    specs = list(dict.fromkeys(r["model"] for r in result.rows))
    md = result.metadata
    fig, axes = plt.subplots(1, len(specs), figsize=(6 * len(specs), 4.5), squeeze=False)
    for ax, spec in zip(axes[0], specs):
        panel(ax, [r for r in result.rows if r["model"] == spec], md)
        ax.set_xlabel("batch size")
        ax.set_title(spec)
        ax.legend(fontsize="small")
    fig.suptitle(f"{title}\n{md['device_name']} · torch {md['torch_version']} · {md['dtype']}")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def write_plots(result: BenchResult, out: Path) -> List[Path]:
    """latency.png and speedup.png in ``out``."""
    return [plot(result, out / name, title, panel) for name, (title, panel) in PANELS.items()]
