"""Reading the prepared dataset that the ``download`` stage writes (see :mod:`mnist_vae.data.fetch`),
and what each dataset is called.

Every stage after ``download`` reads ``data/<data.dataset>.npz`` through :func:`load_dataset`, and
this module imports nothing of the downloader, so those stages do not depend on it. MNIST and
Fashion-MNIST have the same shapes (28x28 grey levels, labels 0..9); :data:`DATASETS` holds what
differs for people: the name as written and what the labels mean.
"""

from __future__ import annotations

import zipfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from mnist_vae.config import ConfigError
from mnist_vae.errors import UserError

IMAGE_SIDE = 28
N_CLASSES = 10
NPZ_KEYS: tuple[str, ...] = ("x_train", "y_train", "x_test", "y_test")

MAKE_DATASET_HINT = "create it with `dvc repro download` (or `mnist-vae download`)"


@dataclass(frozen=True)
class DatasetInfo:
    """What a dataset is called (its ``data.dataset`` value, its title) and what its labels mean."""

    name: str
    title: str
    classes: tuple[str, ...]
    label: str  # what one label names: "digit", "article"


DATASETS: dict[str, DatasetInfo] = {
    "mnist": DatasetInfo("mnist", "MNIST", tuple("0123456789"), "digit"),
    "fashion-mnist": DatasetInfo(
        "fashion-mnist",
        "Fashion-MNIST",
        (
            "T-shirt/top",
            "Trouser",
            "Pullover",
            "Dress",
            "Coat",
            "Sandal",
            "Shirt",
            "Sneaker",
            "Bag",
            "Ankle boot",
        ),
        "article",
    ),
}


class DatasetMissingError(UserError, FileNotFoundError):
    """The prepared ``.npz`` does not exist yet."""


class DatasetFormatError(UserError, ValueError):
    """The prepared ``.npz`` exists but does not hold a dataset as the ``download`` stage writes it."""


@dataclass(frozen=True, eq=False)  # eq on arrays would be elementwise, hence ambiguous
class ImageData:
    """A dataset as uint8 arrays: images ``(N, 28, 28)`` in 0..255, labels ``(N,)`` in 0..9."""

    x_train: np.ndarray
    y_train: np.ndarray
    x_test: np.ndarray
    y_test: np.ndarray

    def split(self, validation: int) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
        """The training split without its last ``validation`` images, and those images:
        ``(x_train, y_train, x_val, y_val)``. The validation split is the same whatever the seed,
        so every model of a sweep is chosen on the same images."""
        if not 0 <= validation < len(self.x_train):
            raise ConfigError(
                f"train.validation: expected fewer images than the "
                f"{len(self.x_train)} of the training split, got {validation}"
            )
        cut = len(self.x_train) - validation
        return self.x_train[:cut], self.y_train[:cut], self.x_train[cut:], self.y_train[cut:]


def load_dataset(path: Path) -> ImageData:
    """Reads the archive written by :func:`mnist_vae.data.fetch.download_dataset`.

    Args:
        path: The ``.npz`` file, usually ``data/mnist.npz`` or ``data/fashion-mnist.npz``.

    Raises:
        DatasetMissingError: ``path`` does not exist.
        DatasetFormatError: It is not an ``.npz`` with the expected keys, dtypes and shapes.
    """
    path = Path(path)
    if not path.is_file():
        raise DatasetMissingError(f"{path}: dataset file is missing; {MAKE_DATASET_HINT}")
    try:
        with np.load(path, allow_pickle=False) as npz:
            arrays = {key: npz[key] for key in NPZ_KEYS if key in npz.files}
    except (OSError, EOFError, ValueError, zipfile.BadZipFile) as exc:
        raise DatasetFormatError(
            f"{path}: expected an .npz archive of image arrays, could not read it ({exc}); "
            f"{MAKE_DATASET_HINT}"
        ) from None
    missing = [key for key in NPZ_KEYS if key not in arrays]
    if missing:
        raise DatasetFormatError(
            f"{path}: expected arrays {', '.join(NPZ_KEYS)}; missing {', '.join(missing)} "
            f"({MAKE_DATASET_HINT})"
        )

    for split in ("train", "test"):
        x, y = arrays[f"x_{split}"], arrays[f"y_{split}"]
        for key, arr, ndim in ((f"x_{split}", x, 3), (f"y_{split}", y, 1)):
            if arr.dtype != np.uint8:
                raise DatasetFormatError(f"{path}: expected {key} of dtype uint8, got {arr.dtype}")
            if arr.ndim != ndim:
                raise DatasetFormatError(
                    f"{path}: expected {key} with {ndim} dimensions, got shape {arr.shape}"
                )
        if x.shape[1:] != (IMAGE_SIDE, IMAGE_SIDE):
            raise DatasetFormatError(
                f"{path}: expected x_{split} of shape (N, {IMAGE_SIDE}, {IMAGE_SIDE}), got {x.shape}"
            )
        if len(y) != len(x):
            raise DatasetFormatError(
                f"{path}: expected one label per image in the {split} split, "
                f"got {len(x)} images and {len(y)} labels"
            )
        if len(y) and int(y.max()) >= N_CLASSES:
            raise DatasetFormatError(f"{path}: expected y_{split} in 0..{N_CLASSES - 1}, got {int(y.max())}")
    return ImageData(**arrays)
