"""The ``fxfuse`` command line (also ``python -m fxfuse``).

    fxfuse bench   [SPEC ...]   benchmark original / fxfuse / plain / fx_fuse (/ torch.compile) side by side
    fxfuse fuse    SPEC --out fused.pt2   reparametrize (verified) and save a torch.export program
    fxfuse explain SPEC         what was fused, what was not and why, ops / params / FLOPs before and after
    fxfuse models               the reference model names

SPEC: a reference name (``fxfuse models``), ``torchvision:NAME`` or ``package.module:callable``.
Errors print one line ``fxfuse: error: ...`` and exit non-zero (``--traceback`` shows the Python traceback).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any, Optional, Sequence, TextIO, Tuple

__all__ = ["main", "build_parser"]

PROG = "fxfuse"


class _UsageError(Exception):
    """A command-line usage error (exit code 2)."""


class _Parser(argparse.ArgumentParser):
    """Usage errors as one line ``fxfuse: error: ...`` (exit 2) instead of argparse's usage dump."""

    def error(self, message: str) -> None:  # type: ignore[override]
        raise _UsageError(f"{message} (see '{self.prog} --help')")


class _CLIError(Exception):
    """A user-facing failure; printed as ``fxfuse: error: <message>``."""


# -------------------------------------------------------------------------------------------- parser
def build_parser() -> argparse.ArgumentParser:
    """The argparse tree for all sub-commands."""
    from .model_source import DTYPES

    p = _Parser(prog=PROG, description="Structural re-parameterization as a torch.fx pass: benchmark, fuse, "
                                       "explain.",
                epilog="SPEC: a reference net (see 'fxfuse models'), torchvision:NAME (weights=None), or "
                       "package.module:callable returning an nn.Module.")
    p.add_argument("--traceback", action="store_true", help="show the Python traceback on errors")
    p.add_argument("--version", action="version", version=f"%(prog)s {_version()}")
    sub = p.add_subparsers(dest="command", metavar="COMMAND", parser_class=_Parser)

    b = sub.add_parser("bench", help="benchmark original / fxfuse / plain / fx_fuse side by side",
                       description="Measure the original model, fxfuse.reparametrize, the hand-written plain "
                                   "deploy twin (reference nets) and torch.fx's generic conv-BN fuse in one "
                                   "process, interleaved, with torch.utils.benchmark.Timer (synchronizes CUDA). "
                                   "BatchNorm statistics are randomized so the comparison is not trivial.")
    b.add_argument("specs", nargs="*", metavar="SPEC", help="models to measure (default: repvgg-article)")
    b.add_argument("--model", "-m", action="append", default=[], metavar="SPEC",
                   help="another model to measure (repeatable; same as a positional SPEC)")
    b.add_argument("--batch-sizes", default=None, metavar="LIST",
                   help="comma-separated batch sizes (default: 1,2,4,8,16,32,64,128 on CUDA, 1,8 on CPU)")
    b.add_argument("--image-size", type=int, default=None, metavar="N",
                   help="square input side (default: the model's own, 224 for ImageNet-sized nets)")
    b.add_argument("--dtype", choices=list(DTYPES), default="float32")
    b.add_argument("--channels-last", action="store_true", help="models and inputs in channels_last")
    b.add_argument("--device", choices=["auto", "cpu", "cuda"], default="auto",
                   help="auto = cuda if available, else cpu (default: auto)")
    b.add_argument("--variants", default=None, metavar="LIST",
                   help="comma-separated subset of original,fxfuse,plain,fx_fuse,compiled_original,"
                        "compiled_fxfuse (default: the first four; original is always measured)")
    b.add_argument("--compile", action="store_true",
                   help="also measure torch.compile of original and of the fxfuse model (compile time = "
                        "first call, cold Inductor caches)")
    b.add_argument("--compile-mode", default=None, help="torch.compile mode (default: torch's default)")
    b.add_argument("--min-run-time", type=float, default=1.0, metavar="S",
                   help="seconds of timed calls per variant and batch size, split over the rounds (default 1.0)")
    b.add_argument("--rounds", type=int, default=5, help="interleaved rounds per batch size (default 5)")
    b.add_argument("--warmup", type=int, default=None,
                   help="untimed calls per variant and batch size (default: 3 on CUDA, 1 on CPU)")
    b.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's default)")
    b.add_argument("--seed", type=int, default=0, help="seed for BN statistics and inputs (default 0)")
    b.add_argument("--no-cudnn-benchmark", action="store_true",
                   help="leave torch.backends.cudnn.benchmark off (default: on for CUDA)")
    b.add_argument("--timer", choices=["wall", "cpu"], default="wall",
                   help="wall: wall-clock latency (default). cpu: CPU time of this process (time.process_time) "
                        "- use with --device cpu --threads 1 on a machine shared with other jobs, where "
                        "wall-clock times mostly measure the other jobs")
    b.add_argument("--no-progress", action="store_true", help="no progress bar")
    b.add_argument("--out", default=None, metavar="DIR",
                   help="write results.csv, results.json, latency.png, speedup.png here")

    f = sub.add_parser("fuse", help="reparametrize a model (verified) and save it",
                       description="Build SPEC, load --weights, reparametrize with verification, and save a "
                                   "torch.export program (pt2, restored by torch.export.load), a state_dict plus "
                                   "the fused graph's code, or ONNX.")
    f.add_argument("spec", metavar="SPEC")
    _shape_and_weights(f)
    f.add_argument("--out", required=True, metavar="PATH", help="output file (e.g. fused.pt2)")
    f.add_argument("--format", choices=["pt2", "state_dict", "onnx"], default="pt2",
                   help="pt2: torch.export program (default); state_dict: torch.save(fused.state_dict()) plus "
                        "PATH's .py with fused.code; onnx: torch.onnx.export (needs onnx)")

    e = sub.add_parser("explain", help="report what fxfuse fuses in a model and why not elsewhere",
                       description="Patterns fused with counts, candidates left unfused with reasons, and ops / "
                                   "params / FLOPs before and after.")
    e.add_argument("spec", metavar="SPEC")
    _shape_and_weights(e)
    e.add_argument("--graph", action="store_true", help="print the traced graph before and after")
    e.add_argument("--randomize-bn", action="store_true",
                   help="randomize BatchNorm statistics first (without --weights BN is the identity)")
    e.add_argument("--json", action="store_true", help="print the report as JSON")

    sub.add_parser("models", help="list the reference model names and their default input shapes",
                   description="List fxfuse.models.names() with default input shapes.")
    return p


