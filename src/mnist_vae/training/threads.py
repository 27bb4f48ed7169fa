"""Sharing a machine's cores between trainings that run at the same time.

torch uses every core by default; two trainings on a 2-core machine then fight over both and run
slower together than one after the other (measured in docs/experiments.md). With
``train.threads: auto`` each training registers itself in a folder shared by all processes of this
user and, at every epoch's start, takes its share: ``cores // live trainings``, at least one thread.
A training that started alone thus gives up cores when a second one starts, and takes them back when
it ends.
"""

from __future__ import annotations

import fcntl
import os
import secrets
import stat
import tempfile
from pathlib import Path

import torch

from mnist_vae.errors import UserError

CORES_DIR_ENV = "MNIST_VAE_CORES_DIR"


class CoresRegistryError(UserError):
    """The folder of live trainings is not this user's own, private folder."""


def registry_folder() -> Path:
    """The folder of live trainings: ``$MNIST_VAE_CORES_DIR``, else ``mnist-vae/trainings`` in
    ``$XDG_RUNTIME_DIR`` (a private folder per user, emptied at logout), else
    ``<temp dir>/mnist-vae-<uid>/trainings``.

    The folder above ``trainings`` and ``trainings`` itself are created private (0700) and checked
    before use: owned by this user, not a link, not writable by group or others (0755 passes). In a
    shared temp dir anyone may create that name first; a folder another user controls could hide or
    fake trainings.

    Raises:
        CoresRegistryError: The folder belongs to someone else, is a link, or others may write there.
    """
    given = os.environ.get(CORES_DIR_ENV, "").strip()
    runtime = os.environ.get("XDG_RUNTIME_DIR", "").strip()
    if given:
        base = Path(given)
    elif runtime and Path(runtime).is_dir():
        base = Path(runtime) / "mnist-vae"
    else:
        base = Path(tempfile.gettempdir()) / f"mnist-vae-{os.getuid()}"
    base.mkdir(mode=0o700, parents=True, exist_ok=True)
    _check_private(base)
    folder = base / "trainings"
    folder.mkdir(mode=0o700, exist_ok=True)
    _check_private(folder)
    return folder


def _check_private(folder: Path) -> None:
    info = folder.lstat()
    if stat.S_ISLNK(info.st_mode) or not stat.S_ISDIR(info.st_mode):
        raise CoresRegistryError(
            f"{folder}: expected a folder of live trainings, found a link or a "
            f"file; remove it, or set ${CORES_DIR_ENV} to a private folder"
        )
    if info.st_uid != os.getuid():
        raise CoresRegistryError(
            f"{folder}: expected a folder owned by uid {os.getuid()}, owned by "
            f"uid {info.st_uid}; remove it, or set ${CORES_DIR_ENV} to a "
            "private folder"
        )
    if info.st_mode & 0o022:
        raise CoresRegistryError(
            f"{folder}: others may write there (mode "
            f"{stat.S_IMODE(info.st_mode):o}); expected 0700 or 0755: "
            f"chmod 700 {folder}"
        )


def available_cores() -> int:
    """The cores this process may run on (its affinity mask, as under taskset or a container)."""
    return len(os.sched_getaffinity(0))


class CoreShare:
    """This process's entry among the live trainings; :meth:`threads` is its fair share now.

    An entry is a file that its training holds an exclusive ``flock`` on for as long as it lives:
    the kernel drops the lock when the process dies, SIGKILL included, so an entry whose lock can
    be taken is a dead training's, whatever became of its PID. (``flock`` by hand, not the
    ``filelock`` package: it removes the file on release and may fall back to a lock file's mere
    existence, neither of which says whether a training lives.)
    """

    def __init__(self) -> None:
        self.folder = registry_folder()
        name = f"{os.getpid()}-{secrets.token_hex(4)}"
        self.entry = self.folder / f"{name}.training"
        # Locked under a name no reader looks at, then renamed into view: a reader that found the
        # entry before its lock was taken would count it dead and remove it.
        hidden = self.folder / f"{name}.starting"
        self._fd: int | None = os.open(hidden, os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o600)
        fcntl.flock(self._fd, fcntl.LOCK_EX)
        os.rename(hidden, self.entry)

    def live(self) -> int:
        """How many trainings run now; entries of trainings that died are removed."""
        count = 0
        for entry in self.folder.glob("*.training"):
            if entry == self.entry or _held(entry):
                count += 1
        return max(count, 1)

    def threads(self) -> int:
        return max(1, available_cores() // self.live())

    def close(self) -> None:
        if self._fd is None:
            return
        self.entry.unlink(missing_ok=True)
        os.close(self._fd)  # releases the lock
        self._fd = None


def _held(entry: Path) -> bool:
    """Whether a live training holds ``entry``; a dead training's entry is removed."""
    try:
        fd = os.open(entry, os.O_RDONLY | os.O_NOFOLLOW)
    except (FileNotFoundError, OSError):  # removed meanwhile, or not a plain file of ours
        return False
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        return True
    else:
        entry.unlink(missing_ok=True)  # under its lock: its training is gone
        return False
    finally:
        os.close(fd)


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
