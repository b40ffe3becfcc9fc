"""Running the timm sweep: the resumable cache (one JSON line per checked model, :func:`load_cache` /
:func:`append_row`), one model per forked child with a time limit (:func:`run_isolated`), and the loop over the
selected models (:func:`run_sweep`)."""

from __future__ import annotations

import json
import math
import multiprocessing
import signal
import time
from dataclasses import asdict
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional, Sequence

import torch

from .cases import ModelSource
from .checks import Fuse, TimmRow, check_model, finish_dead, row_from_dict


# ----------------------------------------------------------------------------------------------- cache
def load_cache(path: Path) -> Dict[str, TimmRow]:
    """Rows of the cache file by model name (the last line of a name wins; a line that does not parse, e.g. one cut
    off when a run was killed, is skipped). Empty when the file does not exist."""
    rows: Dict[str, TimmRow] = {}
    if not path.exists():
        return rows
    for line in path.read_text().splitlines():
        try:
            data = json.loads(line)
            rows[data["name"]] = row_from_dict(data)
        except (ValueError, KeyError, TypeError):
            continue
    return rows


def append_row(path: Path, row: TimmRow) -> None:
    """Add ``row`` to the cache as one JSON line (written and flushed at once, so a killed run keeps every model it
    finished)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("a") as fh:
        fh.write(json.dumps(asdict(row), default=str) + "\n")
        fh.flush()


def reusable(row: TimmRow, size: int, max_params: int) -> bool:
    """A cached row answers this run when it was measured with the same input size and parameter limit."""
    return row.size == size and row.max_params == max_params and bool(row.status)


# ------------------------------------------------------------------------------------------- isolation
def _death(exitcode: Optional[int]) -> str:
    if exitcode is not None and exitcode < 0:
        try:
            return f"the check's process died ({signal.Signals(-exitcode).name})"
        except ValueError:
            pass
    return f"the check's process died (exit code {exitcode})"


def run_isolated(check: Callable[[Callable[[str, TimmRow], None]], TimmRow], name: str, timeout: float,
                 threads: int = 1) -> TimmRow:
    """``check(on_phase)`` in a forked child process, at most ``timeout`` seconds. The child reports the row at the
    start of every step; when it hangs past the limit (it is killed) or dies (segfault, out of memory, exit), the
    row is finished from its last report (:func:`finish_dead`: n.a. before the pass, a crash inside it)."""
    ctx = multiprocessing.get_context("fork")
    recv, send = ctx.Pipe(duplex=False)

    def child() -> None:
        recv.close()
        torch.set_num_threads(threads)

        def on_phase(_: str, row: TimmRow) -> None:
            send.send(("phase", asdict(row)))

        send.send(("row", asdict(check(on_phase))))
        send.close()

    start = time.monotonic()
    proc = ctx.Process(target=child, name=f"zoo-timm:{name}", daemon=True)
    proc.start()
    send.close()
    last: Dict[str, Any] = asdict(TimmRow(name))
    result: Optional[Dict[str, Any]] = None
    timed_out = False
    try:
        while result is None:
            left = start + timeout - time.monotonic()
            if left <= 0:
                timed_out = True
                break
            if not recv.poll(min(left, 1.0)):
                continue
            try:
                kind, data = recv.recv()
            except EOFError:  # the child is gone without a result
                break
            last = data
            if kind == "row":
                result = data
    finally:
        if proc.is_alive() and result is None:
            proc.kill()
        proc.join()
        recv.close()
    if result is not None:
        return row_from_dict(result)
    row = row_from_dict(last)
    row.seconds = time.monotonic() - start
    return finish_dead(row, f"timed out after {timeout:g} s" if timed_out else _death(proc.exitcode))


# ------------------------------------------------------------------------------------------------ loop
def progress_line(i: int, n: int, row: TimmRow, cached: bool = False) -> str:
    """``[i/n] name: status | capture | conv+BN original → fxfuse (timm deploy) | err | pass s (wall s)``."""
    def num(x: Optional[int]) -> str:
        return "—" if x is None else str(x)

    status = row.status + (f" ({row.reason[:160]})" if row.status != "ok" and row.reason else "")
    if row.worse_than_deploy:
        status += " [conv+BN > timm deploy]"
    err = "—" if math.isnan(row.max_rel_error) else f"{row.max_rel_error:.1e}"
    pass_s = "—" if math.isnan(row.pass_s) else f"{row.pass_s:.2f}s"
    return (f"[{i}/{n}] {row.name}: {status} | capture {row.capture or '—'} | conv+BN {num(row.conv_bn(0))} → "
            f"{num(row.conv_bn(1))} (timm deploy {num(row.conv_bn(2))}) | err {err} | pass {pass_s} "
            + ("(cached)" if cached else f"({row.seconds:.0f}s)"))


def run_sweep(names: Sequence[str], source: ModelSource, *, cache: Path, size: int = 96,
              max_params: int = 60_000_000, fresh: bool = False, timeout: float = 600.0, threads: int = 1,
              stamp: Optional[Dict[str, Any]] = None, fuse: Optional[Fuse] = None,
              log: Callable[[str], None] = print) -> List[TimmRow]:
    """Check every model of ``names`` (in order) and return their rows. A model whose row is in ``cache`` for this
    size and parameter limit is not run again (unless ``fresh``); each new row is appended to ``cache`` as soon as
    it is done, stamped with ``stamp`` (date, fxfuse source, versions). ``timeout`` > 0: each model in its own
    forked process (:func:`run_isolated`); 0: in this process (no time limit, a crash ends the sweep)."""
    done = {} if fresh else load_cache(cache)
    rows = []
    for i, name in enumerate(names, 1):
        old = done.get(name)
        if old is not None and reusable(old, size, max_params):
            rows.append(old)
            log(progress_line(i, len(names), old, cached=True))
            continue

        def check(on_phase: Optional[Callable[[str, TimmRow], None]] = None, name: str = name) -> TimmRow:
            return check_model(name, source, size=size, max_params=max_params, fuse=fuse, on_phase=on_phase)

        row = run_isolated(check, name, timeout, threads) if timeout > 0 else check()
        row.size, row.max_params = size, max_params
        for key, value in (stamp or {}).items():
            setattr(row, key, value)
        append_row(cache, row)
        rows.append(row)
        log(progress_line(i, len(names), row))
    return rows