def _shape_and_weights(p: argparse.ArgumentParser) -> None:
    p.add_argument("--input-shape", default=None, metavar="N,C,H,W",
                   help="example input shape (default: the reference model's own)")
    p.add_argument("--weights", default=None, metavar="CKPT",
                   help="checkpoint for torch.load(weights_only=True): a state_dict, or one under a "
                        "'state_dict' / 'model' key")
    p.add_argument("--capture", choices=["auto", "symbolic", "export"], default="auto",
                   help="how the model becomes a graph: torch.fx symbolic tracing, torch.export, or auto (symbolic, "
                        "then export where it captures more; default)")


def _version() -> str:
    from .. import __version__

    return __version__


# ------------------------------------------------------------------------------------------- helpers
def _build(spec: str, shape_text: Optional[str], weights: Optional[str]) -> Tuple[Any, Any, Tuple[int, ...]]:
    """Model (eval) + example input for ``fuse`` / ``explain``."""
    import torch

    from .model_source import default_shape, load_model, load_weights, parse_shape

    loaded = load_model(spec)
    shape = parse_shape(shape_text) if shape_text else default_shape(loaded)
    if weights:
        load_weights(loaded.model, weights)
    model = loaded.model.eval()
    x = torch.randn(shape, generator=torch.Generator().manual_seed(0))
    try:
        with torch.no_grad():
            model(x)
    except Exception as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
        raise _CLIError(f"{spec!r} does not run on an input of shape {tuple(shape)}: {type(exc).__name__}: "
                        f"{first}") from None
    return loaded, model, shape


