"""Where MLflow records runs, and the provenance each run carries."""

from __future__ import annotations

import contextlib
import hashlib
import os
import re
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING
from urllib.parse import urlsplit

import requests
from filelock import FileLock

from mnist_vae.errors import UserError, first_line
from mnist_vae.paths import project_root

if TYPE_CHECKING:
    pass

TRACKING_ENV = "MLFLOW_TRACKING_URI"
# The training run's tag holding its weights' MD5 (what dvc.lock records for models/model.pt):
# how the evaluate stage finds the run that trained the model it measures.
MODEL_MD5_TAG = "model.md5"


class TrackingUnavailableError(UserError):
    """The MLflow tracking server cannot be reached."""


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
            f"MLflow tracking server {redacted(uri)} cannot be reached ({type(exc).__name__}); start "
            f"it, or unset {TRACKING_ENV} to use the embedded store sqlite:///mlflow.db"
        ) from None
    if response.status_code >= 400:
        raise TrackingUnavailableError(
            f"MLflow tracking server {redacted(uri)} answered {response.status_code} to "
            f"{redacted(url)}; expected 200"
        )


class TrackingAuthError(UserError):
    """The tracking server refused the credentials (401) or the action (403)."""


USER_ENV, PASSWORD_ENV = "MLFLOW_TRACKING_USERNAME", "MLFLOW_TRACKING_PASSWORD"


@contextlib.contextmanager
def server_errors(action: str) -> Iterator[None]:
    """Turns a server's 401 and 403 into one-line :class:`TrackingAuthError`, naming the user and
    ``action`` (e.g. "log runs in experiment 'mnist-vae'"); other failures keep their traceback."""
    from mlflow.exceptions import MlflowException

    try:
        yield
    except MlflowException as exc:
        error = auth_error(exc, action)
        if error is None:
            raise
        raise error from None


class ArtifactStoreError(UserError):
    """The artifact store (S3 behind a tracking server, or a local folder) refused a file."""


@contextlib.contextmanager
def artifact_errors() -> Iterator[None]:
    """Reports a failed upload of artifacts in one line; auth errors and bugs pass through."""
    import mlflow
    from mlflow.exceptions import MlflowException

    try:
        yield
    except (MlflowException, requests.RequestException) as exc:
        uri = redacted(mlflow.get_tracking_uri())
        if _is_unreachable(exc):
            raise TrackingUnavailableError(
                f"MLflow tracking server {uri} does not answer ({first_line(exc, limit=200)})"
            ) from None
        answered_errors = "ResponseError" in str(exc)
        if auth_error(exc, "") is not None or not (
            answered_errors or getattr(exc, "error_code", None) in _STORE_FAILURES
        ):
            raise
        raise ArtifactStoreError(
            f"the artifact store of {uri} failed: "
            f"{first_line(exc, limit=200)}; nothing was registered and the previous outputs are kept, "
            "run again when it is back"
        ) from None


def _is_unreachable(exc: Exception) -> bool:
    """A connection that failed or timed out (MLflow wraps requests' errors in its own)."""
    import requests

    text = str(exc)
    if "ResponseError" in text:  # it answered, with errors (e.g. 500s while S3 is down behind it)
        return False
    if isinstance(exc, requests.ConnectionError | requests.Timeout):
        return True
    return any(
        sign in text
        for sign in ("Connection refused", "NewConnectionError", "ConnectTimeout", "Read timed out")
    )


# What a tracking server answers when its artifact store (S3) is down behind it.
_STORE_FAILURES = {"INTERNAL_ERROR", "TEMPORARILY_UNAVAILABLE", "BAD_REQUEST", "ENDPOINT_NOT_FOUND"}


def auth_error(exc: Exception, action: str) -> TrackingAuthError | None:
    """The one-line error for an MLflow 401 or 403, or None for any other failure."""
    import mlflow

    code = getattr(exc, "error_code", None)
    uri = redacted(mlflow.get_tracking_uri())
    # The account MLflow sent: its variable, else the user written into the URI.
    user = os.environ.get(USER_ENV, "").strip() or urlsplit(uri).username or ""
    if code == "UNAUTHENTICATED":
        who = f"user {user!r} (wrong password?)" if user else "an anonymous client"
        return TrackingAuthError(
            f"authentication failed at {uri} for {who}: set {USER_ENV} and {PASSWORD_ENV} to an "
            "account of that server"
        )
    if code == "PERMISSION_DENIED":
        return TrackingAuthError(
            f"user {user or '(anonymous)'} may not {action} at {uri} (HTTP 403); ask the "
            "server's admin for that permission, or use an account that has it"
        )
    return None


def configure(root: Path | None = None) -> str:
    """Points MLflow (tracking and registry) at the project's store, checks it, returns the URI."""
    import mlflow

    uri = tracking_uri(root)
    check_reachable(uri)
    mlflow.set_tracking_uri(uri)
    mlflow.set_registry_uri(uri)
    if uri.startswith(("http://", "https://")):
        # Credentials are checked now, before any work: a 401 here is a one-line error.
        with server_errors("read experiments"):
            mlflow.MlflowClient(uri, uri).search_experiments(max_results=1)
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
    with FileLock(path.with_name(path.name + ".lock")):
        yield


def _sqlite_path(uri: str) -> Path | None:
    """The file of a ``sqlite:///`` URI, or None for other stores (and in-memory SQLite)."""
    prefix = "sqlite:///"
    if not uri.startswith(prefix) or uri == prefix or ":memory:" in uri:
        return None
    return Path(uri[len(prefix) :].split("?", 1)[0])


def experiment_id(name: str, root: Path | None = None) -> str:
    """The id of the named experiment, created (with artifacts beside the store) if missing."""
    import mlflow

    with server_errors(f"read experiment {name!r}"):
        found = mlflow.get_experiment_by_name(name)
    if found is not None:
        return found.experiment_id
    location = artifact_location(mlflow.get_tracking_uri(), root)
    try:
        with server_errors(f"create experiment {name!r}"):
            return mlflow.create_experiment(name, artifact_location=location)
    except mlflow.exceptions.MlflowException:
        # Another process created it between our lookup and create; if not, the create's error.
        created = mlflow.get_experiment_by_name(name)
        if created is None:
            raise
        return created.experiment_id


def file_md5(path: Path) -> str:
    """MD5 of a file's bytes: the hash DVC records for a single-file output in dvc.lock."""
    digest = hashlib.md5()
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


# scheme://user:PASSWORD@host, inside any text: the password runs to the last "@" that a host follows
# (a name, an IPv4 or [IPv6] address, an optional port, then a path, a query, a space or the end), so
# a password may hold "@", ":" and "/" (which a URL should percent-encode, and people write anyway).
_PASSWORD_IN_URL = re.compile(
    r"(?P<keep>\b[A-Za-z][A-Za-z0-9+.\-]*://[^\s:/@]*):\S*?@"
    r"(?=(?:[\w.\-]+|\[[0-9A-Fa-f:.]+\])(?::[^\s/?#@]*)?(?:[/?#\s'\"),;]|$))"
)


def redacted(text: str) -> str:
    """``text`` (a URI, or a message that quotes URIs) without any password written into a URI
    (``https://user:pw@host`` becomes ``https://user@host``). User, host and port stay as written
    (no parsing of the port, which may be invalid)."""
    return _PASSWORD_IN_URL.sub(r"\g<keep>@", text)
