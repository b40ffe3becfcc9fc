"""What a benchmark run leaves behind: the terminal table, results.csv, results.json (and the plots, :mod:`.plots`)."""

from __future__ import annotations

import csv
import json
import math
import re
import sys
from pathlib import Path
from typing import Any, Dict, List, TextIO

import torch

from .config import CSV_COLUMNS, BenchResult


def _fmt(v: Any, spec: str) -> str:
    """``format(v, spec)``; a missing value is ``-`` right-aligned to the spec's width."""
    if v is None or (isinstance(v, float) and math.isnan(v)):
        width = re.match(r"\d*", spec).group()  # type: ignore[union-attr]
        return "-".rjust(int(width) if width else 1)
    return format(v, spec)


def format_table(result: BenchResult) -> str:
    """The terminal table: one line per model × batch × variant, then the run's device line and notes."""
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
    for spec, note in result.models.items():
        if note.get("executed_ops"):
            lines.append("")
            lines.append(format_op_table(spec, note["executed_ops"]))
    return "\n".join(lines)


def format_op_table(spec: str, executed: Dict[str, Dict[str, int]]) -> str:
    """Ops executed by one batch-1 call of each variant, every op kind counted (rows: op, columns: variant)."""
    variants = list(executed)
    ops = sorted({op for counts in executed.values() for op in counts},
                 key=lambda op: (-max(c.get(op, 0) for c in executed.values()), op))
    width = max([10] + [len(op) for op in ops])
    head = f"{'executed ops (' + spec + ', batch 1)':<{width + 2}}" + "".join(f"{v:>10}" for v in variants)
    lines = [head, "-" * len(head)]
    lines.extend(f"  {op:<{width}}" + "".join(f"{executed[v].get(op, 0):>10}" for v in variants) for op in ops)
    lines.append(f"  {'total':<{width}}" + "".join(f"{sum(executed[v].values()):>10}" for v in variants))
    if "fxfuse" in executed and "plain" in executed:
        same = executed["fxfuse"] == executed["plain"]
        lines.append("  fxfuse executes " + ("exactly the plain twin's ops" if same else
                                             "other ops than the plain twin (see the columns)"))
    return "\n".join(lines)


def write_outputs(result: BenchResult, out_dir: str | Path, log: TextIO = sys.stderr) -> List[Path]:
    """Write results.csv, results.json and (with matplotlib) latency.png + speedup.png; return the paths."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    written = [write_csv(result, out / "results.csv"), write_json(result, out / "results.json")]
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot  # fail here, not half-way through the plots
    except ImportError:
        print("fxfuse bench: matplotlib is not installed; skipping latency.png and speedup.png "
              "(pip install 'fxfuse[plot]')", file=log)
        return written
    from .plots import write_plots

    written.extend(write_plots(result, out))
    return written


def write_csv(result: BenchResult, path: Path) -> Path:
    """One row per model × batch × variant, columns :data:`CSV_COLUMNS`; a missing value is an empty cell."""
    with open(path, "w", newline="", encoding="utf-8") as fh:
        writer = csv.DictWriter(fh, fieldnames=list(CSV_COLUMNS))
        writer.writeheader()
        for r in result.rows:
            writer.writerow({k: ("" if r.get(k) is None else r.get(k)) for k in CSV_COLUMNS})
    return path


def write_json(result: BenchResult, path: Path) -> Path:
    """``{"metadata", "models", "results"}`` (:meth:`BenchResult.to_json`), indented."""
    with open(path, "w", encoding="utf-8") as fh:
        json.dump(result.to_json(), fh, indent=2, default=_json_default)
        fh.write("\n")
    return path


def _json_default(o: Any) -> Any:
    if isinstance(o, (torch.dtype, torch.device, Path)):
        return str(o)
    raise TypeError(f"not JSON serializable: {type(o).__name__}")