def _rel_error(reference: Any, actual: Any) -> float:
    """Worst relative output error ``max|a - r| / max|r|`` (:func:`fxfuse.verify.compare`)."""
    from ..verify import compare

    return compare(reference, actual).max_rel


def _reparametrize(model: Any, x: Any, capture: str) -> Any:
    import warnings

    from .. import reparametrize

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        return reparametrize(model, x, capture=capture)


# ------------------------------------------------------------------------------------------ commands
def _cmd_bench(args: argparse.Namespace, out: TextIO, err: TextIO, argv: Sequence[str]) -> int:
    from .bench import BenchConfig, format_table, run_bench, write_outputs
    from .model_source import parse_int_list

    specs = list(args.specs) + list(args.model) or ["repvgg-article"]
    cfg = BenchConfig(
        models=specs,
        batch_sizes=parse_int_list(args.batch_sizes, "batch size") if args.batch_sizes else None,
        image_size=args.image_size, dtype=args.dtype, channels_last=args.channels_last, device=args.device,
        variants=[v for v in args.variants.split(",") if v.strip()] if args.variants else None,
        compile=args.compile, compile_mode=args.compile_mode, min_run_time=args.min_run_time,
        rounds=args.rounds, warmup=args.warmup, threads=args.threads, seed=args.seed,
        cudnn_benchmark=not args.no_cudnn_benchmark, timer=args.timer, progress=not args.no_progress,
        command=" ".join([PROG] + list(argv)),
    )
    if cfg.image_size is not None and cfg.image_size < 1:
        raise _CLIError("--image-size must be >= 1")
    result = run_bench(cfg, log=err)
    print(format_table(result), file=out)
    if args.out:
        paths = write_outputs(result, args.out, log=err)
        print("wrote " + ", ".join(str(p) for p in paths), file=out)
    return 0


def _cmd_fuse(args: argparse.Namespace, out: TextIO, err: TextIO, argv: Sequence[str]) -> int:
    import torch

    loaded, model, shape = _build(args.spec, args.input_shape, args.weights)
    if not args.weights:
        print(f"fxfuse fuse: note: no --weights given; saving {args.spec} with its initial parameters", file=err)
    x = torch.randn(shape, generator=torch.Generator().manual_seed(0))
    fused = _reparametrize(model, x, args.capture)
    print(fused.fxfuse_report.summary(), file=out)
    with torch.no_grad():
        ref = model(x)
    path = Path(args.out)
    if path.parent and not path.parent.exists():
        path.parent.mkdir(parents=True, exist_ok=True)
    if args.format == "pt2":
        ep, batch = _export_program(fused, x)
        torch.export.save(ep, str(path))
        with torch.no_grad():
            back = torch.export.load(str(path)).module()(x)
        print(f"saved torch.export program ({batch} batch) to {path} (torch.export.load round trip: max rel "
              f"error {_rel_error(ref, back):.3g} vs the original)", file=out)
    elif args.format == "state_dict":
        torch.save(fused.state_dict(), str(path))
        code_path = path.with_suffix(".py") if path.suffix != ".py" else path.with_suffix(".code.py")
        code_path.write_text(_code_text(fused, args.spec, shape), encoding="utf-8")
        print(f"saved state_dict to {path} and the fused graph's code to {code_path}", file=out)
    else:
        _export_onnx(fused, x, ref, path, out, err)
    return 0


def _export_program(fused: Any, x: Any) -> Tuple[Any, str]:
    """``fused`` as a ``torch.export`` program with a dynamic batch dim, or a static one where the model pins it."""
    import torch

    from ..capture.export import batch_dynamic_shapes, to_exported_program

    try:
        return to_exported_program(fused, (x,), dynamic_shapes=batch_dynamic_shapes((x,))), "dynamic"
    except Exception:  # the code specializes the batch size: a static program is still a faithful one
        pass
    try:
        return torch.export.export(fused, (x,)), "static"
    except Exception as exc:
        raise _CLIError(f"torch.export.export failed on the fused model: {type(exc).__name__}: "
                        f"{_first_line(exc)}; try --format state_dict") from None


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0] if text else ""


