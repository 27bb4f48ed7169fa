"""Benchmark commands: training speed against the tutorial's loop (``bench``) and ``mlflow models
serve`` under concurrent clients (``serve-bench``)."""

import logging
from pathlib import Path
from typing import Annotated, Protocol, TypeVar

import typer
from rich.console import Console

from mnist_vae.cli.common import DataOption, ParamsOption, busy, dataset_path, default_model, fail
from mnist_vae.config import load_params

_EXPERIMENT = "mnist-vae-bench"

NoMlflowOption = Annotated[
    bool, typer.Option("--no-mlflow", help=f"Do not log the result to the MLflow experiment {_EXPERIMENT}.")
]


_Result = TypeVar("_Result", contravariant=True)


class _Benchmark(Protocol[_Result]):
    """What :mod:`mnist_vae.bench.training` and :mod:`mnist_vae.bench.serving` each offer for their result."""

    def print_table(self, result: _Result, console: Console | None = None) -> None: ...

    def write_json(self, result: _Result, path: Path) -> Path: ...

    def log_to_mlflow(self, result: _Result, json_path: Path, experiment: str = ...) -> str: ...


def _report(benchmark: _Benchmark[_Result], result: _Result, out: Path, log: bool) -> None:
    """Prints the result's table, writes its JSON to ``out`` and, when ``log``, logs an MLflow run."""
    console = Console()
    benchmark.print_table(result, console)
    console.print(f"wrote {benchmark.write_json(result, out)}")
    if log:
        run_id = benchmark.log_to_mlflow(result, out, experiment=_EXPERIMENT)
        console.print(f"logged MLflow run {run_id} (experiment {_EXPERIMENT})")


def bench(
    data: DataOption = None,
    params: ParamsOption = Path("params.yaml"),
    out: Annotated[Path, typer.Option("--out", "-o", help="The JSON to write.")] = Path("reports/bench.json"),
    device: Annotated[str, typer.Option("--device", help="auto | cpu | cuda.")] = "auto",
    chunk: Annotated[
        int,
        typer.Option(
            "--chunk",
            help="Training samples per timed window; rows (a)-(c) time 3 windows after one warm-up window.",
        ),
    ] = 20_000,
    target: Annotated[
        float, typer.Option("--target", help="Row (d): the test negative ELBO (nats/image) to reach.")
    ] = 100.0,
    max_epochs: Annotated[
        int, typer.Option("--max-epochs", help="Row (d): give up after this many epochs.")
    ] = 30,
    no_mlflow: NoMlflowOption = False,
) -> None:
    """Measure training speed against the tutorial's loop, side by side on this machine.

    Rows: (a) the tutorial's loop (torchvision MNIST, ToTensor, DataLoader, batch 32); (b) this
    trainer, seed preset, batch 32; (b2) the same with torch.compile; (c) this trainer at its
    fastest settings; (d) each preset's (mlp, conv, hvae) training time to a test negative ELBO; (e0)-(e2)
    one default-preset training alone and two at once, with threads auto and with torch's default
    threads. Prints a table with each row's ratio to (a), writes JSON and logs an MLflow run. About
    ten minutes on a 2-core CPU.

    Example: mnist-vae bench --device cpu --out reports/bench.json
    """
    from mnist_vae.bench import training as benchmark
    from mnist_vae.data.dataset import load_dataset

    if device not in ("auto", "cpu", "cuda"):
        fail(f"--device: expected auto, cpu or cuda, got {device!r}")
    if chunk < 32:
        fail(f"--chunk: expected at least one batch of 32 samples, got {chunk}")
    settings = benchmark.BenchSettings(
        chunk=chunk, target_neg_elbo=target, max_epochs_d=max_epochs, device=device
    )
    images = load_dataset(dataset_path(load_params(params), data))
    for name in ("mnist_vae.training.trainer", "mnist_vae.progress"):  # the table says it all
        logging.getLogger(name).setLevel(logging.WARNING)
    with busy("benchmarking rows (a)-(e), about ten minutes on a 2-core CPU"):
        result = benchmark.run_benchmark(images, settings)
    _report(benchmark, result, out, log=not no_mlflow)


def serve_bench(
    model: Annotated[
        str | None,
        typer.Option(
            "--model",
            help="What to serve: models:/NAME@ALIAS, models:/NAME/VERSION, runs:/RUN_ID/model, "
            "an MLflow model folder, or a weights file (wrapped with this checkout's code). Default: "
            "the champion of mlflow.registered_model in params.yaml.",
            show_default=False,
        ),
    ] = None,
    data: DataOption = None,
    params: ParamsOption = Path("params.yaml"),
    out: Annotated[Path, typer.Option("--out", "-o", help="The JSON to write.")] = Path(
        "reports/serve_bench.json"
    ),
    clients: Annotated[
        int, typer.Option("--clients", min=1, help="Concurrent HTTP clients (threads) per cell.")
    ] = 8,
    seconds: Annotated[
        float,
        typer.Option("--seconds", min=0.1, help="Measured seconds per cell (after a warm-up of up to 1 s)."),
    ] = 5.0,
    no_mlflow: NoMlflowOption = False,
) -> None:
    """Measure `mlflow models serve` under concurrent clients: batch 1 and 64, 1 and 2 workers.

    Starts the real server for each worker count, reports requests/s, images/s, p50 and p99
    latency per cell, beside the same batches in this process (forward pass, ServedVAE.predict,
    MLflow's pyfunc predict and /invocations handler). Servers are stopped at the end. About a
    minute with the defaults on a 2-core CPU.

    Example: mnist-vae serve-bench --model models:/mnist-vae@champion --clients 8 --seconds 5
    """
    from mnist_vae.bench import serving as benchmark
    from mnist_vae.data.dataset import load_dataset

    settings = benchmark.ServeBenchSettings(clients=clients, seconds=seconds, warmup=min(1.0, seconds))
    # params.yaml is read only for what --model and --data leave open.
    if model is not None and data is not None:
        reference, source = model, data
    else:
        resolved = load_params(params)
        reference, source = default_model(resolved, model), dataset_path(resolved, data)
    images = load_dataset(source).x_test[:256]
    with busy("benchmarking mlflow models serve with 1 and 2 workers"):
        result = benchmark.run_serve_bench(reference, images, settings)
    _report(benchmark, result, out, log=not no_mlflow)
