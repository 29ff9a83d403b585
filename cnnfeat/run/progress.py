"""Progress of long one-off work: a Rich bar on a terminal, rate/ETA log lines elsewhere.

Under ``nohup``, SLURM or a pipe a transient bar is invisible, so ``task_progress`` writes
``<what>: 12800/60000 (21%), 180 images/s, ETA 0:04:22`` to the ``cnnfeat`` logger every ``every_s`` seconds
(and a last line when the work is done) instead.
"""

from __future__ import annotations

import logging
import sys
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager

log = logging.getLogger("cnnfeat")


def format_eta(seconds: float) -> str:
    """``H:MM:SS`` for a number of seconds (``?`` when unknown)."""
    if seconds != seconds or seconds < 0:  # NaN
        return "?"
    s = round(seconds)
    return f"{s // 3600}:{s % 3600 // 60:02d}:{s % 60:02d}"


class _LogLines:
    """``advance(n)`` that logs rate and ETA at most every ``every_s`` seconds."""

    def __init__(self, what: str, total: int, unit: str, every_s: float) -> None:
        self.what, self.total, self.unit, self.every_s = what, total, unit, every_s
        self.done = 0
        self.start = self.last = time.perf_counter()

    def line(self, now: float) -> str:
        elapsed = max(now - self.start, 1e-9)
        rate = self.done / elapsed
        eta = (self.total - self.done) / rate if rate > 0 else float("nan")
        pct = 100 * self.done / self.total if self.total else 100.0
        return f"{self.what}: {self.done}/{self.total} ({pct:.0f}%), {rate:.1f} {self.unit}/s, ETA {format_eta(eta)}"

    def advance(self, n: int = 1) -> None:
        self.done += n
        now = time.perf_counter()
        if now - self.last >= self.every_s and self.done < self.total:
            self.last = now
            log.info(self.line(now))

    def close(self, failed: bool = False) -> None:
        now = time.perf_counter()
        if failed:
            log.info("%s: stopped after %d/%d %s", self.what, self.done, self.total, self.unit)
        elif now - self.start >= self.every_s:  # short work needs no closing line
            log.info("%s in %s", self.line(now).split(", ETA")[0], format_eta(now - self.start))


@contextmanager
def task_progress(
    what: str, total: int, unit: str = "items", every_s: float = 30.0, terminal: bool | None = None
) -> Iterator[Callable[[int], None]]:
    """Yield ``advance(n)`` for ``total`` units of work: a transient Rich bar on a terminal, else log lines.

    ``terminal`` overrides the check of ``sys.stdout.isatty()`` (tests, or a caller that knows better).
    """
    if terminal is None:
        terminal = sys.stdout.isatty()
    if terminal:
        from rich.progress import Progress

        with Progress(transient=True) as bar:
            task = bar.add_task(what, total=total)
            yield lambda n=1: bar.advance(task, n)
        return
    lines = _LogLines(what, total, unit, every_s)
    log.info("%s: %d %s", what, total, unit)
    try:
        yield lines.advance
    except BaseException:
        lines.close(failed=True)
        raise
    lines.close()
