"""The ``mnist-vae`` command line: one thin command per library function.

Pipeline commands (``download``, ``train``, ``run``) call :mod:`mnist_vae.stages`, the same functions
that ``dvc repro`` and ``MLproject`` run. The others load a model through
:func:`mnist_vae.registry.load_vae` and call :mod:`mnist_vae.evaluate`, :mod:`mnist_vae.preprocess`
or :mod:`mnist_vae.aliases`. Failures a user can fix end with one line ``error: ...`` on stderr and
exit code 1, never a traceback.
"""

import functools
import json
import logging
import math
from collections.abc import Callable
from datetime import datetime
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any, NoReturn, ParamSpec, TypeVar

import typer
from rich.console import Console
from rich.table import Table

from mnist_vae.config import EvaluateConfig, Params, load_params
from mnist_vae.errors import UserError
from mnist_vae.paths import Paths
from mnist_vae.runner import one_line

if TYPE_CHECKING:  # torch and mlflow take seconds to import: commands import them when they run,
    # so that `mnist-vae --help` answers at once.
    from mnist_vae.evaluate import Evaluation
    from mnist_vae.model import VAE

P = ParamSpec("P")
R = TypeVar("R")

app = typer.Typer(
    name="mnist-vae",
    help="Train, evaluate and use a variational autoencoder on MNIST, tracked with MLflow.\n\n"
    "Example: mnist-vae run --set train.epochs=5",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_show_locals=False,
)

# (unit, whether lower is better) of the metrics that evaluate_model reports.
_METRICS: dict[str, tuple[str, bool]] = {
    "neg_elbo": ("nats/image", True),
    "recon_bce": ("nats/image", True),
    "kl": ("nats/image", True),
    "recon_mse": ("per pixel", True),
    "psnr": ("dB", False),
    "nll_iw": ("nats/image", True),
    "nll_iw_se": ("nats/image", True),
    "loss_tutorial": ("per pixel", True),
}

ParamsOption = Annotated[
    Path, typer.Option("--params", help="Params file, sectioned by stage.")
]
DataOption = Annotated[
    Path, typer.Option("--data", help="The MNIST .npz that `mnist-vae download` writes.")
]
SetOption = Annotated[
    list[str] | None,
    typer.Option(
        "--set",
        metavar="KEY=VALUE",
        help="Override a param for this run, the value read as YAML, e.g. --set train.epochs=3 "
        "(repeatable).",
        show_default=False,
    ),
]
ProfileOption = Annotated[
    str | None,
    typer.Option("--profile", help="Apply a named profile's overrides first (`mnist-vae profile` "
                 "lists them); --set still wins.", show_default=False),
]
ModelOption = Annotated[
    str | None,
    typer.Option(
        "--model",
        help="Model reference: models:/NAME@ALIAS, models:/NAME/VERSION, runs:/RUN_ID/model or a "
        "weights file such as models/model.pt. Default: the champion of mlflow.registered_model "
        "(models:/mnist-vae@champion).",
        show_default=False,
    ),
]
LimitOption = Annotated[
    int | None,
    typer.Option("--limit", help="Evaluate on the first N selected test images (0: all). "
                 "Default: evaluate.limit.", show_default=False),
]
DigitsOption = Annotated[
    str | None,
    typer.Option("--digits", help="Only these digits, comma-separated, e.g. 3,8.", show_default=False),
]
IwOption = Annotated[
    int | None,
    typer.Option("--iw-samples", help="Importance samples K of the log-likelihood estimate nll_iw. "
                 "Default: evaluate.iw_samples.", show_default=False),
]


def _reports_errors(command: Callable[P, R]) -> Callable[P, R]:
    """Ends a command's user-fixable failures with ``error: <one line>`` and exit code 1."""

    @functools.wraps(command)
    def wrapper(*args: P.args, **kwargs: P.kwargs) -> R:
        try:
            return command(*args, **kwargs)
        except UserError as exc:
            _fail(str(exc))

    return wrapper


