"""Pieces the model-zoo sweeps share (``benchmarks.zoo``: torchvision, ``benchmarks.zoo_timm``: timm): which fxfuse a
run imported, the command line a report shows, the machine it ran on."""

from __future__ import annotations

import os
import shlex
import subprocess
from pathlib import Path
from typing import Sequence

from fxfuse.tools.bench import cpu_model_name

ROOT = Path(__file__).resolve().parents[1]


def source_state(root: Path = ROOT) -> str:
    """Which fxfuse the run used: ``"fxfuse at commit abc1234"``, plus the uncommitted changes under fxfuse/ (the
    working tree is what is imported); outside a git checkout of this tree (an unpacked sdist, an archive, no git
    installed) ``"fxfuse <__version__> from a source tree that is not a git checkout"``."""
    import fxfuse

    def git(*cmd: str) -> str:
        return subprocess.run(["git", *cmd], cwd=root, capture_output=True, text=True, timeout=30).stdout.strip()

    no_git = f"fxfuse {fxfuse.__version__} from a source tree that is not a git checkout"
    try:
        top = git("rev-parse", "--show-toplevel")
        # a tree unpacked inside some other checkout must not report that checkout's commit
        if not top or Path(top).resolve() != root.resolve():
            return no_git
        commit = git("rev-parse", "--short", "HEAD")
        dirty = [line[3:] for line in git("status", "--porcelain", "--", "fxfuse").splitlines()]
    except (OSError, subprocess.SubprocessError):
        return no_git
    if not commit:
        return no_git
    return f"fxfuse at commit {commit}" + (f" plus uncommitted changes to {', '.join(dirty)}" if dirty else "")


def shown_command(command: str, argv: Sequence[str]) -> str:
    """``command`` and its arguments for a report, without ``--note`` and its text (the header prints the note
    itself)."""
    shown, skip = [], False
    for a in argv:
        if skip:
            skip = False
        elif a == "--note":
            skip = True
        elif not a.startswith("--note="):
            shown.append(a)
    return f"{command} {shlex.join(shown)}".strip()


def cpu_text() -> str:
    """``"<CPU model> (<n> cores)"``."""
    return f"{cpu_model_name()} ({os.cpu_count()} cores)"
