"""The promotion gate and registration against a real `mlflow server` that fails or races.

A real tracking server (SQLite backend, proxied artifacts) sits behind a small real HTTP proxy in
this process. The proxy forwards every request, except those a test tells it to answer with a 500
(the server failing one endpoint) or to hold back (two pipelines' writes arriving in a chosen
order). Everything else is real: the stage processes, MLflow's client, the server and its store.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
from collections.abc import Callable, Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import parse_qs, urlsplit

import pytest
import requests
from mlflow import MlflowClient

pytestmark = pytest.mark.slow

API = "/api/2.0/mlflow"
# A failing endpoint fails at once: no retries with back-off.
NO_RETRIES = {
    "MLFLOW_HTTP_REQUEST_MAX_RETRIES": "0",
    "MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR": "0",
    "MLFLOW_HTTP_REQUEST_TIMEOUT": "300",
}
# Answers a request itself (a status code), or lets it through (None); may block to order requests.
Rule = Callable[[str, str, dict[str, list[str]], bytes], int | None]
# Called once a request that was let through has been answered by the server.
After = Callable[[str, str, bytes], None]


class Proxy(ThreadingHTTPServer):
    """Forwards HTTP requests to ``upstream``; ``rule`` may answer one with an error instead."""

    daemon_threads = True

    def __init__(self, upstream: str) -> None:
        super().__init__(("127.0.0.1", 0), _Forward)
        self.upstream = upstream
        self.rule: Rule = lambda method, path, query, body: None
        self.after: After = lambda method, path, body: None
        self.seen: list[tuple[str, str]] = []

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.server_address[1]}"


class _Forward(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    server: Proxy

    def log_message(self, format: str, *args) -> None:  # noqa: A002 (the base class's name)
        pass

    def _body(self) -> bytes:
        if self.headers.get("Transfer-Encoding", "").lower() == "chunked":
            chunks = []
            while size := int(self.rfile.readline().strip() or b"0", 16):
                chunks.append(self.rfile.read(size))
                self.rfile.readline()
            self.rfile.readline()
            return b"".join(chunks)
        return self.rfile.read(int(self.headers.get("Content-Length") or 0))

    def _forward(self) -> None:
        body = self._body()
        split = urlsplit(self.path)
        self.server.seen.append((self.command, self.path))
        status = self.server.rule(self.command, split.path, parse_qs(split.query), body)
        if status is not None:
            self._reply(
                status,
                {"Content-Type": "application/json"},
                json.dumps(
                    {"error_code": "INTERNAL_ERROR", "message": "the test's proxy failed this request"}
                ).encode(),
            )
            return
        headers = {
            k: v
            for k, v in self.headers.items()
            if k.lower() not in ("host", "content-length", "transfer-encoding", "connection")
        }
        answer = requests.request(
            self.command, self.server.upstream + self.path, headers=headers, data=body, timeout=300
        )
        self.server.after(self.command, split.path, body)
        # requests has decoded the body: its length and encoding headers no longer apply.
        kept = {
            k: v
            for k, v in answer.headers.items()
            if k.lower() not in ("content-length", "transfer-encoding", "connection", "content-encoding")
        }
        self._reply(answer.status_code, kept, answer.content)

    def _reply(self, status: int, headers: dict[str, str], content: bytes) -> None:
        self.send_response(status)
        for key, value in headers.items():
            self.send_header(key, value)
        self.send_header("Content-Length", str(len(content)))
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(content)

    do_GET = do_POST = do_PUT = do_PATCH = do_DELETE = do_HEAD = _forward


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory, venv_bin: Path, http_server: Callable) -> Iterator[str]:
    """A real tracking server for the module: SQLite backend, artifacts proxied into a folder."""
    root = tmp_path_factory.mktemp("gate-server")
    with http_server(
        [
            str(venv_bin / "mlflow"),
            "server",
            "--workers",
            "1",
            "--backend-store-uri",
            f"sqlite:///{root / 'backend.db'}",
            "--serve-artifacts",
            "--artifacts-destination",
            str(root / "artifacts"),
        ],
        root / "server.log",
        ping="/health",
        timeout=600,
        # The job runner (GenAI jobs) would start a dozen huey workers, each importing MLflow.
        env={**os.environ, "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"},
    ) as url:
        yield url


@pytest.fixture
def proxy(server: str) -> Iterator[Proxy]:
    """A proxy in front of the server, letting everything through until a test sets a rule."""
    proxy = Proxy(server)
    thread = threading.Thread(target=proxy.serve_forever, daemon=True)
    thread.start()
    yield proxy
    proxy.shutdown()
    proxy.server_close()


def _stage(
    stage: str, root: Path, env: dict[str, str], *settings: str, ok: bool = True
) -> subprocess.CompletedProcess:
    args = [sys.executable, f"pipeline/{stage}.py"]
    for setting in settings:
        args += ["--set", setting]
    result = subprocess.run(args, cwd=root, env=env, capture_output=True, text=True, timeout=600)
    if ok:
        assert result.returncode == 0, f"{stage}:\n{result.stdout}\n{result.stderr}"
    return result


def _project(
    root: Path, make_project: Callable[..., dict[str, str]], proxy: Proxy, model_name: str
) -> tuple[dict[str, str], list[str]]:
    """A project whose stages talk to the proxy, with its own temp folder; its --set settings."""
    env = {
        **make_project(root, n_train=1200, validation=200),
        "MLFLOW_TRACKING_URI": proxy.url,
        **NO_RETRIES,
        "TMPDIR": str(root / "tmp"),
    }
    (root / "tmp").mkdir()
    return env, [f"mlflow.registered_model={model_name}", "evaluate.iw_samples=1"]


def _client(server: str) -> MlflowClient:
    return MlflowClient(server, server)


def _run_tags(client: MlflowClient, root: Path) -> dict[str, str]:
    run_id = json.loads((root / "models" / "run.json").read_text())["run_id"]
    return client.get_run(run_id).data.tags


def _warnings(stderr: str) -> list[str]:
    return [line for line in stderr.splitlines() if line.startswith("warning: promotion gate")]


# --- 1. the gate fails closed --------------------------------------------------------------------


def test_a_gate_that_cannot_read_the_champion_leaves_it_alone(
    server: str,
    proxy: Proxy,
    tmp_path: Path,
    make_project: Callable[..., dict[str, str]],
) -> None:
    """The server fails the gate's read of the registered model (HTTP 500): `champion` stays on
    version 1, version 2 stays `candidate`, the run says why, and the stage exits 0 with one
    warning line (the version is registered and the outputs are valid)."""
    name = "gate-fails-closed"
    env, settings = _project(tmp_path, make_project, proxy, name)
    _stage("train", tmp_path, env, "train.epochs=2")
    _stage("evaluate", tmp_path, env, *settings)
    client = _client(server)
    assert client.get_registered_model(name).aliases == {"champion": "1", "candidate": "1"}

    def refuse_champion(method: str, path: str, query: dict, body: bytes) -> int | None:
        reading = method == "GET" and path == f"{API}/registered-models/alias"
        return 500 if reading and query.get("alias") == ["champion"] else None

    proxy.rule = refuse_champion
    result = _stage("evaluate", tmp_path, env, *settings, "evaluate.seed=1")  # a second evaluation
    assert any(method == "GET" and "alias=champion" in path for method, path in proxy.seen)
    assert client.get_registered_model(name).aliases == {"champion": "1", "candidate": "2"}
    warning = _warnings(result.stderr)
    assert len(warning) == 1, result.stderr
    assert "could not decide for version 2" in warning[0]
    assert "champion is left where it was, version 2 stays candidate" in warning[0]
    assert "promotion gate: version 2" not in result.stdout
    tags = _run_tags(client, tmp_path)
    assert tags["registry.version"] == "2"
    assert tags["registry.gate_decision"] == "error"
    assert tags["registry.promoted"] == "False"
    assert "500" in tags["registry.gate_error"] or "INTERNAL_ERROR" in tags["registry.gate_error"]
    assert (tmp_path / "metrics.json").is_file()
    assert client.get_model_version(name, "2").tags["registration"] == "complete"


# --- 2. registration in one piece ---------------------------------------------------------------


def test_a_registration_failing_part_way_leaves_nothing_behind(
    server: str,
    proxy: Proxy,
    tmp_path: Path,
    make_project: Callable[..., dict[str, str]],
) -> None:
    """The server fails (a) the weights' upload, (b) the `candidate` alias after the version was
    created: each time no version remains, no temporary folder remains, the stage ends with one
    line and exit code 1, and the previous outputs are kept. Then a working registration creates a
    version that has all its tags from its first moment."""
    name = "gate-one-piece"
    env, settings = _project(tmp_path, make_project, proxy, name)
    _stage("train", tmp_path, env, "train.epochs=1")
    client = _client(server)

    def fail_model_upload(method: str, path: str, query: dict, body: bytes) -> int | None:
        uploading = method == "PUT" and path.startswith("/api/2.0/mlflow-artifacts/artifacts/")
        return 500 if uploading and "/models/" in path else None

    def fail_candidate(method: str, path: str, query: dict, body: bytes) -> int | None:
        if method == "POST" and path == f"{API}/registered-models/alias":
            return 500 if json.loads(body)["alias"] == "candidate" else None
        return None

    for rule, expected in (
        (fail_model_upload, "failed"),
        (fail_candidate, "version 1 was deleted, nothing is registered"),
    ):
        proxy.rule = rule
        result = _stage("evaluate", tmp_path, env, *settings, ok=False)
        assert result.returncode == 1, result.stderr
        last = result.stderr.strip().splitlines()[-1]
        assert last.startswith("error: evaluate: ") and expected in last, result.stderr
        assert "Traceback" not in result.stderr
        assert client.search_model_versions(f"name='{name}'") == []
        assert not (tmp_path / "metrics.json").exists()
        left = sorted(p.name for p in (tmp_path / "tmp").iterdir())
        assert not [n for n in left if n.startswith("mnist-vae")], left
    assert any(method == "POST" and path == f"{API}/model-versions/create" for method, path in proxy.seen), (
        "the second failure came after the version existed"
    )

    created: list[dict] = []

    def watch_versions(method: str, path: str, query: dict, body: bytes) -> None:
        # What the server is asked to create, as it is asked: the tags come with the creation.
        if method == "POST" and path == f"{API}/model-versions/create":
            created.append(json.loads(body))
        return None

    proxy.rule = watch_versions
    _stage("evaluate", tmp_path, env, *settings)
    assert len(created) == 1
    tags = {t["key"]: t["value"] for t in created[0]["tags"]}
    assert {
        "test_neg_elbo",
        "test_nll_iw",
        "git_commit",
        "dvc_data_md5",
        "run_id",
        "run_link",
        "preset",
    } <= set(tags)
    assert tags["registration"] == "pending" and created[0]["description"]
    (version,) = client.search_model_versions(f"name='{name}'")
    assert version.tags["registration"] == "complete"
    assert client.get_registered_model(name).aliases["candidate"] == str(version.version)
    # The version is the logged model, whose test metrics were logged before the version existed.
    logged = client.get_logged_model(created[0]["model_id"])
    assert "test_neg_elbo" in {m.key for m in logged.metrics}


# --- 3. one winner across machines ---------------------------------------------------------------


def _validation_neg_elbo(root: Path) -> float:
    """What the gate measures: the project's weights on its validation split, one sample each."""
    from mnist_vae.config import load_params
    from mnist_vae.data.dataset import load_dataset
    from mnist_vae.evaluation.metrics import evaluate_model
    from mnist_vae.models.weights import load_model

    params = load_params(root / "params.yaml")
    _, _, images, labels = load_dataset(root / "data" / "mnist.npz").split(params.train.validation)
    quick = params.evaluate.replace(iw_samples=1, limit=0)
    return evaluate_model(load_model(root / "models" / "model.pt"), images, labels, quick).metrics["neg_elbo"]


