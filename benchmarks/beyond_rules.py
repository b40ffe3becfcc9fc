"""Does a fold beyond the authors' converters pay? fxfuse's result with the fold against the same without it.

    python -m benchmarks.beyond_rules [--rounds 7] [--min-run-time 0.05] [--threads 1] [--batches 1,8]

Cases (each a small net whose only difference between the two variants is the fold):

* ``strided_stem``: 3x3/2 conv (3 → 32) + BN → 1x1 (32 → 64) + BN → ReLU, 128x128 — the strided-first
  ``sequential`` composition (one 3x3/2 conv 3 → 64) against ``disable=["sequential"]``;
* ``strided_pointwise_kxk``: bias-free 1x1/2 (64 → 64) → 3x3 (64 → 64, padding 1) + BN → ReLU, 64x64 — composed
  into a 3x3 conv of dilation 2 and stride 2, against the pair;
* ``strided_kxk_pointwise``: 3x3/2 (64 → 64) + BN → 1x1 (64 → 64) + BN → ReLU, 64x64 — one 3x3/2 conv.

Interleaved like ``benchmarks.vs_authors`` (alternating rounds, CPU time on one thread, median of round ratios).
A ratio > 1: the variant with the fold is faster.
"""

from __future__ import annotations

import argparse
import statistics
from typing import Callable, Dict, Optional, Sequence, Tuple

import torch
from torch import nn

import fxfuse
from fxfuse.models import randomize_batchnorm_

from .vs_authors import round_ratios


def strided_stem() -> Tuple[nn.Module, Tuple[int, ...], Dict[str, object]]:
    net = nn.Sequential(nn.Conv2d(3, 32, 3, 2, 1, bias=False), nn.BatchNorm2d(32), nn.Conv2d(32, 64, 1, bias=False),
                        nn.BatchNorm2d(64), nn.ReLU())
    return net, (3, 128, 128), {"disable": ["sequential"]}


def strided_pointwise_kxk() -> Tuple[nn.Module, Tuple[int, ...], Dict[str, object]]:
    net = nn.Sequential(nn.Conv2d(64, 64, 1, 2, bias=False), nn.Conv2d(64, 64, 3, padding=1), nn.BatchNorm2d(64),
                        nn.ReLU())
    return net, (64, 64, 64), {"disable": ["sequential"]}


def strided_kxk_pointwise() -> Tuple[nn.Module, Tuple[int, ...], Dict[str, object]]:
    net = nn.Sequential(nn.Conv2d(64, 64, 3, 2, 1, bias=False), nn.BatchNorm2d(64), nn.Conv2d(64, 64, 1),
                        nn.BatchNorm2d(64), nn.ReLU())
    return net, (64, 64, 64), {"disable": ["sequential"]}


CASES: Dict[str, Callable[[], Tuple[nn.Module, Tuple[int, ...], Dict[str, object]]]] = {
    "strided_stem": strided_stem,
    "strided_pointwise_kxk": strided_pointwise_kxk,
    "strided_kxk_pointwise": strided_kxk_pointwise,
}


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.beyond_rules", description=__doc__.split("\n")[0])
    parser.add_argument("--cases", default=",".join(CASES))
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--min-run-time", type=float, default=0.05)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--batches", default="1,8")
    args = parser.parse_args(argv)
    print(f"torch {torch.__version__}, {args.threads} thread(s), {args.rounds} alternating rounds of "
          f"{args.min_run_time} s; ratio = time without the fold / time with it")
    print("| case | convs with / without | batch | ratio (round min–max) |\n|---|---|---|---|")
    for name in args.cases.split(","):
        torch.manual_seed(0)
        net, shape, without = CASES[name]()
        net = randomize_batchnorm_(net, seed=0).eval()
        x1 = torch.randn(1, *shape)
        with_fold = fxfuse.reparametrize(net, x1)
        no_fold = fxfuse.reparametrize(net, x1, **without)  # type: ignore[arg-type]
        convs = (with_fold.fxfuse_report.after.convs, no_fold.fxfuse_report.after.convs)
        for b in (int(v) for v in args.batches.split(",")):
            x = torch.randn(b, *shape)
            r = round_ratios(with_fold, no_fold, x, args.threads, args.rounds, args.min_run_time)
            print(f"| {name} | {convs[0]} / {convs[1]} | {b} | {statistics.median(r):.3f} "
                  f"({min(r):.2f}–{max(r):.2f}) |", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
