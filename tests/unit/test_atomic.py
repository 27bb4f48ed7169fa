"""Outputs are written whole or not at all, and a full disk is named as such."""

from __future__ import annotations

import errno
import os
import subprocess
from pathlib import Path

import pytest
import torch

from mnist_vae.atomic import DiskFullError, atomic_write


def _no_space(fh) -> None:
    fh.write(b"half of it")
    raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))


def test_write_replaces_the_file_and_leaves_no_temporary(tmp_path: Path) -> None:
    target = tmp_path / "out" / "metrics.json"
    atomic_write(target, "old")
    atomic_write(target, b"new")
    assert target.read_text() == "new"
    assert sorted(p.name for p in target.parent.iterdir()) == ["metrics.json"]


def test_enospc_names_the_file_keeps_the_old_one_and_cleans_up(tmp_path: Path) -> None:
    target = tmp_path / "model.pt"
    target.write_bytes(b"previous model")
    with pytest.raises(DiskFullError, match=r"no space left on the device while writing .*model\.pt"):
        atomic_write(target, _no_space)
    assert target.read_bytes() == b"previous model"
    assert [p.name for p in tmp_path.iterdir()] == ["model.pt"]


def test_other_failures_keep_their_type(tmp_path: Path) -> None:
    def broken(fh):
        raise ZeroDivisionError("a bug")

    with pytest.raises(ZeroDivisionError):
        atomic_write(tmp_path / "x", broken)
    assert list(tmp_path.iterdir()) == []


@pytest.fixture
def small_filesystem(tmp_path: Path):
    """A real 1 MB tmpfs (needs root, as on this project's machines)."""
    mount = tmp_path / "small"
    mount.mkdir()
    done = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=1m", "tmpfs", str(mount)], capture_output=True)
    if done.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {done.stderr.decode().strip()}")
    yield mount
    subprocess.run(["umount", str(mount)], check=True)


def test_torch_save_on_a_full_filesystem(small_filesystem: Path) -> None:
    target = small_filesystem / "model.pt"
    atomic_write(target, lambda fh: torch.save({"w": torch.zeros(10)}, fh))
    before = target.read_bytes()
    with pytest.raises(DiskFullError, match="model.pt"):
        atomic_write(target, lambda fh: torch.save({"w": torch.zeros(1_000_000)}, fh))  # 4 MB
    assert target.read_bytes() == before
    assert [p.name for p in small_filesystem.iterdir()] == ["model.pt"]
