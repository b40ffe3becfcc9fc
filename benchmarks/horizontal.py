"""Does horizontal fusion (rule ``horizontal``, off by default) pay? Inception-style nets on this machine.

    .venv/bin/python benchmarks/horizontal.py [--models googlenet,inception_v3] [--batch-sizes 1,8]

Measures, side by side in one process with the ``fxfuse bench`` timing (torch.utils.benchmark, one thread,
interleaved rounds, median of the per-round medians), the fxfuse model without and with the rule, and prints the
ratio. Results go to docs/benchmarks.md by hand."""

from __future__ import annotations

import argparse
import statistics

import torch
import torchvision

import fxfuse
from fxfuse.models import randomize_batchnorm_
from fxfuse.tools.bench import cpu_model_name, interleaved_rounds, make_timer

SIZES = {"inception_v3": 299}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--models", default="googlenet,inception_v3")
    ap.add_argument("--batch-sizes", default="1,8")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--min-run-time", type=float, default=1.0)
    args = ap.parse_args()
    print(f"# torch {torch.__version__}, {cpu_model_name()}, 1 timed thread")
    print("| model | batch | fxfuse (ms) | fxfuse + horizontal (ms) | ratio | convs before → after |")
    print("|---|---|---|---|---|---|")
    for name in args.models.split(","):
        model = torchvision.models.get_model(name, weights=None, init_weights=False) \
            if name in ("googlenet", "inception_v3") else torchvision.models.get_model(name, weights=None)
        model = randomize_batchnorm_(model, 0).eval()
        size = SIZES.get(name, 224)
        for batch in (int(b) for b in args.batch_sizes.split(",")):
            x = torch.randn(batch, 3, size, size)
            base = fxfuse.reparametrize(model, x)
            horiz = fxfuse.reparametrize(model, x, enable=["horizontal"])
            timers = {"base": make_timer(base, (x,), threads=1), "horiz": make_timer(horiz, (x,), threads=1)}
            with torch.inference_mode():
                measured = interleaved_rounds(timers, args.rounds, args.min_run_time)
            b, h = (statistics.median(m.median for m in measured[key]) for key in ("base", "horiz"))
            r = horiz.fxfuse_report
            print(f"| {name} | {batch} | {b * 1e3:.1f} | {h * 1e3:.1f} | {b / h:.3f} | "
                  f"{base.fxfuse_report.after.convs} → {r.after.convs} |")


if __name__ == "__main__":
    main()
