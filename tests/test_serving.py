"""The registered model behind a real `mlflow models serve` process, asked over real HTTP."""

from __future__ import annotations

import json
import math
import os
import socket
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest
import requests

from mnist_vae.config import load_params
from mnist_vae.serving import ServedVAE, as_batch

from .conftest import ROOT, tiny_images

pytestmark = pytest.mark.slow

TINY = {"model.hidden": [32], "model.latent": 4, "train.epochs": 2, "train.batch_size": 32,
        "train.lr": 0.003, "evaluate.iw_samples": 2}


@pytest.fixture(scope="module")
def registered(tmp_path_factory: pytest.TempPathFactory) -> dict[str, str]:
    """Trains, evaluates and registers a tiny model in a store of its own; returns the env."""
    from mnist_vae import stages

    root = tmp_path_factory.mktemp("serve")
    x_train, y_train = tiny_images(512, seed=1)
    x_test, y_test = tiny_images(64, seed=2)
    (root / "data").mkdir()
    np.savez(root / "data" / "mnist.npz", x_train=x_train, y_train=y_train, x_test=x_test,
             y_test=y_test)
    env = {"MLFLOW_TRACKING_URI": f"sqlite:///{root / 'mlflow.db'}"}
    old_cwd, old_env = Path.cwd(), {k: os.environ.get(k) for k in env}
    os.chdir(root)
    os.environ.update(env)
    try:
        params = load_params(ROOT / "params.yaml", TINY)
        stages.train(params, progress=False)
        stages.evaluate(params)
    finally:
        os.chdir(old_cwd)
        for key, value in old_env.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value
    # The server runs `uvicorn` from PATH: the venv's, as with an activated venv.
    path = f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}"
    return {**os.environ, **env, "PATH": path}


@pytest.fixture(scope="module")
def server(registered: dict[str, str], tmp_path_factory: pytest.TempPathFactory):
    """`mlflow models serve` on 127.0.0.1; always stopped at the end, also when a test fails."""
    port = _free_port()
    log = (tmp_path_factory.mktemp("serve-log") / "server.log").open("w")
    mlflow_cli = Path(sys.executable).parent / "mlflow"
    process = subprocess.Popen(
        [str(mlflow_cli), "models", "serve", "-m", "models:/mnist-vae@champion",
         "--env-manager", "local", "-h", "127.0.0.1", "-p", str(port)],
        env=registered, stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
    )
    url = f"http://127.0.0.1:{port}"
    try:
        _wait_ready(url, process, log.name)
        yield url
    finally:
        _stop(process)
        log.close()


def _stop(process: subprocess.Popen) -> None:
    """Stops the server and its workers (their own process group)."""
    try:
        os.killpg(process.pid, 15)
        process.wait(timeout=20)
    except ProcessLookupError:
        return
    except subprocess.TimeoutExpired:
        os.killpg(process.pid, 9)
        process.wait()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _wait_ready(url: str, process: subprocess.Popen, log_path: str, timeout: float = 180,
                ping: str = "/ping") -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"server exited: {Path(log_path).read_text()[-3000:]}")
        try:
            if requests.get(f"{url}{ping}", timeout=2).status_code == 200:
                return
        except requests.ConnectionError:
            pass
        time.sleep(0.5)
    raise RuntimeError(f"mlflow models serve not ready after {timeout}s")


def _post(url: str, body: object, raw: bool = False) -> requests.Response:
    data = body if raw else json.dumps(body)
    return requests.post(f"{url}/invocations", data=data,
                         headers={"Content-Type": "application/json"}, timeout=60)


def _batch(n: int, seed: int = 0) -> np.ndarray:
    return tiny_images(n, seed=seed)[0].reshape(n, 784).astype(np.float32) / 255.0


def _bodies(x: np.ndarray) -> dict[str, dict]:
    columns = [str(i) for i in range(784)]
    return {
        "dataframe_split": {"dataframe_split": {"columns": columns, "data": x.tolist()}},
        "dataframe_records": {"dataframe_records": [dict(zip(columns, row, strict=True))
                                                    for row in x.tolist()]},
        "instances": {"instances": x.tolist()},
        "inputs": {"inputs": x.tolist()},
    }


