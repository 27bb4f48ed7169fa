"""Tests for :mod:`mnist_vae.paths` and where :mod:`mnist_vae.tracking` puts the MLflow store."""

from __future__ import annotations

from pathlib import Path

import pytest

from mnist_vae.paths import DEFAULT_PATHS, Paths, project_root
from mnist_vae.tracking import tracking_uri


def test_default_paths_are_those_of_dvc_yaml(repo_root: Path) -> None:
    import yaml

    stages = yaml.safe_load((repo_root / "dvc.yaml").read_text())["stages"]
    outs = {
        str(o if isinstance(o, str) else next(iter(o)))
        for s in stages.values()
        for o in s.get("outs", []) + s.get("metrics", []) + s.get("plots", [])
    }
    # dvc.yaml's dataset file follows data.dataset; the paths of each dataset name the file it resolves to.
    assert "data/${data.dataset}.npz" in outs
    for dataset in ("mnist", "fashion-mnist"):
        assert str(Paths.of(dataset).data) == f"data/{dataset}.npz"
    assert DEFAULT_PATHS.data == Paths.of("mnist").data
    for path in (
        DEFAULT_PATHS.model,
        DEFAULT_PATHS.history,
        DEFAULT_PATHS.metrics,
        DEFAULT_PATHS.figures,
    ):
        assert str(path) in outs, f"{path} is not an output of dvc.yaml: {sorted(outs)}"
    # Differs on every run: an output would change dvc.lock when the weights come out the same.
    assert str(DEFAULT_PATHS.run) not in outs
    ignored = (repo_root / ".gitignore").read_text().splitlines()
    assert str(DEFAULT_PATHS.run) in ignored, "git would list models/run.json as a new file"


def test_project_root_of_a_dvc_temp_experiment(tmp_path: Path) -> None:
    """Queued and --temp experiments run in .dvc/tmp/exps/...; their runs go to the real store."""
    inner = tmp_path / "repo" / ".dvc" / "tmp" / "exps" / "tmpabc123"
    inner.mkdir(parents=True)
    assert project_root(inner) == tmp_path / "repo"
    assert project_root(tmp_path) == tmp_path


def test_tracking_uri_defaults_to_sqlite_in_the_root(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    assert tracking_uri(tmp_path) == f"sqlite:///{tmp_path}/mlflow.db"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "http://mlflow.example:5000")
    assert tracking_uri(tmp_path) == "http://mlflow.example:5000"