def _fail(message: str) -> NoReturn:
    # typer.echo, not rich: rich would wrap a long message over several lines.
    typer.echo(f"error: {one_line(message)}", err=True)
    raise typer.Exit(code=1)


def _setup_logging() -> None:
    """Shows the library's progress lines (one per epoch when stderr is not a terminal).

    Like ``logging.basicConfig``, it leaves alone a process whose logging is already set up (an
    embedding program, pytest), and it touches only this package's logger, not MLflow's.
    """
    from rich.logging import RichHandler

    logger = logging.getLogger("mnist_vae")
    if logging.getLogger().handlers or logger.handlers:
        return
    logger.addHandler(RichHandler(console=Console(stderr=True), show_time=False, show_path=False))
    logger.setLevel(logging.INFO)


def _params(path: Path, overrides: list[str] | None = None, profile: str | None = None) -> Params:
    if profile is not None:
        from mnist_vae.profiles import PROFILES

        if profile not in PROFILES:
            _fail(f"--profile: unknown profile {profile!r}; expected one of {', '.join(PROFILES)}")
        overrides = [*PROFILES[profile], *(overrides or ())]
    return load_params(path, overrides or ())


def _busy(message: str):
    """A spinner on stderr for work that takes seconds (nothing is drawn off a terminal)."""
    return Console(stderr=True).status(message)


def _load_model(reference: str) -> "VAE":
    from mnist_vae import registry, tracking

    # A local weights file needs no tracking store, so a server that is down must not stop it; this
    # mirrors how load_vae tells references apart.
    if "://" in reference or reference.startswith(("models:/", "runs:/")):
        tracking.configure()
    with _busy(f"loading {reference}"):
        return registry.load_vae(reference)


def _client() -> Any:
    from mlflow import MlflowClient

    return MlflowClient()


def _default_model(params: Params, reference: str | None) -> str:
    from mnist_vae.registry import CHAMPION

    return reference or f"models:/{params.mlflow.registered_model}@{CHAMPION}"


def _parse_digits(text: str | None) -> list[int] | None:
    if text is None:
        return None
    parts = [p.strip() for p in text.split(",") if p.strip()]
    if not parts or not all(p.isdigit() and int(p) <= 9 for p in parts):
        _fail(f"--digits: expected comma-separated digits 0-9 such as 3,8, got {text!r}")
    return sorted({int(p) for p in parts})


def _evaluate_config(params: Params, limit: int | None, iw_samples: int | None) -> EvaluateConfig:
    """``evaluate`` of params.yaml with the command-line values; validated like the file."""
    changes = {"limit": limit, "iw_samples": iw_samples}
    return params.evaluate.replace(**{k: v for k, v in changes.items() if v is not None})


def _fmt(value: float) -> str:
    return f"{value:.4f}" if abs(value) < 1000 else f"{value:.1f}"


def _signed(value: float, lower_is_better: bool) -> str:
    if value == 0 or not math.isfinite(value):
        return _fmt(value)
    better = (value < 0) == lower_is_better
    return f"[{'green' if better else 'red'}]{value:+.4f}[/]"


def _metrics_table(evaluation: "Evaluation") -> Table:
    table = Table()
    table.add_column("metric")
    table.add_column("value", justify="right")
    table.add_column("unit")
    for name, value in evaluation.metrics.items():
        table.add_row(name, _fmt(value), _METRICS.get(name, ("", True))[0])
    return table


def _digits_table(evaluation: "Evaluation", counts: dict[int, int]) -> Table:
    hardest = evaluation.hardest_digits[:1]
    table = Table(title="reconstruction MSE per digit (posterior mean)")
    table.add_column("digit", justify="right")
    table.add_column("images", justify="right")
    table.add_column("MSE", justify="right")
    for digit, mse in sorted(evaluation.per_digit_mse.items()):
        mark = " (hardest)" if digit in hardest else ""
        table.add_row(str(digit), str(counts.get(digit, 0)), f"{mse:.5f}{mark}")
    return table


