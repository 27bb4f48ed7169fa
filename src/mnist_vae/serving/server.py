"""``mlflow models serve`` run as a user runs it, on a model folder (see
:func:`mnist_vae.registry.references.model_folder`), in a process group of its own.

The server runs in its own process group and is stopped, workers included, whatever happens: should
this process be killed outright, a watchdog (:class:`mnist_vae.procs.Watchdog`) stops it.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from mnist_vae import procs
from mnist_vae.errors import UserError


class ServerStartError(UserError):
    """``mlflow models serve`` exited or did not answer before the start-up timeout."""


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


def _last_line(log: Path) -> str:
    lines = [line for line in log.read_text(errors="replace").splitlines() if line.strip()]
    return lines[-1].strip()[:300] if lines else "no output"