def _code_text(fused: Any, spec: str, shape: Tuple[int, ...]) -> str:
    header = [f"# fxfuse fuse {spec} --input-shape {','.join(map(str, shape))}: the fused model's forward",
              "# (torch.fx GraphModule.code); its parameters are in the matching state_dict file.",
              "# Module tree:"]
    header += ["#   " + line for line in str(fused).splitlines()]
    code = getattr(fused, "code", None)
    if code is None:
        parts = [f"# --- {name} ---\n{m.code}" for name, m in fused.named_modules() if hasattr(m, "code")]
        code = "\n".join(parts) or "# (model did not trace as a whole and has no rewritten sub-graphs)\n"
    return "\n".join(header) + "\n" + code


def _export_onnx(fused: Any, x: Any, ref: Any, path: Path, out: TextIO, err: TextIO) -> None:
    import importlib.util
    import warnings

    import torch

    if importlib.util.find_spec("onnx") is None:
        raise _CLIError("--format onnx needs the onnx package (pip install 'fxfuse[onnx]')")
    dynamo = importlib.util.find_spec("onnxscript") is not None
    if not dynamo:
        print("fxfuse fuse: onnxscript is not installed; using the TorchScript-based exporter (dynamo=False)",
              file=err)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            torch.onnx.export(fused, (x,), str(path), dynamo=dynamo, input_names=["input"],
                              output_names=["output"])
    except Exception as exc:
        raise _CLIError(f"torch.onnx.export failed: {type(exc).__name__}: {_first_line(exc)}") from None
    msg = f"saved ONNX model to {path}"
    if importlib.util.find_spec("onnxruntime") is not None:
        import onnxruntime as ort

        sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
        got = [torch.from_numpy(g) for g in sess.run(None, {sess.get_inputs()[0].name: x.numpy()})]
        expected = list(ref) if isinstance(ref, (list, tuple)) else [ref]  # ONNX returns a flat list of outputs
        msg += f" (onnxruntime check: max rel error {_rel_error(expected, got):.3g})"
    print(msg, file=out)


