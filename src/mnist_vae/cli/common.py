"""What the command modules share: the one-line error handling, logging, options, models, spinners.

Commands import torch and mlflow only when they run, so that ``mnist-vae --help`` answers at once.
"""

import functools
import inspect
import logging
import sys
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, NoReturn, ParamSpec, TypeVar

import typer
from rich.console import Console
from rich.status import Status

from mnist_vae.config import Params
from mnist_vae.errors import UserError, one_line

if TYPE_CHECKING:
    from mnist_vae.models.vae import VAE

P = ParamSpec("P")
R = TypeVar("R")

ParamsOption = Annotated[Path, typer.Option("--params", help="Params file, sectioned by stage.")]
DataOption = Annotated[
    Path | None,
    typer.Option(
        "--data",
        help="The dataset .npz that `mnist-vae download` writes. Default: data/<data.dataset>.npz, "
        "the file of the dataset that params.yaml names.",
        show_default=False,
    ),
]
ModelOption = Annotated[
    str | None,
    typer.Option(
        "--model",
        help="Model reference: models:/NAME@ALIAS, models:/NAME/VERSION, runs:/RUN_ID/model or a "
        "weights file such as models/model.pt. Default: the alias champion of the registered model "
        "that mlflow.registered_model in params.yaml names (auto: <data.dataset>-vae).",
        show_default=False,
    ),
]


def reports_errors(command: Callable[P, R]) -> Callable[P, R]:
    """Ends a command's user-fixable failures with ``error: <one line>`` and exit code 1."""

    @functools.wraps(command)
    def wrapper(*args: P.args, **kwargs: P.kwargs) -> R:
        try:
            return command(*args, **kwargs)
        except UserError as exc:
            fail(str(exc))

    return wrapper


def fail(message: str) -> NoReturn:
    """Ends the command with ``error: <message on one line>`` on stderr and exit code 1."""
    # typer.echo, not rich: rich would wrap a long message over several lines.
    typer.echo(f"error: {one_line(message)}", err=True)
    raise typer.Exit(code=1)


def setup_logging() -> None:
    """Shows the library's progress lines (one per epoch when stderr is not a terminal).

    Like ``logging.basicConfig``, it leaves alone a process whose logging is already set up (an
    embedding program, pytest), and it touches only this package's logger, not MLflow's.
    """
    from rich.logging import RichHandler

    logger = logging.getLogger("mnist_vae")
    if logging.getLogger().handlers or logger.handlers:
        return
    if sys.stderr.isatty():
        logger.addHandler(RichHandler(console=Console(stderr=True), show_time=False, show_path=False))
    else:
        # A log file or a pipe: one message per line, never wrapped at rich's assumed 80 columns.
        handler = logging.StreamHandler()
        handler.setFormatter(logging.Formatter("%(levelname)s %(message)s"))
        logger.addHandler(handler)
    logger.setLevel(logging.INFO)


def help_text(doc: str | None) -> str:
    """A command's docstring as the paragraphs that ``--help`` wraps to the terminal's width.

    Lines of one paragraph are joined: the docstring's own line breaks (written for the source
    file's width) would otherwise be kept and wrapped again, leaving ragged lines. A paragraph
    whose lines are indented (an example, a list) keeps its breaks.
    """
    paragraphs = inspect.cleandoc(doc or "").split("\n\n")
    return "\n\n".join(
        p if any(line.startswith((" ", "-", "*")) for line in p.splitlines()) else " ".join(p.split())
        for p in paragraphs
    )


def busy(message: str) -> Status:
    """A spinner on stderr for work that takes seconds (nothing is drawn off a terminal)."""
    return Console(stderr=True).status(message)


def load_model(reference: str) -> "VAE":
    """The model behind a registry reference, a run's model or a weights file."""
    from mnist_vae import tracking
    from mnist_vae.registry.references import in_mlflow, load_vae

    # A local weights file needs no tracking store, so a server that is down must not stop it.
    if in_mlflow(reference):
        tracking.configure()
    with busy(f"loading {reference}"):
        return load_vae(reference)


def default_model(params: Params, reference: str | None) -> str:
    """``reference``, else the champion of mlflow.registered_model (the dataset's own with auto)."""
    from mnist_vae.config import registered_model
    from mnist_vae.registry.aliases import CHAMPION

    return reference or f"models:/{registered_model(params)}@{CHAMPION}"


def dataset_path(params: Params, data: Path | None) -> Path:
    """``--data``, else the file of the dataset that params.yaml names (data/<data.dataset>.npz)."""
    from mnist_vae.paths import dataset_file

    return data if data is not None else dataset_file(params.data.dataset)
