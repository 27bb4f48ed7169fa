"""The training checkpoint: what a killed run needs to resume exactly where it stood."""

from __future__ import annotations

import hashlib
import json
import logging
from pathlib import Path
from typing import Any

import torch

from mnist_vae.atomic import atomic_write

log = logging.getLogger(__name__)


def fingerprint(model: dict[str, Any], train: dict[str, Any], data_md5: str) -> str:
    """What a checkpoint must match to be resumed: the model and train params and the data."""
    spec = json.dumps({"model": model, "train": train, "data": data_md5}, sort_keys=True)
    return hashlib.sha256(spec.encode()).hexdigest()


def save(path: Path, state: dict[str, Any]) -> None:
    atomic_write(path, lambda fh: torch.save(state, fh))


def load(path: Path, expected_fingerprint: str) -> dict[str, Any] | None:
    """The checkpoint to resume from, or None (none, unreadable, or from other params or data)."""
    if not path.is_file():
        return None
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # a checkpoint we cannot read is one we start over from
        # Only the type: torch's message for a foreign pickle advises loading it unsafely.
        log.warning("ignoring unreadable checkpoint %s (%s); training from scratch", path, type(exc).__name__)
        return None
    if state.get("fingerprint") != expected_fingerprint:
        log.warning("ignoring checkpoint %s: it was made with other params or data", path)
        return None
    return state