@pytest.mark.parametrize("fmt", ["dataframe_split", "dataframe_records", "instances", "inputs"])
def test_each_body_format_reconstructs(server: str, fmt: str) -> None:
    x = _batch(3)
    response = _post(server, _bodies(x)[fmt])
    assert response.status_code == 200, response.text
    predictions = np.asarray(response.json()["predictions"], dtype=np.float32)
    assert predictions.shape == (3, 784)
    assert predictions.min() >= 0.0 and predictions.max() <= 1.0


def test_outputs_latent_score_and_sample(server: str) -> None:
    x = _batch(4)
    latent = _post(server, {"inputs": x.tolist(), "params": {"output": "latent"}})
    assert latent.status_code == 200, latent.text
    rows = latent.json()["predictions"]
    assert len(rows) == 4 and set(rows[0]) == {f"mu_{i}" for i in range(4)} | {
        f"logvar_{i}" for i in range(4)}

    score = _post(server, {"inputs": x.tolist(), "params": {"output": "score"}})
    assert score.status_code == 200, score.text
    scores = [r["neg_elbo"] for r in score.json()["predictions"]]
    assert len(scores) == 4 and all(s > 0 and math.isfinite(s) for s in scores)
    # A digit-like image scores as more typical than uniform noise.
    noise = np.random.default_rng(0).random((1, 784), dtype=np.float32)
    noisy = _post(server, {"inputs": noise.tolist(), "params": {"output": "score"}})
    assert noisy.json()["predictions"][0]["neg_elbo"] > max(scores)

    sample = _post(server, {"inputs": x[:1].tolist(), "params": {"output": "sample", "n": 5}})
    assert sample.status_code == 200, sample.text
    assert np.asarray(sample.json()["predictions"]).shape == (5, 784)


@pytest.mark.parametrize(
    ("body", "expected"),
    [
        ({"inputs": [[0.5] * 783]}, "784"),
        ({"inputs": [[float("nan")] * 784]}, "finite"),
        ('{"inputs": [[Infinity' + ", 0.5" * 783 + "]]}", "finite"),
        ({"inputs": [[2.0] * 784]}, "[0, 1]"),
        ({"inputs": []}, ""),
        ({"dataframe_split": {"columns": ["a", "b"], "data": [["x", "y"]]}}, ""),
        ("this is not json", ""),
        ({"inputs": [[0.5] * 784], "params": {"output": "everything"}}, "reconstruction"),
    ],
    ids=["783-values", "nan", "infinity", "out-of-range", "empty", "non-numeric", "not-json",
         "unknown-output"],
)
def test_bad_input_is_a_4xx_and_the_server_keeps_answering(
    server: str, body: object, expected: str
) -> None:
    response = _post(server, body, raw=isinstance(body, str))
    assert 400 <= response.status_code < 500, response.text
    assert expected in response.text
    assert _post(server, {"inputs": _batch(1).tolist()}).status_code == 200


def test_burst_of_concurrent_requests_all_correct(server: str, registered: dict[str, str]) -> None:
    import mlflow

    mlflow.set_tracking_uri(registered["MLFLOW_TRACKING_URI"])
    local = mlflow.pyfunc.load_model("models:/mnist-vae@champion")
    batches = [_batch(2, seed=i) for i in range(200)]

    def ask(i: int) -> np.ndarray:
        response = _post(server, {"inputs": batches[i].tolist()})
        assert response.status_code == 200, response.text
        return np.asarray(response.json()["predictions"], dtype=np.float32)

    with ThreadPoolExecutor(max_workers=8) as pool:
        answers = list(pool.map(ask, range(len(batches))))
    assert len(answers) == 200
    for x, answer in zip(batches, answers, strict=True):
        np.testing.assert_allclose(answer, local.predict(x), atol=1e-5)


def test_as_batch_validation_without_a_server() -> None:
    assert as_batch(np.zeros((2, 28, 28))).shape == (2, 784)
    with pytest.raises(Exception, match="784 values per image"):
        as_batch(np.zeros((2, 10)))
    assert isinstance(ServedVAE, type)
