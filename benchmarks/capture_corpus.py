"""Per-network counts on the capture corpus (fxfuse/models/wild/): convs / BatchNorms / Linears executed by the
training-form model, by ``fxfuse.reparametrize`` with each capture, and by the hand-written deploy form; pass time.

    .venv/bin/python -m benchmarks.capture_corpus [--threads 1]

Counts are executed ops (a ``TorchFunctionMode`` sees every conv / BN / linear call on the example input,
:mod:`fxfuse.tools.executed_ops`), whatever the result is (a GraphModule, an exported graph, or the model with
rewritten sub-modules). ``symbolic`` is what fxfuse did before the export front end (torch.fx symbolic tracing,
then the per-sub-module fallback); ``auto`` is the default. BN statistics are randomized; everything runs in
float64 with ``verify=True``, so every row is also an equality check (a row that cannot be produced says why).
"""

from __future__ import annotations

import argparse
import datetime
import time
from typing import Any, Counter, Tuple

import torch
from torch import nn

import fxfuse
from fxfuse.ir.ops import function_kind
from fxfuse.models import randomize_batchnorm_
from fxfuse.models.wild import CORPUS, make
from fxfuse.tools.bench import cpu_model_name
from fxfuse.tools.executed_ops import run_counting

CAPTURES = ("symbolic", "export", "auto")


def executed(model: Any, x: torch.Tensor) -> Tuple[int, int, int]:
    """(convs, BatchNorms, Linears) executed by ``model(x)``."""
    counts: Counter[str] = run_counting(model, x, key=function_kind)[1]
    return counts["conv"], counts["batch_norm"], counts["linear"]


def cell(counts: Tuple[int, int, int]) -> str:
    return " / ".join(map(str, counts))


def row(name: str) -> str:
    model, x = make(name)
    model = randomize_batchnorm_(model, 0).eval().double()
    x = x.double()
    cells = [name, cell(executed(model, x))]
    for capture in CAPTURES:
        start = time.perf_counter()
        try:
            fused: nn.Module = fxfuse.reparametrize(model, x, capture=capture)
        except fxfuse.FusionError as exc:
            cells.append(f"refused: {str(exc)[:60]}")
            continue
        seconds = time.perf_counter() - start
        report = fused.fxfuse_report
        used = "" if capture != "auto" else f" ({report.capture})"
        cells.append(f"{cell(executed(fused, x))}{used}, {seconds:.1f} s")
    cells.append(cell(CORPUS[name][2]))
    return "| " + " | ".join(cells) + " |"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--models", default="", help="comma-separated corpus names (default: all)")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    names = [n for n in args.models.split(",") if n] or list(CORPUS)
    print(f"# capture corpus: executed convs / BNs / linears; torch {torch.__version__}; {cpu_model_name()}; "
          f"{args.threads} thread(s); {datetime.date.today().isoformat()}")
    print("| network | training form | symbolic (+ fallback) | export | auto (capture used) | deploy form |")
    print("|---|---|---|---|---|---|")
    for name in names:
        print(row(name), flush=True)


if __name__ == "__main__":
    main()
