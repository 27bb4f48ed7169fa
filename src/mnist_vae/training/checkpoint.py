"""The training checkpoint: what a killed run needs to resume exactly where it stood, and only there.

A checkpoint carries the fingerprint of what made it: the model-defining params (``model.*`` and
``train.*`` but the thread count and ``compile``, which change speed, not the model), the data's MD5
and the source of the train stage's code (the modules its script imports, which dvc.yaml lists as
its deps). One made by anything else is set aside under another name, never resumed into.
"""

from __future__ import annotations

import ast
import hashlib
import json
import logging
import time
from pathlib import Path
from typing import Any

import torch

import mnist_vae
from mnist_vae.atomic import atomic_write

log = logging.getLogger(__name__)

# Settings of how fast training runs, not of what it computes: a resume may change them.
_SPEED_ONLY = ("threads", "compile")
# The train stage's module: its imports, transitively, are the code a checkpoint belongs to.
STAGE_MODULE = "mnist_vae.stages.train"


def fingerprint(model: dict[str, Any], train: dict[str, Any], data_md5: str, code: str) -> dict[str, str]:
    """What a checkpoint must match to be resumed, part by part (so a mismatch can say which)."""
    kept = {k: v for k, v in train.items() if k not in _SPEED_ONLY}
    return {
        "params": _sha256(json.dumps({"model": model, "train": kept}, sort_keys=True)),
        "data": data_md5,
        "code": code,
    }


def code_digest(module: str = STAGE_MODULE) -> str:
    """SHA-256 of the source of ``module`` and every project module it imports, transitively (at
    the top or inside functions): the code whose checkpoint may be resumed by this code."""
    digest = hashlib.sha256()
    for path in sorted(_import_closure(module)):
        digest.update(path.relative_to(_PACKAGE.parent).as_posix().encode() + b"\0")
        digest.update(path.read_bytes() + b"\0")
    return digest.hexdigest()


def save(path: Path, state: dict[str, Any]) -> None:
    atomic_write(path, lambda fh: torch.save(state, fh))


def load(path: Path, expected: dict[str, str]) -> dict[str, Any] | None:
    """The checkpoint to resume from, or None.

    None when there is none, when it cannot be read (then training starts over and overwrites
    it), or when its fingerprint differs from ``expected``: then it is renamed beside itself
    (``train.pt.set-aside-<time>``), kept for whoever wants it, with one line naming what differs.
    """
    if not path.is_file():
        return None
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # a checkpoint we cannot read is one we start over from
        # Only the type: torch's message for a foreign pickle advises loading it unsafely.
        log.warning("ignoring unreadable checkpoint %s (%s); training from scratch", path, type(exc).__name__)
        return None
    found = state.get("fingerprint")
    if found == expected:
        return state
    differs = (
        [part for part in expected if found.get(part) != expected[part]]
        if isinstance(found, dict)
        else ["format (an older version's checkpoint)"]
    )
    kept = path.with_name(f"{path.name}.set-aside-{time.strftime('%Y%m%d-%H%M%S')}")
    path.rename(kept)
    log.warning(
        "checkpoint %s was made with other %s; set aside as %s, training from scratch",
        path,
        " and ".join(differs),
        kept,
    )
    return None


_PACKAGE = Path(mnist_vae.__file__).parent


def _import_closure(module: str) -> set[Path]:
    seen: set[Path] = set()
    todo = [module]
    while todo:
        path = _module_file(todo.pop())
        if path is None or path in seen:
            continue
        seen.add(path)
        todo.extend(_imported(path))
    return seen


def _module_file(name: str) -> Path | None:
    if name != "mnist_vae" and not name.startswith("mnist_vae."):
        return None
    base = _PACKAGE.parent.joinpath(*name.split("."))
    for candidate in (base.with_suffix(".py"), base / "__init__.py"):
        if candidate.is_file():
            return candidate
    return None


def _imported(path: Path) -> set[str]:
    """The modules ``path`` imports, and the packages above each (importing runs their __init__)."""
    names: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names.add(node.module)
            names.update(f"{node.module}.{alias.name}" for alias in node.names)
    return {".".join(name.split(".")[:i]) for name in names for i in range(1, name.count(".") + 2)}


def _sha256(text: str) -> str:
    return hashlib.sha256(text.encode()).hexdigest()