def _test_split(data: Path, limit: int, digits: list[int] | None):
    from mnist_vae.data import load_mnist
    from mnist_vae.evaluate import select

    mnist = load_mnist(data)
    return select(mnist.x_test, mnist.y_test, limit, digits)


def _counts(labels) -> dict[int, int]:
    import numpy as np

    return {d: int(c) for d, c in enumerate(np.bincount(labels, minlength=10)) if c}


@app.callback()
def _main() -> None:
    _setup_logging()


@app.command()
@_reports_errors
def download(
    params: ParamsOption = Path("params.yaml"),
    data: DataOption = Path("data/mnist.npz"),
    overrides: SetOption = None,
) -> None:
    """Fetch MNIST from the mirrors in data.mirrors, verify its SHA-256 and write one .npz.

    $MNIST_MIRRORS (comma-separated) replaces the configured mirrors.

    Example: mnist-vae download --data data/mnist.npz
    """
    from mnist_vae.stages import download as stage

    out = stage.run(_params(params, overrides), Paths(data=data))
    Console().print(f"wrote {out}")


@app.command()
@_reports_errors
def train(
    params: ParamsOption = Path("params.yaml"),
    data: DataOption = Path("data/mnist.npz"),
    overrides: SetOption = None,
    profile: ProfileOption = None,
) -> None:
    """Train the VAE as the train stage does, logging the run to MLflow.

    Writes models/model.pt, models/run.json and reports/train_history.csv.

    Example: mnist-vae train --set train.epochs=3 --set model.latent=16
    """
    from mnist_vae import tracking
    from mnist_vae.stages import train as stage

    resolved = _params(params, overrides, profile)
    tracking.configure()
    run_id = stage.run(resolved, Paths(data=data))
    Console().print(f"trained: MLflow run {run_id}, weights in {Paths().model}")


@app.command()
@_reports_errors
def run(
    params: ParamsOption = Path("params.yaml"),
    data: DataOption = Path("data/mnist.npz"),
    overrides: SetOption = None,
    profile: ProfileOption = None,
) -> None:
    """The whole pipeline: download (only when the dataset is missing), train, evaluate, register.

    The new model version becomes champion when it beats the current one on the test set.

    Example: mnist-vae run --set train.epochs=5 --set model.hidden=[256,128]
    """
    from mnist_vae import tracking
    from mnist_vae.stages import download, evaluate, train

    resolved = _params(params, overrides, profile)
    tracking.configure()  # an unreachable server fails now, not after the download
    paths = Paths(data=data)
    console = Console()
    if data.is_file():
        console.print(f"dataset {data} present; not downloading (`mnist-vae download` refetches)")
    else:
        download.run(resolved, paths)
    run_id = train.run(resolved, paths)
    with _busy("evaluating and registering"):
        evaluation = evaluate.run(resolved, paths)
    console.print(f"test metrics of MLflow run {run_id}:")
    console.print(_metrics_table(evaluation))


