"""Progress of long work: rich bars on stderr at a terminal, log lines elsewhere.

One place makes the bars (:func:`bars`); :class:`EpochBars` (a training: epochs and batches, one
log line per epoch off a terminal) and :class:`CountBar` (images evaluated, a log line a minute
off a terminal) are its two users, and the download's byte counters the third.
"""

from __future__ import annotations

import logging
import sys
import time
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from rich.progress import Progress, ProgressColumn

log = logging.getLogger(__name__)

# Off a terminal, a long count says how far it is at most this often (seconds).
LOG_EVERY = 60.0


def want_progress(progress: bool | None) -> bool:
    """Whether to draw bars: ``progress`` itself, or None for "when stderr is a terminal"."""
    return sys.stderr.isatty() if progress is None else progress


def bars(*middle: ProgressColumn, transient: bool = True, info: bool = False) -> Progress:
    """A started rich display on stderr: each task's description, its bar, then ``middle`` (the
    count by default) and the time left, then the task's ``info`` field when ``info`` is set."""
    from rich.console import Console
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

    columns = [TextColumn("{task.description}"), BarColumn(), *(middle or (MofNCompleteColumn(),))]
    columns.append(TimeRemainingColumn())
    if info:
        columns.append(TextColumn("{task.fields[info]}"))
    display = Progress(*columns, console=Console(stderr=True), transient=transient)
    display.start()
    return display


class EpochBars:
    """Epoch and batch bars on a terminal, one log line per epoch otherwise."""

    def __init__(self, epochs: int, steps: int, enabled: bool, done: int = 0) -> None:
        self.epochs, self.steps, self.enabled, self.done = epochs, steps, enabled, done
        self._progress: Progress | None = None

    def __enter__(self) -> EpochBars:
        if self.enabled:
            self._progress = bars(transient=False, info=True)
            self._epoch_task = self._progress.add_task(
                "epochs", total=self.epochs, info="", completed=self.done
            )
            self._batch_task = self._progress.add_task("batches", total=self.steps, info="")
        return self

    def __exit__(self, *exc: object) -> None:
        if self._progress is not None:
            self._progress.stop()

    def advance_batch(self) -> None:
        if self._progress is not None:
            self._progress.advance(self._batch_task)

    def end_epoch(self, summary: str, loss: float) -> None:
        """Closes an epoch: ``summary`` is its one line, ``loss`` shown beside the epochs' bar."""
        if self._progress is None:
            log.info(summary)
            return
        self._progress.update(self._epoch_task, advance=1, info=f"loss {loss:.4f}")
        self._progress.reset(self._batch_task, total=self.steps, info="")
        self._progress.console.log(summary)


class CountBar:
    """How far a count of ``what`` is: a bar on a terminal, a log line a minute elsewhere.

    An evaluation with many importance samples takes an hour on a CPU, so it must not be silent;
    one that takes seconds logs nothing off a terminal.
    """

    def __init__(self, what: str, total: int, progress: bool | None) -> None:
        """``progress``: True draws the bar; None draws it on a terminal and logs elsewhere; False
        neither."""
        self.what, self.total, self.done = what, total, 0
        self.bar = want_progress(progress)
        self.logs = progress is None and not self.bar
        self._progress: Progress | None = None

    def __enter__(self) -> CountBar:
        self._start = self._logged = time.monotonic()
        if self.bar:
            self._progress = bars()
            self._task = self._progress.add_task(self.what, total=self.total)
        return self

    def __exit__(self, *exc: object) -> None:
        if self._progress is not None:
            self._progress.stop()

    def advance(self, count: int) -> None:
        self.done += count
        if self._progress is not None:
            self._progress.advance(self._task, count)
            return
        now = time.monotonic()
        if self.logs and self.done < self.total and now - self._logged >= LOG_EVERY:
            self._logged = now
            left = (now - self._start) * (self.total - self.done) / self.done
            log.info("%s: %d/%d, about %s left", self.what, self.done, self.total, duration(left))


def duration(seconds: float) -> str:
    """``3 min 7 s``, or ``42 s`` under a minute."""
    minutes, secs = divmod(round(seconds), 60)
    return f"{minutes} min {secs} s" if minutes else f"{secs} s"
