"""Per-call latency of what ``reparametrize`` returns, against the hand-written deploy net with the same ops.

    python -m benchmarks.artifact_latency [--rounds 7] [--min-run-time 0.2] [--threads 1] [--out FILE]

For every reference net (``fxfuse.models``: training form and its ``plain_twin``, the deploy net a perfect
re-parameterizer produces, holding the fused model's weights) under ``capture="symbolic"`` and
``capture="export"``: the fused model's per-call time at batch 1 on a small input as a ratio to the twin's (median
of interleaved ``torch.utils.benchmark`` rounds, the order rotating each round), with what each executes (convs +
BatchNorms + pools) and holds (state-dict entries, parameter bytes). A ratio is meaningful where the executed ops
are equal (column "same ops"). For the capture corpus
(``fxfuse/models/wild/``, no hand-written twin) the export artifact is timed against the symbolic one where
symbolic tracing captures the model whole. docs/benchmarks.md quotes a run.
"""

from __future__ import annotations

import argparse
import copy
import datetime as _dt
import platform
import statistics
import warnings
from typing import Dict, List, Optional, Sequence, Tuple

import torch
from torch import Tensor, nn

import fxfuse
from fxfuse.models import build, default_input_shape, plain_twin, randomize_batchnorm_
from fxfuse.models.wild import CORPUS, make
from fxfuse.tools.bench.timing import interleaved_rounds, make_timer, per_call_times
from fxfuse.tools.executed_ops import executed_fusable

NETS = ("repvgg-tiny", "repvgg-A0", "acnet", "dbb", "mobileone", "bn-after-sum")
CAPTURES = ("symbolic", "export")


def state(model: nn.Module) -> Tuple[int, int]:
    """``(state-dict entries, parameter + buffer bytes)``."""
    sd = model.state_dict()
    return len(sd), sum(t.numel() * t.element_size() for t in sd.values())


def with_weights_of(twin: nn.Module, fused: nn.Module) -> nn.Module:
    """``twin`` holding ``fused``'s parameter values (same shapes, in order): CPU conv speed depends on the values
    (a twin with fresh random weights ran 1.5x slower than itself with the fused weights, measured here), so the
    twin compared with is the deploy net with the very same weights."""
    twin = copy.deepcopy(twin)
    ours, theirs = list(twin.parameters()), list(fused.parameters())
    if [p.shape for p in ours] != [p.shape for p in theirs]:
        raise ValueError("the twin's parameters do not match the fused model's")
    with torch.no_grad():
        for a, b in zip(ours, theirs):
            a.copy_(b)
    return twin


def ratio(models: Dict[str, nn.Module], x: Tensor, threads: int, rounds: int, min_run_time: float
          ) -> Dict[str, float]:
    """Median per-call seconds of each model, measured interleaved."""
    timers = {name: make_timer(m, (x,), threads) for name, m in models.items()}
    with torch.no_grad():
        runs = interleaved_rounds(timers, rounds, min_run_time)
    return {name: statistics.median(per_call_times(ms)[0]) for name, ms in runs.items()}


def reference_rows(threads: int, rounds: int, min_run_time: float, nets: Sequence[str]) -> List[List[str]]:
    rows = []
    for name in nets:
        torch.manual_seed(0)
        model = randomize_batchnorm_(build(name), 0).eval()
        shape = default_input_shape(name)
        x = torch.randn((1, *shape[1:]))
        fused = {cap: fxfuse.reparametrize(model, x, capture=cap) for cap in CAPTURES}
        twin = with_weights_of(plain_twin(model).eval(), fused["symbolic"])
        times = ratio({"twin": twin, **fused}, x, threads, rounds, min_run_time)
        tw_entries, tw_bytes = state(twin)
        tw_ops = executed_fusable(twin, x)
        for cap in CAPTURES:
            entries, nbytes = state(fused[cap])
            ops = executed_fusable(fused[cap], x)
            rows.append([name, cap, f"{ops} / {tw_ops}", "yes" if ops == tw_ops else "no",
                         f"{entries} / {tw_entries}", f"{nbytes / tw_bytes:.4f}",
                         f"{times[cap] * 1e6:.0f} / {times['twin'] * 1e6:.0f}", f"{times['twin'] / times[cap]:.3f}"])
            print(" | ".join(rows[-1]), flush=True)
    return rows


def corpus_rows(threads: int, rounds: int, min_run_time: float) -> List[List[str]]:
    rows = []
    for name in CORPUS:
        model, x = make(name)
        randomize_batchnorm_(model, 0).eval()
        x = x[:1] if x.dim() > 0 and x.shape[0] > 1 else x
        fused: Dict[str, Optional[nn.Module]] = {}
        for cap in CAPTURES:
            try:
                fused[cap] = fxfuse.reparametrize(copy.deepcopy(model), x, capture=cap)
            except Exception as exc:  # recorded, not fatal: the table says which capture failed
                warnings.warn(f"{name} {cap}: {type(exc).__name__}: {exc}", stacklevel=1)
                fused[cap] = None
        sym, exp = fused["symbolic"], fused["export"]
        if exp is None:
            continue
        whole = sym is not None and sym.fxfuse_report.capture == "symbolic"
        ops_e = executed_fusable(exp, x)
        if not whole:
            rows.append([name, "export", str(ops_e), "-", str(state(exp)[0]), "-", "-", "- (symbolic not whole)"])
            continue
        assert sym is not None
        ops_s = executed_fusable(sym, x)
        times = ratio({"symbolic": sym, "export": exp}, x, threads, rounds, min_run_time)
        rows.append([name, "export vs symbolic", f"{ops_e} / {ops_s}", "yes" if ops_e == ops_s else "no",
                     f"{state(exp)[0]} / {state(sym)[0]}", f"{state(exp)[1] / max(1, state(sym)[1]):.4f}",
                     f"{times['export'] * 1e6:.0f} / {times['symbolic'] * 1e6:.0f}",
                     f"{times['symbolic'] / times['export']:.3f}"])
        print(" | ".join(rows[-1]), flush=True)
    return rows


HEADER = ["model", "capture", "conv+BN+pool executed (fused / ref)", "same ops", "state entries (fused / ref)",
          "bytes fused / ref", "µs per call (fused / ref)", "speed vs ref"]


def table(rows: List[List[str]]) -> str:
    lines = ["| " + " | ".join(HEADER) + " |", "|" + "---|" * len(HEADER)]
    lines += ["| " + " | ".join(r) + " |" for r in rows]
    return "\n".join(lines)


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.artifact_latency", description=__doc__.split("\n")[0])
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--min-run-time", type=float, default=0.2, help="seconds per turn")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--nets", default=",".join(NETS))
    parser.add_argument("--no-corpus", action="store_true", help="skip the capture corpus rows")
    parser.add_argument("--out", help="also write the markdown table here")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    rows = reference_rows(args.threads, args.rounds, args.min_run_time, args.nets.split(","))
    if not args.no_corpus:
        rows += corpus_rows(args.threads, args.rounds, args.min_run_time)
    text = (f"{_dt.datetime.now(_dt.timezone.utc):%Y-%m-%d %H:%M} UTC, {platform.processor() or platform.machine()}, "
            f"torch {torch.__version__}, {args.threads} thread(s), batch 1, {args.rounds} interleaved rounds of "
            f"{args.min_run_time} s; speed vs ref = ref time / fused time (> 1: the fused model is faster)\n\n"
            + table(rows))
    print(text)
    if args.out:
        with open(args.out, "w") as fh:
            fh.write(text + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
