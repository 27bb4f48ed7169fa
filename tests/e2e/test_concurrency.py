"""Several pipelines at once against one embedded SQLite store, as queued `dvc exp run -j N` jobs do."""

from __future__ import annotations

import re
import subprocess
from collections.abc import Callable
from pathlib import Path

import pytest
from mlflow import MlflowClient

pytestmark = pytest.mark.slow


def test_three_pipelines_at_once_on_a_fresh_sqlite_store(
    tmp_path: Path,
    venv_bin: Path,
    write_dataset: Callable[..., Path],
    write_params: Callable[..., Path],
) -> None:
    store = f"sqlite:///{tmp_path}/shared/mlflow.db"
    (tmp_path / "shared").mkdir()
    env = {"MLFLOW_TRACKING_URI": store, "PATH": str(venv_bin), "HOME": str(tmp_path)}
    folders = []
    for i in range(3):
        folder = tmp_path / f"p{i}"
        write_dataset(folder / "data" / "mnist.npz", 256 + 64, train_seed=i, test_seed=100 + i)
        write_params(
            folder / "params.yaml",
            {
                "model": {"preset": "mlp", "hidden": [32], "latent": 4},
                "train": {
                    "device": "cpu",
                    "epochs": 2,
                    "batch_size": 64,
                    "threads": 1,
                    "seed": i,
                    "validation": 64,
                },
                "evaluate": {"iw_samples": 2, "n_images": 4},
            },
        )
        folders.append(folder)
    jobs = [
        subprocess.Popen(
            [str(venv_bin / "mnist-vae"), "run"],
            cwd=folder,
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        for folder in folders
    ]
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

    # The gate decided one version at a time: exactly one became the first champion, every later
    # promotion displaced the champion of its time, and the alias ends on the one never displaced.
    reasons = {r.data.tags["registry.version"]: r.data.tags["registry.gate_reason"] for r in runs}
    promoted = {
        v
        for v, r in reasons.items()
        if r.startswith((f"version {v} is the first champion", f"version {v} promoted"))
    }
    assert sum("is the first champion" in r for r in reasons.values()) == 1, reasons
    displaced = {m.group(1) for v in promoted if (m := re.search(r"of version (\d+) on ", reasons[v]))}
    assert displaced < promoted, reasons
    champion = client.get_model_version_by_alias("mnist-vae", "champion")
    assert promoted - displaced == {str(champion.version)}, reasons
