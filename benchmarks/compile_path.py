"""The compile path: ``fxfuse.compile`` (re-parameterize, then ``torch.compile``) against ``torch.compile`` of the
training-form model, with and without Inductor freezing; and the pass time of both captures.

    .venv/bin/python benchmarks/compile_path.py [--model repvgg-A0] [--batch 1] [--threads 1]
    .venv/bin/python benchmarks/compile_path.py --pass-time resnet50,resnet152
    .venv/bin/python benchmarks/compile_path.py --aoti [--model repvgg-A0]

Only one-shot durations use a raw ``perf_counter`` (a cold compile, an export, a package build cannot be
repeated by ``torch.utils.benchmark``); pass times are the pass's own ``report.pass_seconds``.
Compile time is the wall time of the first call of the compiled model (cold: Inductor's on-disk caches are off,
and a trivial function is compiled first so one-time start-up is billed to nobody); for ``fxfuse.compile`` the
re-parameterization pass is timed separately and added. Run time: ``torch.utils.benchmark`` on ``--threads``
threads, rounds interleaved across the variants, median of the per-round medians. Everything runs under
``torch.no_grad()`` (freezing needs it). ``--pass-time`` times ``fxfuse.reparametrize(model, x,
capture=..., verify=False)`` on torchvision models (best of ``--repeats``). ``--aoti`` exports the model (dynamic
batch), re-parameterizes the ``ExportedProgram`` (``fxfuse.reparametrize(ep)``) and AOTInductor-compiles both
programs into packages (``torch._inductor.aoti_compile_and_package``); it reports the export / pass / package
times and the run time of the loaded packages. Results go to docs/benchmarks.md by hand, with the command,
``lscpu`` model name and date.
"""

from __future__ import annotations

import argparse
import copy
import datetime
import statistics
import time
from typing import Any, Callable, Dict, List, Tuple

import torch
import torchvision
from torch import nn

import fxfuse
from fxfuse import GraphStats
from fxfuse.models import build, randomize_batchnorm_
from fxfuse.testing import op_counts
from fxfuse.tools.bench import cpu_model_name, interleaved_rounds, make_timer
from fxfuse.tools.bench.timing import cold_inductor, warm_compiler

# variant name -> (callable, set-up seconds: compile / pass / package time)
Variants = Dict[str, Tuple[Callable[..., Any], float]]


def _no_grad(fn: Callable[..., Any]) -> Callable[..., Any]:
    def call(*args: Any) -> Any:
        with torch.no_grad():
            return fn(*args)
    return call


def _first_call(fn: Callable[..., Any], x: torch.Tensor) -> float:
    start = time.perf_counter()
    with torch.no_grad():
        fn(x)
    return time.perf_counter() - start


def compile_path(model_name: str, batch: int, threads: int, rounds: int, min_run_time: float) -> None:
    torch.set_num_threads(threads)
    torch.manual_seed(0)
    model = randomize_batchnorm_(build(model_name), 0).eval()
    x = torch.randn(batch, 3, 224, 224)
    warm_compiler(torch.device("cpu"), torch.float32)

    fused = fxfuse.reparametrize(model, x)
    pass_s = fused.fxfuse_report.pass_seconds  # the pass times itself (one shot: nothing to repeat)
    counts = op_counts(fused)
    print(f"fxfuse.reparametrize: {pass_s:.2f} s ({fused.fxfuse_report.capture}); convs {counts['conv']}, "
          f"batch_norms {counts['batch_norm']}")

    variants: Variants = {}
    variants["eager original"] = (model, 0.0)
    variants["eager fxfuse"] = (fused, pass_s)
    for label, options in (("", None), (" + freezing", {"freezing": True})):
        kwargs = {"options": options} if options else {}
        with cold_inductor():  # each variant compiles its own copy of the model
            compiled = torch.compile(copy.deepcopy(model), **kwargs)
            variants[f"torch.compile(original){label}"] = (compiled, _first_call(compiled, x))
            start = time.perf_counter()
            fx_compiled = fxfuse.compile(copy.deepcopy(model), x, **kwargs)
            fx_pass = time.perf_counter() - start
            variants[f"fxfuse.compile{label}"] = (fx_compiled, fx_pass + _first_call(fx_compiled, x))
    for fn, _ in variants.values():  # steady state before timing
        _first_call(fn, x)
    timers = {name: make_timer(_no_grad(fn), (x,), threads) for name, (fn, _) in variants.items()}
    results = interleaved_rounds(timers, rounds, min_run_time)
    _print_table(f"{model_name}, batch {batch}, {threads} thread(s)", "compile / pass time (s)", variants, results,
                 "torch.compile(original)")


