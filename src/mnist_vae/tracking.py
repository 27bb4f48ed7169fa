"""Where MLflow records runs, and the provenance each run carries."""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import os
import subprocess
from collections.abc import Iterator
from pathlib import Path

import requests

TRACKING_ENV = "MLFLOW_TRACKING_URI"
# DVC runs queued or --temp experiments in a copy of the repo under this folder; their runs belong
# in the project's store, not in a throw-away copy's.
_DVC_EXP_DIR = (".dvc", "tmp", "exps")


class TrackingUnavailableError(RuntimeError):
    """The MLflow tracking server cannot be reached."""


def project_root(cwd: Path | None = None) -> Path:
    """The project's root: the working directory, or the repo that a DVC temp experiment copies."""
    cwd = (cwd or Path.cwd()).resolve()
    parts = cwd.parts
    n = len(_DVC_EXP_DIR)
    for i in range(len(parts) - n):
        if parts[i : i + n] == _DVC_EXP_DIR:
            return Path(*parts[:i])
    return cwd


def tracking_uri(root: Path | None = None) -> str:
    """``$MLFLOW_TRACKING_URI`` if set, else the embedded store ``sqlite:///<root>/mlflow.db``."""
    uri = os.environ.get(TRACKING_ENV, "").strip()
    if uri:
        return uri
    return f"sqlite:///{(root or project_root()) / 'mlflow.db'}"


def artifact_location(uri: str, root: Path | None = None) -> str | None:
    """Artifacts of the embedded store live beside it in ``mlartifacts/``; a server picks its own."""
    if uri.startswith("sqlite:"):
        return ((root or project_root()) / "mlartifacts").as_uri()
    return None


def check_reachable(uri: str, timeout: float = 5.0) -> None:
    """Fails fast, before any training, when a tracking server does not answer.

    Raises:
        TrackingUnavailableError: An http(s) server did not answer its health check.
    """
    if not uri.startswith(("http://", "https://")):
        return
    url = uri.rstrip("/") + "/health"
    try:
        response = requests.get(url, timeout=timeout)
    except requests.RequestException as exc:
        raise TrackingUnavailableError(
            f"MLflow tracking server {uri} cannot be reached ({type(exc).__name__}); start it, or "
            f"unset {TRACKING_ENV} to use the embedded store sqlite:///mlflow.db"
        ) from None
    if response.status_code >= 400:
        raise TrackingUnavailableError(
            f"MLflow tracking server {uri} answered {response.status_code} to {url}; expected 200"
        )


def configure(root: Path | None = None) -> str:
    """Points MLflow (tracking and registry) at the project's store, checks it, returns the URI."""
    import mlflow

    uri = tracking_uri(root)
    check_reachable(uri)
    mlflow.set_tracking_uri(uri)
    mlflow.set_registry_uri(uri)
    if _sqlite_path(uri) is not None:
        # MLflow creates and migrates a SQLite store's tables on first use; two processes doing
        # that at once (queued `dvc exp run` jobs) corrupt its schema. One at a time, then.
        with store_lock(uri):
            client = mlflow.MlflowClient(uri, uri)
            client.search_experiments(max_results=1)
            client.search_registered_models(max_results=1)
    return uri


@contextlib.contextmanager
def store_lock(uri: str | None = None) -> Iterator[None]:
    """Serialises work on an embedded SQLite store across processes (no-op for a server).

    A server's database handles concurrent clients itself; a SQLite file is shared by every process
    on the machine, so read-decide-write sequences (creating the schema, the promotion gate) hold an
    exclusive lock on ``<store>.lock`` beside it.
    """
    import mlflow

    path = _sqlite_path(uri or mlflow.get_tracking_uri())
    if path is None:
        yield
        return
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path.with_name(path.name + ".lock"), "a") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def _sqlite_path(uri: str) -> Path | None:
    """The file of a ``sqlite:///`` URI, or None for other stores (and in-memory SQLite)."""
    prefix = "sqlite:///"
    if not uri.startswith(prefix) or uri == prefix or ":memory:" in uri:
        return None
    return Path(uri[len(prefix):].split("?", 1)[0])


def experiment_id(name: str, root: Path | None = None) -> str:
    """The id of the named experiment, created (with artifacts beside the store) if missing."""
    import mlflow

    found = mlflow.get_experiment_by_name(name)
    if found is not None:
        return found.experiment_id
    location = artifact_location(mlflow.get_tracking_uri(), root)
    try:
        return mlflow.create_experiment(name, artifact_location=location)
    except mlflow.exceptions.MlflowException:
        # Another process created it between our lookup and create.
        return mlflow.get_experiment_by_name(name).experiment_id


def git_commit(root: Path | None = None) -> str:
    """The checked-out commit, with ``-dirty`` when tracked files changed; ``unknown`` outside git."""
    cwd = root or project_root()
    try:
        sha = subprocess.run(["git", "rev-parse", "HEAD"], cwd=cwd, capture_output=True,
                             text=True, check=True).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=cwd,
                               capture_output=True, text=True, check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"
    return f"{sha}-dirty" if dirty else sha


def file_md5(path: Path) -> str:
    """MD5 of a file's bytes: the hash DVC records for a single-file output in dvc.lock."""
    digest = hashlib.md5()
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()
