"""Serving speed: the real ``mlflow models serve`` under concurrent HTTP clients, beside the same
model in this process.

One server per worker count (1, then 2 uvicorn workers) is started as a user would start it, waited
for until every worker is up, and for each batch size (1 and 64) warmed up, then asked by
``clients`` threads (one keep-alive ``http.client`` connection each) for ``seconds`` with JSON
``inputs`` bodies of test images. A cell reports requests/s, images/s, the p50 and p99 latency seen
by the clients, and the cores the server and the clients used. The in-process rows time the same
batches through each layer a request crosses, so the gaps between them say where a request's time
goes: the raw forward pass, :meth:`ServedVAE.predict`, MLflow's pyfunc ``predict`` (schema
enforcement), and MLflow's ``invocations`` handler (JSON parsing and encoding) without HTTP.

The clients run in this process, on the same cores as the server: on a 2-core machine their CPU
time is taken from the server's. The servers and the model folder they serve are
:mod:`mnist_vae.serving.server`'s, the clients and the in-process timings :mod:`mnist_vae.bench.load`'s.
"""

from __future__ import annotations

import os
import signal
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypedDict

import numpy as np

from mnist_vae import procs
from mnist_vae.bench.load import load, measure_in_process, request_bodies
from mnist_vae.bench.report import EXPERIMENT, BenchmarkResult, log_run, print_tables, table
from mnist_vae.bench.report import write_json as write_json  # re-exported: the CLI writes through it
from mnist_vae.registry.references import model_folder
from mnist_vae.serving.server import serve

if TYPE_CHECKING:
    from rich.console import Console


@dataclass(frozen=True)
class ServeBenchSettings:
    clients: int = 8  # concurrent HTTP clients (threads) per cell
    seconds: float = 5.0  # measured time per cell
    warmup: float = 1.0  # unmeasured load before each cell
    batches: tuple[int, ...] = (1, 64)
    workers: tuple[int, ...] = (1, 2)
    in_process_seconds: float = 0.5  # per in-process row
    start_timeout: float = 180.0


class ServerStart(TypedDict):
    workers: int
    pid: int
    port: int
    start_seconds: float


class LoadAverage(TypedDict):
    start: float
    end: float


class ServeBenchResult(BenchmarkResult):
    """What :func:`run_serve_bench` returns and the JSON holds.

    A cell holds ``workers``, ``batch``, ``clients`` and the keys of :func:`mnist_vae.bench.load.load`;
    an in-process row ``layer``, ``what``, ``batch``, ``calls`` and those of
    :meth:`mnist_vae.bench.load.Timing.summary`.
    """

    model: str
    load_average_1min: LoadAverage
    servers: list[ServerStart]
    cells: list[dict[str, Any]]
    in_process: list[dict[str, Any]]
    scaling: dict[str, float]


def run_serve_bench(
    model: str,
    images: np.ndarray,
    settings: ServeBenchSettings = ServeBenchSettings(),
    log_dir: Path | None = None,
) -> ServeBenchResult:
    """Measures ``model`` served by ``mlflow models serve`` and in this process.

    Args:
        model: An MLflow model folder, ``models:/...`` or ``runs:/...`` URI, or a weights file (.pt),
            which is wrapped into a temporary pyfunc folder with this checkout's code.
        images: uint8 (N, 28, 28) images, N >= the largest batch; request bodies are made of them.
        settings: Cell sizes; see :class:`ServeBenchSettings`.
        log_dir: Keep the servers' logs here (default: a temporary folder, removed at the end).

    Returns:
        ``machine``, ``settings``, ``servers`` (pid, start-up seconds), ``cells`` (one per workers x
        batch), ``in_process`` (one per layer x batch) and ``scaling`` (2 workers / 1 worker).

    Raises:
        ServerStartError: A server did not start; the message ends with its log's last line.
        ModelNotFoundError: ``model`` does not resolve to an MLflow model.
    """
    from mnist_vae.bench.report import machine

    assert len(images) >= max(settings.batches), "need at least one image per row of a batch"
    load_before = os.getloadavg()[0]  # other work on a shared machine skews every number
    x = images.reshape(len(images), -1).astype(np.float32) / 255.0
    bodies = {b: request_bodies(x, b) for b in settings.batches}
    with (
        tempfile.TemporaryDirectory(prefix="mnist-vae-serve-bench-") as tmp,
        procs.signals_raise(_exit_code, signal.SIGTERM),
    ):
        folder = model_folder(model, Path(tmp))
        logs = Path(log_dir) if log_dir is not None else Path(tmp) / "logs"
        logs.mkdir(parents=True, exist_ok=True)
        servers: list[ServerStart] = []
        cells: list[dict[str, Any]] = []
        for workers in settings.workers:
            with serve(folder, workers, logs / f"serve-{workers}w.log", settings.start_timeout) as srv:
                servers.append(
                    {"workers": workers, "pid": srv.pid, "port": srv.port, "start_seconds": srv.start_seconds}
                )
                for batch in settings.batches:
                    cells.append(
                        {
                            "workers": workers,
                            "batch": batch,
                            "clients": settings.clients,
                            **load(
                                srv, bodies[batch], batch, settings.clients, settings.seconds, settings.warmup
                            ),
                        }
                    )
        in_process = measure_in_process(folder, x, settings.batches, settings.in_process_seconds)
    return {
        "machine": machine("cpu"),
        "model": model,
        "settings": asdict(settings),
        "load_average_1min": {"start": load_before, "end": os.getloadavg()[0]},
        "servers": servers,
        "cells": cells,
        "in_process": in_process,
        "scaling": _scaling(cells),
    }


