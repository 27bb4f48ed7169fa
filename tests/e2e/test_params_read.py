"""Each stage reads exactly the params that dvc.yaml lists for it, no more: otherwise changing an
unlisted param would leave DVC's outputs stale, and listing an unread one would rerun for nothing.

The stages run for real on tiny data, with params whose every read is recorded: a field read is
that one param, a method of a section (``to_dict``, ``replace``) reads all of that section.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import yaml
from pydantic import BaseModel

from mnist_vae.config import Params, load_params
from mnist_vae.data.fetch import MIRRORS_ENV
from mnist_vae.paths import Paths
from mnist_vae.stages import download, evaluate, train

ROOT = Path(__file__).resolve().parents[2]
STAGES = yaml.safe_load((ROOT / "dvc.yaml").read_text())["stages"]

TINY = {
    "model": {"preset": "mlp", "hidden": [16], "latent": 2},
    "train": {"device": "cpu", "epochs": 1, "batch_size": 16, "threads": 1, "validation": 64},
    "evaluate": {"batch_size": 32, "iw_samples": 2, "n_images": 2},
}


def _leaves(model: BaseModel, prefix: str) -> set[str]:
    out = set()
    for name in type(model).model_fields:
        value = getattr(model, name)
        key = f"{prefix}.{name}" if prefix else name
        out |= _leaves(value, key) if isinstance(value, BaseModel) else {key}
    return out


class Recorded:
    """A params object, or one of its sections, that notes in ``reads`` each param read through it."""

    def __init__(self, model: BaseModel, reads: set[str], prefix: str = "") -> None:
        self._model, self._reads, self._prefix = model, reads, prefix

    def __getattr__(self, name: str) -> Any:
        value = getattr(self._model, name)
        if name in type(self._model).model_fields:
            key = f"{self._prefix}.{name}" if self._prefix else name
            if isinstance(value, BaseModel):
                return Recorded(value, self._reads, key)
            self._reads.add(key)
        elif callable(value):  # to_dict, flat, replace, model_dump: they read every field
            self._reads |= _leaves(self._model, self._prefix)
        return value


def _listed(stage: str) -> set[str]:
    leaves = _leaves(Params(), "")
    out = set()
    for entry in STAGES[stage]["params"]:
        out |= {leaf for leaf in leaves if leaf == entry or leaf.startswith(entry + ".")}
    return out


@pytest.fixture
def project(
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    mlflow_store: str,
    tiny_idx: dict[str, bytes],
    tiny_splits: dict[str, int],
    make_mirror: Callable[..., Path],
    write_params: Callable[..., Path],
) -> Path:
    make_mirror(tmp_path / "mirror", tiny_idx)
    monkeypatch.setenv(MIRRORS_ENV["mnist"], str(tmp_path / "mirror"))
    write_params(tmp_path / "params.yaml", TINY)
    monkeypatch.chdir(tmp_path)
    return tmp_path


def test_each_stage_reads_exactly_the_params_dvc_yaml_lists(
    project: Path, write_dataset: Callable[..., Path]
) -> None:
    params = load_params(project / "params.yaml")
    paths = Paths()
    reads: dict[str, set[str]] = {}
    for name, stage, kwargs in (
        ("download", download, {}),
        ("train", train, {"progress": False}),
        ("evaluate", evaluate, {}),
    ):
        if name == "train":  # the tiny IDX files hold 3 images: train on a tiny dataset of 320
            write_dataset(paths.data, 256 + 64)
        reads[name] = set()
        stage.run(Recorded(params, reads[name]), paths, **kwargs)  # type: ignore[arg-type]
    for name, seen in reads.items():
        listed = _listed(name)
        assert seen <= listed, f"{name} reads params that dvc.yaml does not list: {sorted(seen - listed)}"
        for entry in STAGES[name]["params"]:
            assert any(key == entry or key.startswith(entry + ".") for key in seen), (
                f"{name}: dvc.yaml lists {entry}, which the stage never reads"
            )
    assert (project / "metrics.json").is_file()  # the stages did run to their end


def test_the_recorder_sees_a_read_that_dvc_yaml_does_not_list() -> None:
    """The check above can fail: a read of an unlisted param is seen."""
    reads: set[str] = set()
    recorded = Recorded(Params(), reads)
    assert recorded.train.lr == Params().train.lr
    recorded.evaluate.to_dict()
    assert "train.lr" in reads and not reads - _leaves(Params(), "") and "train.lr" not in _listed("download")
    assert {"evaluate.iw_samples", "evaluate.seed"} <= reads and "train.epochs" not in reads
