"""Fixtures shared by the unit tests (tests/unit) and the end-to-end tests (tests/e2e).

Test modules never import each other, nor this file: every shared helper is a fixture here, the
helper functions being fixtures that return the function (``tiny_images(n)``, ``make_project(root)``).
Fixtures that start the team's stack live in tests/e2e/conftest.py.
"""

from __future__ import annotations

import contextlib
import csv
import functools
import gzip
import hashlib
import os
import shutil
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import requests
import yaml

ROOT = Path(__file__).resolve().parents[1]
# The offline MNIST and Fashion-MNIST copies present on every machine of this project, CI included.
SHARED_MNIST = ROOT.parent / "shared" / "datasets" / "mnist"
SHARED_FASHION_MNIST = ROOT.parent / "shared" / "datasets" / "fashion-mnist"
VENV_BIN = Path(sys.executable).parent


def pytest_configure(config: pytest.Config) -> None:
    """Under pytest-xdist, each worker's torch takes one thread: two workers with torch's default
    (every core each) would oversubscribe two cores and run slower than one."""
    if os.environ.get("PYTEST_XDIST_WORKER"):
        import torch

        torch.set_num_threads(1)


def _tiny_images(n: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """``n`` uint8 28x28 images of bars whose position depends on the label: learnable, not noise."""
    rng = np.random.default_rng(seed)
    labels = rng.integers(0, 10, size=n).astype(np.uint8)
    images = np.zeros((n, 28, 28), dtype=np.uint8)
    for i, label in enumerate(labels):
        row = 4 + 2 * int(label)
        images[i, row : row + 3, 4:24] = 200 + rng.integers(0, 55)
        images[i, 4:24, 4 + 2 * int(label)] = 255
    return images, labels


def _write_dataset(
    path: Path, n_train: int, n_test: int = 64, train_seed: int = 1, test_seed: int = 2
) -> Path:
    """A dataset file in the format the download stage writes, made of :func:`_tiny_images`."""
    (x_train, y_train), (x_test, y_test) = _tiny_images(n_train, train_seed), _tiny_images(n_test, test_seed)
    path.parent.mkdir(parents=True, exist_ok=True)
    np.savez(path, x_train=x_train, y_train=y_train, x_test=x_test, y_test=y_test)
    return path


def _write_params(path: Path, changes: dict[str, dict[str, Any]]) -> Path:
    """The project's params.yaml with some keys of some sections changed."""
    params = yaml.safe_load((ROOT / "params.yaml").read_text())
    for section, values in changes.items():
        params[section].update(values)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(yaml.safe_dump(params, sort_keys=False))
    return path


# --- data and params ---------------------------------------------------------------------------


@pytest.fixture(scope="session")
def repo_root() -> Path:
    """The project's checkout (params.yaml, MLproject, README.md, pipeline/)."""
    return ROOT


@pytest.fixture(scope="session")
def shared_mnist() -> Path:
    """The offline copy of the real MNIST files; the test is skipped on a machine without it."""
    if not SHARED_MNIST.is_dir():
        pytest.skip(f"no offline MNIST copy at {SHARED_MNIST}")
    return SHARED_MNIST


@pytest.fixture(scope="session")
def shared_fashion_mnist() -> Path:
    """The offline copy of the real Fashion-MNIST files; the test is skipped without it."""
    if not SHARED_FASHION_MNIST.is_dir():
        pytest.skip(f"no offline Fashion-MNIST copy at {SHARED_FASHION_MNIST}")
    return SHARED_FASHION_MNIST


@pytest.fixture(scope="session")
def tiny_images() -> Callable[..., tuple[np.ndarray, np.ndarray]]:
    """``tiny_images(n, seed=0)``: n learnable uint8 images (bars placed by the label) and labels."""
    return _tiny_images


@pytest.fixture(scope="session")
def write_dataset() -> Callable[..., Path]:
    """``write_dataset(path, n_train, n_test=64, train_seed=1, test_seed=2)``: a tiny mnist.npz."""
    return _write_dataset


@pytest.fixture(scope="session")
def write_params() -> Callable[[Path, dict[str, dict[str, Any]]], Path]:
    """``write_params(path, {"train": {"epochs": 1}})``: params.yaml with some values changed."""
    return _write_params


@pytest.fixture
def tiny_npz(tmp_path: Path) -> Path:
    """``tmp_path/data/mnist.npz`` with 256 train and 64 test images."""
    return _write_dataset(tmp_path / "data" / "mnist.npz", 256)


@pytest.fixture(scope="session")
def _empty_mlflow_db(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """An embedded store with MLflow's tables and nothing else, made once: creating the tables
    takes a second or more, copying the file a millisecond."""
    import mlflow

    path = tmp_path_factory.mktemp("mlflow-template") / "mlflow.db"
    uri = f"sqlite:///{path}"
    client = mlflow.MlflowClient(uri, uri)
    client.search_experiments(max_results=1)
    client.search_registered_models(max_results=1)
    return path


@pytest.fixture
def mlflow_store(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, _empty_mlflow_db: Path) -> Iterator[str]:
    """An embedded MLflow store ``tmp_path/mlflow.db`` for the test, through
    ``MLFLOW_TRACKING_URI``; the process-wide URIs that ``tracking.configure`` sets are reset
    afterwards."""
    import mlflow

    shutil.copyfile(_empty_mlflow_db, tmp_path / "mlflow.db")
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    for name in (
        "MLFLOW_REGISTRY_URI",
        "MLFLOW_RUN_ID",
        "MLFLOW_EXPERIMENT_NAME",
        "MLFLOW_EXPERIMENT_ID",
        "MNIST_MIRRORS",
        "FASHION_MNIST_MIRRORS",
        "DVC_EXP_NAME",
        "DVC_ROOT",
    ):
        monkeypatch.delenv(name, raising=False)
    yield uri
    while mlflow.active_run() is not None:
        mlflow.end_run()
    mlflow.set_tracking_uri(None)
    mlflow.set_registry_uri(None)


def _stroke_picture(path: Path, ink: str = "black", paper: str = "white") -> Path:
    """A 100x60 picture of a 7-like stroke, as a user's photo or drawing might be."""
    from PIL import Image, ImageDraw

    picture = Image.new("RGB", (100, 60), paper)
    ImageDraw.Draw(picture).line([(35, 12), (62, 12), (44, 50)], fill=ink, width=6)
    picture.save(path)
    return path


@pytest.fixture(scope="session")
def stroke_picture() -> Callable[..., Path]:
    """``stroke_picture(path, ink="black", paper="white")``: a drawn 7 saved as PNG or JPEG."""
    return _stroke_picture


# --- the downloader: tiny stand-ins for the four MNIST files -----------------------------------

TINY_SPLITS = {"train": 3, "test": 2}  # images in the tiny stand-in files


def _idx_bytes(array: np.ndarray, type_code: int = 0x08) -> bytes:
    """Encodes an array as an IDX file (the inverse of ``parse_idx``, written independently)."""
    header = bytes([0, 0, type_code, array.ndim])
    header += b"".join(int(d).to_bytes(4, "big") for d in array.shape)
    return header + array.astype(np.uint8).tobytes()


def _make_mirror(directory: Path, files: dict[str, bytes], compress: bool = True) -> Path:
    directory.mkdir(parents=True, exist_ok=True)
    for name, raw in files.items():
        if compress:
            (directory / f"{name}.gz").write_bytes(gzip.compress(raw))
        else:
            (directory / name).write_bytes(raw)
    return directory


@pytest.fixture(scope="session")
def idx_bytes() -> Callable[..., bytes]:
    """``idx_bytes(array, type_code=0x08)``: the array encoded as an IDX file."""
    return _idx_bytes


@pytest.fixture(scope="session")
def make_mirror() -> Callable[..., Path]:
    """``make_mirror(folder, {name: raw}, compress=True)``: a local mirror holding those files."""
    return _make_mirror


@pytest.fixture
def tiny_idx(monkeypatch: pytest.MonkeyPatch) -> dict[str, bytes]:
    """Four tiny MNIST-shaped IDX files (labels: train 0, 9, 4; test 7, 1), with the digests of every
    dataset in ``mnist_vae.data.fetch.SHA256`` pointed at them so that the real checks run on them."""
    from mnist_vae.data import fetch

    rng = np.random.default_rng(0)
    files = {
        "train-images-idx3-ubyte": _idx_bytes(rng.integers(0, 256, (TINY_SPLITS["train"], 28, 28))),
        "train-labels-idx1-ubyte": _idx_bytes(np.array([0, 9, 4])),
        "t10k-images-idx3-ubyte": _idx_bytes(rng.integers(0, 256, (TINY_SPLITS["test"], 28, 28))),
        "t10k-labels-idx1-ubyte": _idx_bytes(np.array([7, 1])),
    }
    digests = {name: hashlib.sha256(raw).hexdigest() for name, raw in files.items()}
    monkeypatch.setattr(fetch, "SHA256", {dataset: digests for dataset in fetch.SHA256})
    return files


@pytest.fixture
def tiny_splits(monkeypatch: pytest.MonkeyPatch) -> dict[str, int]:
    """Lets ``download_dataset`` accept the tiny files' sizes instead of 60000/10000; returns them."""
    from mnist_vae.data import fetch

    monkeypatch.setattr(
        fetch,
        "SPLITS",
        {
            "train": ("train-images-idx3-ubyte", "train-labels-idx1-ubyte", TINY_SPLITS["train"]),
            "test": ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte", TINY_SPLITS["test"]),
        },
    )
    return TINY_SPLITS


# --- end-to-end: project folders run by real processes -----------------------------------------


def _project_env(root: Path) -> dict[str, str]:
    env = {
        **os.environ,
        "MLFLOW_TRACKING_URI": f"sqlite:///{root / 'mlflow.db'}",
        "PATH": f"{VENV_BIN}{os.pathsep}{os.environ['PATH']}",
    }
    for name in (
        "MLFLOW_REGISTRY_URI",
        "MLFLOW_RUN_ID",
        "MNIST_MIRRORS",
        "FASHION_MNIST_MIRRORS",
        "DVC_EXP_NAME",
        "DVC_ROOT",
    ):
        env.pop(name, None)
    return env


# Small enough to train for a few epochs in seconds on 2 cores, big enough to learn the bars.
SMALL_PROJECT = {
    "model": {"preset": "mlp", "hidden": [64], "latent": 4},
    "train": {"device": "cpu", "epochs": 5, "batch_size": 16, "lr": 0.002, "limit": 0, "threads": 1},
    "evaluate": {"iw_samples": 2, "n_images": 4},
}


def _make_project(root: Path, n_train: int = 2000, validation: int = 100) -> dict[str, str]:
    """A project folder with the stage scripts, small params and a tiny dataset of ``n_train``
    training images of which the last ``validation`` are held out; returns the environment to run
    its stages in (the venv on PATH, its own embedded MLflow store)."""
    root.mkdir(parents=True, exist_ok=True)
    shutil.copytree(ROOT / "pipeline", root / "pipeline")
    changes = {**SMALL_PROJECT, "train": {**SMALL_PROJECT["train"], "validation": validation}}
    _write_params(root / "params.yaml", changes)
    _write_dataset(root / "data" / "mnist.npz", n_train)
    return _project_env(root)


def _copy_repo(root: Path, changes: dict[str, dict[str, Any]], data: Path | None = None) -> Path:
    """The files this checkout tracks or would track (code, params, dvc.yaml and dvc.lock; no
    outputs) copied into ``root``, with some params changed: a fresh clone of the working tree.

    With ``data`` (the real ``mnist.npz`` that the download stage wrote), the file is linked into
    the copy's workspace and DVC cache: `dvc repro` then finds the download stage up to date, as
    after `dvc pull`, instead of parsing and compressing MNIST once more.
    """
    files = subprocess.run(
        ["git", "ls-files", "-co", "--exclude-standard"], cwd=ROOT, capture_output=True, text=True, check=True
    ).stdout.split()
    for name in files:
        if (ROOT / name).is_file():
            (root / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(ROOT / name, root / name)
    _write_params(root / "params.yaml", changes)
    if data is not None:
        _link_mnist(root, data)
    return root


def _link_mnist(root: Path, data: Path) -> Path:
    """Links ``data`` (the download stage's output) into the project's workspace and DVC cache,
    where `dvc pull` would put it; returns the workspace file."""
    from mnist_vae.tracking import file_md5

    md5 = file_md5(data)
    workspace = root / "data" / "mnist.npz"
    for target in (workspace, root / ".dvc" / "cache" / "files" / "md5" / md5[:2] / md5[2:]):
        target.parent.mkdir(parents=True, exist_ok=True)
        if not target.exists():
            os.link(data, target)
    return workspace


@pytest.fixture(scope="session")
def link_mnist(real_mnist: Path) -> Callable[[Path], Path]:
    """``link_mnist(root)``: the real data/mnist.npz in the project ``root``, as after `dvc pull`."""
    return functools.partial(_link_mnist, data=real_mnist)


@pytest.fixture(scope="session")
def copy_repo(real_mnist: Path) -> Callable[..., Path]:
    """``copy_repo(root, {"train": {"epochs": 2}})``: the repo's files in ``root``, params changed,
    and the real ``data/mnist.npz`` in place (``data=None`` leaves it out)."""
    return functools.partial(_copy_repo, data=real_mnist)


def _session_folder(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """This test run's base folder, the same for every pytest-xdist worker of the run."""
    base = tmp_path_factory.getbasetemp()
    return base.parent if os.environ.get("PYTEST_XDIST_WORKER") else base


@pytest.fixture(scope="session")
def real_mnist(tmp_path_factory: pytest.TempPathFactory, shared_mnist: Path) -> Path:
    """The real MNIST as the download stage writes it (``pipeline/download.py``, a real process,
    from the offline mirror), made once per test run: every project that `dvc repro`s gets this
    file instead of parsing and compressing 70,000 images again. Workers of pytest-xdist share it
    through a file lock, as xdist's documentation shows."""
    from filelock import FileLock

    folder = _session_folder(tmp_path_factory) / "real-mnist"
    folder.mkdir(exist_ok=True)
    out = folder / "data" / "mnist.npz"
    with FileLock(folder / ".lock"):
        if not out.is_file():
            shutil.copytree(ROOT / "pipeline", folder / "pipeline", dirs_exist_ok=True)
            shutil.copy2(ROOT / "params.yaml", folder / "params.yaml")
            env = {**_project_env(folder), "MNIST_MIRRORS": str(shared_mnist)}
            result = subprocess.run(
                [sys.executable, "pipeline/download.py"],
                cwd=folder,
                env=env,
                capture_output=True,
                text=True,
                timeout=600,
            )
            assert result.returncode == 0, result.stdout + result.stderr
    return out


@pytest.fixture(scope="session")
def make_project() -> Callable[..., dict[str, str]]:
    """``make_project(root, n_train=2000, validation=100)``: a runnable project; returns its env.

    Its params: hidden [64], latent 4, 5 epochs of batch 16 on the CPU, 1 thread.
    """
    return _make_project


def _losses(root: Path) -> list[float]:
    with open(root / "reports" / "train_history.csv") as fh:
        return [float(row["loss"]) for row in csv.DictReader(fh)]


@pytest.fixture(scope="session")
def history_losses() -> Callable[[Path], list[float]]:
    """``history_losses(root)``: the per-epoch training loss the train stage wrote."""
    return _losses


def _runs(root: Path, experiment: str = "mnist-vae") -> tuple[list, Any]:
    import mlflow

    client = mlflow.MlflowClient(f"sqlite:///{root / 'mlflow.db'}")
    found = client.get_experiment_by_name(experiment)
    assert found is not None, f"no experiment {experiment!r} in {root / 'mlflow.db'}"
    return client.search_runs([found.experiment_id]), client


@pytest.fixture(scope="session")
def project_runs() -> Callable[..., tuple[list, Any]]:
    """``project_runs(root)``: the runs of experiment mnist-vae in the project's embedded store,
    and a client of that store."""
    return _runs


# --- end-to-end: HTTP servers in their own process group --------------------------------------


def _wait_ready(url: str, process: subprocess.Popen, log: Path, ping: str, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise AssertionError(
                f"{url}: the server exited ({process.returncode}):\n{log.read_text()[-3000:]}"
            )
        try:
            if requests.get(f"{url}{ping}", timeout=2).status_code == 200:
                return
        except (requests.ConnectionError, requests.Timeout):  # not listening yet, or still busy
            pass
        time.sleep(0.5)
    raise AssertionError(f"{url}{ping} did not answer 200 within {timeout:.0f}s:\n{log.read_text()[-3000:]}")


@contextlib.contextmanager
def _http_server(
    command: list[str],
    log: Path,
    ping: str = "/ping",
    env: dict[str, str] | None = None,
    cwd: Path | None = None,
    timeout: float = 180,
) -> Iterator[str]:
    """Runs ``command --host 127.0.0.1 --port PORT`` (a free port) in its own process group, logging
    to ``log``; yields its URL once ``ping`` answers 200, and always stops the group (workers
    included) at the end; a watchdog stops it should the test process be killed first."""
    from mnist_vae import procs

    port = procs.free_port()
    with procs.Watchdog() as watchdog, open(log, "w") as out:
        process = procs.start(
            [*command, "--host", "127.0.0.1", "--port", str(port)],
            log=out,
            env=env,
            cwd=cwd,
            watchdog=watchdog,
        )
        try:
            url = f"http://127.0.0.1:{port}"
            _wait_ready(url, process, log, ping, timeout)
            yield url
        finally:
            procs.stop_group(process.pid, process, grace=20.0)
            watchdog.forget(process.pid)


@pytest.fixture(scope="session")
def http_server() -> Callable[..., contextlib.AbstractContextManager[str]]:
    """``with http_server([mlflow, "models", "serve", ...], log, ping="/ping", env=...) as url``:
    a real server process on 127.0.0.1, stopped with its workers when the block ends."""
    return _http_server


@pytest.fixture(scope="session")
def venv_bin() -> Path:
    """The folder of this interpreter's console scripts (mlflow, dvc, mnist-vae)."""
    return VENV_BIN


def _trained_and_registered(
    root: Path, repo_root: Path, venv_bin: Path, overrides: list[str]
) -> dict[str, str]:
    """The train and evaluate stages run in this process on a tiny dataset in ``root`` (the repo's
    params.yaml, copied for the CLI, with ``overrides``), into a store of the project's own; returns
    the environment for processes on that store: the venv's commands first on PATH, tracking and
    registry on the store whatever earlier tests left in os.environ."""
    from mnist_vae.config import load_params
    from mnist_vae.stages import evaluate, train

    _write_dataset(root / "data" / "mnist.npz", 512 + 64)
    (root / "params.yaml").write_text((repo_root / "params.yaml").read_text())
    env = {"MLFLOW_TRACKING_URI": f"sqlite:///{root / 'mlflow.db'}"}
    with pytest.MonkeyPatch.context() as mp:
        mp.chdir(root)
        for key, value in env.items():
            mp.setenv(key, value)
        mp.delenv("MLFLOW_REGISTRY_URI", raising=False)
        params = load_params(repo_root / "params.yaml", overrides)
        train.run(params, progress=False)
        evaluate.run(params)
    import mlflow

    mlflow.set_tracking_uri(None)
    mlflow.set_registry_uri(None)
    full_env = {**os.environ, **env, "PATH": f"{venv_bin}{os.pathsep}{os.environ['PATH']}"}
    full_env.pop("MLFLOW_REGISTRY_URI", None)
    return full_env


@pytest.fixture(scope="session")
def trained_and_registered() -> Callable[..., dict[str, str]]:
    """``trained_and_registered(root, repo_root, venv_bin, overrides)``: a trained, evaluated and
    registered tiny project (:func:`_trained_and_registered`)."""
    return _trained_and_registered