@app.command()
@_reports_errors
def evaluate(
    model: Annotated[str, typer.Argument(
        help="models:/NAME@ALIAS, models:/NAME/VERSION, runs:/RUN_ID/model or a weights file.",
        show_default=False)],
    params: ParamsOption = Path("params.yaml"),
    data: DataOption = Path("data/mnist.npz"),
    limit: LimitOption = None,
    digits: DigitsOption = None,
    iw_samples: IwOption = None,
    out: Annotated[Path | None, typer.Option(
        "--out", "-o", help="Also write metrics.json and the figures (PNG) into this folder.",
        show_default=False)] = None,
) -> None:
    """Measure a model on the MNIST test set: negative ELBO, IW log-likelihood, MSE, per digit.

    Example: mnist-vae evaluate models:/mnist-vae@champion --digits 3,8 --out reports/champion
    """
    from mnist_vae.evaluate import evaluate_model, write_figures

    resolved = _params(params)
    chosen = _parse_digits(digits)
    cfg = _evaluate_config(resolved, limit, iw_samples)
    images, labels = _test_split(data, cfg.limit, chosen)
    vae = _load_model(model)
    with _busy(f"evaluating on {len(images)} test images"):
        evaluation = evaluate_model(vae, images, labels, cfg)
    console = Console()
    console.print(f"{model} on {evaluation.n_images} test images:", highlight=False)
    console.print(_metrics_table(evaluation))
    console.print(_digits_table(evaluation, _counts(labels)))
    if out is not None:
        out.mkdir(parents=True, exist_ok=True)
        (out / "metrics.json").write_text(json.dumps(evaluation.to_json(), indent=2) + "\n")
        with _busy("drawing figures"):
            figures = write_figures(vae, images, out, n=cfg.n_images, seed=cfg.seed, labels=labels)
        console.print(f"wrote {out / 'metrics.json'}, " + ", ".join(str(f) for f in figures))


@app.command()
@_reports_errors
def compare(
    model_a: Annotated[str, typer.Argument(help="The baseline model reference.", show_default=False)],
    model_b: Annotated[str, typer.Argument(help="The model compared with it.", show_default=False)],
    params: ParamsOption = Path("params.yaml"),
    data: DataOption = Path("data/mnist.npz"),
    limit: LimitOption = None,
    digits: DigitsOption = None,
    iw_samples: IwOption = None,
) -> None:
    """Evaluate two models on the same images with the same random draws; show B - A.

    Green differences are improvements of B over A.

    Example: mnist-vae compare models:/mnist-vae/1 models:/mnist-vae@champion
    """
    from mnist_vae.evaluate import evaluate_model

    resolved = _params(params)
    chosen = _parse_digits(digits)
    cfg = _evaluate_config(resolved, limit, iw_samples)
    images, labels = _test_split(data, cfg.limit, chosen)
    results = []
    for reference in (model_a, model_b):
        vae = _load_model(reference)
        with _busy(f"evaluating {reference} on {len(images)} test images"):
            # evaluate_model reseeds torch from cfg.seed, so both models see the same draws.
            results.append(evaluate_model(vae, images, labels, cfg))
    a, b = results

    metrics = Table()
    for name, justify in (("metric", "left"), ("A", "right"), ("B", "right"), ("B - A", "right"),
                          ("unit", "left")):
        metrics.add_column(name, justify=justify)
    for name, value_a in a.metrics.items():
        unit, lower_is_better = _METRICS.get(name, ("", True))
        value_b = b.metrics[name]
        metrics.add_row(name, _fmt(value_a), _fmt(value_b), _signed(value_b - value_a, lower_is_better),
                        unit)

    per_digit = Table(title="reconstruction MSE per digit")
    for name in ("digit", "images", "A", "B", "B - A"):
        per_digit.add_column(name, justify="right")
    counts = _counts(labels)
    for digit, mse_a in sorted(a.per_digit_mse.items()):
        mse_b = b.per_digit_mse[digit]
        per_digit.add_row(str(digit), str(counts.get(digit, 0)), f"{mse_a:.5f}", f"{mse_b:.5f}",
                          _signed(mse_b - mse_a, lower_is_better=True))
    console = Console()
    console.print(f"A = {model_a}\nB = {model_b}\non the same {a.n_images} test images:",
                  highlight=False)
    console.print(metrics)
    console.print(per_digit)


