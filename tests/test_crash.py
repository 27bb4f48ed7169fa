"""Training survives a crash: SIGKILL mid-epoch, SIGTERM, a NaN loss, a failing save."""

from __future__ import annotations

import csv
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import mlflow
import numpy as np
import pytest
import torch
import yaml

from mnist_vae import stages
from mnist_vae.config import load_params
from mnist_vae.train import TrainingDivergedError

from .conftest import ROOT, tiny_images

SMALL = {"model": {"hidden": [64], "latent": 4},
         "train": {"epochs": 5, "batch_size": 16, "lr": 0.002, "limit": 0}}


def _project(root: Path, n_train: int = 2000) -> dict[str, str]:
    """A project folder with the stage scripts, small params and a synthetic dataset."""
    root.mkdir(parents=True, exist_ok=True)
    shutil.copytree(ROOT / "pipeline", root / "pipeline")
    params = yaml.safe_load((ROOT / "params.yaml").read_text())
    for section, values in SMALL.items():
        params[section].update(values)
    (root / "params.yaml").write_text(yaml.safe_dump(params))
    x_train, y_train = tiny_images(n_train, seed=1)
    x_test, y_test = tiny_images(64, seed=2)
    (root / "data").mkdir()
    np.savez(root / "data" / "mnist.npz", x_train=x_train, y_train=y_train, x_test=x_test,
             y_test=y_test)
    return {**os.environ, "MLFLOW_TRACKING_URI": f"sqlite:///{root / 'mlflow.db'}",
            "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}"}


def _train(root: Path, env: dict[str, str]) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "pipeline/train.py"], cwd=root, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            start_new_session=True)


def _wait_for_epoch(root: Path, epoch: int, process: subprocess.Popen, timeout: float = 120) -> None:
    checkpoint = root / "checkpoints" / "train.pt"
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        assert process.poll() is None, process.stdout.read()
        if checkpoint.is_file():
            state = torch.load(checkpoint, weights_only=True)
            if state["trainer"]["epoch"] >= epoch:
                return
        time.sleep(0.05)
    raise AssertionError(f"no checkpoint of epoch {epoch} after {timeout}s")


def _losses(root: Path) -> list[float]:
    with open(root / "reports" / "train_history.csv") as fh:
        return [float(row["loss"]) for row in csv.DictReader(fh)]


def _runs(root: Path) -> list:
    client = mlflow.MlflowClient(f"sqlite:///{root / 'mlflow.db'}")
    experiment = client.get_experiment_by_name("mnist-vae")
    return client.search_runs([experiment.experiment_id]), client


@pytest.mark.slow
def test_sigkill_mid_epoch_resumes_to_the_same_result(tmp_path: Path) -> None:
    reference, crashed = tmp_path / "reference", tmp_path / "crashed"
    env_ref, env = _project(reference), _project(crashed)
    assert _train(reference, env_ref).wait(timeout=300) == 0

    process = _train(crashed, env)
    _wait_for_epoch(crashed, 2, process)
    time.sleep(0.1)  # into the next epoch
    os.killpg(process.pid, signal.SIGKILL)
    process.wait()
    assert not (crashed / "models" / "model.pt").exists()

    resumed = _train(crashed, env)
    output, _ = resumed.communicate(timeout=300)
    assert resumed.returncode == 0, output
    assert "resuming from checkpoints/train.pt after epoch" in output
    assert _losses(crashed) == _losses(reference)
    assert not (crashed / "checkpoints" / "train.pt").exists()
    runs, client = _runs(crashed)
    assert len(runs) == 1 and runs[0].info.status == "FINISHED"
    steps = [m.step for m in client.get_metric_history(runs[0].info.run_id, "train_loss")]
    assert sorted(steps) == [1, 2, 3, 4, 5]


@pytest.mark.slow
def test_sigterm_keeps_the_checkpoint_and_marks_the_run_killed(tmp_path: Path) -> None:
    env = _project(tmp_path)
    process = _train(tmp_path, env)
    _wait_for_epoch(tmp_path, 1, process)
    os.killpg(process.pid, signal.SIGTERM)
    output, _ = process.communicate(timeout=60)
    assert process.returncode == 130, output
    assert "interrupted; the last finished epoch's checkpoint is kept" in output
    assert "Traceback" not in output
    assert (tmp_path / "checkpoints" / "train.pt").is_file()
    assert not (tmp_path / "models" / "model.pt").exists()
    runs, _ = _runs(tmp_path)
    assert [r.info.status for r in runs] == ["KILLED"]


def _in_process(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    env = _project(tmp_path, n_train=256)
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", env["MLFLOW_TRACKING_URI"])
    return load_params(tmp_path / "params.yaml", {"train.epochs": 3})


def test_nan_loss_names_epoch_and_step_and_fails_the_run(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    params = _in_process(tmp_path, monkeypatch)
    from mnist_vae import train as train_module

    real = train_module.loss_terms
    calls = {"n": 0}

    def poisoned(model, x, k=1):
        calls["n"] += 1
        terms = real(model, x, k)
        if calls["n"] == 20:  # epoch 2 (16 steps per epoch), its 4th step
            terms.loss = terms.loss * float("nan")
        return terms

    monkeypatch.setattr(train_module, "loss_terms", poisoned)
    with pytest.raises(TrainingDivergedError, match="in epoch 2 at step 20 \\(batch 4 of the epoch"):
        stages.train(params, progress=False)
    runs, _ = _runs(tmp_path)
    assert [r.info.status for r in runs] == ["FAILED"]
    state = torch.load(tmp_path / "checkpoints" / "train.pt", weights_only=True)
    assert state["trainer"]["epoch"] == 1  # the last good epoch


def test_failed_save_leaves_previous_outputs_intact(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    params = _in_process(tmp_path, monkeypatch)
    stages.train(params, progress=False)
    model_before = (tmp_path / "models" / "model.pt").read_bytes()
    run_before = (tmp_path / "models" / "run.json").read_bytes()

    real_save = torch.save

    def disk_full(obj, f, *args, **kwargs):
        if "model.pt" in str(f):
            Path(f).write_bytes(b"half a file")
            raise OSError(28, "No space left on device")
        return real_save(obj, f, *args, **kwargs)

    monkeypatch.setattr(torch, "save", disk_full)
    with pytest.raises(OSError, match="No space left"):
        stages.train(load_params(tmp_path / "params.yaml", {"train.epochs": 2}), progress=False)
    assert (tmp_path / "models" / "model.pt").read_bytes() == model_before
    assert (tmp_path / "models" / "run.json").read_bytes() == run_before
    from mnist_vae.model import load_model

    load_model(tmp_path / "models" / "model.pt")
