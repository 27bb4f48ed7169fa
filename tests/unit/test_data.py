"""Tests for :mod:`mnist_vae.data.dataset`: loading the prepared archive and the validation split."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from mnist_vae.config import ConfigError
from mnist_vae.data.dataset import DatasetFormatError, DatasetMissingError, ImageData, load_dataset
from mnist_vae.errors import UserError

# --- load_dataset --------------------------------------------------------------------------------


def test_missing_dataset_says_how_to_make_it(tmp_path: Path) -> None:
    with pytest.raises(DatasetMissingError, match="dvc repro download") as info:
        load_dataset(tmp_path / "mnist.npz")
    assert isinstance(info.value, UserError)  # printed as one line by the stages and the CLI
    assert isinstance(info.value, FileNotFoundError)
    assert str(tmp_path / "mnist.npz") in str(info.value)


def _save(path: Path, **arrays: np.ndarray) -> Path:
    with path.open("wb") as fh:
        np.savez(fh, **arrays)
    return path


def _valid_arrays() -> dict[str, np.ndarray]:
    return {
        "x_train": np.zeros((2, 28, 28), np.uint8),
        "y_train": np.zeros(2, np.uint8),
        "x_test": np.zeros((1, 28, 28), np.uint8),
        "y_test": np.zeros(1, np.uint8),
    }


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"y_test": None}, "missing y_test"),
        ({"x_train": np.zeros((2, 28, 28), np.float32)}, "x_train of dtype uint8, got float32"),
        ({"x_test": np.zeros((1, 784), np.uint8)}, "x_test with 3 dimensions"),
        ({"x_test": np.zeros((1, 28, 27), np.uint8)}, r"x_test of shape \(N, 28, 28\)"),
        ({"y_train": np.zeros(3, np.uint8)}, "2 images and 3 labels"),
        ({"y_test": np.array([10], np.uint8)}, r"y_test in 0\.\.9, got 10"),
    ],
)
def test_malformed_dataset_names_file_and_expectation(
    tmp_path: Path, change: dict[str, np.ndarray | None], message: str
) -> None:
    arrays = {**_valid_arrays(), **change}
    path = _save(tmp_path / "mnist.npz", **{k: v for k, v in arrays.items() if v is not None})
    with pytest.raises(DatasetFormatError, match=message) as info:
        load_dataset(path)
    assert isinstance(info.value, UserError)
    assert str(path) in str(info.value)


def test_not_an_npz_is_a_format_error(tmp_path: Path) -> None:
    path = tmp_path / "mnist.npz"
    path.write_bytes(b"not a zip archive")
    with pytest.raises(DatasetFormatError, match="expected an .npz archive"):
        load_dataset(path)


def test_valid_small_dataset_loads(tmp_path: Path) -> None:
    loaded = load_dataset(_save(tmp_path / "mnist.npz", **_valid_arrays()))
    assert isinstance(loaded, ImageData)
    assert loaded.x_train.shape == (2, 28, 28)


# --- the validation split ----------------------------------------------------------------------


def _numbered(n_train: int) -> ImageData:
    """Training images whose first pixel is their index, so a split shows which ones it took."""
    x = np.zeros((n_train, 28, 28), np.uint8)
    x[:, 0, 0] = np.arange(n_train)
    return ImageData(x, np.arange(n_train, dtype=np.uint8) % 10, x[:1], np.zeros(1, np.uint8))


def test_split_holds_out_the_last_images() -> None:
    x_train, y_train, x_val, y_val = _numbered(10).split(3)
    assert x_train[:, 0, 0].tolist() == list(range(7)) and len(y_train) == 7
    assert x_val[:, 0, 0].tolist() == [7, 8, 9] and y_val.tolist() == [7, 8, 9]


def test_split_of_zero_keeps_every_image_for_training() -> None:
    x_train, _, x_val, y_val = _numbered(10).split(0)
    assert len(x_train) == 10 and len(x_val) == len(y_val) == 0


@pytest.mark.parametrize("validation", [10, 11])
def test_a_split_as_large_as_the_data_names_the_key(validation: int) -> None:
    with pytest.raises(
        ConfigError,
        match=f"train.validation: expected fewer images than the 10 of the training split, got {validation}",
    ):
        _numbered(10).split(validation)