@app.command()
@_reports_errors
def reconstruct(
    images: Annotated[list[Path], typer.Argument(
        help="PNG or JPEG pictures of single digits, any size.", metavar="IMAGE",
        show_default=False)],
    model: ModelOption = None,
    out: Annotated[Path, typer.Option("--out", "-o", help="The PNG to write.")] = Path(
        "reconstructions.png"),
    params: ParamsOption = Path("params.yaml"),
) -> None:
    """Reconstruct your own digit pictures: prepared inputs on the top row, reconstructions below.

    Each picture is prepared as MNIST's digits were made:

    - converted to grey, transparent pixels counting as white paper;
    - inverted when its border is light, since MNIST is a white digit on black;
    - cropped to the bounding box of the ink, faint background noise dropped;
    - scaled so that its longer side is 20 pixels, aspect ratio kept;
    - placed in a 28x28 field with its centre of mass at the centre.

    Example: mnist-vae reconstruct my_seven.png my_three.jpg -o mine.png
    """
    import numpy as np

    from mnist_vae.evaluate import reconstruct as decode_means
    from mnist_vae.images import image_grid, write_png
    from mnist_vae.preprocess import load_digit

    # Read the pictures first: a bad file fails before the slow model download.
    prepared = np.stack([load_digit(path) for path in images])
    vae = _load_model(_default_model(_params(params), model))
    recon = decode_means(vae, prepared)
    columns = len(prepared)
    written = write_png(out, image_grid(prepared / 255.0, columns=columns),
                        image_grid(recon, columns=columns))
    Console().print(f"wrote {written}")


@app.command()
@_reports_errors
def sample(
    number: Annotated[int, typer.Option("--number", "-n", help="How many digits to draw.")] = 64,
    out: Annotated[Path, typer.Option("--out", "-o", help="The PNG to write.")] = Path("samples.png"),
    model: ModelOption = None,
    seed: Annotated[int, typer.Option("--seed", help="Seed of the prior draws.")] = 0,
    params: ParamsOption = Path("params.yaml"),
) -> None:
    """Decode draws from the prior N(0, I) into a grid of new digits.

    Example: mnist-vae sample -n 64 -o grid.png --seed 1
    """
    from mnist_vae.evaluate import sample as draw
    from mnist_vae.images import image_grid, write_png

    if number < 1:
        _fail(f"--number: expected at least 1 image, got {number}")
    vae = _load_model(_default_model(_params(params), model))
    images = draw(vae, number, seed=seed)
    written = write_png(out, image_grid(images, columns=math.ceil(math.sqrt(number))))
    Console().print(f"wrote {written}")


@app.command()
@_reports_errors
def models(params: ParamsOption = Path("params.yaml")) -> None:
    """List the registered versions of mlflow.registered_model with aliases and test metrics.

    Example: mnist-vae models
    """
    from mnist_vae import aliases, tracking

    name = _params(params).mlflow.registered_model
    tracking.configure()
    with tracking.server_errors(f"read model {name!r}"):
        rows = aliases.list_versions(_client(), name)
    table = Table(title=f"registered model {name} (test metrics in nats/image)")
    table.add_column("version", justify="right", no_wrap=True)
    table.add_column("aliases", min_width=9)
    table.add_column("created", min_width=10)
    table.add_column("neg_elbo", justify="right", no_wrap=True)
    table.add_column("nll_iw", justify="right", no_wrap=True)
    table.add_column("preset", no_wrap=True)
    table.add_column("run id", min_width=8, overflow="fold")  # 32 hex digits
    for row in rows:
        created = datetime.fromtimestamp(row.created_ms / 1000).strftime("%Y-%m-%d %H:%M")
        table.add_row(row.version, ", ".join(row.aliases), created,
                      row.tags.get("test_neg_elbo", ""), row.tags.get("test_nll_iw", ""),
                      row.tags.get("preset", ""), row.run_id)
    Console().print(table)


