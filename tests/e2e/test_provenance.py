"""Honest provenance: `dvc repro` in a fresh clone registers the bare commit; edited code is
"-dirty"."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

import pytest
from mlflow import MlflowClient

pytestmark = pytest.mark.slow

TINY = {
    "model": {"preset": "mlp", "hidden": [32], "latent": 4},
    "train": {"epochs": 1, "limit": 500, "validation": 200, "batch_size": 64, "threads": 1},
    "evaluate": {"limit": 200, "iw_samples": 1, "n_images": 4},
}
GIT = ["git", "-c", "user.name=t", "-c", "user.email=t@t"]


def _run(args: list[str], cwd: Path, env: dict[str, str]) -> str:
    result = subprocess.run(args, cwd=cwd, env=env, capture_output=True, text=True, timeout=2400)
    assert result.returncode == 0, f"{' '.join(args)} failed:\n{result.stdout}\n{result.stderr}"
    return result.stdout


def test_a_fresh_clone_registers_its_commit_and_edited_code_is_dirty(
    tmp_path: Path,
    copy_repo,
    link_mnist,
    shared_mnist: Path,
    venv_bin: Path,
) -> None:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("MLFLOW_", "DVC_"))}
    env.update({"MNIST_MIRRORS": str(shared_mnist), "PATH": f"{venv_bin}{os.pathsep}{os.environ['PATH']}"})
    origin = copy_repo(tmp_path / "origin", TINY)
    _run(["git", "init", "-q"], origin, env)
    _run(["git", "add", "-A"], origin, env)
    _run([*GIT, "commit", "-qm", "init"], origin, env)
    clone = tmp_path / "clone"
    _run(["git", "clone", "-q", str(origin), str(clone)], tmp_path, env)
    sha = _run(["git", "rev-parse", "HEAD"], clone, env).strip()
    link_mnist(clone)  # as `dvc pull` would: the download stage is then up to date

    _run(["dvc", "repro"], clone, env)
    # The run rewrote dvc.lock and metrics.json (tracked): outputs, not inputs.
    changed = _run(["git", "status", "--porcelain", "--untracked-files=no"], clone, env)
    assert "dvc.lock" in changed and "metrics.json" in changed, changed
    store = f"sqlite:///{clone / 'mlflow.db'}"
    client = MlflowClient(store, store)
    version = client.get_model_version("mnist-vae", "1")
    assert version.tags["git_commit"] == sha
    assert sha in version.description and "-dirty" not in version.description
    run = client.get_run(version.run_id)
    assert run.data.tags["mlflow.source.git.commit"] == sha

    # A change to tracked code is a change of inputs: the next version says so.
    code = clone / "src" / "mnist_vae" / "evaluation" / "metrics.py"
    code.write_text(code.read_text() + "\n# a local change\n")
    _run(["dvc", "repro"], clone, env)
    assert client.get_model_version("mnist-vae", "2").tags["git_commit"] == f"{sha}-dirty"
