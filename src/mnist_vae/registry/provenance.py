"""Where a run came from: the git commit of its code (and whether the inputs differ from it), the
data it saw, and the DVC experiment that ran it.

A run records ``<sha>-dirty`` only when a tracked input (code, params, configuration) differs from
the commit. The pipeline's own outputs do not count: ``dvc repro`` rewrites ``dvc.lock`` and
``metrics.json`` before ``evaluate`` asks, so counting them would mark every first run of a fresh
clone as dirty.
"""

from __future__ import annotations

import hashlib
import json
import os
import secrets
import subprocess
import time
import warnings
from pathlib import Path, PurePosixPath
from typing import TYPE_CHECKING

import numpy as np
import yaml

from mnist_vae.config import Params
from mnist_vae.paths import project_root

if TYPE_CHECKING:
    from mlflow.data.numpy_dataset import NumpyDataset

# Written by the pipeline and the CLI (figures, training history, bench results), never read as
# an input; DVC's lock file records what the last `dvc repro` produced.
OUTPUT_FILES = ("dvc.lock",)
OUTPUT_FOLDERS = ("reports",)


def git_commit(root: Path | None = None) -> str:
    """The checked-out commit, with ``-dirty`` when a tracked input differs from it.

    Returns ``unknown`` outside a git checkout (or without git).
    """
    cwd = root or project_root()
    try:
        sha = _git(cwd, "rev-parse", "HEAD").strip()
        # -z: paths verbatim (no quoting of odd names); --no-renames: one path per entry.
        status = _git(cwd, "status", "--porcelain=v1", "-z", "--no-renames", "--untracked-files=all")
        top = Path(_git(cwd, "rev-parse", "--show-toplevel").strip())
    except (OSError, subprocess.CalledProcessError):
        return "unknown"
    entries = [entry for entry in status.split("\0") if entry]
    # An untracked file is an input when it is code: a new module the stages may import runs
    # although the commit lacks it. Other new files (notes, a scratch table) are not inputs.
    changed = [e[3:] for e in entries if not e.startswith("??") or _is_code(PurePosixPath(e[3:]))]
    # git names paths from the top of the checkout; dvc.yaml names them from the project's root.
    prefix = PurePosixPath(Path(cwd).resolve().relative_to(top.resolve()).as_posix())
    outputs = {prefix / out for out in pipeline_outputs(Path(cwd))}
    inputs = [path for path in changed if not _is_output(PurePosixPath(path), outputs)]
    return f"{sha}-dirty" if inputs else sha


def _is_code(path: PurePosixPath) -> bool:
    return path.suffix == ".py" or bool({"src", "pipeline"} & set(path.parts[:-1]))


def pipeline_outputs(root: Path) -> set[PurePosixPath]:
    """The files and folders the pipeline writes, relative to ``root``: every stage's ``outs``,
    ``metrics`` and ``plots`` in ``dvc.yaml``, ``dvc.lock`` and ``reports/``."""
    found = {PurePosixPath(p) for p in (*OUTPUT_FILES, *OUTPUT_FOLDERS)}
    try:
        stages = (yaml.safe_load((root / "dvc.yaml").read_text()) or {}).get("stages") or {}
    except FileNotFoundError:
        return found
    for stage in stages.values():
        for key in ("outs", "metrics", "plots"):
            for entry in stage.get(key) or []:
                # An entry is a path, or a one-key mapping {path: options}.
                for path in entry if isinstance(entry, dict) else [entry]:
                    found.add(PurePosixPath(str(path).rstrip("/")))
    return found


def _is_output(path: PurePosixPath, outputs: set[PurePosixPath]) -> bool:
    return any(path == out or out in path.parents for out in outputs)


def _git(cwd: Path, *args: str) -> str:
    return subprocess.run(["git", *args], cwd=cwd, capture_output=True, text=True, check=True).stdout


def log_dataset(
    images: np.ndarray, labels: np.ndarray, name: str, source: Path, file_md5: str, context: str
) -> NumpyDataset:
    """Logs a split as an input of the active run, its digest that of the DVC-tracked file and split.

    The digest names the file (its MD5, as in dvc.lock) and the rows taken from it, so the run page
    shows which data, exactly, a model saw.
    """
    import mlflow
    from mlflow.data.numpy_dataset import from_numpy

    digest = hashlib.md5(f"{file_md5}:{name}:{len(images)}".encode()).hexdigest()[:8]
    with warnings.catch_warnings():
        # MLflow registers two local-file source classes under one name and warns that a path
        # "can be interpreted in multiple ways"; both record the same path.
        warnings.filterwarnings("ignore", message="The specified dataset source")
        dataset = from_numpy(
            images.reshape(len(images), -1),
            targets=labels,
            source=str(Path(source).resolve()),
            name=name,
            digest=digest,
        )
    mlflow.log_input(dataset, context=context)
    return dataset


# What DVC passes to a stage command run by `dvc exp run`, tagged on the run so that a row of
# `dvc exp show` and a run in `mlflow ui` are found from each other.
_DVC_ENV_TAGS = {"DVC_EXP_NAME": "dvc.exp_name", "DVC_EXP_BASELINE_REV": "dvc.exp_baseline_rev"}


def run_name(params: Params) -> str:
    """The experiment's name under ``dvc exp run``; else ``<preset>-<hash>-<time>-<random>``, the hash
    that of the ``model`` and ``train`` params (what the train stage reads).

    Never drawn from Python's ``random``: seeded training would give every run the same name.
    """
    name = os.environ.get("DVC_EXP_NAME", "").strip()
    if name:
        return name
    trained = {"model": params.model.to_dict(), "train": params.train.to_dict()}
    digest = hashlib.sha256(json.dumps(trained, sort_keys=True).encode()).hexdigest()[:7]
    return f"{params.model.preset}-{digest}-{time.strftime('%m%d-%H%M%S')}-{secrets.token_hex(2)}"


def dvc_tags() -> dict[str, str]:
    return {tag: os.environ[var] for var, tag in _DVC_ENV_TAGS.items() if os.environ.get(var)}