@app.command()
@_reports_errors
def promote(
    version: Annotated[str, typer.Argument(help="The model version to make champion.",
                                           show_default=False)],
    params: ParamsOption = Path("params.yaml"),
) -> None:
    """Point the champion alias at VERSION; `mnist-vae rollback` undoes it.

    Example: mnist-vae promote 3
    """
    from mnist_vae import aliases, tracking

    name = _params(params).mlflow.registered_model
    tracking.configure()
    with tracking.server_errors(f"move aliases of model {name!r}"):
        previous = aliases.promote(_client(), name, version)
    if previous == version:
        Console().print(f"{name} version {version} is already champion")
    else:
        was = f" (was version {previous})" if previous else ""
        Console().print(f"{name}: champion is version {version}{was}")


@app.command()
@_reports_errors
def rollback(params: ParamsOption = Path("params.yaml")) -> None:
    """Move the champion alias back to the version it pointed at before the last promote.

    Example: mnist-vae rollback
    """
    from mnist_vae import aliases, tracking

    name = _params(params).mlflow.registered_model
    tracking.configure()
    with tracking.server_errors(f"move aliases of model {name!r}"):
        version = aliases.rollback(_client(), name)
    Console().print(f"{name}: champion is back at version {version}")


@app.command()
@_reports_errors
def bench(
    data: DataOption = Path("data/mnist.npz"),
    out: Annotated[Path, typer.Option("--out", "-o", help="The JSON to write.")] = Path(
        "reports/bench.json"),
    device: Annotated[str, typer.Option("--device", help="auto | cpu | cuda.")] = "auto",
    chunk: Annotated[int, typer.Option(
        "--chunk", help="Training samples per timed window; rows (a)-(c) time 3 windows after one "
        "warm-up window.")] = 20_000,
    target: Annotated[float, typer.Option(
        "--target", help="Row (d): the test negative ELBO (nats/image) to reach.")] = 100.0,
    max_epochs: Annotated[int, typer.Option(
        "--max-epochs", help="Row (d): give up after this many epochs.")] = 30,
    no_mlflow: Annotated[bool, typer.Option(
        "--no-mlflow", help="Do not log the result to the MLflow experiment mnist-vae-bench.")] = False,
) -> None:
    """Measure training speed against the tutorial's loop, side by side on this machine.

    Rows: (a) the tutorial's loop (torchvision MNIST, ToTensor, DataLoader, batch 32); (b) this
    trainer, seed preset, batch 32; (b2) the same with torch.compile; (c) this trainer at its
    fastest settings; (d) each preset's (mlp, conv) training time to a test negative ELBO. Prints
    a table with each row's ratio to (a), writes JSON and logs an MLflow run. About ten minutes on
    a 2-core CPU.

    Example: mnist-vae bench --device cpu --out reports/bench.json
    """
    from mnist_vae import bench as benchmark
    from mnist_vae.data import load_mnist

    if device not in ("auto", "cpu", "cuda"):
        _fail(f"--device: expected auto, cpu or cuda, got {device!r}")
    if chunk < 32:
        _fail(f"--chunk: expected at least one batch of 32 samples, got {chunk}")
    settings = benchmark.BenchSettings(chunk=chunk, target_neg_elbo=target, max_epochs_d=max_epochs,
                                       device=device)
    mnist = load_mnist(data)
    logging.getLogger("mnist_vae.train").setLevel(logging.WARNING)  # the table says it all
    with _busy("benchmarking rows (a)-(e), about ten minutes on a 2-core CPU"):
        result = benchmark.run_benchmark(mnist, settings)
    console = Console()
    benchmark.print_table(result, console)
    console.print(f"wrote {benchmark.write_json(result, out)}")
    if not no_mlflow:
        run_id = benchmark.log_to_mlflow(result, out)
        console.print(f"logged MLflow run {run_id} (experiment mnist-vae-bench)")


