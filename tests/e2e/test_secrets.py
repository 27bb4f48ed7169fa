"""No password in anything the pipeline or the CLI print or write, with a tracking URI that holds one
(``http://user:password@host``) and a server that is down or refuses it."""

from __future__ import annotations

import subprocess
from collections.abc import Callable
from pathlib import Path

import pytest

from mnist_vae import procs
from mnist_vae.stack import Stack

pytestmark = pytest.mark.slow

PASSWORD = "Sup3r-s3cret-pw"
# A client gives up on a dead server after one retry: what is printed is the same, minutes sooner.
FAST_FAILING = {"MLFLOW_HTTP_REQUEST_MAX_RETRIES": "1", "MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR": "1"}


def _dead_server(stack: Stack) -> str:
    return f"http://alice:{PASSWORD}@127.0.0.1:{procs.free_port()}"  # nothing listens there


def _refusing_server(stack: Stack) -> str:
    return stack.tracking_uri.replace("http://", f"http://admin:{PASSWORD}@")  # a wrong password: 401


@pytest.mark.parametrize("server", [_dead_server, _refusing_server], ids=["dead", "refusing"])
def test_no_password_in_output_or_files(
    server: Callable[[Stack], str],
    team_stack: Stack,
    tmp_path: Path,
    make_project: Callable[..., dict[str, str]],
    venv_bin: Path,
) -> None:
    root = tmp_path / "project"
    env = make_project(root, n_train=200, validation=50)
    uri = server(team_stack)
    env = {**env, **FAST_FAILING, "MLFLOW_TRACKING_URI": uri}
    for name in ("MLFLOW_TRACKING_USERNAME", "MLFLOW_TRACKING_PASSWORD"):
        env.pop(name, None)
    commands = {
        "train stage": ["python", "pipeline/train.py"],
        "mnist-vae models": [str(venv_bin / "mnist-vae"), "models"],
        "mnist-vae evaluate": [str(venv_bin / "mnist-vae"), "evaluate", "models:/mnist-vae@champion"],
    }
    for name, command in commands.items():
        result = subprocess.run(command, cwd=root, env=env, capture_output=True, text=True, timeout=600)
        printed = result.stdout + result.stderr
        assert result.returncode == 1, f"{name}: {printed[-2000:]}"
        errors = [line for line in printed.splitlines() if line.startswith("error:")]
        assert len(errors) == 1 and "Traceback" not in printed, f"{name}: {printed[-2000:]}"
        assert PASSWORD not in printed, f"{name} printed the password: {printed[-2000:]}"
        assert "alice@" in printed or "admin" in printed, f"{name}: {printed}"
    leaked = [path for path in root.rglob("*") if path.is_file() and PASSWORD.encode() in path.read_bytes()]
    assert not leaked, f"the password was written to {leaked}"


def test_tune_storage_password_from_the_environment_is_never_printed(
    tmp_path: Path, make_project: Callable[..., dict[str, str]], venv_bin: Path
) -> None:
    root = tmp_path / "project"
    env = make_project(root, n_train=200, validation=50)
    storage = f"postgresql+psycopg://optuna:{PASSWORD}@127.0.0.1:{procs.free_port()}/optuna"
    result = subprocess.run(
        [str(venv_bin / "mnist-vae"), "tune", "--trials", "1", "--space", str(_space(tmp_path))],
        cwd=root,
        env={**env, "MNIST_VAE_TUNE_STORAGE": storage},
        capture_output=True,
        text=True,
        timeout=600,
    )
    printed = result.stdout + result.stderr
    assert result.returncode == 1, printed[-2000:]
    errors = [line for line in printed.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and "Traceback" not in printed, printed[-2000:]
    assert "postgresql+psycopg://optuna@127.0.0.1" in errors[0], printed[-2000:]
    assert PASSWORD not in printed, printed[-2000:]


def _space(folder: Path) -> Path:
    path = folder / "space.yaml"
    path.write_text("fixed:\n  train.epochs: 1\nparams:\n  train.lr:\n    float: {low: 0.001, high: 0.01}\n")
    return path
