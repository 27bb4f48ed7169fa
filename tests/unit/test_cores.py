"""The register of live trainings behind ``train.threads: auto``: a private folder, and entries that
die with their training (a lock the kernel drops), not with a PID that may be reused."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from mnist_vae.training.threads import CoreShare, CoresRegistryError, registry_folder

# A training's entry as CoreShare holds it: an exclusive flock for as long as the process lives.
HOLDER = (
    "import fcntl, os, sys, time; fd = os.open(sys.argv[1], os.O_RDWR | os.O_CREAT, 0o600); "
    "fcntl.flock(fd, fcntl.LOCK_EX); print('held', flush=True); time.sleep(120)"
)


@pytest.fixture
def cores_dir(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    folder = tmp_path / "cores"
    monkeypatch.setenv("MNIST_VAE_CORES_DIR", str(folder))
    return folder


def test_the_folder_is_created_private(cores_dir: Path) -> None:
    folder = registry_folder()
    assert folder == cores_dir / "trainings"
    for path in (cores_dir, folder):
        assert path.stat().st_mode & 0o777 == 0o700
        assert path.stat().st_uid == os.getuid()


def test_a_folder_others_may_write_to_is_refused(cores_dir: Path) -> None:
    cores_dir.mkdir()
    cores_dir.chmod(0o777)
    with pytest.raises(CoresRegistryError, match="others may write there"):
        registry_folder()


def test_a_link_is_refused(cores_dir: Path, tmp_path: Path) -> None:
    (tmp_path / "elsewhere").mkdir(mode=0o700)
    cores_dir.symlink_to(tmp_path / "elsewhere")
    with pytest.raises(CoresRegistryError, match="a link"):
        registry_folder()


@pytest.mark.skipif(os.geteuid() != 0, reason="giving a folder to another user needs root")
def test_a_folder_of_another_user_is_refused(cores_dir: Path) -> None:
    cores_dir.mkdir(mode=0o700)
    os.chown(cores_dir, 65534, 65534)  # nobody
    with pytest.raises(CoresRegistryError, match="owned by uid 65534"):
        registry_folder()


def test_a_killed_training_is_stale_whatever_its_pid(cores_dir: Path) -> None:
    share = CoreShare()
    try:
        folder = share.folder
        other = folder / "999999-0a0b0c0d.training"
        holder = subprocess.Popen(
            [sys.executable, "-c", HOLDER, str(other)], stdout=subprocess.PIPE, text=True
        )
        try:
            assert holder.stdout.readline().strip() == "held"
            assert share.live() == 2
        finally:
            holder.kill()  # SIGKILL: no clean-up of its own
            holder.wait()
        assert share.live() == 1
        assert not other.exists(), "the dead training's entry was not removed"
        # An entry named after a live PID (ours) but held by nobody is stale too: no PID check.
        reused = folder / f"{os.getpid()}-feedface.training"
        reused.touch()
        assert share.live() == 1 and not reused.exists()
    finally:
        share.close()
    assert not share.entry.exists()


def test_a_reader_at_the_moment_of_registration_does_not_remove_the_new_entry(
    cores_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Another training counts the live ones just as this one registers, before its lock is
    taken: the new entry must survive, and be counted."""
    import fcntl

    from mnist_vae.training import threads as cores

    other = CoreShare()
    real_flock = fcntl.flock

    def count_first(fd: int, operation: int) -> None:
        other.live()  # the concurrent reader, at the worst moment
        real_flock(fd, operation)

    monkeypatch.setattr(cores.fcntl, "flock", count_first)
    mine = CoreShare()
    monkeypatch.setattr(cores.fcntl, "flock", real_flock)
    try:
        assert mine.entry.exists(), "a reader removed the entry of a training that was starting"
        assert other.live() == mine.live() == 2
    finally:
        mine.close()
        other.close()
