"""What the two benchmarks (``bench``: training speed, ``serve_bench``: serving speed) share: the
machine they ran on, their JSON file, their rich tables and their MLflow run."""

from __future__ import annotations

import json
import os
import platform
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypedDict

from mnist_vae.atomic import atomic_write

if TYPE_CHECKING:
    from rich.console import Console
    from rich.table import Table

EXPERIMENT = "mnist-vae-bench"


class Machine(TypedDict):
    """The machine a benchmark ran on, as text (MLflow tags of the run)."""

    device: str
    torch: str
    cpu: str
    cpu_count: str
    threads: str
    gpu: str
    python: str


class BenchmarkResult(TypedDict):
    """What every benchmark's result holds: where it ran and with which settings."""

    machine: Machine
    settings: dict[str, Any]


def machine(device: str = "auto") -> Machine:
    """The device ``device`` resolves to, its CPU or GPU, torch's threads and the versions."""
    import torch

    from mnist_vae.training.trainer import resolve_device

    dev = resolve_device(device)
    gpu = torch.cuda.get_device_name(0) if dev.type == "cuda" else ""
    return {
        "device": str(dev),
        "torch": torch.__version__,
        "cpu": _cpu_model(),
        "cpu_count": str(os.cpu_count()),
        "threads": str(torch.get_num_threads()),
        "gpu": gpu,
        "python": platform.python_version(),
    }


def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def write_json(result: Mapping[str, Any], path: Path) -> Path:
    """Writes a benchmark's result to ``path`` (indented JSON), atomically; returns ``path``."""
    return atomic_write(path, json.dumps(result, indent=2) + "\n")


def table(
    title: str, columns: Sequence[str], rows: Iterable[Sequence[str]], *, left: str | None = None
) -> Table:
    """A rich table whose columns are right-aligned except ``left``. Every cell may wrap, never be
    cut: a word longer than its column folds onto the next line."""
    from rich.table import Table

    out = Table(title=title)
    for column in columns:
        out.add_column(column, justify="left" if column == left else "right", overflow="fold")
    for row in rows:
        out.add_row(*row)
    return out


def print_tables(tables: Sequence[Table], console: Console | None = None) -> Console:
    """Prints ``tables`` on ``console`` (stdout's by default); returns the console.

    On a terminal the cells wrap to its width. Off a terminal (a file, a pipe, a CI or ``dvc exp
    run`` log) rich would assume 80 columns; each table is printed at its natural width instead,
    one line per row, so that a log keeps every column and every cell whole.
    """
    from rich.console import Console

    if console is None:
        console = Console()
    for t in tables:
        if console.is_terminal:
            console.print(t)
        else:
            natural = console.measure(t, options=console.options.update_width(10_000)).maximum
            title = len(t.title) if isinstance(t.title, str) else 0
            width, console.width = console.width, max(console.width, natural, title)
            try:
                console.print(t, crop=False)
            finally:
                console.width = width
    return console


def log_run(
    result: BenchmarkResult,
    json_path: Path,
    experiment: str,
    prefix: str,
    metrics: Mapping[str, float],
    tags: Mapping[str, str] | None = None,
    run_name: str | None = None,
) -> str:
    """Logs a benchmark as a run of ``experiment``: its machine as ``machine.*`` tags, its settings as
    ``<prefix>.*`` params, the metrics, and the JSON as an artifact. Returns the run id."""
    import mlflow

    from mnist_vae import tracking

    tracking.configure()
    with mlflow.start_run(experiment_id=tracking.experiment_id(experiment), run_name=run_name) as run:
        mlflow.set_tags({**(tags or {}), **{f"machine.{k}": v for k, v in result["machine"].items()}})
        mlflow.log_params({f"{prefix}.{k}": v for k, v in result["settings"].items()})
        mlflow.log_metrics(dict(metrics))
        mlflow.log_artifact(str(json_path))
        return run.info.run_id
