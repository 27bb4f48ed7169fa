"""The base class of failures a user can fix.

Each module defines its own subclasses where it raises them (``ConfigError`` in ``config``,
``DownloadError`` in ``fetch``...). The stage scripts, the CLI and MLproject turn exactly these into one
line on stderr and exit code 1; every other exception is a bug and keeps its traceback.
"""

from __future__ import annotations


class UserError(Exception):
    """Something the user can fix: bad params, missing data, an unknown model, a full disk..."""
