"""The train stage in this process: it fails early and in one line, and a failure part way (a NaN
loss, a full disk) fails the MLflow run and loses nothing. Killing a real training process is in
tests/e2e/test_crash.py."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import mlflow
import pytest
import torch

from mnist_vae.atomic import DiskFullError
from mnist_vae.config import Params, load_params
from mnist_vae.models.weights import load_model
from mnist_vae.stages import train as stage
from mnist_vae.training import trainer as train_module
from mnist_vae.training.trainer import TrainingDivergedError

# 256 + 64 images: 16 steps of 16 per epoch, and a validation split of 64.
TINY = {
    "model": {"preset": "mlp", "hidden": [16], "latent": 2},
    "train": {"device": "cpu", "epochs": 3, "batch_size": 16, "lr": 0.002, "threads": 1, "validation": 64},
}


@pytest.fixture
def project(
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    write_dataset: Callable[..., Path],
    write_params: Callable[..., Path],
) -> Path:
    """A tiny project in ``tmp_path``, the working directory; no MLflow store chosen yet."""
    write_dataset(tmp_path / "data" / "mnist.npz", 256 + 64)
    write_params(tmp_path / "params.yaml", TINY)
    monkeypatch.chdir(tmp_path)
    return tmp_path


def _params(root: Path, **overrides: Any) -> Params:
    return load_params(root / "params.yaml", overrides)


def _runs(uri: str) -> list:
    client = mlflow.MlflowClient(uri)
    return client.search_runs([client.get_experiment_by_name("mnist-vae").experiment_id])


def test_unreachable_tracking_server_fails_before_training(
    project: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "http://127.0.0.1:9")
    with pytest.raises(SystemExit) as info:
        stage.main(["--set", "train.epochs=1"])
    assert info.value.code == 1
    err = capsys.readouterr().err
    assert (
        err.startswith("error: train: MLflow tracking server http://127.0.0.1:9 cannot be reached")
        and err.count("\n") == 1
    ), err
    assert not (project / "models").exists()
    assert not (project / "checkpoints").exists()


def test_bad_params_are_one_line(project: Path, capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as info:
        stage.main(["--set", "train.epochs=0"])
    assert info.value.code == 1
    assert capsys.readouterr().err == "error: train: train.epochs: expected an integer >= 1, got 0\n"


def test_missing_dataset_names_the_command_that_makes_it(
    project: Path,
    mlflow_store: str,
    capsys: pytest.CaptureFixture[str],
) -> None:
    (project / "data" / "mnist.npz").unlink()
    with pytest.raises(SystemExit) as info:
        stage.main([])
    assert info.value.code == 1
    err = capsys.readouterr().err
    assert err.startswith("error: train: data/mnist.npz: dataset file is missing")
    assert "dvc repro download" in err


def test_a_validation_split_larger_than_the_data_fails_before_any_run(
    project: Path,
    mlflow_store: str,
    capsys: pytest.CaptureFixture[str],
) -> None:
    """The project's default (10000 held out) does not fit a tiny dataset: one line, no run."""
    with pytest.raises(SystemExit) as info:
        stage.main(["--set", "train.validation=10000"])
    assert info.value.code == 1
    err = capsys.readouterr().err
    # MLflow's own INFO lines about creating the store may come first.
    assert [line for line in err.splitlines() if " INFO mlflow." not in line] == [
        "error: train: train.validation: expected fewer images than the 320 of the training split, got 10000"
    ], err
    assert mlflow.MlflowClient(mlflow_store).get_experiment_by_name("mnist-vae") is None
    assert not (project / "models").exists()