@app.command()
@_reports_errors
def profile(
    name: Annotated[str | None, typer.Argument(help="A profile; none lists them all.",
                                               show_default=False)] = None,
) -> None:
    """Print a profile's overrides as `dvc exp run` arguments, or list the profiles.

    Example: dvc exp run $(mnist-vae profile burda2015-iwae)
    """
    from mnist_vae.profiles import PROFILES, dvc_arguments

    if name is None:
        for known, items in PROFILES.items():
            typer.echo(f"{known}: {' '.join(items)}")
        return
    if name not in PROFILES:
        _fail(f"unknown profile {name!r}; expected one of {', '.join(PROFILES)}")
    typer.echo(dvc_arguments(name))


@app.command()
@_reports_errors
def tune(
    trials: Annotated[int, typer.Option("--trials", min=1, help="Trials in the study, in total "
                                        "over every process that works on it.")] = 20,
    jobs: Annotated[int, typer.Option("--jobs", min=1, help="Trials at once on this machine "
                                      "(processes; train.threads auto shares the cores).")] = 1,
    space: Annotated[Path, typer.Option("--space", help="The search space file.")] =
        Path("search_space.yaml"),
    storage: Annotated[str | None, typer.Option(
        "--storage", help="Optuna storage URL shared by several machines, e.g. "
        "postgresql+psycopg://user@host/optuna. Better: set it in $MNIST_VAE_TUNE_STORAGE, so that a "
        "password is not on the command line. Default: that variable, else the journal file "
        ".tune/STUDY.journal (this machine's processes).", show_default=False)] = None,
    study: Annotated[str, typer.Option("--study", help="Study name; an existing study is "
                                       "continued.")] = "mnist-vae",
    params: ParamsOption = Path("params.yaml"),
    data: DataOption = Path("data/mnist.npz"),
    overrides: SetOption = None,
) -> None:
    """Search hyperparameters with Optuna (TPE, pruning on the validation negative ELBO).

    Each trial is an MLflow child run of one parent run; the best trial is printed as `dvc exp run`
    arguments, to reproduce and commit it through the pipeline.

    Example: mnist-vae tune --trials 20 --jobs 2 --set train.limit=20000
    """
    from mnist_vae.tune import TuneSettings
    from mnist_vae.tune import tune as run_search

    settings = TuneSettings(space_file=space, params_file=params, data=data, trials=trials,
                            jobs=jobs, storage=storage, study=study,
                            overrides=tuple(overrides or ()))
    result = run_search(settings)
    typer.echo(f"study {study}: {result.trials} trials ({result.pruned} pruned), MLflow parent run "
               f"{result.parent_run_id}")
    typer.echo(f"best validation neg. ELBO {result.best_value:.2f} with "
               + ", ".join(f"{k}={v}" for k, v in result.best_params.items()))
    typer.echo(f"reproduce: dvc exp run {result.dvc_args}")


@app.command()
@_reports_errors
def stack(
    workdir: Annotated[Path | None, typer.Option(
        "--workdir", help="Keep the servers' logs and data here (default: a temporary folder, "
        "removed at the end).", show_default=False)] = None,
) -> None:
    """Start the team's stack on 127.0.0.1 until Ctrl-C: PostgreSQL, an S3 endpoint (moto) with a
    bucket, and an MLflow server with basic auth storing runs in PostgreSQL and artifacts in S3.

    Prints the variables to export (the admin password among them) for the pipeline and the CLI
    to use it. Everything stops, and nothing is left running, when it ends.

    Example: mnist-vae stack --workdir .stack
    """
    from mnist_vae.stack import serve_forever

    serve_forever(workdir)


