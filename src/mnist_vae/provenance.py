"""Which code made a run: the git commit, and whether the inputs differ from it.

A run records ``<sha>-dirty`` only when a tracked input (code, params, configuration) differs from
the commit. The pipeline's own outputs do not count: ``dvc repro`` rewrites ``dvc.lock`` and
``metrics.json`` before ``evaluate`` asks, so counting them would mark every first run of a fresh
clone as dirty.
"""

from __future__ import annotations

import subprocess
from pathlib import Path, PurePosixPath

import yaml

from mnist_vae.paths import project_root

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
