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
time is taken from the server's. Servers run in their own process group and are stopped, workers
included, whatever happens: should this process be killed outright, a watchdog
(:class:`mnist_vae.procs.Watchdog`) stops them.
"""

from __future__ import annotations

import contextlib
import http.client
import json
import os
import shutil
import signal
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np

from mnist_vae import procs
from mnist_vae.atomic import atomic_write
from mnist_vae.errors import UserError

EXPERIMENT = "mnist-vae-bench"


class ServerStartError(UserError):
    """``mlflow models serve`` exited or did not answer before the start-up timeout."""


@dataclass(frozen=True)
class ServeBenchSettings:
    clients: int = 8  # concurrent HTTP clients (threads) per cell
    seconds: float = 5.0  # measured time per cell
    warmup: float = 1.0  # unmeasured load before each cell
    batches: tuple[int, ...] = (1, 64)
    workers: tuple[int, ...] = (1, 2)
    in_process_seconds: float = 0.5  # per in-process row
    start_timeout: float = 180.0


@dataclass(frozen=True)
class Timing:
    """Latencies of one measured stretch; calls/s counts all ``calls`` over ``seconds``."""

    calls: int
    seconds: float
    latencies: list[float]

    def summary(self, batch: int) -> dict[str, float]:
        lat_ms = np.asarray(self.latencies) * 1000.0
        rate = self.calls / self.seconds
        return {"requests_per_s": rate, "images_per_s": rate * batch,
                "p50_ms": float(np.percentile(lat_ms, 50)), "p99_ms": float(np.percentile(lat_ms, 99))}


def run_serve_bench(model: str, images: np.ndarray, settings: ServeBenchSettings = ServeBenchSettings(),
                    log_dir: Path | None = None) -> dict[str, Any]:
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
    from mnist_vae.bench import machine

    assert len(images) >= max(settings.batches), "need at least one image per row of a batch"
    load_before = os.getloadavg()[0]  # other work on a shared machine skews every number
    x = images.reshape(len(images), -1).astype(np.float32) / 255.0
    bodies = {b: _bodies(x, b) for b in settings.batches}
    with tempfile.TemporaryDirectory(prefix="mnist-vae-serve-bench-") as tmp, \
            _terminate_as_exit():
        folder = model_folder(model, Path(tmp))
        logs = Path(log_dir) if log_dir is not None else Path(tmp) / "logs"
        logs.mkdir(parents=True, exist_ok=True)
        servers, cells = [], []
        for workers in settings.workers:
            with serve(folder, workers, logs / f"serve-{workers}w.log", settings.start_timeout) as srv:
                servers.append({"workers": workers, "pid": srv.pid, "port": srv.port,
                                "start_seconds": srv.start_seconds})
                for batch in settings.batches:
                    cells.append({"workers": workers, "batch": batch, "clients": settings.clients,
                                  **load(srv, bodies[batch], batch, settings)})
        in_process = measure_in_process(folder, x, settings)
    return {"machine": machine("cpu"), "model": model, "settings": asdict(settings),
            "load_average_1min": {"start": load_before, "end": os.getloadavg()[0]},
            "servers": servers, "cells": cells, "in_process": in_process,
            "scaling": _scaling(cells)}


def _bodies(x: np.ndarray, batch: int, variants: int = 4) -> list[bytes]:
    """A few JSON ``inputs`` bodies of ``batch`` test images each, as a client would send them."""
    starts = [(i * batch) % max(1, len(x) - batch + 1) for i in range(variants)]
    return [json.dumps({"inputs": x[s : s + batch].tolist()}).encode() for s in starts]


def _scaling(cells: list[dict[str, Any]]) -> dict[str, float]:
    """requests/s of the most workers over that of one worker, per batch size."""
    by = {(c["workers"], c["batch"]): c.get("requests_per_s", 0.0) for c in cells}
    most = max(w for w, _ in by)
    return {f"batch_{b}_workers_{most}_over_1": by[(most, b)] / by[(1, b)]
            for w, b in by if w == 1 and (most, b) in by and most > 1 and by[(1, b)] > 0}


# --- the model folder ---------------------------------------------------------------------------


def model_folder(reference: str, workdir: Path) -> Path:
    """A local MLflow model folder for ``reference`` (see :func:`run_serve_bench`).

    Raises:
        ModelNotFoundError: ``reference`` resolves to nothing, or to no MLflow model.
    """
    from mnist_vae.registry import ModelNotFoundError

    path = Path(reference)
    if "://" not in reference and not reference.startswith(("models:/", "runs:/")):
        if path.is_dir():
            if not (path / "MLmodel").is_file():
                raise ModelNotFoundError(f"{path}: expected an MLflow model folder (with MLmodel)")
            return path
        return wrap_weights(path, workdir / "model")
    import mlflow
    from mlflow.exceptions import MlflowException

    from mnist_vae import tracking

    tracking.configure()
    try:
        local = Path(mlflow.artifacts.download_artifacts(artifact_uri=reference,
                                                          dst_path=str(workdir / "download")))
    except (MlflowException, OSError) as exc:
        first = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
        raise ModelNotFoundError(f"model {reference!r} not found: {first}") from None
    found = sorted(local.rglob("MLmodel"))
    if not found:
        raise ModelNotFoundError(f"model {reference!r} holds no MLmodel; is it an MLflow model?")
    return found[0].parent


def wrap_weights(weights: Path, folder: Path) -> Path:
    """Saves a weights file as a pyfunc model folder, as :func:`registry.log_and_register` logs it."""
    import importlib.metadata as md

    import mlflow

    import mnist_vae
    from mnist_vae import serving
    from mnist_vae.model import N_PIXELS, load_model

    load_model(weights)  # a missing or foreign file fails here, in one line
    data = folder.with_name(folder.name + "-data")
    data.mkdir(parents=True)
    shutil.copy2(weights, data / serving.WEIGHTS_FILE)
    # Explicit requirements: inferring them would load the model in a subprocess (seconds).
    requirements = [f"{pkg}=={md.version(pkg)}" for pkg in ("torch", "numpy", "pandas", "mlflow")]
    mlflow.pyfunc.save_model(str(folder), loader_module="mnist_vae.serving", data_path=str(data),
                             code_paths=[str(Path(mnist_vae.__file__).parent)],
                             signature=serving.signature(),
                             input_example=np.zeros((1, N_PIXELS), dtype=np.float32),
                             pip_requirements=requirements)
    return folder


# --- the server -----------------------------------------------------------------------------


@dataclass(frozen=True)
class Server:
    url: str
    port: int
    pid: int  # also its process group
    start_seconds: float


def _mlflow_command() -> list[str]:
    # The venv's console script, as an activated venv would find it; `mlflow` on PATH otherwise.
    script = Path(sys.executable).parent / "mlflow"
    return [str(script)] if script.exists() else [shutil.which("mlflow") or "mlflow"]


@contextlib.contextmanager
def serve(folder: Path, workers: int, log: Path, timeout: float = 180.0) -> Iterator[Server]:
    """Runs ``mlflow models serve`` on a free port of 127.0.0.1 in its own process group; yields it
    once every worker has started and /ping answers; always stops the whole group at the end.

    Raises:
        ServerStartError: It exited, or was not ready within ``timeout`` seconds.
    """
    import requests

    port = procs.free_port()
    command = [*_mlflow_command(), "models", "serve", "-m", str(folder), "--env-manager", "local",
               "-p", str(port), "-h", "127.0.0.1", "--workers", str(workers)]
    # The scoring server runs `uvicorn` from PATH: this interpreter's.
    env = {**os.environ, "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}"}
    start = time.perf_counter()
    watchdog = procs.Watchdog()
    with open(log, "w") as out:
        process = procs.start(command, log=out, env=env, watchdog=watchdog)
    try:
        url = f"http://127.0.0.1:{port}"
        deadline = time.monotonic() + timeout
        while True:
            if process.poll() is not None:
                raise ServerStartError(f"mlflow models serve exited with code {process.returncode}: "
                                       f"{_last_line(log)} (log: {log})")
            if time.monotonic() > deadline:
                raise ServerStartError(f"mlflow models serve was not ready within {timeout:.0f}s: "
                                       f"{_last_line(log)} (log: {log})")
            # /ping answers as soon as one worker is up; the others still load the model then.
            if log.read_text(errors="replace").count("Application startup complete") >= workers:
                try:
                    if requests.get(f"{url}/ping", timeout=2).status_code == 200:
                        break
                except requests.ConnectionError:
                    pass
            time.sleep(0.2)
        yield Server(url, port, process.pid, time.perf_counter() - start)
    finally:
        # uvicorn's supervisor outlives `mlflow models serve` while its workers shut down: the
        # whole group is waited for, and what is left of it after 20 s killed.
        procs.stop_group(process.pid, process, grace=20.0)
        watchdog.forget(process.pid)
        watchdog.close()


def group_alive(pgid: int) -> bool:
    """Whether a process of group ``pgid`` (a server's) is still running."""
    return procs.group_alive(pgid)


def _last_line(log: Path) -> str:
    lines = [line for line in log.read_text(errors="replace").splitlines() if line.strip()]
    return lines[-1].strip()[:300] if lines else "no output"


@contextlib.contextmanager
def _terminate_as_exit() -> Iterator[None]:
    """SIGTERM (a killed benchmark) raises SystemExit, so the servers' ``finally`` runs."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def _exit(signum: int, frame: object) -> None:
        raise SystemExit(128 + signum)

    previous = signal.signal(signal.SIGTERM, _exit)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


# --- the load -------------------------------------------------------------------------------


def load(server: Server, bodies: list[bytes], batch: int, settings: ServeBenchSettings) -> dict[str, Any]:
    """``settings.clients`` threads POST ``bodies`` in turn, each on one keep-alive connection.

    The clients start one after another during the warm-up, as clients of a service arrive: a burst
    of connections would be accepted by whichever worker wakes first, all of them sometimes, and
    leave the other worker idle. Requests that complete within the next ``settings.seconds`` count.
    ``server_cpu`` and ``client_cpu`` are the cores the server (all its processes) and this process
    used meanwhile: on a machine with few cores the clients' share bounds the server's.
    """
    latencies: list[list[float]] = [[] for _ in range(settings.clients)]
    errors = [0] * settings.clients
    begin = time.perf_counter() + settings.warmup
    end = begin + settings.seconds
    stagger = settings.warmup / (2 * settings.clients)
    threads = [threading.Thread(target=_client, args=(server.port, bodies, i, begin, end, latencies[i],
                                                      errors), daemon=True)
               for i in range(settings.clients)]
    for t in threads:
        t.start()
        time.sleep(stagger)
    time.sleep(max(0.0, begin - time.perf_counter()))
    server_cpu, client_cpu, busy = group_cpu_seconds(server.pid), time.process_time(), busy_cpu_seconds()
    time.sleep(max(0.0, end - time.perf_counter()))
    server_cpu = (group_cpu_seconds(server.pid) - server_cpu) / settings.seconds
    client_cpu = (time.process_time() - client_cpu) / settings.seconds
    other_cpu = max(0.0, (busy_cpu_seconds() - busy) / settings.seconds - server_cpu - client_cpu)
    for t in threads:
        t.join()
    done = [lat for per in latencies for lat in per]
    if not done:
        return {"requests": 0, "errors": sum(errors), "seconds": settings.seconds}
    return {"requests": len(done), "errors": sum(errors), "seconds": settings.seconds,
            **Timing(len(done), settings.seconds, done).summary(batch),
            "server_cpu": server_cpu, "client_cpu": client_cpu, "other_cpu": other_cpu,
            "server_cpu_ms_per_request": 1000.0 * server_cpu * settings.seconds / len(done)}


def _client(port: int, bodies: list[bytes], i: int, begin: float, end: float, latencies: list[float],
            errors: list[int]) -> None:
    """One client until ``end``; keeps the latency of each request answered in [begin, end]."""
    # http.client rather than requests: a keep-alive connection at a fraction of the CPU per
    # request, which on 2 cores is taken from the server being measured.
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=60)
    headers = {"Content-Type": "application/json"}
    k = i
    try:
        while (t0 := time.perf_counter()) < end:
            try:
                conn.request("POST", "/invocations", body=bodies[k % len(bodies)], headers=headers)
                response = conn.getresponse()
                response.read()
                ok = response.status == 200
            except (OSError, http.client.HTTPException):
                conn.close()  # reconnects on the next request
                ok = False
            t1 = time.perf_counter()
            if not ok:
                errors[i] += 1
            elif begin <= t1 <= end:
                latencies.append(t1 - t0)
            k += 1
    finally:
        conn.close()


def busy_cpu_seconds() -> float:
    """CPU seconds the whole machine has been busy since boot, all cores (Linux; else 0)."""
    try:
        fields = [int(v) for v in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]]
    except (OSError, ValueError):
        return 0.0
    idle = fields[3] + fields[4]  # idle, iowait
    return (sum(fields[:8]) - idle) / os.sysconf("SC_CLK_TCK")  # guest time is counted in user


def group_cpu_seconds(pgid: int) -> float:
    """User + system CPU seconds of the live processes of a process group (Linux; else 0)."""
    ticks = os.sysconf("SC_CLK_TCK") if hasattr(os, "sysconf") else 100
    total = 0
    for entry in Path("/proc").glob("[0-9]*/stat"):
        try:
            # The command may hold spaces and parentheses: the fields start after the last ")".
            fields = entry.read_text().rpartition(")")[2].split()
        except OSError:  # the process ended meanwhile
            continue
        if int(fields[2]) == pgid:  # fields: state ppid pgrp ... utime(12) stime(13)
            total += int(fields[11]) + int(fields[12])
    return total / ticks


# --- in process -----------------------------------------------------------------------------


def measure_in_process(folder: Path, x: np.ndarray, settings: ServeBenchSettings) -> list[dict]:
    """The same batches through each layer of a request, in this process (see the module doc)."""
    import mlflow
    import torch
    from mlflow.pyfunc import scoring_server

    saved_path = list(sys.path)
    try:
        pyfunc = mlflow.pyfunc.load_model(str(folder))
    finally:
        sys.path[:] = saved_path  # MLflow prepends the model's code folder for good
    # The loader_module's object (our ServedVAE); MLflow offers no public accessor for it.
    served = pyfunc._model_impl
    vae = served.model
    schema = pyfunc.metadata.get_input_schema()
    rows = []
    for batch in settings.batches:
        arr = x[:batch]
        tensor = torch.from_numpy(arr)
        body = _bodies(x, batch, variants=1)[0]

        def forward(t: torch.Tensor = tensor) -> None:
            with torch.inference_mode():
                vae.pixel_means(vae.decode(vae.encode(t)[0]))

        layers: list[tuple[str, str, Callable[[], object]]] = [
            ("forward", "model encode + decode(mu) + sigmoid, torch tensor in", forward),
            ("served_predict", "ServedVAE.predict (validation + forward)", lambda a=arr: served.predict(a)),
            ("pyfunc_predict", "MLflow PyFuncModel.predict (schema enforcement)",
             lambda a=arr: pyfunc.predict(a)),
            ("invocations", "MLflow's /invocations handler: JSON body in, JSON out, no HTTP",
             lambda b=body: scoring_server.invocations(b, "application/json", pyfunc, schema)),
        ]
        for name, what, call in layers:
            timing = _time_calls(call, settings.in_process_seconds)
            rows.append({"layer": name, "what": what, "batch": batch, "calls": timing.calls,
                         **timing.summary(batch)})
    return rows


def _time_calls(call: Callable[[], object], seconds: float, at_least: int = 20) -> Timing:
    for _ in range(3):  # warm-up: first calls allocate
        call()
    latencies = []
    start = time.perf_counter()
    while len(latencies) < at_least or time.perf_counter() - start < seconds:
        t0 = time.perf_counter()
        call()
        latencies.append(time.perf_counter() - t0)
    return Timing(len(latencies), sum(latencies), latencies)


# --- reporting ------------------------------------------------------------------------------


def write_json(result: dict[str, Any], path: Path) -> Path:
    return atomic_write(path, json.dumps(result, indent=2) + "\n")


def print_table(result: dict[str, Any], console: Any = None) -> None:
    """The cells and the in-process rows as rich tables."""
    from rich.console import Console
    from rich.table import Table

    m, s = result["machine"], result["settings"]
    load = result["load_average_1min"]
    table = Table(title=f"mlflow models serve, {s['clients']} clients, {s['seconds']:g} s per cell "
                  f"({m['cpu']}, {m['cpu_count']} cores, load average {load['start']:.1f} before, "
                  f"{load['end']:.1f} after)")
    for column in ("workers", "batch", "req/s", "images/s", "p50 ms", "p99 ms", "errors",
                   "server cores", "server CPU ms/req", "client cores", "others' cores"):
        table.add_column(column, justify="right")
    for c in result["cells"]:
        if not c["requests"]:
            table.add_row(str(c["workers"]), str(c["batch"]), "0", "", "", "", str(c["errors"]),
                          *[""] * 4)
            continue
        table.add_row(str(c["workers"]), str(c["batch"]), f"{c['requests_per_s']:,.1f}",
                      f"{c['images_per_s']:,.0f}", f"{c['p50_ms']:.1f}", f"{c['p99_ms']:.1f}",
                      str(c["errors"]), f"{c['server_cpu']:.2f}",
                      f"{c['server_cpu_ms_per_request']:.2f}", f"{c['client_cpu']:.2f}",
                      f"{c['other_cpu']:.2f}")
    inproc = Table(title="the same batches in this process, one call at a time")
    for column in ("layer", "batch", "calls/s", "images/s", "p50 ms", "p99 ms"):
        inproc.add_column(column, justify="left" if column == "layer" else "right")
    for r in result["in_process"]:
        if r["batch"]:
            inproc.add_row(r["layer"], str(r["batch"]), f"{r['requests_per_s']:,.0f}",
                           f"{r['images_per_s']:,.0f}", f"{r['p50_ms']:.3f}", f"{r['p99_ms']:.3f}")
    if console is None:
        console = Console()
    if not console.is_terminal:  # rich assumes 80 columns then: too few for the cells' table
        console.width = max(console.width, 130)
    console.print(table)
    console.print(inproc)
    for key, ratio in result["scaling"].items():
        console.print(f"{key}: {ratio:.2f}x")


def log_to_mlflow(result: dict[str, Any], json_path: Path, experiment: str = EXPERIMENT) -> str:
    """Logs the result as a run of the benchmark experiment; returns the run id."""
    import mlflow

    from mnist_vae import tracking

    tracking.configure()
    with mlflow.start_run(experiment_id=tracking.experiment_id(experiment),
                          run_name=f"serve-bench-{time.strftime('%m%d-%H%M%S')}") as run:
        mlflow.set_tags({"bench": "serving", "model": result["model"],
                         **{f"machine.{k}": v for k, v in result["machine"].items()}})
        mlflow.log_params({f"serve_bench.{k}": v for k, v in result["settings"].items()})
        metrics: dict[str, float] = {}
        for c in result["cells"]:
            for key in ("requests_per_s", "images_per_s", "p50_ms", "p99_ms", "errors", "server_cpu",
                        "client_cpu", "other_cpu", "server_cpu_ms_per_request"):
                if key in c:
                    metrics[f"w{c['workers']}_b{c['batch']}_{key}"] = float(c[key])
        for r in result["in_process"]:
            if r["batch"]:
                for key in ("requests_per_s", "images_per_s", "p50_ms", "p99_ms"):
                    metrics[f"inproc_{r['layer']}_b{r['batch']}_{key}"] = float(r[key])
        metrics.update(result["scaling"])
        mlflow.log_metrics(metrics)
        mlflow.log_artifact(str(json_path))
        return run.info.run_id

