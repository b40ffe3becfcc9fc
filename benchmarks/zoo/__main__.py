"""``python -m benchmarks.zoo`` (from the repository root; ``make zoo``): run the sweep, write docs/zoo.md."""

from __future__ import annotations

import argparse
import datetime as _dt
import json
import shlex
import subprocess
import sys
from dataclasses import asdict, fields
from pathlib import Path
from typing import Any, Dict, Optional, Sequence

import torch

import fxfuse

from . import __doc__ as ZOO_DOC
from .cases import all_models
from .checks import SubmoduleCheck, ZooRow, check_model
from .render import err_text, header, machine, ratio_text, render, render_pass_speed, status_text
from .speed import pass_speed

ROOT = Path(__file__).resolve().parents[2]
COMMAND = "python -m benchmarks.zoo"


def source_state() -> str:
    """Which fxfuse the run used: ``"fxfuse at commit abc1234"``, plus the uncommitted changes under fxfuse/ (the
    working tree is what is imported); outside a git checkout of this tree (an unpacked sdist, an archive, no git
    installed) ``"fxfuse <__version__> from a source tree that is not a git checkout"``."""
    def git(*cmd: str) -> str:
        return subprocess.run(["git", *cmd], cwd=ROOT, capture_output=True, text=True, timeout=30).stdout.strip()

    no_git = f"fxfuse {fxfuse.__version__} from a source tree that is not a git checkout"
    try:
        top = git("rev-parse", "--show-toplevel")
        # a tree unpacked inside some other checkout must not report that checkout's commit
        if not top or Path(top).resolve() != ROOT.resolve():
            return no_git
        commit = git("rev-parse", "--short", "HEAD")
        dirty = [line[3:] for line in git("status", "--porcelain", "--", "fxfuse").splitlines()]
    except (OSError, subprocess.SubprocessError):
        return no_git
    if not commit:
        return no_git
    return f"fxfuse at commit {commit}" + (f" plus uncommitted changes to {', '.join(dirty)}" if dirty else "")


def shown_command(argv: Sequence[str]) -> str:
    """The command line for the report, without ``--note`` and its text (the header prints the note itself)."""
    shown, skip = [], False
    for a in argv:
        if skip:
            skip = False
        elif a == "--note":
            skip = True
        elif not a.startswith("--note="):
            shown.append(a)
    return f"{COMMAND} {shlex.join(shown)}".strip()


def run_note(source: str, note: str) -> str:
    """The header's sentence about a run: which fxfuse it imported (:func:`source_state`), then ``--note``."""
    return " ".join(n for n in (f"{source}." if source else "", note.strip()) if n)


def row_from_json(data: Dict[str, Any]) -> ZooRow:
    """A :class:`ZooRow` back from its ``--json`` form (tuples and nested checks restored; keys a row of another
    harness version lacks take their defaults)."""
    known = {f.name for f in fields(ZooRow)}
    kw = {k: v for k, v in data.items() if k in known}
    for key in ("convs", "batch_norms"):
        if key in kw:
            kw[key] = tuple(kw[key])
    kw["submodule_checks"] = {k: SubmoduleCheck(**v) for k, v in kw.get("submodule_checks", {}).items()}
    return ZooRow(**kw)


def rerender(paths: Sequence[str], out: str, extra_note: str = "") -> int:
    """Write the report from saved runs instead of running: ``paths`` are ``--json`` files, each with its
    ``.meta.json`` (command, date, note, pass speed); rows of a later file replace the rows of the same model in an
    earlier one (a partial re-run merged into a full sweep), in the first file's model order. The header is the
    first file's, then ``extra_note`` (e.g. why rows were re-run), then a sentence naming each merged run."""
    metas = [json.loads(Path(p + ".meta.json").read_text()) for p in paths]
    rows: Dict[str, ZooRow] = {}
    for p in paths:
        for data in json.loads(Path(p).read_text()):
            rows[data["name"]] = row_from_json(data)
    first = metas[0]
    note = run_note(first.get("source", ""), first.get("note", ""))
    note += f" {extra_note.strip()}" if extra_note.strip() else ""
    for p, meta in zip(paths[1:], metas[1:]):
        names = [d["name"] for d in json.loads(Path(p).read_text())]
        about = "; ".join(x.strip().rstrip(".") for x in (meta.get("source", ""), meta.get("note", "")) if x.strip())
        note += (f" Rows of {', '.join(names)} come from a later run: `{meta['command']}`, {meta['date']}"
                 f"{f' ({about})' if about else ''}.")
    text = render(list(rows.values()), header(first["command"], first["date"], first["min_run_time"], note,
                                              first.get("machine")), first.get("speed_info"))
    Path(out).write_text(text)
    print(f"wrote {out} from {', '.join(paths)}")
    return 1 if any(not r.passed for r in rows.values()) else 0


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
    p.add_argument("--note", default="", help="a sentence about the run for the report's header (e.g. the load)")
    p.add_argument("--from-json", default="", help="comma-separated --json files of earlier runs: write --out from "
                   "them (later files' rows replace earlier ones of the same model) instead of running")
    args = p.parse_args(argv)
    if args.from_json:
        return rerender([x.strip() for x in args.from_json.split(",") if x.strip()], args.out, args.note)
    torch.set_num_threads(args.threads)
    command = shown_command(argv if argv is not None else sys.argv[1:])
    date = _dt.datetime.now(_dt.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    source = source_state()
    speed_info = None
    if not args.no_pass_speed:
        speed_info = pass_speed()
        speed_info.update(command=command.strip(), machine=machine(threads=False), date=date)
        print(render_pass_speed(speed_info), flush=True)
        if args.pass_speed:
            return 0
    names = [n.strip() for n in args.models.split(",") if n.strip()] or all_models()
    if args.json:  # what --from-json needs to write the report again
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json + ".meta.json").write_text(json.dumps(
            {"command": command.strip(), "date": date, "min_run_time": args.min_run_time, "note": args.note,
             "source": source, "machine": machine(), "speed_info": speed_info}, indent=1, default=str))
    rows = []
    for i, name in enumerate(names):
        row = check_model(name, speed=not args.no_speed, min_run_time=args.min_run_time)
        rows.append(row)
        print(f"[{i + 1}/{len(names)}] {name}: {status_text(row)} | capture {row.capture or '-'} | "
              f"convs {row.convs} bns {row.batch_norms} "
              f"rewrites {row.rewrites} pass {row.pass_s:.2f}s err {err_text(row)} "
              f"speed {ratio_text(row.speed_ratio)} ({row.seconds:.0f}s)", flush=True)
        if row.status == "FAIL" and row.detail:
            print(row.detail, flush=True)
        if args.json:  # after every model, so that a long sweep that stops keeps what it measured
            Path(args.json).parent.mkdir(parents=True, exist_ok=True)
            Path(args.json).write_text(json.dumps([asdict(r) for r in rows], indent=1, default=str))
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    text = render(rows, header(command, date, args.min_run_time, run_note(source, args.note)), speed_info)
    Path(args.out).write_text(text)
    print(f"wrote {args.out}; {sum(not r.passed for r in rows)} failure(s)")
    return 1 if any(not r.passed for r in rows) else 0


if __name__ == "__main__":
    raise SystemExit(main())
