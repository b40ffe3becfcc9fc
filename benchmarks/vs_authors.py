"""The fxfuse-fused model against each network's own deploy conversion, timed interleaved.

    python -m benchmarks.vs_authors [--cases LIST] [--threads 1,2] [--batches 1,8] [--rounds 5]
                                    [--min-run-time 0.05] [--size N] [--long] [--out FILE]

Cases (``--cases``, comma-separated; default: all of :data:`DEFAULT_CASES`):

* ``timm:<name>``: a timm model with random weights and randomized BatchNorms; the authors' deploy form is
  ``timm.utils.model.reparameterize_model`` of a copy (each block's ``reparameterize()`` / ``fuse()`` /
  ``switch_to_deploy()``). Both conversions start from the same training-form weights, so the deploy convs hold
  the same values as fxfuse's up to float rounding.
* ``ref:<name>``: a reference net of ``fxfuse.models`` (RepVGG, ACNet, DBB, MobileOne, BN-after-sum blocks as their
  papers write them; ``-zoo`` names in model-zoo spelling); the authors' deploy form is its ``plain_twin`` (the
  hand-written ``switch_to_deploy`` network) holding **fxfuse's fused weights** (CPU conv time depends on the
  values; see ``benchmarks.artifact_latency.with_weights_of``).
* ``repmlp:<depth>``: :class:`fxfuse.models.RepMLPNet` (RepMLP blocks of ``depth``, 1x1 + 3x3 local perceptrons,
  ``fc_groups=4``, on ``--size``); the authors' deploy form is :func:`fxfuse.models.repmlp_deploy` (their
  ``switch_to_deploy``: local perceptrons turned into FC weights by a conv on an identity tensor), from the same
  training-form weights. ``repmlp:<depth>-without``: the same with fxfuse's ``conv_into_fc`` rule disabled.

For every case, thread count and batch size: ``--rounds`` rounds, each timing the fused model and the deploy
net for ``--min-run-time`` seconds apiece (``torch.utils.benchmark.Timer.blocked_autorange``), alternating which
goes first. A round's ratio is median(deploy block times) / median(fused block times) (> 1: fxfuse's model is
faster); the row's ratio is the median of the round ratios. The summary is the geometric mean over all rows
and the smallest row. Quote ratios, not times, from a shared machine. docs/benchmarks.md has a run.
"""

from __future__ import annotations

import argparse
import copy
import datetime as _dt
import math
import os
import statistics
import time
import warnings
from typing import Callable, Dict, List, Optional, Sequence, Tuple

import torch
from torch import Tensor, nn

import fxfuse
from fxfuse.models import RepMLPNet, build, plain_twin, randomize_batchnorm_, repmlp_deploy
from fxfuse.tools.bench import cpu_model_name
from fxfuse.tools.bench.timing import make_timer
from fxfuse.tools.executed_ops import executed_fusable

from .artifact_latency import with_weights_of

DEFAULT_CASES = (
    "timm:repvgg_a0", "timm:mobileone_s0", "timm:fastvit_t8", "timm:repghostnet_050", "timm:levit_conv_128s",
    "timm:repvit_m0_9",
    "ref:repvgg-tiny", "ref:acnet", "ref:dbb", "ref:mobileone", "ref:bn-after-sum", "ref:mobileone-zoo",
    "repmlp:2",
)
LONG_CASES = ("timm:fastvit_sa12", "timm:mobileone_s1", "timm:repghostnet_100", "timm:levit_128s",
              "ref:repvgg-A0", "ref:dbb-zoo", "ref:acnet-zoo")

Pair = Tuple[nn.Module, nn.Module, str]  # fused, deploy, note


def _timm_pair(name: str, size: int) -> Pair:
    import timm

    try:
        from timm.utils.model import reparameterize_model
    except ImportError:  # older timm
        from timm.models import reparameterize_model
    torch.manual_seed(0)
    try:
        model = timm.create_model(name, pretrained=False, img_size=size)
    except TypeError:
        model = timm.create_model(name, pretrained=False)
    model = randomize_batchnorm_(model, seed=0).float().eval()
    x = torch.randn(1, 3, size, size)
    deploy = reparameterize_model(copy.deepcopy(model), inplace=True).eval()
    fused = fxfuse.reparametrize(model, x)
    return fused, deploy, "timm.utils.model.reparameterize_model"