def test_two_pipelines_finishing_at_once_leave_the_better_champion(
    server: str,
    proxy: Proxy,
    tmp_path: Path,
    make_project: Callable[..., dict[str, str]],
) -> None:
    """Two pipelines in separate project folders (separate lock folders) register against one
    server at once. Both read the same champion and both move it; the proxy lets the better one's
    write through first, so that without a re-check the worse one's later write would win."""
    name = "gate-race"
    roots = {key: tmp_path / key for key in ("weak", "a", "b")}
    envs = {key: _project(root, make_project, proxy, name) for key, root in roots.items()}
    settings = envs["weak"][1]
    _stage("train", roots["weak"], envs["weak"][0], "train.epochs=1", "train.limit=32")
    _stage("train", roots["a"], envs["a"][0], "train.epochs=4")
    _stage("train", roots["b"], envs["b"][0], "train.epochs=1", "train.limit=400")
    _stage("evaluate", roots["weak"], envs["weak"][0], *settings)
    client = _client(server)
    assert client.get_registered_model(name).aliases["champion"] == "1"
    scores = {key: _validation_neg_elbo(roots[key]) for key in ("a", "b")}
    better, worse = sorted(scores, key=scores.get)
    run_of = {
        key: json.loads((roots[key] / "models" / "run.json").read_text())["run_id"] for key in ("a", "b")
    }

    worse_arrived, better_written = threading.Event(), threading.Event()
    first_writes: list[str] = []
    lock = threading.Lock()

    def champion_write(method: str, path: str, body: bytes) -> str | None:
        """Whose version a request moves `champion` to ("a" or "b"), or None for other requests."""
        if method != "POST" or path != f"{API}/registered-models/alias":
            return None
        request = json.loads(body)
        if request["alias"] != "champion":
            return None
        run_id = client.get_model_version(name, request["version"]).run_id
        return next(key for key, run in run_of.items() if run == run_id)

    def better_first(method: str, path: str, query: dict, body: bytes) -> int | None:
        who = champion_write(method, path, body)
        with lock:
            first = who is not None and who not in first_writes
            if who is not None:
                first_writes.append(who)
        if first and who == worse:
            worse_arrived.set()
            better_written.wait(timeout=280)
        elif first:
            worse_arrived.wait(timeout=280)  # until the worse one has read the champion too
        return None

    def after(method: str, path: str, body: bytes) -> None:
        if champion_write(method, path, body) == better:
            better_written.set()

    proxy.after = after
    proxy.rule = better_first
    jobs = {
        key: subprocess.Popen(
            [sys.executable, "pipeline/evaluate.py", *(arg for s in settings for arg in ("--set", s))],
            cwd=roots[key],
            env=envs[key][0],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for key in ("a", "b")
    }
    outputs = {key: job.communicate(timeout=600) for key, job in jobs.items()}
    for key, job in jobs.items():
        assert job.returncode == 0, outputs[key]
        assert not _warnings(outputs[key][1]), outputs[key]
    assert first_writes[:2] in ([better, worse], [worse, better]), first_writes
    assert worse_arrived.is_set() and better_written.is_set(), "the writes did not race"

    versions = {
        key: str(
            next(v.version for v in client.search_model_versions(f"name='{name}'") if v.run_id == run_of[key])
        )
        for key in ("a", "b")
    }
    champion = client.get_registered_model(name).aliases["champion"]
    assert champion == versions[better], (scores, versions, outputs)
    # Both decisions are logged; every promotion names the champion it displaced, and the alias
    # ends on the one promoted version that nothing displaced.
    reasons = {versions[key]: _run_tags(client, roots[key])["registry.gate_reason"] for key in ("a", "b")}
    for key in ("a", "b"):
        assert reasons[versions[key]] in outputs[key][0], outputs[key]
    promoted = {v for v, r in reasons.items() if r.startswith(f"version {v} promoted")}
    displaced = {r.split(" of version ")[1].split()[0] for v, r in reasons.items() if v in promoted}
    assert promoted - displaced == {champion}, reasons
    assert f"of version {versions[worse]} on" in reasons[versions[better]], reasons
