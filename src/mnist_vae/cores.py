"""Sharing a machine's cores between trainings that run at the same time.

torch uses every core by default; two trainings on a 2-core machine then fight over both and run
slower together than one after the other (measured in README, "Many experiments"). With
``train.threads: auto`` each training registers itself in a folder shared by all processes of this
user and, at every epoch's start, takes its share: ``cores // live trainings``, at least one thread.
A training that started alone thus gives up cores when a second one starts, and takes them back when
it ends.
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

import torch


def _registry() -> Path:
    folder = Path(os.environ.get("MNIST_VAE_CORES_DIR")
                  or Path(tempfile.gettempdir()) / f"mnist-vae-{os.getuid()}" / "trainings")
    folder.mkdir(parents=True, exist_ok=True)
    return folder


def available_cores() -> int:
    """The cores this process may run on (its affinity mask, as under taskset or a container)."""
    return len(os.sched_getaffinity(0))


class CoreShare:
    """This process's entry among the live trainings; :meth:`threads` is its fair share now."""

    def __init__(self) -> None:
        self.folder = _registry()
        self.entry = self.folder / str(os.getpid())
        self.entry.touch()

    def live(self) -> int:
        """How many trainings run now; entries of processes that died are removed."""
        count = 0
        for entry in self.folder.iterdir():
            if not entry.name.isdigit():
                continue
            try:
                os.kill(int(entry.name), 0)
            except ProcessLookupError:
                entry.unlink(missing_ok=True)
                continue
            except PermissionError:  # alive, another user's
                pass
            count += 1
        return max(count, 1)

    def threads(self) -> int:
        return max(1, available_cores() // self.live())

    def close(self) -> None:
        self.entry.unlink(missing_ok=True)


class Threads:
    """``train.threads``: a fixed count (0: torch's default), or ``auto`` through :class:`CoreShare`."""

    def __init__(self, setting: int | str) -> None:
        self.share = CoreShare() if setting == "auto" else None
        if isinstance(setting, int) and setting > 0:
            torch.set_num_threads(setting)

    def update(self) -> int:
        """Applies the current share (auto); returns the threads torch uses now."""
        if self.share is not None:
            wanted = self.share.threads()
            if wanted != torch.get_num_threads():
                torch.set_num_threads(wanted)
        return torch.get_num_threads()

    def close(self) -> None:
        if self.share is not None:
            self.share.close()