def _ref_pair(name: str, size: int) -> Pair:
    torch.manual_seed(0)
    model = randomize_batchnorm_(build(name), 0).eval()
    x = torch.randn(1, 3, size, size)
    fused = fxfuse.reparametrize(model, x)
    twin = with_weights_of(plain_twin(model).eval(), fused)
    return fused, twin, "plain twin with fxfuse's weights"


def _repmlp_pair(name: str, size: int) -> Pair:
    """``<depth>``, or ``<depth>-without``: fxfuse with the ``conv_into_fc`` rule disabled (what it did before)."""
    depth, _, variant = name.partition("-")
    torch.manual_seed(0)
    model = randomize_batchnorm_(RepMLPNet(size=size, depth=int(depth)), 0).eval()
    x = torch.randn(1, 3, size, size)
    fused = fxfuse.reparametrize(model, x, disable=["conv_into_fc"] if variant == "without" else ())
    return fused, repmlp_deploy(model).eval(), "repmlp_deploy (the authors' conversion)"


def make_pair(case: str, size: int) -> Pair:
    kind, _, name = case.partition(":")
    if kind == "repmlp":
        return _repmlp_pair(name, size)
    if kind == "timm":
        return _timm_pair(name, size)
    if kind == "ref":
        return _ref_pair(name, size)
    raise ValueError(f"unknown case {case!r}: expected timm:<name>, ref:<name> or repmlp:<depth>")


def round_ratios(fused: nn.Module, deploy: nn.Module, x: Tensor, threads: int, rounds: int,
                 min_run_time: float, timer: str = "auto") -> List[float]:
    """Per round: median deploy block time / median fused block time, the order alternating. ``timer``: "wall",
    "cpu" (CPU time of the process: immune to time-slicing by other jobs, meaningful on one thread), or "auto"
    (cpu on one thread, wall otherwise)."""
    kind = ("cpu" if threads == 1 else "wall") if timer == "auto" else timer
    timers = {"fused": make_timer(fused, (x,), threads, kind), "deploy": make_timer(deploy, (x,), threads, kind)}
    out = []
    with torch.inference_mode():
        for m in (fused, deploy):  # warm-up
            m(x)
        for r in range(rounds):
            order = ("fused", "deploy") if r % 2 == 0 else ("deploy", "fused")
            med = {k: timers[k].blocked_autorange(min_run_time=min_run_time).median for k in order}
            out.append(med["deploy"] / med["fused"])
    return out


def run(cases: Sequence[str], threads: Sequence[int], batches: Sequence[int], rounds: int, min_run_time: float,
        size: int, timer: str = "auto", log: Callable[[str], None] = print) -> List[Dict[str, object]]:
    rows: List[Dict[str, object]] = []
    for case in cases:
        t0 = time.perf_counter()
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                fused, deploy, note = make_pair(case, size)
        except Exception as exc:  # reported, not fatal: the table says which case failed
            log(f"{case}: could not build ({type(exc).__name__}: {str(exc).splitlines()[0][:200]})")
            continue
        prep = time.perf_counter() - t0
        x1 = torch.randn(1, 3, size, size)
        ops = (executed_fusable(fused, x1), executed_fusable(deploy, x1))
        with torch.inference_mode():
            err = (fused(x1) - deploy(x1)).abs().max().item() / max(deploy(x1).abs().max().item(), 1e-30)
        for t in threads:
            for b in batches:
                x = torch.randn(b, 3, size, size)
                ratios = round_ratios(fused, deploy, x, t, rounds, min_run_time, timer)
                row = {"case": case, "threads": t, "batch": b, "ratio": statistics.median(ratios),
                       "lo": min(ratios), "hi": max(ratios), "ops": ops, "err": err, "deploy": note, "prep_s": prep}
                rows.append(row)
                log(f"{case:24s} threads={t} batch={b}: deploy/fused {row['ratio']:.3f} "
                    f"(rounds {min(ratios):.3f}–{max(ratios):.3f}); conv+BN+pool executed fused {ops[0]} / deploy "
                    f"{ops[1]}; rel diff {err:.1e}")
    return rows


