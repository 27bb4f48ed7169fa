"""Commands that run the pipeline: its stages (``download``, ``train``, ``run``) and the named profiles
of params (``profile``)."""

from collections.abc import Callable
from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console

from mnist_vae.cli.common import DataOption, ParamsOption, busy, dataset_path, fail
from mnist_vae.cli.evaluation import metrics_table
from mnist_vae.config import Params, load_params
from mnist_vae.paths import Paths

SetOption = Annotated[
    list[str] | None,
    typer.Option(
        "--set",
        metavar="KEY=VALUE",
        help="Override a param for this run, the value read as YAML, e.g. --set train.epochs=3 (repeatable).",
        show_default=False,
    ),
]
ProfileOption = Annotated[
    str | None,
    typer.Option(
        "--profile",
        help="Apply a named profile's overrides first (`mnist-vae profile` lists them); --set still wins.",
        show_default=False,
    ),
]


def _params(path: Path, overrides: list[str] | None, profile: str | None = None) -> Params:
    """The params file with the profile's overrides, then ``--set``'s, applied."""
    if profile is not None:
        from mnist_vae.stages.profiles import PROFILES

        if profile not in PROFILES:
            fail(f"--profile: unknown profile {profile!r}; expected one of {', '.join(PROFILES)}")
        overrides = [*PROFILES[profile], *(overrides or ())]
    return load_params(path, overrides or ())


def download(
    params: ParamsOption = Path("params.yaml"),
    data: DataOption = None,
    overrides: SetOption = None,
) -> None:
    """Fetch data.dataset (MNIST or Fashion-MNIST) from its mirrors in data.mirrors, verify its
    SHA-256 and write one .npz.

    $MNIST_MIRRORS ($FASHION_MNIST_MIRRORS; comma-separated) replaces the configured mirrors.

    Example: mnist-vae download --set data.dataset=fashion-mnist
    """
    from mnist_vae.stages import download as stage

    resolved = _params(params, overrides)
    out = stage.run(resolved, Paths(data=dataset_path(resolved, data)))
    Console().print(f"wrote {out}")


def _training_command(whole: bool, doc: str) -> Callable[..., None]:
    """``train`` (``whole=False``) or ``run``: the same options, the same params; ``run`` also
    downloads a missing dataset, then evaluates and registers."""

    def command(
        params: ParamsOption = Path("params.yaml"),
        data: DataOption = None,
        overrides: SetOption = None,
        profile: ProfileOption = None,
    ) -> None:
        from mnist_vae import tracking
        from mnist_vae.stages import download, evaluate, train

        resolved = _params(params, overrides, profile)
        tracking.configure()  # an unreachable server fails now, not after the download
        data = dataset_path(resolved, data)
        paths = Paths(data=data)
        console = Console()
        if whole and data.is_file():
            console.print(f"dataset {data} present; not downloading (`mnist-vae download` refetches)")
        elif whole:
            download.run(resolved, paths)
        run_id = train.run(resolved, paths)
        if not whole:
            console.print(f"trained: MLflow run {run_id}, weights in {paths.model}")
            return
        with busy("evaluating and registering"):
            evaluation = evaluate.run(resolved, paths)
        console.print(f"test metrics of MLflow run {run_id}:")
        console.print(metrics_table(evaluation))

    command.__doc__ = doc
    return command


train = _training_command(
    whole=False,
    doc="""Train the VAE as the train stage does, logging the run to MLflow.

    Writes models/model.pt, models/run.json and reports/train_history.csv. Trains in this one
    process: train.nproc above 1 is not started under torchrun from here, so for several processes
    run `python pipeline/train.py` (or `dvc repro`).

    Example: mnist-vae train --set train.epochs=3 --set model.latent=16
    """,
)

run = _training_command(
    whole=True,
    doc="""The whole pipeline: download (only when the dataset is missing), train, evaluate, register.

    Trains in this one process, as `train` does. The new model version becomes champion when it
    beats the current one on the validation split (the last 10000 training images when
    train.validation is 0).

    Example: mnist-vae run --set train.epochs=5 --set model.latent=16
    """,
)


def profile(
    name: Annotated[
        str | None, typer.Argument(help="A profile; none lists them all.", show_default=False)
    ] = None,
) -> None:
    """Print a profile's overrides as `dvc exp run` arguments, or list the profiles.

    Example: dvc exp run $(mnist-vae profile burda2015-iwae)
    """
    from mnist_vae.stages.profiles import PROFILES, dvc_arguments

    if name is None:
        for known, items in PROFILES.items():
            typer.echo(f"{known}: {' '.join(items)}")
        return
    if name not in PROFILES:
        fail(f"unknown profile {name!r}; expected one of {', '.join(PROFILES)}")
    typer.echo(dvc_arguments(name))
