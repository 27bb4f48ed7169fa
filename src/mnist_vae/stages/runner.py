"""The command line shared by the stage scripts: ``python pipeline/<stage>.py [--params F] [--set k=v]``.

Failures a user can fix (:class:`~mnist_vae.errors.UserError`) end with one line on stderr and exit
code 1; Ctrl-C ends with exit code 130, and so does SIGTERM while the train stage runs its epochs (at
any other time SIGTERM ends the process at once, as by default); anything else is a bug and keeps its
traceback.
"""

from __future__ import annotations

import argparse
import contextlib
import logging
import sys
from collections.abc import Iterator
from pathlib import Path

from mnist_vae.config import Params, load_params
from mnist_vae.errors import UserError, one_line


def parse_args(stage: str, argv: list[str] | None, description: str | None) -> Params:
    """Reads ``--params`` and ``--set`` and returns the validated params; sets up logging."""
    parser = argparse.ArgumentParser(prog=f"pipeline/{stage}.py", description=description)
    parser.add_argument(
        "--params", type=Path, default=Path("params.yaml"), help="params file (default: params.yaml)"
    )
    parser.add_argument(
        "--set",
        dest="overrides",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="override a param, e.g. --set train.epochs=3 (repeatable)",
    )
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s", datefmt="%H:%M:%S")
    return load_params(args.params, args.overrides)


@contextlib.contextmanager
def reporting(stage: str) -> Iterator[None]:
    """Turns a :class:`UserError` into ``error: <stage>: <one line>`` and exit code 1."""
    try:
        yield
    except UserError as exc:
        print(f"error: {stage}: {one_line(str(exc))}", file=sys.stderr)
        sys.exit(1)
    except KeyboardInterrupt:
        print(
            f"error: {stage}: interrupted; the last finished epoch's checkpoint is kept, run again to resume",
            file=sys.stderr,
        )
        sys.exit(130)
