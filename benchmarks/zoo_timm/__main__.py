"""``python -m benchmarks.zoo_timm`` (from the repository root; ``make zoo-timm``): run the timm sweep (resuming from
its cache), write docs/zoo-timm.md."""

from __future__ import annotations

import argparse
import datetime as _dt
import sys
from pathlib import Path
from typing import Optional, Sequence

import torch

import fxfuse

from ..common import ROOT, cpu_text, shown_command, source_state
from . import __doc__ as DOC
from .cases import ModelSource, parse_count, select, timm_source
from .checks import Fuse
from .render import header, machine, provenance, render, summary_line, violators
from .sweep import load_cache, reusable, run_sweep

COMMAND = "python -m benchmarks.zoo_timm"
DEFAULT_CACHE = ROOT / ".zoo-timm-cache.jsonl"


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog=COMMAND, description=(DOC or "").strip().splitlines()[0])
    p.add_argument("--filter", default="", help="comma-separated globs over timm.list_models() (default: all)")
    p.add_argument("--limit", type=int, default=0, help="only the first N selected models (sorted by name)")
    p.add_argument("--max-params", type=parse_count, default=60_000_000,
                   help="skip models with more parameters (e.g. 60M, 1.5G, 60e6; default 60M)")
    p.add_argument("--size", type=int, default=96, help="input height and width (default 96)")
    p.add_argument("--timeout-per-model", type=float, default=600.0,
                   help="seconds per model, each in its own forked process (0: in this process, no limit)")
    p.add_argument("--cache", default=str(DEFAULT_CACHE), help="JSON-lines cache of checked models (resumable)")
    p.add_argument("--fresh", action="store_true", help="check the selected models again, ignoring the cache")
    p.add_argument("--out", default=str(ROOT / "docs" / "zoo-timm.md"), help="markdown report to write")
    p.add_argument("--threads", type=int, default=1, help="torch threads (1: robust on a shared machine)")
    p.add_argument("--note", default="", help="a sentence about the run for the report's header")
    p.add_argument("--render-only", action="store_true",
                   help="write --out from the cache's rows for this selection, checking nothing")
    return p


def main(argv: Optional[Sequence[str]] = None, source: Optional[ModelSource] = None,
         fuse: Optional[Fuse] = None) -> int:
    """Run (or with ``--render-only`` only render) the sweep; 1 when a model misses the goal, else 0. ``source`` /
    ``fuse``: stand-ins for timm and ``fxfuse.reparametrize`` (tests)."""
    args = parser().parse_args(argv)
    argv = list(argv if argv is not None else sys.argv[1:])
    torch.set_num_threads(args.threads)
    cache = Path(args.cache)
    command = shown_command(COMMAND, argv)
    date = _dt.datetime.now(_dt.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    fresh_rows = 0
    if args.render_only:
        cached = {n: r for n, r in load_cache(cache).items() if reusable(r, args.size, args.max_params)}
        rows = [cached[n] for n in select(list(cached), args.filter, args.limit)]
        versions = rows[0].versions if rows else {}
    else:
        source = source or timm_source()
        names = select(source.list_models(), args.filter, args.limit)
        versions = {"torch": torch.__version__, **source.versions, "fxfuse": fxfuse.__version__}
        stamp = {"date": date, "source": source_state(), "versions": versions, "threads": args.threads,
                 "machine": cpu_text()}
        print(f"{len(names)} models; cache {cache}", flush=True)
        before = load_cache(cache)
        rows = run_sweep(names, source, cache=cache, size=args.size, max_params=args.max_params, fresh=args.fresh,
                         timeout=args.timeout_per_model, threads=args.threads, stamp=stamp, fuse=fuse,
                         log=lambda line: print(line, flush=True))
        fresh_rows = sum(1 for r in rows if args.fresh or r.name not in before
                         or not reusable(before[r.name], args.size, args.max_params))
    try:
        shown_cache = str(cache.resolve().relative_to(ROOT))
    except ValueError:
        shown_cache = str(cache)
    text = render(rows, header(command, date, machine(versions, args.threads), args.note),
                  provenance(rows, fresh_rows, shown_cache))
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(text)
    print(summary_line(rows), flush=True)
    for name, what in violators(rows):
        print(f"  {name}: {'; '.join(what)}", flush=True)
    print(f"wrote {args.out}", flush=True)
    return 1 if violators(rows) else 0


if __name__ == "__main__":
    raise SystemExit(main())
