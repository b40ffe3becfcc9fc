"""What the pass costs: ``fxfuse.reparametrize`` against ``torch.fx.experimental.optimization.fuse`` on the same model.

    python -m benchmarks.pass_time [--models resnet50,resnet152] [--size 64] [--rounds 5] [--threads 2]

For each torchvision model (random weights, randomized BatchNorm statistics, eval mode) at batch 1 and ``size``²,
one process times in interleaved rounds (the order rotating each round): ``torch.fx``'s conv-BN fuser, fxfuse with
``verify=True`` and ``verify=False`` under ``capture="symbolic"``, fxfuse's ``capture="export"`` (its own work,
``torch.export`` itself subtracted: the export call is timed in the same round), plus ``symbolic_trace`` and one
forward in the model's dtype and one in float64 as yardsticks. A verified pass cannot cost less than its
floor: tracing plus the four runs it makes (the original in its dtype, the float64 reference, the fused graph in
float64, the returned model in its dtype) — printed beside fx's fuse, so the table says how much of the gap is
the check itself. Each time is the minimum over the rounds (the least disturbed by other work on a shared
machine); ratios are of those minima. The phase split of the last fxfuse run (``report.phases``) is printed too.
The growth ratio (largest model / smallest) says whether the pass is linear in the graph's size.
docs/benchmarks.md quotes a run.
"""

from __future__ import annotations

import argparse
import copy
import datetime as _dt
import time
import warnings
from typing import Callable, Dict, List, Sequence

import torch
import torchvision
from torch import nn
from torch.fx.experimental.optimization import fuse as fx_fuse

import fxfuse
from fxfuse.models import randomize_batchnorm_

from .common import cpu_text

VARIANTS = ("fx_fuse", "fxfuse", "fxfuse_noverify", "fxfuse_export", "export_call", "symbolic_trace", "forward",
            "forward64")


def _model(name: str) -> nn.Module:
    model = getattr(torchvision.models, name)()
    randomize_batchnorm_(model, seed=0)
    return model.eval()


def _timed(fn: Callable[[], object]) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def measure(name: str, size: int, rounds: int, with_export: bool) -> Dict[str, object]:
    model = _model(name)
    x = torch.randn(1, 3, size, size)
    model64, x64 = copy.deepcopy(model).double(), x.double()
    runs: Dict[str, Callable[[], object]] = {
        "fx_fuse": lambda: fx_fuse(model),
        "fxfuse": lambda: fxfuse.reparametrize(model, x, capture="symbolic"),
        "fxfuse_noverify": lambda: fxfuse.reparametrize(model, x, capture="symbolic", verify=False),
        "symbolic_trace": lambda: torch.fx.symbolic_trace(model),
        "forward": lambda: torch.no_grad()(model)(x),
        "forward64": lambda: torch.no_grad()(model64)(x64),
    }
    if with_export:
        runs["fxfuse_export"] = lambda: fxfuse.reparametrize(model, x, capture="export")
        runs["export_call"] = lambda: torch.export.export(model, (x,), strict=False)
    for fn in runs.values():  # warm-up: imports, first-call caches
        fn()
    times: Dict[str, List[float]] = {k: [] for k in runs}
    order = list(runs)
    for r in range(rounds):
        for k in order[r % len(order):] + order[:r % len(order)]:
            times[k].append(_timed(runs[k]))
    best = {k: min(v) for k, v in times.items()}
    fused = fxfuse.reparametrize(model, x, capture="symbolic")
    return {"model": name, "best": best, "phases": dict(fused.fxfuse_report.phases),
            "convs": sum(isinstance(m, nn.Conv2d) for m in model.modules())}


def render(rows: Sequence[Dict[str, object]], args: argparse.Namespace) -> str:
    lines = [f"`python -m benchmarks.pass_time --models {args.models} --size {args.size} --rounds {args.rounds} "
             f"--threads {args.threads}` — {cpu_text()}, torch {torch.__version__}, "
             f"{_dt.date.today().isoformat()}; minimum of {args.rounds} interleaved rounds, seconds.", "",
             "| model | fx fuse | fxfuse (verify) | ratio | fxfuse (no verify) | ratio | export: fxfuse's own work | "
             "ratio to symbolic | symbolic_trace | one forward | float64 forward | floor of a verified pass | "
             "floor / fx fuse |", "|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for row in rows:
        b: Dict[str, float] = row["best"]  # type: ignore[assignment]
        own_export = b["fxfuse_export"] - b["export_call"] if "fxfuse_export" in b else float("nan")
        floor = b["symbolic_trace"] + 2 * b["forward"] + 2 * b["forward64"]
        lines.append(f"| {row['model']} | {b['fx_fuse']:.3f} | {b['fxfuse']:.3f} | {b['fxfuse'] / b['fx_fuse']:.2f}x "
                     f"| {b['fxfuse_noverify']:.3f} | {b['fxfuse_noverify'] / b['fx_fuse']:.2f}x | {own_export:.3f} "
                     f"| {own_export / b['fxfuse']:.2f}x | {b['symbolic_trace']:.3f} | {b['forward']:.3f} "
                     f"| {b['forward64']:.3f} | {floor:.3f} | {floor / b['fx_fuse']:.2f}x |")
    if len(rows) > 1:
        first, last = rows[0]["best"], rows[-1]["best"]
        lines += ["", f"growth {rows[-1]['model']} / {rows[0]['model']}: fxfuse (verify) "
                      f"{last['fxfuse'] / first['fxfuse']:.2f}, fx fuse {last['fx_fuse'] / first['fx_fuse']:.2f}, "  # type: ignore[index]
                      f"convs {rows[-1]['convs']} / {rows[0]['convs']}"]
    lines += ["", "phases of the last verified symbolic pass (s):"]
    for row in rows:
        phases = ", ".join(f"{k} {v:.3f}" for k, v in row["phases"].items())  # type: ignore[attr-defined]
        lines.append(f"- {row['model']}: {phases}")
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--models", default="resnet50,resnet152")
    parser.add_argument("--size", type=int, default=64)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--no-export", action="store_true", help="skip the capture='export' columns")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    warnings.filterwarnings("ignore")
    rows = [measure(m, args.size, args.rounds, not args.no_export) for m in args.models.split(",")]
    print(render(rows, args))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
