"""The two-layer family through the real pipeline: the train and evaluate stages on a tiny hvae
(MLflow store, registry, figures of each layer), then the registered version behind a real
`mlflow models serve` answering the four outputs over HTTP, and the `mnist-vae` commands that
take a model (score, reconstruct, sample) on it."""

from __future__ import annotations

import json
import math
import subprocess
from collections.abc import Callable, Iterator
from pathlib import Path

import numpy as np
import pytest
import requests

pytestmark = pytest.mark.slow

TINY = [
    "model.preset=hvae",
    "model.channels=[4,8]",
    "model.dense=32",
    "model.latent=6",
    "model.latent2=3",
    "model.hidden2=16",
    "train.epochs=2",
    "train.batch_size=32",
    "train.lr=0.003",
    "train.validation=64",
    "train.threads=1",
    "train.kl_warmup=1",
    "train.ema=0.9",
    "evaluate.iw_samples=4",
]


@pytest.fixture(scope="module")
def project(
    tmp_path_factory: pytest.TempPathFactory,
    repo_root: Path,
    venv_bin: Path,
    trained_and_registered: Callable[..., dict[str, str]],
) -> tuple[Path, dict[str, str]]:
    """The two stages run on a tiny hvae in a project of its own; returns its root and the env."""
    root = tmp_path_factory.mktemp("hvae")
    return root, trained_and_registered(root, repo_root, venv_bin, TINY)


def test_the_stages_record_and_register_a_two_layer_model(project: tuple[Path, dict[str, str]]) -> None:
    root, env = project
    metrics = json.loads((root / "metrics.json").read_text())
    assert all(math.isfinite(metrics[k]) for k in ("neg_elbo", "nll_iw", "kl")), metrics
    figures = sorted(p.name for p in (root / "reports" / "figures").iterdir())
    assert {"latent.png", "latent_z1.png", "traversal.png", "samples.png"} <= set(figures)
    import mlflow

    store = env["MLFLOW_TRACKING_URI"]
    client = mlflow.MlflowClient(tracking_uri=store, registry_uri=store)
    version = client.get_model_version_by_alias("mnist-vae", "champion")
    run = client.get_run(version.run_id)
    assert run.data.params["model.preset"] == "hvae"
    assert float(run.data.tags["train.flops"]) > 0


@pytest.fixture(scope="module")
def server(
    project: tuple[Path, dict[str, str]],
    tmp_path_factory: pytest.TempPathFactory,
    venv_bin: Path,
    http_server: Callable,
) -> Iterator[str]:
    log = tmp_path_factory.mktemp("hvae-serve-log") / "server.log"
    command = [str(venv_bin / "mlflow"), "models", "serve", "-m", "models:/mnist-vae@champion"]
    with http_server([*command, "--env-manager", "local"], log, env=project[1]) as url:
        yield url


def test_the_served_version_answers_each_output(server: str, tiny_images: Callable) -> None:
    x = tiny_images(3)[0].reshape(3, 784).astype(np.float32) / 255.0

    def post(params: dict) -> list:
        body = json.dumps({"inputs": x.tolist(), "params": params})
        answer = requests.post(
            f"{server}/invocations", data=body, headers={"Content-Type": "application/json"}, timeout=60
        )
        assert answer.status_code == 200, answer.text
        return answer.json()["predictions"]

    assert np.asarray(post({})).shape == (3, 784)
    latent = post({"output": "latent"})  # the top layer z2: 3 units
    assert set(latent[0]) == {f"mu_{i}" for i in range(3)} | {f"logvar_{i}" for i in range(3)}
    scores = [row["neg_elbo"] for row in post({"output": "score"})]
    assert len(scores) == 3 and all(s > 0 and math.isfinite(s) for s in scores)
    assert np.asarray(post({"output": "sample", "n": 4})).shape == (4, 784)


def test_the_cli_scores_reconstructs_and_samples(
    project: tuple[Path, dict[str, str]], venv_bin: Path
) -> None:
    root, env = project
    cli = str(venv_bin / "mnist-vae")
    for args in (
        ["score", "data/mnist.npz", "--out", "scores.csv"],
        ["sample", "-n", "4", "-o", "samples.png"],
        ["reconstruct", "reports/figures/samples.png", "-o", "again.png"],
    ):
        done = subprocess.run([cli, *args], cwd=root, env=env, capture_output=True, text=True, timeout=300)
        assert done.returncode == 0, done.stdout + done.stderr
    test_images = len(np.load(root / "data" / "mnist.npz")["x_test"])
    assert len((root / "scores.csv").read_text().splitlines()) == 1 + test_images
    assert (root / "samples.png").stat().st_size > 0 and (root / "again.png").stat().st_size > 0
