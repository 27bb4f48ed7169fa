"""Progress of a training: epoch and batch bars on a terminal, one log line per epoch elsewhere."""

from __future__ import annotations

import logging
import sys
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from rich.progress import Progress

log = logging.getLogger(__name__)


def want_progress(progress: bool | None) -> bool:
    return sys.stderr.isatty() if progress is None else progress


class EpochBars:
    """Epoch and batch progress bars on a terminal, one log line per epoch otherwise."""

    def __init__(self, epochs: int, steps: int, enabled: bool, done: int = 0) -> None:
        self.epochs, self.steps, self.enabled, self.done = epochs, steps, enabled, done
        self._progress: Progress | None = None

    def __enter__(self) -> EpochBars:
        if self.enabled:
            from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

            progress = Progress(
                TextColumn("{task.description}"),
                BarColumn(),
                MofNCompleteColumn(),
                TimeRemainingColumn(),
                TextColumn("{task.fields[info]}"),
                transient=False,
            )
            progress.start()
            self._epoch_task = progress.add_task("epochs", total=self.epochs, info="", completed=self.done)
            self._batch_task = progress.add_task("batches", total=self.steps, info="")
            self._progress = progress
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