def _print_table(title: str, setup_label: str, variants: Variants, results: Dict[str, Any], base_name: str) -> None:
    """A markdown table: set-up time, median run time (median of the rounds' medians), speed vs ``base_name``."""
    print(f"\n# {title}; torch {torch.__version__}; {cpu_model_name()}; {datetime.date.today().isoformat()}")
    print(f"| variant | {setup_label} | run time (ms, median) | vs {base_name} |")
    print("|---|---|---|---|")
    medians = {name: statistics.median(m.median for m in ms) * 1e3 for name, ms in results.items()}
    for name, (_, setup_s) in variants.items():
        print(f"| {name} | {setup_s:.1f} | {medians[name]:.2f} | {medians[base_name] / medians[name]:.2f}x |")


def aoti(model_name: str, batch: int, threads: int, rounds: int, min_run_time: float) -> None:
    import tempfile

    torch.set_num_threads(threads)
    torch.manual_seed(0)
    model = randomize_batchnorm_(build(model_name), 0).eval()
    x = torch.randn(batch, 3, 224, 224)
    start = time.perf_counter()
    ep = torch.export.export(model, (torch.randn(2, 3, 224, 224),),
                             dynamic_shapes=({0: torch.export.Dim("batch")},), strict=False)
    export_s = time.perf_counter() - start
    start = time.perf_counter()
    fused_ep = fxfuse.reparametrize(ep, x)
    pass_s = time.perf_counter() - start
    stats = GraphStats.of(fused_ep.graph_module)
    print(f"export {export_s:.1f} s; fxfuse.reparametrize(ep) {pass_s:.1f} s: convs {stats.convs}, "
          f"batch_norms {stats.batch_norms}")
    variants: Variants = {"eager original": (_no_grad(model), 0.0),
                          "eager fxfuse program": (_no_grad(fused_ep.module()), export_s + pass_s)}
    with tempfile.TemporaryDirectory() as tmp, cold_inductor():
        for name, program, setup in (("AOTInductor(original program)", ep, export_s),
                                     ("AOTInductor(fxfuse program)", fused_ep, export_s + pass_s)):
            start = time.perf_counter()
            path = torch._inductor.aoti_compile_and_package(program, package_path=f"{tmp}/{len(variants)}.pt2")
            runner = torch._inductor.aoti_load_package(path)
            variants[name] = (runner, setup + time.perf_counter() - start)
        with torch.no_grad():
            ref, out = model(x), variants["AOTInductor(fxfuse program)"][0](x)
        print(f"max |fused - original eager| / max |original| = {((out - ref).abs().max() / ref.abs().max()):.1e}")
        timers = {name: make_timer(fn, (x,), threads) for name, (fn, _) in variants.items()}
        results = interleaved_rounds(timers, rounds, min_run_time)
    _print_table(f"{model_name}, batch {batch}, {threads} thread(s)", "export + pass + package time (s)", variants,
                 results, "AOTInductor(original program)")


def pass_time(names: List[str], repeats: int, threads: int) -> None:
    torch.set_num_threads(threads)
    print(f"\n# pass time, verify=False, batch 1, 224x224; torch {torch.__version__}; {cpu_model_name()}; "
          f"{datetime.date.today().isoformat()}")
    print(f"| model | capture | pass time (s, best of {repeats}) | convs | BNs | capture note |")
    print("|---|---|---|---|---|---|")
    for name in names:
        torch.manual_seed(0)
        model: nn.Module = randomize_batchnorm_(torchvision.models.get_model(name, weights=None), 0).eval()
        x = torch.randn(1, 3, 224, 224)
        for capture in ("symbolic", "export"):
            runs = [fxfuse.reparametrize(model, x, capture=capture, verify=False) for _ in range(repeats)]
            times = [run.fxfuse_report.pass_seconds for run in runs]
            fused = runs[-1]
            stats = GraphStats.of(fused)
            note = fused.fxfuse_report.capture_reason.split(";")[-1].strip()
            print(f"| {name} | {capture} | {min(times):.2f} | {stats.convs} | {stats.batch_norms} | {note} |")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="repvgg-A0")
    ap.add_argument("--batch", type=int, default=1)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--min-run-time", type=float, default=1.0)
    ap.add_argument("--pass-time", default="", help="comma-separated torchvision models: time both captures")
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--aoti", action="store_true", help="AOTInductor packages of the original and fused programs")
    args = ap.parse_args()
    if args.aoti:
        aoti(args.model, args.batch, args.threads, args.rounds, args.min_run_time)
    elif args.pass_time:
        pass_time(args.pass_time.split(","), args.repeats, args.threads)
    else:
        compile_path(args.model, args.batch, args.threads, args.rounds, args.min_run_time)


if __name__ == "__main__":
    main()
