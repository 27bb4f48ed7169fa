"""Writing a file so that no reader ever sees half of it: write a temporary file, then rename.

Every output of the project (dataset, weights, checkpoint, metrics, figures) goes through
:func:`atomic_open`, the figures directly and the rest by way of :func:`atomic_write`. The temporary
file sits beside the target, so the rename stays on one filesystem and is atomic; it is flushed to
disk first, so a power cut leaves the old file or the new one. When the write fails, the temporary
file is removed and the previous file is left as it was.
"""

from __future__ import annotations

import contextlib
import errno
import os
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import BinaryIO

from mnist_vae.errors import UserError

_NO_SPACE = (errno.ENOSPC, errno.EDQUOT)


class DiskFullError(UserError):
    """The filesystem ran out of space (or quota) while writing an output file."""


@contextlib.contextmanager
def atomic_open(path: Path | str, mode: int = 0o644) -> Iterator[BinaryIO]:
    """Yields a binary file to write; on success it replaces ``path``, on failure nothing changes.

    Raises:
        DiskFullError: The disk filled up; the message names ``path``.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp_name = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    tmp = Path(tmp_name)
    try:
        with os.fdopen(fd, "wb") as fh:
            yield fh
            fh.flush()
            os.fsync(fh.fileno())
        tmp.chmod(mode)  # mkstemp makes the file private; outputs are not secret
        os.replace(tmp, path)
    except BaseException as exc:
        tmp.unlink(missing_ok=True)
        if _is_no_space(exc):
            raise DiskFullError(
                f"no space left on the device while writing {path}; "
                f"free some space in {path.parent.resolve()} and run again"
            ) from exc
        raise


def atomic_write(path: Path | str, content: bytes | str | Callable[[BinaryIO], object]) -> Path:
    """Writes ``content`` (bytes, text as UTF-8, or a function that writes to a file) to ``path``."""
    with atomic_open(path) as fh:
        if callable(content):
            content(fh)
        else:
            fh.write(content.encode() if isinstance(content, str) else content)
    return Path(path)


def _is_no_space(exc: BaseException | None) -> bool:
    # torch.save reports a short write as a RuntimeError ("unexpected pos ..."), chaining the
    # OSError of the file object; follow the chain to the errno.
    seen = set()
    while exc is not None and id(exc) not in seen:
        seen.add(id(exc))
        if isinstance(exc, OSError) and exc.errno in _NO_SPACE:
            return True
        exc = exc.__cause__ or exc.__context__
    return False
