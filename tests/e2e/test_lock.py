"""main's dvc.lock is the result of main's code and params, and DVC reruns only what an edit touches."""

from __future__ import annotations

import json
import shutil
import subprocess
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow


def _tracked_copy(root: Path, dest: Path) -> Path:
    """The files git tracks, as they are in the working tree (a fresh clone holds just these)."""
    files = subprocess.run(["git", "ls-files", "-z"], cwd=root, capture_output=True, check=True)
    for name in filter(None, files.stdout.decode().split("\0")):
        if (root / name).is_file():
            (dest / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(root / name, dest / name)
    subprocess.run(["git", "init", "-q"], cwd=dest, check=True)
    return dest


def _changed_code_and_params(project: Path, dvc: Path) -> dict[str, list[str]]:
    """Per stage, the git-tracked deps and the params that differ from dvc.lock (the data and
    model files are absent from a fresh clone: their absence is not a change of code)."""
    out = subprocess.run(
        [str(dvc), "status", "--json"], cwd=project, capture_output=True, text=True, check=True
    ).stdout
    changed: dict[str, list[str]] = {}
    for stage, changes in json.loads(out or "{}").items():
        for change in changes if isinstance(changes, list) else []:
            if not isinstance(change, dict):
                continue
            for path in change.get("changed deps", {}):
                if path.startswith(("src/", "pipeline/")):
                    changed.setdefault(stage, []).append(path)
            for params_file, keys in change.get("changed params", {}).items():
                changed.setdefault(stage, []).extend(f"{params_file}:{k}" for k in keys)
    return changed


def test_dvc_lock_matches_the_committed_code_and_params(
    tmp_path: Path, repo_root: Path, venv_bin: Path
) -> None:
    project = _tracked_copy(repo_root, tmp_path / "clone")
    assert _changed_code_and_params(project, venv_bin / "dvc") == {}, (
        "dvc.lock is not the result of this code and params.yaml: run `dvc repro` and commit "
        "dvc.lock and metrics.json with the change"
    )


@pytest.mark.parametrize(
    ("module", "function", "reruns"),
    [
        ("src/mnist_vae/evaluation/metrics.py", "def select(", {"evaluate": ["src/mnist_vae/evaluation"]}),
        ("src/mnist_vae/data/fetch.py", "def resolve_mirrors(", {"download": ["src/mnist_vae/data"]}),
        ("src/mnist_vae/training/trainer.py", "def learning_rate(", {"train": ["src/mnist_vae/training"]}),
        ("src/mnist_vae/bench/training.py", "def tutorial_loop(", {}),
        ("src/mnist_vae/tuning/search.py", "def tune(", {}),
    ],
)
def test_editing_a_function_reruns_only_its_stage(
    tmp_path: Path, repo_root: Path, venv_bin: Path, module: str, function: str, reruns: dict[str, list[str]]
) -> None:
    """An edit reruns the stages whose room it is in (a folder dep), and none for the benchmarks or
    the search."""
    project = _tracked_copy(repo_root, tmp_path / "clone")
    source = (project / module).read_text()
    assert function in source
    # A real edit of the function's body: a statement that changes nothing at run time.
    head, sep, rest = source.partition(function)
    signature_end = rest.index(":\n") + 2
    edited = head + sep + rest[:signature_end] + "    _ = None  # edited\n" + rest[signature_end:]
    (project / module).write_text(edited)
    assert _changed_code_and_params(project, venv_bin / "dvc") == reruns
