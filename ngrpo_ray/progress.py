"""Progress lines with an estimate for long commands: ``what: done/total, elapsed 1m05s, ETA 3m20s`` on stderr.

stdout stays the command's result (JSON that scripts parse); progress goes to stderr. A line is printed only once
the work has run ``quiet_s`` seconds and then at most every ``every_s`` seconds, so short runs stay silent and long
ones (a full neighbor-table build, benchmark rounds) say how far they are and how long is left. The estimate is the
mean time per finished unit times the units left, counted from the start or from ``begin_units()`` when a setup phase
(engine builds, reported with ``note``) comes first and should not count as unit time.
"""

from __future__ import annotations

import sys
import time
from typing import Callable, TextIO


def format_seconds(seconds: float) -> str:
    """``42s``, ``3m05s``, ``1h02m``: short enough for a progress line."""
    s = max(0, int(round(seconds)))
    if s < 60:
        return f"{s}s"
    if s < 3600:
        return f"{s // 60}m{s % 60:02d}s"
    return f"{s // 3600}h{(s % 3600) // 60:02d}m"


class Progress:
    """``p = Progress(total, "neighbor-table rows")``; ``p.update(done)`` after each unit; ``p.note("...")`` for a
    phase message (always printed, with the elapsed time). ``clock`` and ``stream`` are injectable for tests."""

    def __init__(self, total: int, what: str, quiet_s: float = 3.0, every_s: float = 10.0,
                 stream: TextIO | None = None, clock: Callable[[], float] = time.perf_counter):
        self.total, self.what = int(total), what
        self.quiet_s, self.every_s = quiet_s, every_s
        self.stream, self.clock = stream, clock
        self.started = self._units_from = clock()
        self._last_print: float | None = None

    def _write(self, line: str) -> None:
        stream = self.stream if self.stream is not None else sys.stderr
        print(line, file=stream, flush=True)

    def elapsed(self) -> float:
        return self.clock() - self.started

    def eta(self, done: int) -> float | None:
        """Seconds left, from the mean time per finished unit; None before the first unit."""
        if done <= 0:
            return None
        return (self.clock() - self._units_from) / done * max(self.total - done, 0)

    def line(self, done: int) -> str:
        eta = self.eta(done)
        tail = "done" if done >= self.total else f"ETA {format_seconds(eta)}" if eta is not None else "ETA ?"
        return f"{self.what}: {done}/{self.total}, elapsed {format_seconds(self.elapsed())}, {tail}"

    def update(self, done: int) -> None:
        now, elapsed = self.clock(), self.elapsed()
        finished = done >= self.total
        if elapsed < self.quiet_s and not (finished and self._last_print is not None):
            return
        if not finished and self._last_print is not None and now - self._last_print < self.every_s:
            return
        self._last_print = now
        self._write(self.line(done))

    def note(self, message: str) -> None:
        self._write(f"{self.what}: {message} (elapsed {format_seconds(self.elapsed())})")

    def begin_units(self) -> None:
        """Estimate from now on: call it when setup (engine builds, warm-up) is over and the counted units begin."""
        self._units_from = self.clock()