def _scaling(cells: list[dict[str, Any]]) -> dict[str, float]:
    """requests/s of the most workers over that of one worker, per batch size."""
    by = {(c["workers"], c["batch"]): c.get("requests_per_s", 0.0) for c in cells}
    most = max(w for w, _ in by)
    return {
        f"batch_{b}_workers_{most}_over_1": by[(most, b)] / by[(1, b)]
        for w, b in by
        if w == 1 and (most, b) in by and most > 1 and by[(1, b)] > 0
    }


# --- reporting ------------------------------------------------------------------------------

_CELL_COLUMNS = (
    "workers",
    "batch",
    "req/s",
    "images/s",
    "p50 ms",
    "p99 ms",
    "errors",
    "server cores",
    "server CPU ms/req",
    "client cores",
    "others' cores",
)
_CELL_METRICS = (
    "requests_per_s",
    "images_per_s",
    "p50_ms",
    "p99_ms",
    "errors",
    "server_cpu",
    "client_cpu",
    "other_cpu",
    "server_cpu_ms_per_request",
)
_LAYER_METRICS = ("requests_per_s", "images_per_s", "p50_ms", "p99_ms")


def print_table(result: ServeBenchResult, console: Console | None = None) -> None:
    """The cells and the in-process rows as rich tables."""
    m, s, load = result["machine"], result["settings"], result["load_average_1min"]
    title = (
        f"mlflow models serve, {s['clients']} clients, {s['seconds']:g} s per cell ({m['cpu']}, "
        f"{m['cpu_count']} cores, load average {load['start']:.1f} before, {load['end']:.1f} after)"
    )
    cells = table(title, _CELL_COLUMNS, (_cell_row(c) for c in result["cells"]))
    layers = ("layer", "batch", "calls/s", "images/s", "p50 ms", "p99 ms")
    rows = (_layer_row(r) for r in result["in_process"] if r["batch"])
    inproc = table("the same batches in this process, one call at a time", layers, rows, left="layer")
    out = print_tables([cells, inproc], console)
    for key, ratio in result["scaling"].items():
        out.print(f"{key}: {ratio:.2f}x")


def _cell_row(c: dict[str, Any]) -> list[str]:
    head = [str(c["workers"]), str(c["batch"])]
    if not c["requests"]:
        return [*head, "0", "", "", "", str(c["errors"]), *[""] * 4]
    return [
        *head,
        f"{c['requests_per_s']:,.1f}",
        f"{c['images_per_s']:,.0f}",
        f"{c['p50_ms']:.1f}",
        f"{c['p99_ms']:.1f}",
        str(c["errors"]),
        f"{c['server_cpu']:.2f}",
        f"{c['server_cpu_ms_per_request']:.2f}",
        f"{c['client_cpu']:.2f}",
        f"{c['other_cpu']:.2f}",
    ]


def _layer_row(r: dict[str, Any]) -> list[str]:
    rates = f"{r['requests_per_s']:,.0f}", f"{r['images_per_s']:,.0f}"
    return [r["layer"], str(r["batch"]), *rates, f"{r['p50_ms']:.3f}", f"{r['p99_ms']:.3f}"]


def log_to_mlflow(result: ServeBenchResult, json_path: Path, experiment: str = EXPERIMENT) -> str:
    """Logs the result as a run of the benchmark experiment; returns the run id."""
    metrics: dict[str, float] = {}
    for c in result["cells"]:
        metrics.update({f"w{c['workers']}_b{c['batch']}_{k}": float(c[k]) for k in _CELL_METRICS if k in c})
    for r in result["in_process"]:
        if r["batch"]:
            metrics.update({f"inproc_{r['layer']}_b{r['batch']}_{k}": float(r[k]) for k in _LAYER_METRICS})
    metrics.update(result["scaling"])
    tags = {"bench": "serving", "model": result["model"]}
    run_name = f"serve-bench-{time.strftime('%m%d-%H%M%S')}"
    return log_run(result, json_path, experiment, "serve_bench", metrics, tags, run_name)


def _exit_code(signum: int) -> SystemExit:
    """SIGTERM (a killed benchmark) ends as an exit, so the servers' ``finally`` stops them."""
    return SystemExit(128 + signum)
