"""The stage entry points: failures are one line and exit 1, and nothing is half-written."""

from __future__ import annotations

from pathlib import Path

import pytest

from mnist_vae.stages import main
from mnist_vae.tracking import project_root, tracking_uri

from .conftest import ROOT


def _project(tmp_path: Path, tiny_npz: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    (tmp_path / "params.yaml").write_text((ROOT / "params.yaml").read_text())
    monkeypatch.chdir(tmp_path)


def test_unreachable_tracking_server_fails_before_training(
    tmp_path: Path, tiny_npz: Path, monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    _project(tmp_path, tiny_npz, monkeypatch)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "http://127.0.0.1:9")
    with pytest.raises(SystemExit) as info:
        main("train", ["--set", "train.epochs=1"])
    assert info.value.code == 1
    err = capsys.readouterr().err
    assert "error: train: MLflow tracking server http://127.0.0.1:9 cannot be reached" in err
    assert "Traceback" not in err
    assert not (tmp_path / "models").exists()


def test_bad_params_are_one_line(
    tmp_path: Path, tiny_npz: Path, monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    _project(tmp_path, tiny_npz, monkeypatch)
    with pytest.raises(SystemExit) as info:
        main("train", ["--set", "train.epochs=0"])
    assert info.value.code == 1
    assert capsys.readouterr().err.strip() == (
        "error: train: train.epochs: expected an integer >= 1, got 0")


def test_missing_dataset_names_the_command_that_makes_it(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str],
) -> None:
    (tmp_path / "params.yaml").write_text((ROOT / "params.yaml").read_text())
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path / 'mlflow.db'}")
    with pytest.raises(SystemExit):
        main("train", [])
    assert "dvc repro download" in capsys.readouterr().err


def test_project_root_of_a_dvc_temp_experiment(tmp_path: Path) -> None:
    """Queued and --temp experiments run in .dvc/tmp/exps/...; their runs go to the real store."""
    inner = tmp_path / "repo" / ".dvc" / "tmp" / "exps" / "tmpabc123"
    inner.mkdir(parents=True)
    assert project_root(inner) == tmp_path / "repo"
    assert project_root(tmp_path) == tmp_path


def test_tracking_uri_defaults_to_sqlite_in_the_root(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    assert tracking_uri(tmp_path) == f"sqlite:///{tmp_path}/mlflow.db"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "http://mlflow.example:5000")
    assert tracking_uri(tmp_path) == "http://mlflow.example:5000"
