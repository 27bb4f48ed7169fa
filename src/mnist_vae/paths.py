"""Where the stages read and write, and where the project's root is."""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

# DVC runs queued or --temp experiments in a copy of the repo under this folder; their runs belong
# in the project's store, not in a throw-away copy's.
_DVC_EXP_DIR = (".dvc", "tmp", "exps")


def dataset_file(dataset: str) -> Path:
    """The prepared dataset ``data/<data.dataset>.npz``: dvc.yaml's ``data/${data.dataset}.npz``."""
    return Path("data") / f"{dataset}.npz"


@dataclass(frozen=True)
class Paths:
    """The stages' files, relative to the project root (as in dvc.yaml). ``data`` follows
    ``data.dataset``: :meth:`of` gives the paths of a dataset; the default is MNIST's."""

    data: Path = dataset_file("mnist")
    model: Path = Path("models/model.pt")
    run: Path = Path("models/run.json")
    history: Path = Path("reports/train_history.csv")
    metrics: Path = Path("metrics.json")
    figures: Path = Path("reports/figures")
    checkpoint: Path = Path("checkpoints/train.pt")

    @classmethod
    def of(cls, dataset: str) -> Paths:
        """The paths of a pipeline on ``dataset`` (a ``data.dataset`` value)."""
        return cls(data=dataset_file(dataset))


def project_root(cwd: Path | None = None) -> Path:
    """The project's root: the working directory, or the repo that a DVC temp experiment copies.

    A queued experiment runs in a copy of the repo in DVC's temporary folder; DVC passes the
    repo's own root to its stages as ``DVC_ROOT``.
    """
    dvc_root = os.environ.get("DVC_ROOT", "").strip()
    if cwd is None and dvc_root and Path(dvc_root).is_dir():
        return Path(dvc_root).resolve()
    cwd = (cwd or Path.cwd()).resolve()
    parts = cwd.parts
    n = len(_DVC_EXP_DIR)
    for i in range(len(parts) - n):
        if parts[i : i + n] == _DVC_EXP_DIR:
            return Path(*parts[:i])
    return cwd


DEFAULT_PATHS = Paths()