def test_nan_loss_names_epoch_and_step_and_fails_the_run(
    project: Path, mlflow_store: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    real = train_module.training_loss
    calls = {"n": 0}

    def poisoned(model, x, k=1, kl_weight=1.0):
        calls["n"] += 1
        terms = real(model, x, k, kl_weight)
        if calls["n"] == 20:  # epoch 2 (16 steps per epoch), its 4th step
            terms.loss = terms.loss * float("nan")
        return terms

    monkeypatch.setattr(train_module, "training_loss", poisoned)
    with pytest.raises(TrainingDivergedError, match="in epoch 2 at step 20 \\(batch 4 of the epoch"):
        stage.run(_params(project), progress=False)
    assert [r.info.status for r in _runs(mlflow_store)] == ["FAILED"]
    state = torch.load(project / "checkpoints" / "train.pt", weights_only=True)
    assert state["trainer"]["epoch"] == 1  # the last good epoch
    assert not (project / "models").exists()


def test_failed_save_leaves_previous_outputs_intact(
    project: Path, mlflow_store: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    stage.run(_params(project, **{"train.epochs": 1}), progress=False)
    model_before = (project / "models" / "model.pt").read_bytes()
    run_before = (project / "models" / "run.json").read_bytes()

    real_save = torch.save

    def disk_full(obj, f, *args, **kwargs):
        if isinstance(obj, dict) and "architecture" in obj:  # the weights, not the checkpoint
            f.write(b"half a file")
            raise OSError(28, "No space left on device")
        return real_save(obj, f, *args, **kwargs)

    monkeypatch.setattr(torch, "save", disk_full)
    with pytest.raises(DiskFullError, match=r"no space left on the device while writing models/model\.pt"):
        stage.run(_params(project, **{"train.epochs": 2}), progress=False)
    assert (project / "models" / "model.pt").read_bytes() == model_before
    assert (project / "models" / "run.json").read_bytes() == run_before
    assert sorted(p.name for p in (project / "models").iterdir()) == ["model.pt", "run.json"]
    load_model(project / "models" / "model.pt")
    assert sorted(r.info.status for r in _runs(mlflow_store)) == ["FAILED", "FINISHED"]


def test_a_failure_while_describing_the_run_ends_it_failed(
    project: Path, mlflow_store: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Logging the datasets fails after the run started: the run ends FAILED, not FINISHED (as
    MLflow would end it at exit), and the error propagates."""
    from mnist_vae.registry import provenance

    def broken(*args, **kwargs):
        raise OSError("disk gone while logging the dataset")

    monkeypatch.setattr(provenance, "log_dataset", broken)
    with pytest.raises(OSError, match="disk gone"):
        stage.run(_params(project), progress=False)
    assert [r.info.status for r in _runs(mlflow_store)] == ["FAILED"]


def _stop_in_epoch_2(project: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The loss turns NaN in epoch 2: the stage fails with the checkpoint of epoch 1 kept."""
    real, calls = train_module.training_loss, {"n": 0}

    def poisoned(model, x, k=1, kl_weight=1.0):
        calls["n"] += 1
        terms = real(model, x, k, kl_weight)
        if calls["n"] == 20:
            terms.loss = terms.loss * float("nan")
        return terms

    monkeypatch.setattr(train_module, "training_loss", poisoned)
    with pytest.raises(TrainingDivergedError):
        stage.run(_params(project), progress=False)
    monkeypatch.setattr(train_module, "training_loss", real)


@pytest.mark.parametrize("change", ["threads", "code"])
def test_a_checkpoint_resumes_into_the_same_code_only(
    change: str,
    project: Path,
    mlflow_store: str,
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
) -> None:
    """Another thread count resumes (the same model, trained at another speed); edited code sets
    the checkpoint aside and trains from scratch in a new run."""
    import logging

    from mnist_vae.training import checkpoint

    _stop_in_epoch_2(project, monkeypatch)
    (failed,) = _runs(mlflow_store)
    overrides: dict[str, Any] = {}
    if change == "threads":
        overrides["train.threads"] = 1
    else:
        monkeypatch.setattr(checkpoint, "code_digest", lambda module=checkpoint.STAGE_MODULE: "edited")
    with caplog.at_level(logging.INFO, logger="mnist_vae"):
        run_id = stage.run(_params(project, **overrides), progress=False)
    messages = " | ".join(r.getMessage() for r in caplog.records)
    if change == "threads":
        assert run_id == failed.info.run_id, "resumed into the run it left"
        assert "resuming from checkpoints/train.pt after epoch 1" in messages
        assert not list((project / "checkpoints").glob("*set-aside*"))
    else:
        assert run_id != failed.info.run_id and "resuming" not in messages
        assert "checkpoint checkpoints/train.pt was made with other code; set aside as" in messages
        (kept,) = (project / "checkpoints").glob("train.pt.set-aside-*")
        assert torch.load(kept, weights_only=True)["trainer"]["epoch"] == 1
