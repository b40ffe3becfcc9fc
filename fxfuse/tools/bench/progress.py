"""Progress of a benchmark run on stderr: a tqdm bar on a terminal, one plain line per step otherwise."""

from __future__ import annotations

import sys
from typing import Any, Optional, TextIO


def _is_terminal(stream: TextIO) -> bool:
    isatty = getattr(stream, "isatty", None)
    try:
        return bool(isatty()) if callable(isatty) else False
    except (OSError, ValueError):  # a closed or detached stream
        return False


class Progress:
    """Counts steps of a run. On a terminal (and with tqdm installed) a redrawn bar; when the stream is a pipe
    or file (``make bench | cat``, a CI log) one line ``[   k/N] what`` per step, so the log reads top to bottom
    instead of collecting carriage-return fragments. Silent when disabled."""

    def __init__(self, total: int, enabled: bool, stream: TextIO = sys.stderr) -> None:
        self.total, self.done, self.enabled, self.stream = total, 0, enabled, stream
        self._bar: Optional[Any] = None
        if enabled and _is_terminal(stream):
            try:
                from tqdm import tqdm
            except ImportError:
                pass
            else:
                self._bar = tqdm(total=total, file=stream, unit="step", dynamic_ncols=True, leave=False)

    def grow(self, n: int) -> None:
        """Add ``n`` (possibly negative: variants that could not be built) to the expected number of steps."""
        self.total += n
        if self._bar is not None:
            self._bar.total = self.total
            self._bar.refresh()

    def step(self, desc: str) -> None:
        self.done += 1
        if not self.enabled:
            return
        if self._bar is not None:
            self._bar.set_description_str(desc, refresh=False)
            self._bar.update(1)
        else:
            print(f"[{self.done:>4}/{self.total}] {desc}", file=self.stream, flush=True)

    def note(self, text: str) -> None:
        """A message that stays (printed above the bar on a terminal)."""
        if not self.enabled:
            return
        if self._bar is not None:
            self._bar.write(text, file=self.stream)
        else:
            print(text, file=self.stream, flush=True)

    def close(self) -> None:
        if self._bar is not None:
            self._bar.close()
