"""The ``stack`` command: the team's servers (PostgreSQL, S3, MLflow) on this machine until Ctrl-C."""

from pathlib import Path
from typing import Annotated

import typer


def stack(
    workdir: Annotated[
        Path | None,
        typer.Option(
            "--workdir",
            help="Keep the servers' logs and data here (default: a temporary folder, removed at the end).",
            show_default=False,
        ),
    ] = None,
) -> None:
    """Start the team's stack on 127.0.0.1 until Ctrl-C: PostgreSQL, an S3 endpoint (moto) with a
    bucket, and an MLflow server with basic auth storing runs in PostgreSQL and artifacts in S3.

    Prints the variables to export (the admin password among them) for the pipeline and the CLI
    to use it. Everything stops, and nothing is left running, when it ends.

    Example: mnist-vae stack --workdir .stack
    """
    from mnist_vae.stack import serve_forever

    serve_forever(workdir)
