"""A model served by ``mlflow models serve``, as a user starts it: the model folder it serves, the
server process and the CPU time it uses.

The server runs in its own process group and is stopped, workers included, whatever happens: should
this process be killed outright, a watchdog (:class:`mnist_vae.procs.Watchdog`) stops it.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import sys
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from mnist_vae import procs
from mnist_vae.errors import UserError, first_line


class ServerStartError(UserError):
    """``mlflow models serve`` exited or did not answer before the start-up timeout."""


def model_folder(reference: str, workdir: Path) -> Path:
    """A local MLflow model folder for ``reference`` (see :func:`mnist_vae.serve_bench.run_serve_bench`).

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
        local = Path(
            mlflow.artifacts.download_artifacts(artifact_uri=reference, dst_path=str(workdir / "download"))
        )
    except (MlflowException, OSError) as exc:
        raise ModelNotFoundError(f"model {reference!r} not found: {first_line(exc)}") from None
    found = sorted(local.rglob("MLmodel"))
    if not found:
        raise ModelNotFoundError(f"model {reference!r} holds no MLmodel; is it an MLflow model?")
    return found[0].parent


def wrap_weights(weights: Path, folder: Path) -> Path:
    """Saves a weights file as a pyfunc model folder, as :func:`registry.log_and_register` logs it."""
    import mlflow

    import mnist_vae
    from mnist_vae import serving
    from mnist_vae.model import N_PIXELS, load_model

    load_model(weights)  # a missing or foreign file fails here, in one line
    data = folder.with_name(folder.name + "-data")
    data.mkdir(parents=True)
    shutil.copy2(weights, data / serving.WEIGHTS_FILE)
    mlflow.pyfunc.save_model(
        str(folder),
        loader_module="mnist_vae.serving",
        data_path=str(data),
        code_paths=[str(Path(mnist_vae.__file__).parent)],
        signature=serving.signature(),
        input_example=np.zeros((1, N_PIXELS), dtype=np.float32),
        pip_requirements=serving.pip_requirements(),
    )
    return folder


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
    command = [
        *_mlflow_command(),
        "models",
        "serve",
        "-m",
        str(folder),
        "--env-manager",
        "local",
        "-p",
        str(port),
        "-h",
        "127.0.0.1",
        "--workers",
        str(workers),
    ]
    # The scoring server runs `uvicorn` from PATH: this interpreter's.
    env = {**os.environ, "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}"}
    start = time.perf_counter()
    watchdog = procs.Watchdog()
    with open(log, "wb") as out:
        process = procs.start(command, log=out, env=env, watchdog=watchdog)
    try:
        url = f"http://127.0.0.1:{port}"
        deadline = time.monotonic() + timeout
        while True:
            if process.poll() is not None:
                raise ServerStartError(
                    f"mlflow models serve exited with code {process.returncode}: "
                    f"{_last_line(log)} (log: {log})"
                )
            if time.monotonic() > deadline:
                raise ServerStartError(
                    f"mlflow models serve was not ready within {timeout:.0f}s: {_last_line(log)} (log: {log})"
                )
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
def terminate_as_exit() -> Iterator[None]:
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