@app.command("serve-bench")
@_reports_errors
def serve_bench(
    model: Annotated[str, typer.Option(
        "--model", help="What to serve: models:/NAME@ALIAS, models:/NAME/VERSION, runs:/RUN_ID/model, "
        "an MLflow model folder, or a weights file (wrapped with this checkout's code).")
    ] = "models:/mnist-vae@champion",
    data: DataOption = Path("data/mnist.npz"),
    out: Annotated[Path, typer.Option("--out", "-o", help="The JSON to write.")] = Path(
        "reports/serve_bench.json"),
    clients: Annotated[int, typer.Option(
        "--clients", min=1, help="Concurrent HTTP clients (threads) per cell.")] = 8,
    seconds: Annotated[float, typer.Option(
        "--seconds", min=0.1, help="Measured seconds per cell (after a warm-up of up to 1 s).")] = 5.0,
    no_mlflow: Annotated[bool, typer.Option(
        "--no-mlflow", help="Do not log the result to the MLflow experiment mnist-vae-bench.")] = False,
) -> None:
    """Measure `mlflow models serve` under concurrent clients: batch 1 and 64, 1 and 2 workers.

    Starts the real server for each worker count, reports requests/s, images/s, p50 and p99
    latency per cell, beside the same batches in this process (forward pass, ServedVAE.predict,
    MLflow's pyfunc predict and /invocations handler). Servers are stopped at the end. About a
    minute with the defaults on a 2-core CPU.

    Example: mnist-vae serve-bench --model models:/mnist-vae@champion --clients 8 --seconds 5
    """
    from mnist_vae import serve_bench as benchmark
    from mnist_vae.data import load_mnist

    settings = benchmark.ServeBenchSettings(clients=clients, seconds=seconds,
                                            warmup=min(1.0, seconds))
    images = load_mnist(data).x_test[:256]
    with _busy("benchmarking mlflow models serve with 1 and 2 workers"):
        result = benchmark.run_serve_bench(model, images, settings)
    console = Console()
    benchmark.print_table(result, console)
    console.print(f"wrote {benchmark.write_json(result, out)}")
    if not no_mlflow:
        run_id = benchmark.log_to_mlflow(result, out)
        console.print(f"logged MLflow run {run_id} (experiment {benchmark.EXPERIMENT})")


@app.command()
@_reports_errors
def score(
    source: Annotated[Path, typer.Argument(
        help="An .npz (its test images by default, see --key), an .npy of uint8 (N,28,28)/(N,784) "
        "or float [0,1] images, or a folder of PNG/JPEG digits.")] = Path("data/mnist.npz"),
    model: ModelOption = None,
    out: Annotated[Path, typer.Option(
        "--out", "-o", help="The table to write: .csv or .parquet (by the suffix).")] = Path(
        "reports/scores.csv"),
    key: Annotated[str | None, typer.Option(
        "--key", help="The array of an .npz to score. Default: x_test.", show_default=False)] = None,
    latents: Annotated[bool, typer.Option(
        "--latents", help="Also write the posterior means mu_0, mu_1, ... of each image.")] = False,
    seed: Annotated[int, typer.Option(
        "--seed", min=0, max=2**31 - 1, help="Seed of the posterior draws, as the served model's "
        "`seed` parameter.")] = 0,
    batch_size: Annotated[int, typer.Option(
        "--batch-size", min=1, help="Images per forward pass.")] = 4096,
    params: ParamsOption = Path("params.yaml"),
) -> None:
    """Score many images in bulk, without a server or JSON: per-image negative ELBO (nats).

    The same numbers as the served model's `score` output for the same seed; higher is more
    unusual. Writes one row per image: `image` (index, or file name in a folder), `neg_elbo`, and
    with --latents `mu_0`, `mu_1`, ...

    Example: mnist-vae score data/mnist.npz --model models/model.pt --out reports/scores.parquet
    """
    from mnist_vae.score import check_output, score_file

    check_output(out)  # a bad suffix fails before the model loads
    vae = _load_model(model or _default_model(_params(params), None))
    with _busy(f"scoring {source}"):
        result = score_file(vae, source, out, key=key, seed=seed, latents=latents,
                            batch_size=batch_size)
    Console().print(f"scored {result.images} images in {result.seconds:.2f} s "
                    f"({result.images_per_sec:,.0f} images/s): wrote {result.path}", highlight=False,
                    soft_wrap=True)
