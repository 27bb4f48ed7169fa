"""`mnist-vae tune` on a database: two processes on one study in the team stack's PostgreSQL."""

from __future__ import annotations

import subprocess
from collections.abc import Callable
from pathlib import Path

import pytest

from mnist_vae.stack import Stack

pytestmark = pytest.mark.slow

SPACE = (
    "fixed:\n  train.epochs: 2\n  train.schedule: constant\n"
    "params:\n  train.lr: {float: {low: 0.001, high: 0.01, log: true}}\n"
    "  train.validation: {categorical: [100, 50000]}\n"
)


def test_two_tune_processes_on_postgres_make_exactly_the_trials_asked(
    team_stack: Stack, tmp_path: Path, make_project: Callable[..., dict[str, str]], venv_bin: Path
) -> None:
    import optuna

    root = tmp_path / "project"
    env = make_project(root, n_train=400, validation=100)
    (root / "search_space.yaml").write_text(SPACE)
    url = team_stack.create_database("optuna")
    storage = url.replace("mlflow@", f"mlflow:{team_stack.database_password}@")
    # The trials are queued: the first with a learning rate that makes training diverge (outside
    # the space's range: Optuna warns, and uses it), the second with a validation split larger than
    # the 400 images; both fail, and the search goes on to the 4 trials asked. (Categorical choices
    # travel as their YAML text.)
    queued = optuna.create_study(study_name="on-postgres", storage=storage, direction="minimize")
    for lr, validation in ((0.99, "100"), (0.005, "50000"), (0.002, "100"), (0.004, "100")):
        queued.enqueue_trial({"train.lr": lr, "train.validation": validation})
    # The storage from the environment, its password in libpq's own variable: neither on the
    # command line.
    env = {**env, "MNIST_VAE_TUNE_STORAGE": url, "PGPASSWORD": team_stack.database_password}
    command = [str(venv_bin / "mnist-vae"), "tune", "--trials", "4", "--study", "on-postgres"]
    processes = [
        subprocess.Popen(
            command, cwd=root, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
        )
        for _ in range(2)
    ]
    try:
        for process in processes:
            out, err = process.communicate(timeout=900)
            assert process.returncode == 0, err[-3000:]
            assert "best validation neg. ELBO" in out, out
    finally:
        for process in processes:
            if process.poll() is None:
                process.kill()
                process.wait()
    study = optuna.load_study(study_name="on-postgres", storage=storage)
    frame = study.trials_dataframe()
    assert sorted(frame["number"]) == [0, 1, 2, 3], frame
    states = dict(zip(frame["number"], frame["state"], strict=True))
    assert states[0] == states[1] == "FAIL", frame[["number", "state"]]
    assert "loss became NaN or infinite" in study.trials[0].user_attrs["fail_reason"]
    assert "train.validation" in study.trials[1].user_attrs["fail_reason"]
    assert {states[2], states[3]} <= {"COMPLETE", "PRUNED"}, frame[["number", "state"]]
    assert not (root / ".tune").exists(), "the journal file was used instead of the database"
