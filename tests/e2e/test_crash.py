"""A real training process killed part way: SIGKILL mid-epoch resumes to the same result, SIGTERM
keeps the checkpoint. (A NaN loss and a full disk, in this process: tests/unit/stages/test_train.py.)"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import pytest
import torch

pytestmark = pytest.mark.slow


def _train(root: Path, env: dict[str, str]) -> subprocess.Popen:
    return subprocess.Popen(
        [sys.executable, "pipeline/train.py"],
        cwd=root,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        start_new_session=True,
    )


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


def test_sigkill_mid_epoch_resumes_to_the_same_result(
    tmp_path: Path,
    make_project: Callable[..., dict[str, str]],
    history_losses: Callable[[Path], list[float]],
    project_runs: Callable[..., tuple],
) -> None:
    reference, crashed = tmp_path / "reference", tmp_path / "crashed"
    env_ref, env = make_project(reference), make_project(crashed)
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
    assert len(history_losses(reference)) == 5
    assert history_losses(crashed) == history_losses(reference)
    assert not (crashed / "checkpoints" / "train.pt").exists()
    runs, client = project_runs(crashed)
    assert len(runs) == 1 and runs[0].info.status == "FINISHED"
    for metric in ("train_loss", "val_neg_elbo"):
        steps = [m.step for m in client.get_metric_history(runs[0].info.run_id, metric)]
        assert sorted(steps) == [1, 2, 3, 4, 5], metric


def test_sigterm_keeps_the_checkpoint_and_marks_the_run_killed(
    tmp_path: Path,
    make_project: Callable[..., dict[str, str]],
    project_runs: Callable[..., tuple],
) -> None:
    env = make_project(tmp_path)
    process = _train(tmp_path, env)
    _wait_for_epoch(tmp_path, 1, process)
    os.killpg(process.pid, signal.SIGTERM)
    output, _ = process.communicate(timeout=60)
    assert process.returncode == 130, output
    assert "interrupted; the last finished epoch's checkpoint is kept" in output
    assert "Traceback" not in output
    assert (tmp_path / "checkpoints" / "train.pt").is_file()
    assert not (tmp_path / "models" / "model.pt").exists()
    runs, _ = project_runs(tmp_path)
    assert [r.info.status for r in runs] == ["KILLED"]
