"""Commands on the versions of mlflow.registered_model (with ``auto``, the model of data.dataset): list
them (``models``), move the champion alias by hand (``promote``, ``rollback``)."""

import contextlib
from collections.abc import Iterator
from datetime import datetime
from pathlib import Path
from typing import TYPE_CHECKING, Annotated

import typer
from rich.console import Console
from rich.table import Table

from mnist_vae.bench.report import print_tables
from mnist_vae.cli.common import ParamsOption
from mnist_vae.config import load_params, registered_model

if TYPE_CHECKING:
    from mlflow import MlflowClient


@contextlib.contextmanager
def _registered_model(params: Path, action: str) -> "Iterator[tuple[MlflowClient, str]]":
    """A client of the tracking store and the name of mlflow.registered_model; a server's refusal
    ends in one line saying it could not ``action`` that model."""
    from mlflow import MlflowClient

    from mnist_vae import tracking

    name = registered_model(load_params(params))
    tracking.configure()
    with tracking.server_errors(f"{action} {name!r}"):
        yield MlflowClient(), name


def models(params: ParamsOption = Path("params.yaml")) -> None:
    """List the registered versions of mlflow.registered_model with aliases and test metrics, and
    who moved champion last (the promotion gate, a person or a rollback), when, from which version.

    Example: mnist-vae models
    """
    from mnist_vae.registry import aliases

    with _registered_model(params, "read model") as (client, name):
        rows = aliases.list_versions(client, name)
        move = aliases.last_move(client, name)
    table = Table(title=f"registered model {name} (test metrics in nats/image)")
    table.add_column("version", justify="right", overflow="fold")
    table.add_column("aliases", min_width=9, overflow="fold")
    table.add_column("created", min_width=10, overflow="fold")
    table.add_column("neg_elbo", justify="right", overflow="fold")
    table.add_column("nll_iw", justify="right", overflow="fold")
    table.add_column("preset", overflow="fold")
    table.add_column("protocol", overflow="fold")
    table.add_column("run id", min_width=8, overflow="fold")  # 32 hex digits
    for row in rows:
        created = datetime.fromtimestamp(row.created_ms / 1000).strftime("%Y-%m-%d %H:%M")
        table.add_row(
            row.version,
            ", ".join(row.aliases),
            created,
            row.tags.get("test_neg_elbo", ""),
            row.tags.get("test_nll_iw", ""),
            row.tags.get("preset", ""),
            row.tags.get("protocol", ""),
            row.run_id,
        )
    print_tables([table])
    if move is not None:
        was = f" from version {move.previous}" if move.previous else ""
        back = f" (`mnist-vae rollback` returns to version {move.previous})" if move.previous else ""
        Console().print(f"champion: version {move.version}, moved by {move.by} at {move.at}{was}{back}")


def promote(
    version: Annotated[str, typer.Argument(help="The model version to make champion.", show_default=False)],
    params: ParamsOption = Path("params.yaml"),
) -> None:
    """Point the champion alias at VERSION; `mnist-vae rollback` undoes it.

    Example: mnist-vae promote 3
    """
    from mnist_vae.registry import aliases

    with _registered_model(params, "move aliases of model") as (client, name):
        previous = aliases.promote(client, name, version)
    if previous == version:
        Console().print(f"{name} version {version} is already champion")
    else:
        was = f" (was version {previous})" if previous else ""
        Console().print(f"{name}: champion is version {version}{was}")


def rollback(params: ParamsOption = Path("params.yaml")) -> None:
    """Move the champion alias back to the version it pointed at before its last move, whether the
    promotion gate or a person moved it.

    Example: mnist-vae rollback
    """
    from mnist_vae.registry import aliases

    with _registered_model(params, "move aliases of model") as (client, name):
        version = aliases.rollback(client, name)
    Console().print(f"{name}: champion is back at version {version}")
