"""Tests for :mod:`mnist_vae.checkpoint`: only a checkpoint of the same params and data is resumed."""

from __future__ import annotations

import logging
from pathlib import Path

import pytest
import torch

from mnist_vae import checkpoint

MODEL, TRAIN = {"preset": "mlp", "hidden": [8], "latent": 2}, {"epochs": 3, "seed": 0}


def test_fingerprint_changes_with_params_and_data() -> None:
    base = checkpoint.fingerprint(MODEL, TRAIN, "md5-a")
    assert base == checkpoint.fingerprint(dict(MODEL), dict(TRAIN), "md5-a")
    assert base != checkpoint.fingerprint(MODEL, {**TRAIN, "epochs": 4}, "md5-a")
    assert base != checkpoint.fingerprint({**MODEL, "latent": 3}, TRAIN, "md5-a")
    assert base != checkpoint.fingerprint(MODEL, TRAIN, "md5-b")


def test_a_matching_checkpoint_round_trips(tmp_path: Path) -> None:
    path = tmp_path / "checkpoints" / "train.pt"
    state = {"fingerprint": "abc", "run_id": "r1", "trainer": {"epoch": 2, "w": torch.ones(3)}}
    checkpoint.save(path, state)
    loaded = checkpoint.load(path, "abc")
    assert loaded is not None and loaded["run_id"] == "r1" and loaded["trainer"]["epoch"] == 2
    assert torch.equal(loaded["trainer"]["w"], torch.ones(3))
    assert [p.name for p in path.parent.iterdir()] == ["train.pt"]


def test_other_params_or_an_unreadable_file_start_afresh_with_a_warning(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    path = tmp_path / "train.pt"
    assert checkpoint.load(path, "abc") is None  # none yet: no warning
    checkpoint.save(path, {"fingerprint": "other"})
    with caplog.at_level(logging.WARNING, logger="mnist_vae.checkpoint"):
        assert checkpoint.load(path, "abc") is None
        path.write_bytes(b"half a checkpoint")
        assert checkpoint.load(path, "abc") is None
    messages = [r.getMessage() for r in caplog.records]
    assert len(messages) == 2
    assert "made with other params or data" in messages[0]
    assert messages[1].startswith(f"ignoring unreadable checkpoint {path}")
