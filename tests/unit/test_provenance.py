"""The commit a run records: ``-dirty`` for changed inputs, not for the pipeline's own outputs."""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest

from mnist_vae.registry.provenance import git_commit, pipeline_outputs

DVC_YAML = """\
stages:
  train:
    cmd: python pipeline/train.py
    deps: [pipeline/train.py]
    outs: [models/model.pt]
    plots: [reports/train_history.csv]
  evaluate:
    cmd: python pipeline/evaluate.py
    metrics:
      - metrics.json:
          cache: false
    outs:
      - reports/figures
"""


def _git(root: Path, *args: str) -> str:
    return subprocess.run(
        ["git", "-c", "user.name=t", "-c", "user.email=t@t", *args],
        cwd=root,
        capture_output=True,
        text=True,
        check=True,
    ).stdout.strip()


@pytest.fixture
def repo(tmp_path: Path) -> Path:
    """A committed project: code, params, dvc.yaml, and the outputs git tracks (dvc.lock,
    metrics.json, reports/bench.json)."""
    files = {
        "dvc.yaml": DVC_YAML,
        "params.yaml": "train:\n  epochs: 2\n",
        "pipeline/train.py": "print('train')\n",
        "dvc.lock": "schema: '2.0'\n",
        "metrics.json": "{}\n",
        "reports/bench.json": "{}\n",
        "models/.gitignore": "/model.pt\n",
    }
    for name, text in files.items():
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / name).write_text(text)
    _git(tmp_path, "init", "-q")
    _git(tmp_path, "add", "-A")
    _git(tmp_path, "commit", "-qm", "init")
    return tmp_path


def test_a_clean_checkout_records_the_bare_commit(repo: Path) -> None:
    assert git_commit(repo) == _git(repo, "rev-parse", "HEAD")


def test_rewritten_pipeline_outputs_are_not_dirty(repo: Path) -> None:
    """What `dvc repro` rewrites before `evaluate` asks: the lock, the metrics, the reports."""
    (repo / "dvc.lock").write_text("schema: '2.0'\nstages: {}\n")
    (repo / "metrics.json").write_text('{"neg_elbo": 90.1}\n')
    (repo / "reports" / "bench.json").write_text('{"rows": []}\n')
    (repo / "models" / "model.pt").write_bytes(b"weights")  # untracked
    assert git_commit(repo) == _git(repo, "rev-parse", "HEAD")


@pytest.mark.parametrize("name", ["pipeline/train.py", "params.yaml", "dvc.yaml", "models/.gitignore"])
def test_a_changed_input_is_dirty(repo: Path, name: str) -> None:
    (repo / name).write_text((repo / name).read_text() + "# changed\n")
    (repo / "metrics.json").write_text('{"neg_elbo": 90.1}\n')
    assert git_commit(repo) == _git(repo, "rev-parse", "HEAD") + "-dirty"


def test_a_new_uncommitted_module_is_dirty_a_new_note_is_not(repo: Path) -> None:
    (repo / "notes.txt").write_text("ideas\n")
    assert git_commit(repo) == _git(repo, "rev-parse", "HEAD")
    (repo / "pipeline" / "helper.py").write_text("X = 1\n")  # untracked: not in the commit
    assert git_commit(repo) == _git(repo, "rev-parse", "HEAD") + "-dirty"


def test_a_staged_or_deleted_input_is_dirty(repo: Path) -> None:
    (repo / "params.yaml").unlink()
    assert git_commit(repo).endswith("-dirty")
    _git(repo, "checkout", "--", "params.yaml")
    assert not git_commit(repo).endswith("-dirty")
    (repo / "pipeline" / "train.py").write_text("print('staged')\n")
    _git(repo, "add", "pipeline/train.py")
    assert git_commit(repo).endswith("-dirty")


def test_a_project_in_a_subfolder_of_the_checkout(repo: Path) -> None:
    """git names paths from the top of the checkout, dvc.yaml from the project's folder."""
    project = repo / "sub"
    project.mkdir()
    (project / "dvc.yaml").write_text(DVC_YAML)
    (project / "metrics.json").write_text("{}\n")
    _git(repo, "add", "-A")
    _git(repo, "commit", "-qm", "sub")
    (project / "metrics.json").write_text('{"neg_elbo": 1}\n')
    assert not git_commit(project).endswith("-dirty")
    # The top's own metrics.json is not an output of the sub-project.
    (repo / "metrics.json").write_text('{"other": 1}\n')
    assert git_commit(project).endswith("-dirty")


def test_outside_git_the_commit_is_unknown(tmp_path: Path) -> None:
    assert git_commit(tmp_path) == "unknown"


def test_pipeline_outputs_are_read_from_dvc_yaml(repo: Path) -> None:
    assert {str(p) for p in pipeline_outputs(repo)} == {
        "dvc.lock",
        "reports",
        "models/model.pt",
        "reports/train_history.csv",
        "metrics.json",
        "reports/figures",
    }
