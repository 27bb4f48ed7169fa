"""Several pipelines at once against one embedded SQLite store, as queued `dvc exp run -j N` jobs do."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import yaml
from mlflow import MlflowClient

from .conftest import tiny_images

ROOT = Path(__file__).resolve().parents[1]
CLI = Path(sys.executable).with_name("mnist-vae")


def tiny_project(folder: Path, seed: int) -> Path:
    (folder / "data").mkdir(parents=True)
    x_train, y_train = tiny_images(256, seed=seed)
    x_test, y_test = tiny_images(64, seed=100 + seed)
    np.savez(folder / "data" / "mnist.npz", x_train=x_train, y_train=y_train, x_test=x_test,
             y_test=y_test)
    params = yaml.safe_load((ROOT / "params.yaml").read_text())
    params["model"].update(hidden=[32], latent=4)
    params["train"].update(device="cpu", epochs=2, batch_size=64, threads=1, seed=seed)
    params["evaluate"].update(iw_samples=2, n_images=4)
    (folder / "params.yaml").write_text(yaml.safe_dump(params))
    return folder


@pytest.mark.slow
def test_three_pipelines_at_once_on_a_fresh_sqlite_store(tmp_path: Path) -> None:
    store = f"sqlite:///{tmp_path}/shared/mlflow.db"
    (tmp_path / "shared").mkdir()
    env = {"MLFLOW_TRACKING_URI": store, "PATH": str(CLI.parent), "HOME": str(tmp_path)}
    jobs = [subprocess.Popen([str(CLI), "run"], cwd=tiny_project(tmp_path / f"p{i}", seed=i), env=env,
                             stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
            for i in range(3)]
    outputs = [job.communicate(timeout=600)[0] for job in jobs]
    for job, output in zip(jobs, outputs, strict=True):
        assert job.returncode == 0, output
        assert "database is locked" not in output

    client = MlflowClient(store, store)
    runs = client.search_runs([client.get_experiment_by_name("mnist-vae").experiment_id])
    assert sorted(r.info.status for r in runs) == ["FINISHED"] * 3
    assert all("test_neg_elbo" in r.data.metrics for r in runs)
    versions = client.search_model_versions("name='mnist-vae'")
    assert sorted(int(v.version) for v in versions) == [1, 2, 3]
    assert {v.run_id for v in versions} == {r.info.run_id for r in runs}
    champion = client.get_model_version_by_alias("mnist-vae", "champion")
    assert int(champion.version) in {1, 2, 3}
