"""The registered model behind a real `mlflow models serve` process, asked over real HTTP.
(The input checks and outputs in this process: tests/unit/test_serving.py.)"""

from __future__ import annotations

import json
import math
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest
import requests

pytestmark = pytest.mark.slow

TINY = [
    "model.preset=mlp",
    "model.hidden=[32]",
    "model.latent=4",
    "train.epochs=2",
    "train.batch_size=32",
    "train.lr=0.003",
    "train.validation=64",
    "train.threads=1",
    "evaluate.iw_samples=2",
]


@pytest.fixture(scope="module")
def registered(
    tmp_path_factory: pytest.TempPathFactory,
    repo_root: Path,
    venv_bin: Path,
    trained_and_registered: Callable[..., dict[str, str]],
) -> dict[str, str]:
    """Trains, evaluates and registers a tiny model in a store of its own; returns the env (the
    server runs `uvicorn` from PATH: the venv's, as with an activated venv)."""
    return trained_and_registered(tmp_path_factory.mktemp("serve"), repo_root, venv_bin, TINY)


@pytest.fixture(scope="module")
def server(
    registered: dict[str, str],
    tmp_path_factory: pytest.TempPathFactory,
    venv_bin: Path,
    http_server: Callable,
) -> Iterator[str]:
    """`mlflow models serve` on 127.0.0.1; always stopped at the end, also when a test fails."""
    log = tmp_path_factory.mktemp("serve-log") / "server.log"
    with http_server(
        [
            str(venv_bin / "mlflow"),
            "models",
            "serve",
            "-m",
            "models:/mnist-vae@champion",
            "--env-manager",
            "local",
        ],
        log,
        env=registered,
    ) as url:
        yield url


def _post(url: str, body: object, raw: bool = False) -> requests.Response:
    data = body if raw else json.dumps(body)
    return requests.post(
        f"{url}/invocations", data=data, headers={"Content-Type": "application/json"}, timeout=60
    )


@pytest.fixture(scope="module")
def batch(tiny_images: Callable[..., tuple[np.ndarray, np.ndarray]]) -> Callable[..., np.ndarray]:
    """``batch(n, seed=0)``: n tiny images as the server takes them, 784 grey levels in [0, 1]."""
    return lambda n, seed=0: tiny_images(n, seed=seed)[0].reshape(n, 784).astype(np.float32) / 255.0


def _bodies(x: np.ndarray) -> dict[str, dict]:
    columns = [str(i) for i in range(784)]
    return {
        "dataframe_split": {"dataframe_split": {"columns": columns, "data": x.tolist()}},
        "dataframe_records": {
            "dataframe_records": [dict(zip(columns, row, strict=True)) for row in x.tolist()]
        },
        "instances": {"instances": x.tolist()},
        "inputs": {"inputs": x.tolist()},
    }


@pytest.mark.parametrize("fmt", ["dataframe_split", "dataframe_records", "instances", "inputs"])
def test_each_body_format_reconstructs(server: str, batch: Callable, fmt: str) -> None:
    x = batch(3)
    response = _post(server, _bodies(x)[fmt])
    assert response.status_code == 200, response.text
    predictions = np.asarray(response.json()["predictions"], dtype=np.float32)
    assert predictions.shape == (3, 784)
    assert predictions.min() >= 0.0 and predictions.max() <= 1.0


def test_outputs_latent_score_and_sample(server: str, batch: Callable) -> None:
    x = batch(4)
    latent = _post(server, {"inputs": x.tolist(), "params": {"output": "latent"}})
    assert latent.status_code == 200, latent.text
    rows = latent.json()["predictions"]
    assert len(rows) == 4 and set(rows[0]) == {f"mu_{i}" for i in range(4)} | {
        f"logvar_{i}" for i in range(4)
    }

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
        # MLflow's own schema check answers these before the model sees them.
        ({"inputs": []}, "with schema '[Tensor('float32', (-1, 784))]'"),
        (
            {"dataframe_split": {"columns": ["a", "b"], "data": [["x", "y"]]}},
            "could not convert string to float",
        ),
        ("this is not json", "Ensure that input is a valid JSON formatted string"),
        ({"inputs": [[0.5] * 784], "params": {"output": "everything"}}, "reconstruction"),
    ],
    ids=[
        "783-values",
        "nan",
        "infinity",
        "out-of-range",
        "empty",
        "non-numeric",
        "not-json",
        "unknown-output",
    ],
)
def test_bad_input_is_a_400_and_the_server_keeps_answering(
    server: str, batch: Callable, body: object, expected: str
) -> None:
    response = _post(server, body, raw=isinstance(body, str))
    assert response.status_code == 400, response.text  # docs/serving.md promises 400
    assert expected in response.text, response.text
    assert _post(server, {"inputs": batch(1).tolist()}).status_code == 200


def test_burst_of_concurrent_requests_all_correct(
    server: str, registered: dict[str, str], batch: Callable
) -> None:
    import mlflow

    # Both URIs: an earlier in-process test may have left a registry URI set in this process.
    mlflow.set_tracking_uri(registered["MLFLOW_TRACKING_URI"])
    mlflow.set_registry_uri(registered["MLFLOW_TRACKING_URI"])
    try:
        local = mlflow.pyfunc.load_model("models:/mnist-vae@champion")
    finally:
        mlflow.set_tracking_uri(None)
        mlflow.set_registry_uri(None)
    batches = [batch(2, seed=i) for i in range(200)]

    def ask(i: int) -> np.ndarray:
        response = _post(server, {"inputs": batches[i].tolist()})
        assert response.status_code == 200, response.text
        return np.asarray(response.json()["predictions"], dtype=np.float32)

    with ThreadPoolExecutor(max_workers=8) as pool:
        answers = list(pool.map(ask, range(len(batches))))
    assert len(answers) == 200
    for x, answer in zip(batches, answers, strict=True):
        np.testing.assert_allclose(answer, local.predict(x), atol=1e-5)