def table(rows: Sequence[Dict[str, object]]) -> str:
    lines = ["| case | conv+BN+pool executed (fxfuse / deploy) | threads | batch | deploy time / fxfuse time "
             "(round min–max) |", "|---|---|---|---|---|"]
    for r in rows:
        ops = r["ops"]
        assert isinstance(ops, tuple)
        lines.append(f"| {r['case']} | {ops[0]} / {ops[1]} | {r['threads']} | {r['batch']} | "
                     f"{r['ratio']:.3f} ({r['lo']:.2f}–{r['hi']:.2f}) |")
    return "\n".join(lines)


def pivot(rows: Sequence[Dict[str, object]]) -> str:
    """One line per case, one column per (threads, batch): the ratios only."""
    cols = sorted({(int(r["threads"]), int(r["batch"])) for r in rows})  # type: ignore[call-overload]
    cases = list(dict.fromkeys(str(r["case"]) for r in rows))
    by = {(str(r["case"]), int(r["threads"]), int(r["batch"])): r for r in rows}  # type: ignore[call-overload]
    lines = ["| case | conv+BN+pool executed (fxfuse / deploy) | "
             + " | ".join(f"{t} thr, batch {b}" for t, b in cols) + " |", "|---|---|" + "---|" * len(cols)]
    for case in cases:
        first = next(r for r in rows if r["case"] == case)
        ops = first["ops"]
        assert isinstance(ops, tuple)
        cells = [f"{float(by[(case, t, b)]['ratio']):.3f}" if (case, t, b) in by else "–"  # type: ignore[arg-type]
                 for t, b in cols]
        lines.append(f"| {case} | {ops[0]} / {ops[1]} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def summary(rows: Sequence[Dict[str, object]]) -> str:
    """Geometric mean and lowest ratio, over all rows and per thread count."""
    out = []
    for label, sel in [("all", list(rows))] + [(f"{t} thread(s)", [r for r in rows if r["threads"] == t])
                                              for t in sorted({int(r["threads"]) for r in rows})]:  # type: ignore[call-overload]
        ratios = [float(r["ratio"]) for r in sel]  # type: ignore[arg-type]
        if not ratios:
            continue
        geo = math.exp(sum(math.log(v) for v in ratios) / len(ratios))
        worst = min(sel, key=lambda r: float(r["ratio"]))  # type: ignore[arg-type]
        out.append(f"{label}: geomean deploy/fxfuse over {len(ratios)} rows {geo:.3f}, lowest "
                   f"{float(worst['ratio']):.3f} ({worst['case']}, {worst['threads']} thread(s), "  # type: ignore[arg-type]
                   f"batch {worst['batch']})")
    return "\n".join(out) if out else "no rows"


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.vs_authors", description=__doc__.split("\n")[0])
    parser.add_argument("--cases", default=",".join(DEFAULT_CASES))
    parser.add_argument("--long", action="store_true", help=f"add the larger cases {', '.join(LONG_CASES)}")
    parser.add_argument("--threads", default="1,2")
    parser.add_argument("--batches", default="1,8")
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--min-run-time", type=float, default=0.05, help="seconds per model per round")
    parser.add_argument("--size", type=int, default=64, help="input height = width")
    parser.add_argument("--timer", choices=("auto", "wall", "cpu"), default="auto",
                        help="auto: CPU time of the process on 1 thread, wall clock on more")
    parser.add_argument("--out", help="also write the markdown table here")
    args = parser.parse_args(argv)
    cases = [c for c in args.cases.split(",") if c] + (list(LONG_CASES) if args.long else [])
    threads = [int(t) for t in args.threads.split(",")]
    batches = [int(b) for b in args.batches.split(",")]
    start = _dt.datetime.now(_dt.timezone.utc)
    load0 = os.getloadavg()[0]
    rows = run(cases, threads, batches, args.rounds, args.min_run_time, args.size, args.timer)
    text = (f"{start:%Y-%m-%d %H:%M} UTC, {cpu_model_name()} ({os.cpu_count()} cores), torch {torch.__version__}, "
            f"{args.size}x{args.size} float32, timer {args.timer}, {args.rounds} alternating rounds of "
            f"{args.min_run_time} s per model, "
            f"1-min load {load0:.1f} -> {os.getloadavg()[0]:.1f}\n\n{table(rows)}\n\n{pivot(rows)}\n\n{summary(rows)}")
    print(text)
    if args.out:
        with open(args.out, "w") as fh:
            fh.write(text + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
