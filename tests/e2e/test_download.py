"""The download stage as DVC runs it, on the real MNIST files of the offline mirror."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from mnist_vae.data import load_mnist

pytestmark = pytest.mark.slow


def test_real_mnist_from_the_offline_mirror(tmp_path: Path, repo_root: Path, shared_mnist: Path) -> None:
    shutil.copytree(repo_root / "pipeline", tmp_path / "pipeline")
    shutil.copy2(repo_root / "params.yaml", tmp_path / "params.yaml")
    env = {**os.environ, "MNIST_MIRRORS": str(shared_mnist)}
    result = subprocess.run(
        [sys.executable, "pipeline/download.py"],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    assert sorted(p.name for p in (tmp_path / "data").iterdir()) == ["mnist.npz"]

    mnist = load_mnist(tmp_path / "data" / "mnist.npz")
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
