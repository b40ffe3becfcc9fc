"""A small, honest training study: a plain CNN vs its fxfuse.expand training forms, same budget, several seeds.

Data: scikit-learn's bundled 8x8 handwritten digits (``sklearn.datasets.load_digits``: 1797 images, 10 classes,
shipped inside the package, nothing downloaded; ``pip install 'fxfuse[study]'``), one fixed stratified split
(1297 train / 500 test). Per seed: the plain net is built with that seed; every expanded form starts from the
same plain net (its convs keep their initial weights, the new branches get each scheme's published
initialization, ``init="paper"``) and trains with the same optimizer, schedule, batch order and epochs. After
training, each expanded form is collapsed with ``fxfuse.reparametrize`` and evaluated again: the collapsed model
must reach the same test accuracy (asserted) with the plain net's conv structure (asserted).

Training speed: wall-clock time of the training-epoch loop (forward, backward, optimizer step; data already in
memory), median over all epochs and seeds, in one process, variants interleaved per seed.

    python benchmarks/train_study.py                      # 3 seeds, 15 epochs, all schemes: a few minutes on 2 cores
    python benchmarks/train_study.py --seeds 5 --out table.md
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import datetime
import math
import platform
import statistics
import subprocess
import sys
import time
from collections import defaultdict
from typing import Dict, List, Tuple

import torch
from torch import nn

import fxfuse

SCHEMES = ("repvgg", "acnet", "dbb", "mobileone", "qarepvgg")
# Each scheme offline (every branch on the feature map) and online (``expand(online=True)``: one conv per block with
# the kernel computed from the branches every step; docs/expand.md "Online mode").
VARIANTS = ("plain", *SCHEMES, *(f"{s}-online" for s in SCHEMES))


def load_data(seed: int = 0) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    try:
        from sklearn.datasets import load_digits
    except ImportError:
        sys.exit("this study needs scikit-learn (bundled digits data set): pip install 'fxfuse[study]'")
    digits = load_digits()
    x = torch.tensor(digits.images, dtype=torch.float32).unsqueeze(1) / 16.0
    x = (x - x.mean()) / x.std()
    y = torch.tensor(digits.target, dtype=torch.long)
    gen = torch.Generator().manual_seed(seed)
    test_idx: List[int] = []
    for c in range(10):  # stratified: 50 test images per class
        idx = torch.nonzero(y == c).flatten()
        test_idx += idx[torch.randperm(len(idx), generator=gen)[:50]].tolist()
    mask = torch.ones(len(y), dtype=torch.bool)
    mask[test_idx] = False
    return x[mask], y[mask], x[~mask], y[~mask]


def plain_net(width: int = 16) -> nn.Module:
    """conv-BN-ReLU ×4 (one stride 2), global average pool, linear: 8x8 digits → 10 classes."""

    def cbr(cin: int, cout: int, stride: int = 1) -> List[nn.Module]:
        return [nn.Conv2d(cin, cout, 3, stride, 1, bias=False), nn.BatchNorm2d(cout), nn.ReLU()]

    return nn.Sequential(*cbr(1, width), *cbr(width, width), *cbr(width, 2 * width, 2), *cbr(2 * width, 2 * width),
                         nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(2 * width, 10))


def accuracy(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> float:
    with torch.no_grad():
        return float((model(x).argmax(1) == y).float().mean())


def train(model: nn.Module, data: Tuple[torch.Tensor, ...], epochs: int, seed: int, batch: int = 64,
          lr: float = 0.05) -> List[float]:
    """SGD (momentum 0.9, weight decay 1e-4), cosine schedule; returns the wall time of each epoch's loop."""
    xtr, ytr = data[0], data[1]
    opt = torch.optim.SGD(model.parameters(), lr=lr, momentum=0.9, weight_decay=1e-4)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, epochs)
    loss_fn = nn.CrossEntropyLoss()
    gen = torch.Generator().manual_seed(1000 + seed)  # the same batch order for every variant of a seed
    times = []
    model.train()
    for _ in range(epochs):
        order = torch.randperm(len(ytr), generator=gen)
        start = time.perf_counter()
        for i in range(0, len(order), batch):
            idx = order[i:i + batch]
            opt.zero_grad(set_to_none=True)
            loss_fn(model(xtr[idx]), ytr[idx]).backward()
            opt.step()
        times.append(time.perf_counter() - start)
        sched.step()
    return times


def conv_geometry(gm: nn.Module) -> List[Tuple]:
    return sorted((tuple(m.weight.shape), m.stride, m.padding, m.groups) for m in gm.modules()
                  if isinstance(m, nn.Conv2d))


