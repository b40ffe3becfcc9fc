"""``python -m benchmarks.zoo`` (from the repository root; ``make zoo``): run the sweep, write docs/zoo.md."""

from __future__ import annotations

import argparse
import datetime as _dt
import json
import sys
from dataclasses import asdict
from pathlib import Path
from typing import Optional, Sequence

import torch

from . import __doc__ as ZOO_DOC
from .cases import all_models
from .checks import check_model
from .render import err_text, header, machine, ratio_text, render, render_pass_speed, status_text
from .speed import pass_speed

ROOT = Path(__file__).resolve().parents[2]
COMMAND = "python -m benchmarks.zoo"


def main(argv: Optional[Sequence[str]] = None) -> int:
    p = argparse.ArgumentParser(prog=COMMAND, description=(ZOO_DOC or "").splitlines()[0])
    p.add_argument("--models", default="", help="comma-separated model names (default: every list_models())")
    p.add_argument("--out", default=str(ROOT / "docs" / "zoo.md"), help="markdown report to write")
    p.add_argument("--json", default="", help="also write the rows as JSON here")
    p.add_argument("--no-speed", action="store_true", help="skip the float32 speed comparison")
    p.add_argument("--min-run-time", type=float, default=0.3,
                   help="Timer.blocked_autorange min_run_time per model and round (s)")
    p.add_argument("--pass-speed", action="store_true", help="only measure the resnet50/152 pass speed")
    p.add_argument("--no-pass-speed", action="store_true", help="skip the resnet50/152 pass-speed section")
    p.add_argument("--threads", type=int, default=1, help="torch threads (1: robust on a shared machine)")
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    command = f"{COMMAND} " + " ".join(argv if argv is not None else sys.argv[1:])
    date = _dt.datetime.now(_dt.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    speed_info = None
    if not args.no_pass_speed:
        speed_info = pass_speed()
        speed_info.update(command=command.strip(), machine=machine(threads=False), date=date)
        print(render_pass_speed(speed_info), flush=True)
        if args.pass_speed:
            return 0
    names = [n.strip() for n in args.models.split(",") if n.strip()] or all_models()
    rows = []
    for i, name in enumerate(names):
        row = check_model(name, speed=not args.no_speed, min_run_time=args.min_run_time)
        rows.append(row)
        print(f"[{i + 1}/{len(names)}] {name}: {status_text(row)} | convs {row.convs} bns {row.batch_norms} "
              f"rewrites {row.rewrites} pass {row.pass_s:.2f}s err {err_text(row)} "
              f"speed {ratio_text(row.speed_ratio)} ({row.seconds:.0f}s)", flush=True)
        if row.status == "FAIL" and row.detail:
            print(row.detail, flush=True)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(render(rows, header(command, date, args.min_run_time), speed_info))
    if args.json:
        Path(args.json).write_text(json.dumps([asdict(r) for r in rows], indent=1, default=str))
    print(f"wrote {args.out}; {sum(not r.passed for r in rows)} failure(s)")
    return 1 if any(not r.passed for r in rows) else 0


if __name__ == "__main__":
    raise SystemExit(main())
