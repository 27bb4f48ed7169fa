"""A team's setup: a real `mlflow server` (SQL store, proxied artifacts) on 127.0.0.1."""

from __future__ import annotations

import json
import subprocess
import sys
from collections.abc import Callable, Iterator
from pathlib import Path

import numpy as np
import pytest
import requests

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def tracking_server(
    tmp_path_factory: pytest.TempPathFactory, venv_bin: Path, http_server: Callable
) -> Iterator[tuple[str, Path]]:
    root = tmp_path_factory.mktemp("server")
    with http_server(
        [
            str(venv_bin / "mlflow"),
            "server",
            "--backend-store-uri",
            f"sqlite:///{root / 'backend.db'}",
            "--serve-artifacts",
            "--artifacts-destination",
            str(root / "artifacts"),
        ],
        root / "server.log",
        ping="/health",
    ) as url:
        yield url, root


def test_pipeline_against_a_tracking_server_then_serve(
    tracking_server: tuple[str, Path],
    tmp_path: Path,
    venv_bin: Path,
    http_server: Callable,
    make_project: Callable[..., dict[str, str]],
) -> None:
    url, server_root = tracking_server
    env = {**make_project(tmp_path, n_train=512), "MLFLOW_TRACKING_URI": url}
    for stage in ("train", "evaluate"):
        result = subprocess.run(
            [
                sys.executable,
                f"pipeline/{stage}.py",
                "--set",
                "train.epochs=2",
                "--set",
                "evaluate.iw_samples=2",
            ],
            cwd=tmp_path,
            env=env,
            capture_output=True,
            text=True,
            timeout=300,
        )
        assert result.returncode == 0, result.stderr
    assert not (tmp_path / "mlflow.db").exists(), "the embedded store must not be used"
    assert not (tmp_path / "mlartifacts").exists()

    api = f"{url}/api/2.0/mlflow"
    experiment = requests.get(
        f"{api}/experiments/get-by-name", params={"experiment_name": "mnist-vae"}, timeout=10
    ).json()
    runs = requests.post(
        f"{api}/runs/search", json={"experiment_ids": [experiment["experiment"]["experiment_id"]]}, timeout=10
    ).json()["runs"]
    assert len(runs) == 1
    run = runs[0]
    assert run["info"]["status"] == "FINISHED"
    metrics = {m["key"] for m in run["data"]["metrics"]}
    assert {"train_loss", "train_kl", "test_neg_elbo", "test_nll_iw"} <= metrics
    history = requests.get(
        f"{api}/metrics/get-history",
        params={"run_id": run["info"]["run_id"], "metric_key": "train_loss"},
        timeout=10,
    ).json()
    assert [m["step"] for m in history["metrics"]] == [1, 2]
    figures = requests.get(
        f"{api}/artifacts/list", params={"run_id": run["info"]["run_id"], "path": "figures"}, timeout=10
    ).json()
    assert {f["path"] for f in figures["files"]} >= {"figures/reconstructions.png"}
    # Artifacts went through the server into its own artifact folder.
    assert list((server_root / "artifacts").rglob("reconstructions.png"))
    version = requests.get(
        f"{api}/model-versions/get", params={"name": "mnist-vae", "version": "1"}, timeout=10
    ).json()["model_version"]
    tags = {t["key"]: t["value"] for t in version["tags"]}
    assert float(tags["test_neg_elbo"]) > 0 and tags["run_id"] == run["info"]["run_id"]

    serve = [
        str(venv_bin / "mlflow"),
        "models",
        "serve",
        "-m",
        "models:/mnist-vae/1",
        "--env-manager",
        "local",
    ]
    with http_server(serve, tmp_path / "serve.log", env=env, cwd=tmp_path) as served:
        x = np.load(tmp_path / "data" / "mnist.npz")["x_test"][:2].reshape(2, -1) / 255.0
        response = requests.post(
            f"{served}/invocations",
            data=json.dumps({"inputs": x.tolist()}),
            headers={"Content-Type": "application/json"},
            timeout=30,
        )
        assert response.status_code == 200, response.text
        assert np.asarray(response.json()["predictions"]).shape == (2, 784)
