"""Shared fixtures: tiny datasets and an isolated MLflow store per test."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

ROOT = Path(__file__).resolve().parents[1]
# The offline MNIST copy present on every machine of this project, CI included.
SHARED_MNIST = ROOT.parent / "shared" / "datasets" / "mnist"


def tiny_images(n: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """``n`` uint8 28x28 images of bars whose position depends on the label: learnable, not noise."""
    rng = np.random.default_rng(seed)
    labels = rng.integers(0, 10, size=n).astype(np.uint8)
    images = np.zeros((n, 28, 28), dtype=np.uint8)
    for i, label in enumerate(labels):
        row = 4 + 2 * int(label)
        images[i, row : row + 3, 4:24] = 200 + rng.integers(0, 55)
        images[i, 4:24, 4 + 2 * int(label)] = 255
    return images, labels


@pytest.fixture
def tiny_npz(tmp_path: Path) -> Path:
    """A dataset file in the format the download stage writes, 256 train and 64 test images."""
    x_train, y_train = tiny_images(256, seed=1)
    x_test, y_test = tiny_images(64, seed=2)
    path = tmp_path / "data" / "mnist.npz"
    path.parent.mkdir(parents=True)
    np.savez(path, x_train=x_train, y_train=y_train, x_test=x_test, y_test=y_test)
    return path