def run_study(seeds: int, epochs: int, width: int,
              variants: Tuple[str, ...] = VARIANTS) -> Dict[str, Dict[str, List[float]]]:
    data = load_data()
    xte, yte = data[2], data[3]
    example = data[0][:2]
    results: Dict[str, Dict[str, List[float]]] = defaultdict(lambda: defaultdict(list))
    for seed in range(seeds):
        torch.manual_seed(seed)
        base = plain_net(width)
        deploy_ref = conv_geometry(fxfuse.reparametrize(base.eval(), example))
        for variant in variants:
            torch.manual_seed(10_000 + seed)  # the new branches' init: the same per seed for every scheme
            if variant == "plain":
                model = copy.deepcopy(base)
            else:
                scheme, _, mode = variant.partition("-")
                model = fxfuse.expand(base, example, scheme=scheme, init="paper", online=mode == "online")
            r = results[variant]
            r["params"].append(sum(p.numel() for p in model.parameters()))
            r["epoch_s"].extend(train(model, data, epochs, seed))
            model.eval()
            r["acc"].append(accuracy(model, xte, yte))
            deploy = fxfuse.reparametrize(model, example)
            acc_deploy = accuracy(deploy, xte, yte)
            assert acc_deploy == r["acc"][-1], (variant, seed, acc_deploy, r["acc"][-1])
            assert conv_geometry(deploy) == deploy_ref, (variant, conv_geometry(deploy))
            r["acc_deploy"].append(acc_deploy)
            growth = deploy.fxfuse_report.weight_growth
            r["max_growth"].append(max(g.max_growth for g in growth))
            r["outliers"].append(sum(len(g.outliers) for g in growth))
            print(f"seed {seed} {variant:<9} test acc {r['acc'][-1]:.4f} (collapsed {acc_deploy:.4f}), "
                  f"epoch {statistics.median(r['epoch_s'][-epochs:]):.3f} s", flush=True)
    return results


def table(results: Dict[str, Dict[str, List[float]]], seeds: int, epochs: int, threads: int, width: int) -> str:
    plain_t = statistics.median(results["plain"]["epoch_s"])
    lines = [f"| variant | train params | test accuracy, mean ± std ({seeds} seeds) | min – max | collapsed = "
             f"expanded | epoch time (median) | vs plain | fused kernel range growth (max) | outlier channels |",
             "|---|---:|---:|---:|---|---:|---:|---:|---:|"]
    for v in (v for v in VARIANTS if v in results):
        r = results[v]
        acc = r["acc"]
        std = statistics.stdev(acc) if len(acc) > 1 else float("nan")
        t = statistics.median(r["epoch_s"])
        same = "yes" if r["acc_deploy"] == acc else "NO"
        lines.append(f"| {v} | {int(r['params'][0]):,} | {100 * statistics.mean(acc):.2f} ± {100 * std:.2f} % | "
                     f"{100 * min(acc):.1f} – {100 * max(acc):.1f} % | {same} | {1000 * t:.0f} ms | "
                     f"{t / plain_t:.2f}x | {statistics.median(r['max_growth']):.3g}x | "
                     f"{int(sum(r['outliers']))} |")
    cpu = "unknown CPU"
    with contextlib.suppress(Exception):
        cpu = next(line.split(":", 1)[1].strip() for line in subprocess.run(
            ["lscpu"], capture_output=True, text=True, check=True).stdout.splitlines()
            if line.startswith("Model name"))
    lines.append("")
    lines.append(f"`python benchmarks/train_study.py --seeds {seeds} --epochs {epochs} --threads {threads} "
                 f"--width {width}`; "
                 f"{cpu}, {threads} thread(s), torch {torch.__version__}, Python {platform.python_version()}, "
                 f"{datetime.date.today().isoformat()}. {epochs} epochs, batch 64, SGD momentum 0.9, lr 0.05 "
                 "cosine, weight decay 1e-4; expanded forms `init=\"paper\"`; epoch time = wall clock of the "
                 "training loop.")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--epochs", type=int, default=15)
    parser.add_argument("--threads", type=int, default=1, help="torch threads (default 1: steadier timings)")
    parser.add_argument("--width", type=int, default=16, help="channels of the first two convs (then 2x)")
    parser.add_argument("--out", help="also write the Markdown table here")
    parser.add_argument("--variants", default=",".join(VARIANTS),
                        help="comma-separated subset of: " + ", ".join(VARIANTS))
    args = parser.parse_args()
    variants = tuple(v for v in args.variants.split(",") if v)
    unknown = sorted(set(variants) - set(VARIANTS))
    if unknown or "plain" not in variants:
        parser.error(f"--variants must include 'plain' and name only {', '.join(VARIANTS)} (got {unknown})")
    torch.set_num_threads(args.threads)
    start = time.perf_counter()
    results = run_study(args.seeds, args.epochs, args.width, variants)
    text = table(results, args.seeds, args.epochs, args.threads, args.width)
    print()
    print(text)
    print(f"\nstudy took {(time.perf_counter() - start) / 60:.1f} min")
    if args.out:
        with open(args.out, "w") as f:
            f.write(text + "\n")
    if not all(math.isfinite(a) for r in results.values() for a in r["acc"]):
        sys.exit(1)


if __name__ == "__main__":
    main()
