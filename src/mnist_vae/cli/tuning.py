"""``tune``: the hyperparameter search, trials as MLflow child runs."""

from pathlib import Path
from typing import Annotated

import typer

from mnist_vae.cli.common import DataOption, ParamsOption, dataset_path
from mnist_vae.cli.pipeline import SetOption
from mnist_vae.config import load_params


def tune(
    trials: Annotated[
        int,
        typer.Option(
            "--trials", min=1, help="Trials in the study, in total over every process that works on it."
        ),
    ] = 20,
    jobs: Annotated[
        int,
        typer.Option(
            "--jobs",
            min=1,
            help="Trials at once on this machine (processes; train.threads auto shares the cores).",
        ),
    ] = 1,
    space: Annotated[Path, typer.Option("--space", help="The search space file.")] = Path(
        "search_space.yaml"
    ),
    storage: Annotated[
        str | None,
        typer.Option(
            "--storage",
            help="Optuna storage URL shared by several machines, e.g. "
            "postgresql+psycopg://user@host/optuna. Better: set it in $MNIST_VAE_TUNE_STORAGE, so that a "
            "password is not on the command line. Default: that variable, else the journal file "
            ".tune/STUDY.journal (this machine's processes).",
            show_default=False,
        ),
    ] = None,
    study: Annotated[
        str, typer.Option("--study", help="Study name; an existing study is continued.")
    ] = "mnist-vae",
    params: ParamsOption = Path("params.yaml"),
    data: DataOption = None,
    overrides: SetOption = None,
) -> None:
    """Search hyperparameters with Optuna (TPE, pruning on the validation negative ELBO).

    Each trial is an MLflow child run of one parent run; the best trial is printed as `dvc exp run`
    arguments, to reproduce and commit it through the pipeline.

    Example: mnist-vae tune --trials 20 --jobs 2 --set train.limit=20000
    """
    from mnist_vae.tuning.search import TuneSettings
    from mnist_vae.tuning.search import tune as run_search

    settings = TuneSettings(
        space_file=space,
        params_file=params,
        data=dataset_path(load_params(params, overrides or ()), data),
        trials=trials,
        jobs=jobs,
        storage=storage,
        study=study,
        overrides=tuple(overrides or ()),
    )
    result = run_search(settings)
    typer.echo(
        f"study {study}: {result.trials} trials ({result.pruned} pruned, {result.failed} failed), "
        f"MLflow parent run {result.parent_run_id}"
    )
    typer.echo(
        f"best validation neg. ELBO {result.best_value:.2f} with "
        + ", ".join(f"{k}={v}" for k, v in result.best_params.items())
    )
    typer.echo(f"reproduce: dvc exp run {result.dvc_args}")
