"""Tests for :mod:`mnist_vae.training.checkpoint`: only a checkpoint of the same params, data and code is
resumed; any other is set aside, never loaded."""

from __future__ import annotations

import logging
from pathlib import Path

import pytest
import torch

from mnist_vae.training import checkpoint

MODEL, TRAIN = {"preset": "mlp", "hidden": [8], "latent": 2}, {"epochs": 3, "seed": 0, "threads": "auto"}


def test_fingerprint_changes_with_params_data_and_code_but_not_speed_settings() -> None:
    base = checkpoint.fingerprint(MODEL, TRAIN, "md5-a", "code-a")
    assert base == checkpoint.fingerprint(dict(MODEL), dict(TRAIN), "md5-a", "code-a")
    assert base != checkpoint.fingerprint(MODEL, {**TRAIN, "epochs": 4}, "md5-a", "code-a")
    assert base != checkpoint.fingerprint({**MODEL, "latent": 3}, TRAIN, "md5-a", "code-a")
    assert base != checkpoint.fingerprint(MODEL, TRAIN, "md5-b", "code-a")
    assert base != checkpoint.fingerprint(MODEL, TRAIN, "md5-a", "code-b")
    # The same model, trained faster or slower: the checkpoint is still this training's.
    assert base == checkpoint.fingerprint(MODEL, {**TRAIN, "threads": 1, "compile": True}, "md5-a", "code-a")


def test_the_code_digest_covers_the_train_stages_modules_only() -> None:
    package = Path(checkpoint.__file__).parents[1]
    closure = {p.relative_to(package).as_posix() for p in checkpoint._import_closure(checkpoint.STAGE_MODULE)}
    assert {"stages/train.py", "training/trainer.py", "models/vae.py", "models/objectives.py"} <= closure
    assert {"training/checkpoint.py", "data/dataset.py"} <= closure
    rooms = {path.split("/")[0] for path in closure}
    assert not {"evaluation", "serving", "tuning", "bench", "cli"} & rooms
    assert not {"data/fetch.py", "registry/gate.py", "registry/registration.py"} & closure
    assert checkpoint.code_digest() == checkpoint.code_digest()
    assert checkpoint.code_digest() != checkpoint.code_digest("mnist_vae.stages.evaluate")


def test_a_matching_checkpoint_round_trips(tmp_path: Path) -> None:
    path = tmp_path / "checkpoints" / "train.pt"
    mine = checkpoint.fingerprint(MODEL, TRAIN, "md5", "code")
    state = {"fingerprint": mine, "run_id": "r1", "trainer": {"epoch": 2, "w": torch.ones(3)}}
    checkpoint.save(path, state)
    loaded = checkpoint.load(path, mine)
    assert loaded is not None and loaded["run_id"] == "r1" and loaded["trainer"]["epoch"] == 2
    assert torch.equal(loaded["trainer"]["w"], torch.ones(3))
    assert [p.name for p in path.parent.iterdir()] == ["train.pt"]


@pytest.mark.parametrize(
    ("made_by", "says"),
    [
        (checkpoint.fingerprint(MODEL, TRAIN, "md5", "other code"), "made with other code;"),
        (checkpoint.fingerprint(MODEL, {**TRAIN, "epochs": 9}, "md5", "code"), "made with other params;"),
        (checkpoint.fingerprint(MODEL, TRAIN, "other md5", "other code"), "with other data and code;"),
        ("a1b2c3", "made with other format (an older version's checkpoint);"),
    ],
    ids=["code", "params", "data and code", "older format"],
)
def test_a_checkpoint_made_otherwise_is_set_aside_not_loaded(
    tmp_path: Path, caplog: pytest.LogCaptureFixture, made_by: object, says: str
) -> None:
    path = tmp_path / "train.pt"
    checkpoint.save(path, {"fingerprint": made_by, "trainer": {"epoch": 5}})
    before = path.read_bytes()
    with caplog.at_level(logging.WARNING, logger="mnist_vae.training.checkpoint"):
        assert checkpoint.load(path, checkpoint.fingerprint(MODEL, TRAIN, "md5", "code")) is None
    (kept,) = tmp_path.iterdir()
    assert kept.name.startswith("train.pt.set-aside-") and kept.read_bytes() == before
    (message,) = [r.getMessage() for r in caplog.records]
    assert message.startswith(f"checkpoint {path} was made with other ") and says in message, message
    assert f"set aside as {kept}, training from scratch" in message


def test_an_unreadable_file_starts_afresh_with_a_warning(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    path = tmp_path / "train.pt"
    expected = checkpoint.fingerprint(MODEL, TRAIN, "md5", "code")
    assert checkpoint.load(path, expected) is None  # none yet: no warning
    path.write_bytes(b"half a checkpoint")
    with caplog.at_level(logging.WARNING, logger="mnist_vae.training.checkpoint"):
        assert checkpoint.load(path, expected) is None
    (message,) = [r.getMessage() for r in caplog.records]
    assert message.startswith(f"ignoring unreadable checkpoint {path}")