def _cmd_explain(args: argparse.Namespace, out: TextIO, err: TextIO, argv: Sequence[str]) -> int:
    import json

    import torch

    from ..capture import trace
    from ..models import randomize_batchnorm_
    from .bench import count_flops

    loaded, model, shape = _build(args.spec, args.input_shape, args.weights)
    if args.randomize_bn:
        randomize_batchnorm_(model, seed=0)
    x = torch.randn(shape, generator=torch.Generator().manual_seed(0))
    fused = _reparametrize(model, x, args.capture)
    rep = fused.fxfuse_report
    params = [sum(p.numel() for p in m.parameters()) for m in (model, fused)]
    flops = [count_flops(m, x) for m in (model, fused)]
    if args.json:
        d = rep.to_dict()
        d.update(spec=args.spec, input_shape=list(shape), params={"before": params[0], "after": params[1]},
                 flops={"before": flops[0], "after": flops[1]})
        print(json.dumps(d, indent=2, default=str), file=out)
        return 0
    w = out.write
    w(f"model: {args.spec} ({loaded.kind}), input {tuple(shape)}, reparametrize pass {rep.pass_seconds:.2f} s\n")
    w(f"capture: {rep.capture} ({rep.capture_reason})\n")
    if rep.phases:
        w("pass phases (s): " + ", ".join(f"{k} {v:.3f}" for k, v in rep.phases.items()) + "\n")
    w(f"fused patterns ({rep.total_fused} rewrites):\n")
    for name, count in sorted(rep.fused.items()):
        w(f"  {name:<24} {count:>5}\n")
    if not rep.fused:
        w("  (none)\n")
    w(f"left unfused ({len(rep.unfused)}):\n")
    for u in rep.unfused:
        w(f"  [{u.rule}] {u.node} ({u.target}) {u.code.value}: {u.reason}\n")
    if not rep.unfused:
        w("  (none)\n")
    if rep.rolled_back:
        w(f"rolled back by verification: {', '.join(rep.rolled_back)}\n")
    if rep.weight_growth:  # quantization readiness: per-channel kernel range vs the main branch's (docs/expand.md)
        top = max(rep.weight_growth, key=lambda g: g.max_growth)
        w(f"weight range growth vs main-branch kernels: max {top.max_growth:.3g}x ({top.module})\n")
        for g in (g for g in rep.weight_growth if g.outliers):
            w(f"  {g.module}: outlier channels {list(g.outliers)} (median growth {g.median_growth:.3g}x)\n")
    if not rep.traced_whole:
        w("model did not trace as a whole; sub-modules:\n")
        for k, v in rep.submodules.items():
            w(f"  {k}: {v}\n")
    b, a = rep.before, rep.after
    w(f"{'':<14}{'before':>14}{'after':>14}\n")
    for label, before, after in (("ops", b.nodes, a.nodes), ("convs", b.convs, a.convs),
                                 ("batch_norms", b.batch_norms, a.batch_norms), ("avg_pools", b.pools, a.pools),
                                 ("adds", b.adds, a.adds), ("params", params[0], params[1])):
        w(f"{label:<14}{before:>14}{after:>14}\n")
    fl = ["-" if f is None else f"{f / 1e9:.4f}" for f in flops]
    w(f"{'GFLOPs':<14}{fl[0]:>14}{fl[1]:>14}   (FlopCounterMode, batch {shape[0]})\n")
    if rep.verified is not None:
        w(f"verified: {rep.verified} in {rep.verify_dtype}, max abs error {rep.max_abs_error:.3g}, relative "
          f"{rep.max_rel_error:.3g} (tolerance {rep.tolerance:.3g})\n")
    for warning in rep.warnings:
        w(f"warning: {warning}\n")
    if args.graph:
        try:
            before_graph = str(trace(model).graph)
        except Exception as exc:
            before_graph = f"(does not trace as a whole: {type(exc).__name__}: {_first_line(exc)})"
        after_graph = str(fused.graph) if hasattr(fused, "graph") else str(fused)
        w("\ngraph before:\n" + before_graph + "\n\ngraph after:\n" + after_graph + "\n")
    return 0


def _cmd_models(args: argparse.Namespace, out: TextIO, err: TextIO, argv: Sequence[str]) -> int:
    from ..models import default_input_shape, names

    for name in names():
        out.write(f"{name:<16} {','.join(map(str, default_input_shape(name)))}\n")
    return 0


_COMMANDS = {"bench": _cmd_bench, "fuse": _cmd_fuse, "explain": _cmd_explain, "models": _cmd_models}


# --------------------------------------------------------------------------------------------- main
def main(argv: Optional[Sequence[str]] = None, *, stdout: Optional[TextIO] = None,
         stderr: Optional[TextIO] = None) -> int:
    """Run the CLI; return the exit code (0 ok, 1 runtime error, 2 usage error, 130 interrupted)."""
    argv = list(sys.argv[1:] if argv is None else argv)
    out = stdout or sys.stdout
    err = stderr or sys.stderr
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
    except _UsageError as exc:
        print(f"{PROG}: error: {exc}", file=err)
        return 2
    except SystemExit as exc:  # --help, --version
        return int(exc.code) if isinstance(exc.code, int) else (0 if exc.code is None else 2)
    if not args.command:
        parser.print_help(out)
        return 2
    try:
        return _COMMANDS[args.command](args, out, err, argv)
    except KeyboardInterrupt:
        print(f"{PROG}: error: interrupted", file=err)
        return 130
    except Exception as exc:  # every failure becomes one line unless --traceback
        if args.traceback:
            raise
        from .model_source import SpecError

        known = isinstance(exc, (SpecError, _CLIError))
        text = " ".join(str(exc).split()) if str(exc).strip() else type(exc).__name__
        if not known:
            text = f"{type(exc).__name__}: {text}"
        if len(text) > 600:
            text = text[:600] + " ..."
        hint = "" if known else " (run with --traceback for details)"
        print(f"{PROG}: error: {text}{hint}", file=err)
        return 1


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
