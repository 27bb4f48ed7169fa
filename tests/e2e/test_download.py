"""The download stage as DVC runs it, on the real MNIST files of the offline mirror."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import yaml

from mnist_vae.data.dataset import load_dataset
from mnist_vae.tracking import file_md5

pytestmark = pytest.mark.slow


def test_real_mnist_from_the_offline_mirror(real_mnist: Path, repo_root: Path) -> None:
    """``real_mnist`` is ``pipeline/download.py`` run for real once per test session; every
    reproduced project of the session starts from its output."""
    assert sorted(p.name for p in real_mnist.parent.iterdir()) == ["mnist.npz"]
    mnist = load_dataset(real_mnist)
    assert mnist.x_train.shape == (60_000, 28, 28)
    assert mnist.x_test.shape == (10_000, 28, 28)
    assert mnist.y_train.shape == (60_000,)
    assert mnist.y_test.shape == (10_000,)
    for arr in (mnist.x_train, mnist.y_train, mnist.x_test, mnist.y_test):
        assert arr.dtype == np.uint8
    assert set(np.unique(mnist.y_train).tolist()) == set(range(10))
    assert set(np.unique(mnist.y_test).tolist()) == set(range(10))
    assert mnist.y_test[:5].tolist() == [7, 2, 1, 0, 4]  # the well-known first test digits
    assert mnist.y_train[:5].tolist() == [5, 0, 4, 1, 9]
    assert 0 < mnist.x_train.mean() < 255
    # Byte for byte what main's dvc.lock records: the archive is written the same on every machine,
    # so a fresh clone's download stage reproduces the lock.
    lock = yaml.safe_load((repo_root / "dvc.lock").read_text())
    assert file_md5(real_mnist) == lock["stages"]["download"]["outs"][0]["md5"]
