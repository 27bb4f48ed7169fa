"""The base class of failures a user can fix, and the one line an exception is reported by.

Each module defines its own subclasses where it raises them (``ConfigError`` in ``config``,
``DownloadError`` in ``fetch``...). The stage scripts, the CLI and MLproject turn exactly these into one
line on stderr and exit code 1; every other exception is a bug and keeps its traceback.
"""

from __future__ import annotations


class UserError(Exception):
    """Something the user can fix: bad params, missing data, an unknown model, a full disk..."""


def first_line(exc: BaseException, *, limit: int | None = None, with_type: bool = False) -> str:
    """The first line of ``exc``'s message, for an error or warning of one line.

    A message-less exception is named by its class. ``limit`` cuts the line to that many characters
    (a server may answer with a page of HTML); ``with_type`` puts the class name first, where the
    message alone does not say what failed (``ReadTimeout: ...``).
    """
    text = str(exc).strip()
    if not text:
        return type(exc).__name__
    line = text.splitlines()[0]
    if limit is not None:
        line = line[:limit]
    return f"{type(exc).__name__}: {line}" if with_type else line


def one_line(message: str) -> str:
    """A multi-line message (a download's per-mirror reasons) joined into one line."""
    return "; ".join(part.strip() for part in message.strip().splitlines() if part.strip()).replace(":;", ":")
