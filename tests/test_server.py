"""A team's setup: a real `mlflow server` (SQL store, proxied artifacts) on 127.0.0.1."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import requests

from .test_crash import _project
from .test_serving import _free_port, _stop, _wait_ready

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def tracking_server(tmp_path_factory: pytest.TempPathFactory):
    root = tmp_path_factory.mktemp("server")
    port = _free_port()
    log = (root / "server.log").open("w")
    process = subprocess.Popen(
        [str(Path(sys.executable).parent / "mlflow"), "server",
         "--backend-store-uri", f"sqlite:///{root / 'backend.db'}",
         "--serve-artifacts", "--artifacts-destination", str(root / "artifacts"),
         "--host", "127.0.0.1", "--port", str(port)],
        stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
    )
    url = f"http://127.0.0.1:{port}"
    try:
        _wait_ready(url, process, log.name, ping="/health")
        yield url, root
    finally:
        _stop(process)
        log.close()


def test_pipeline_against_a_tracking_server_then_serve(
    tracking_server: tuple[str, Path], tmp_path: Path
) -> None:
    url, server_root = tracking_server
    env = {**_project(tmp_path, n_train=512), "MLFLOW_TRACKING_URI": url}
    for stage in ("train", "evaluate"):
        result = subprocess.run([sys.executable, f"pipeline/{stage}.py", "--set",
                                 "train.epochs=2", "--set", "evaluate.iw_samples=2"],
                                cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
        assert result.returncode == 0, result.stderr
    assert not (tmp_path / "mlflow.db").exists(), "the embedded store must not be used"
    assert not (tmp_path / "mlartifacts").exists()

    api = f"{url}/api/2.0/mlflow"
    experiment = requests.get(f"{api}/experiments/get-by-name",
                              params={"experiment_name": "mnist-vae"}, timeout=10).json()
    runs = requests.post(f"{api}/runs/search", json={
        "experiment_ids": [experiment["experiment"]["experiment_id"]]}, timeout=10).json()["runs"]
    assert len(runs) == 1
    run = runs[0]
    assert run["info"]["status"] == "FINISHED"
    metrics = {m["key"] for m in run["data"]["metrics"]}
    assert {"train_loss", "train_kl", "test_neg_elbo", "test_nll_iw"} <= metrics
    history = requests.get(f"{api}/metrics/get-history", params={
        "run_id": run["info"]["run_id"], "metric_key": "train_loss"}, timeout=10).json()
    assert [m["step"] for m in history["metrics"]] == [1, 2]
    figures = requests.get(f"{api}/artifacts/list", params={
        "run_id": run["info"]["run_id"], "path": "figures"}, timeout=10).json()
    assert {f["path"] for f in figures["files"]} >= {"figures/reconstructions.png"}
    # Artifacts went through the server into its own artifact folder.
    assert list((server_root / "artifacts").rglob("reconstructions.png"))
    version = requests.get(f"{api}/model-versions/get", params={
        "name": "mnist-vae", "version": "1"}, timeout=10).json()["model_version"]
    tags = {t["key"]: t["value"] for t in version["tags"]}
    assert float(tags["test_neg_elbo"]) > 0 and tags["run_id"] == run["info"]["run_id"]

    port = _free_port()
    serve_log = (tmp_path / "serve.log").open("w")
    serve = subprocess.Popen(
        [str(Path(sys.executable).parent / "mlflow"), "models", "serve", "-m",
         "models:/mnist-vae/1", "--env-manager", "local", "-h", "127.0.0.1", "-p", str(port)],
        env=env, cwd=tmp_path, stdout=serve_log, stderr=subprocess.STDOUT, start_new_session=True,
    )
    try:
        _wait_ready(f"http://127.0.0.1:{port}", serve, serve_log.name)
        x = np.load(tmp_path / "data" / "mnist.npz")["x_test"][:2].reshape(2, -1) / 255.0
        response = requests.post(f"http://127.0.0.1:{port}/invocations",
                                 data=json.dumps({"inputs": x.tolist()}),
                                 headers={"Content-Type": "application/json"}, timeout=30)
        assert response.status_code == 200, response.text
        assert np.asarray(response.json()["predictions"]).shape == (2, 784)
    finally:
        _stop(serve)
        serve_log.close()
