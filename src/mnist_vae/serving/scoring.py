"""Bulk scoring without JSON: the per-image negative ELBO of many images, written to CSV or Parquet.

The same numbers as the served model's ``score`` output (:mod:`mnist_vae.serving.scores`: one
posterior draw per image, fixed by ``seed`` and the image's own pixels), computed in large batches in
this process instead of through HTTP and JSON; ``--engine spark`` computes them on Spark
(:mod:`mnist_vae.serving.spark`). Inputs: an ``.npz`` (``x_test`` of ``data/mnist.npz`` by
default), an ``.npy``, or a folder of PNG/JPEG pictures, each prepared by
:func:`mnist_vae.data.pictures.load_digit`.
"""

from __future__ import annotations

import time
import zipfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
import torch

from mnist_vae.atomic import atomic_write
from mnist_vae.errors import UserError
from mnist_vae.models.estimate import for_estimate
from mnist_vae.models.networks import N_PIXELS
from mnist_vae.models.vae import VAE
from mnist_vae.serving import tables
from mnist_vae.serving.inputs import PixelMessages, checked_pixels
from mnist_vae.serving.scores import score_batch

DEFAULT_KEY = "x_test"
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg")
OUTPUT_SUFFIXES = (".csv", ".parquet")
_EXPECTED = "uint8 0-255 or float grey levels in [0, 1], of shape (N, 28, 28) or (N, 784)"
_FILE_MESSAGES = PixelMessages(
    shape=f"expected {_EXPECTED}, got shape {{shape}}",
    empty="expected at least one image, got none",
    dtype=f"expected {_EXPECTED}, got dtype {{dtype}}",
    not_finite="expected finite grey levels in [0, 1], got NaN or infinity",
    out_of_range="expected grey levels in [0, 1] (or uint8 0-255), got values in [{low}, {high}]",
)


class ScoreInputError(UserError):
    """The images to score, or the output file asked for, are not what ``score`` reads or writes."""


@dataclass(frozen=True, eq=False)
class Images:
    """Images to score: (N, 784) uint8 or float32 in [0, 1], and a name per row (index or file)."""

    pixels: np.ndarray
    names: list[str] | np.ndarray


@dataclass(frozen=True)
class ScoreResult:
    path: Path
    images: int
    seconds: float  # reading, scoring and writing, not loading the model

    @property
    def images_per_sec(self) -> float:
        return self.images / self.seconds


SOURCES = "a Parquet dataset, an .npz, an .npy or a folder of PNG/JPEG images"


def read_images(source: Path, key: str | None = None, column: str | None = None) -> Images:
    """Reads the images of a Parquet dataset (a ``.parquet`` file or a folder of them; the image
    column ``column``, see :mod:`mnist_vae.serving.tables`), an ``.npz`` (array ``key``, default
    ``x_test``), an ``.npy`` or a folder of pictures.

    Raises:
        ScoreInputError: ``source`` is missing, of another kind, or holds no valid images.
        ImageError: A picture of the folder is unreadable or shows no digit.
    """
    source = Path(source)
    if not source.exists():
        raise ScoreInputError(f"{source}: no such file or folder; expected {SOURCES}")
    parquet = tables.is_dataset(source)
    if key is not None and (parquet or source.is_dir()):
        raise ScoreInputError(f"--key {key!r}: only an .npz has keys, {source} is not one")
    if column is not None and not parquet:
        raise ScoreInputError(f"--column {column!r}: only a Parquet dataset has columns, {source} is not one")
    if parquet:
        return _read_parquet(source, column)
    if source.is_dir():
        return _read_folder(source)
    suffix = source.suffix.lower()
    if suffix == ".npz":
        array = _read_npz(source, key or DEFAULT_KEY)
    elif suffix == ".npy":
        if key is not None:
            raise ScoreInputError(f"--key {key!r}: only an .npz has keys, {source} is an .npy")
        array = _read_npy(source)
    else:
        raise ScoreInputError(
            f"{source}: unknown kind {source.suffix or '(no suffix)'!r}; expected {SOURCES}"
        )
    what = f"{source}[{key or DEFAULT_KEY}]" if suffix == ".npz" else str(source)
    return Images(_checked(array, what), np.arange(len(array)))


def _read_npz(source: Path, key: str) -> np.ndarray:
    try:
        with np.load(source, allow_pickle=False) as npz:
            if key not in npz.files:
                raise ScoreInputError(
                    f"{source}: no array {key!r}; expected one of its arrays: "
                    f"{', '.join(npz.files) or '(none: the archive is empty)'}"
                )
            return npz[key]
    except (OSError, EOFError, ValueError, zipfile.BadZipFile) as exc:
        raise ScoreInputError(
            f"{source}: expected an .npz archive of arrays, could not read it ({exc})"
        ) from None


def _read_npy(source: Path) -> np.ndarray:
    try:
        return np.load(source, allow_pickle=False)
    except (OSError, EOFError, ValueError) as exc:
        raise ScoreInputError(f"{source}: expected an .npy array, could not read it ({exc})") from None


def _checked(array: np.ndarray, what: str) -> np.ndarray:
    """The array as (N, 784), uint8 or float32 in [0, 1]; raises ScoreInputError otherwise."""
    return checked_pixels(array, _FILE_MESSAGES, lambda message: ScoreInputError(f"{what}: {message}"))


def _read_parquet(source: Path, column: str | None) -> Images:
    """The image column of a Parquet dataset as (N, 784) uint8 or float32, rows numbered in order."""
    import pyarrow as pa
    import pyarrow.compute as pc
    import pyarrow.parquet as pq

    paths = tables.files(source)
    try:
        schema = pq.read_schema(paths[0])
        layouts = {f.name: (str(f.type), tables.arrow_layout(f.type)) for f in schema}
        name = tables.choose_column(layouts, column, str(source))
        values = pa.concat_arrays(
            [chunk for path in paths for chunk in pq.read_table(path, columns=[name]).column(name).chunks]
        )
    except LookupError as exc:
        raise ScoreInputError(str(exc)) from None
    except (pa.ArrowException, OSError) as exc:
        raise ScoreInputError(f"{source}: expected a Parquet dataset, could not read it ({exc})") from None
    where, layout = f"{source}[{name}]", layouts[name][1]
    if len(values) == 0:
        raise ScoreInputError(f"{where}: expected at least one image, got none")
    if layout == "picture":
        blobs = values.field("bytes") if pa.types.is_struct(values.type) else values
        pixels = np.empty((len(blobs), N_PIXELS), dtype=np.uint8)
        for row, blob in enumerate(blobs.to_pylist()):
            try:
                pixels[row] = tables.decode_picture(blob)
            except tables.PictureError as exc:
                raise ScoreInputError(tables.bad_picture(where, row, str(exc))) from None
        return Images(pixels, np.arange(len(pixels)))
    lengths = pc.fill_null(pc.list_value_length(values), -1).to_numpy()
    wrong = np.flatnonzero(lengths != N_PIXELS)
    if len(wrong):
        length = int(lengths[wrong[0]])
        raise ScoreInputError(tables.wrong_length(where, int(wrong[0]), None if length < 0 else length))
    flat = pc.list_flatten(values)
    if flat.null_count:
        rows = np.repeat(np.arange(len(values)), N_PIXELS)[np.asarray(flat.is_null())]
        raise ScoreInputError(tables.null_values(where, int(rows[0])))
    grey = flat.to_numpy(zero_copy_only=False).reshape(len(values), N_PIXELS)
    assert layout is not None
    low, high = float(grey.min()), float(grey.max())
    if not tables.in_range(layout, low, high):
        raise ScoreInputError(tables.out_of_range(where, layout, low, high))
    pixels = grey.astype(np.uint8) if layout == "int" else grey.astype(np.float32)
    return Images(pixels, np.arange(len(pixels)))


def _read_folder(folder: Path) -> Images:
    from mnist_vae.data.pictures import load_digit

    files = sorted(p for p in folder.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES and p.is_file())
    if not files:
        raise ScoreInputError(f"{folder}: no PNG or JPEG files (expected *.png, *.jpg or *.jpeg)")
    pixels = np.stack([load_digit(p) for p in files]).reshape(len(files), N_PIXELS)
    return Images(pixels, [p.name for p in files])


def check_output(out: Path) -> None:
    """Fails before any work when ``out`` cannot be written as asked.

    Raises:
        ScoreInputError: Its suffix is neither .csv nor .parquet, or Parquet has no engine here.
    """
    suffix = Path(out).suffix.lower()
    if suffix not in OUTPUT_SUFFIXES:
        raise ScoreInputError(
            f"{out}: unknown output kind {Path(out).suffix or '(no suffix)'!r}; "
            "expected a .csv or .parquet file"
        )
    if suffix == ".parquet":
        try:
            import pyarrow  # noqa: F401
        except ImportError:
            raise ScoreInputError(
                f"{out}: writing Parquet needs pyarrow (pip install pyarrow); or write a .csv"
            ) from None


def score_pixels(
    model: VAE,
    pixels: np.ndarray,
    seed: int = 0,
    latents: bool = False,
    batch_size: int = 4096,
    complexity: bool = False,
) -> dict[str, np.ndarray]:
    """Negative ELBO per image (nats), with ``latents`` the posterior means ``mu_i``, with
    ``complexity`` the PNG length and the corrected score (:func:`mnist_vae.serving.scores.score_batch`).

    Each image's posterior draw depends on ``seed`` and the image alone, so the scores equal the
    served model's ``score`` output and the Spark engine's for the same images and seed, whatever
    ``batch_size`` or the batches around them.
    """
    assert pixels.ndim == 2 and pixels.shape[1] == N_PIXELS, f"expected (N, 784), got {pixels.shape}"
    # The decoder rewritten for speed, in FP32: the same code as the served model's score.
    model = for_estimate(model.eval(), "fp32")
    parts: list[dict[str, np.ndarray]] = []
    for start in range(0, len(pixels), batch_size):
        x = torch.from_numpy(np.ascontiguousarray(pixels[start : start + batch_size]))
        x = x.float().div_(255.0) if x.dtype == torch.uint8 else x.float()
        parts.append(score_batch(model, x, seed, latents, complexity))
    return {name: np.concatenate([part[name] for part in parts]) for name in parts[0]}


def write_table(columns: dict[str, np.ndarray | list], out: Path) -> Path:
    """Writes the columns to ``out`` (CSV or Parquet by its suffix), atomically."""
    frame = pd.DataFrame(columns)
    if Path(out).suffix.lower() == ".parquet":
        return atomic_write(out, lambda fh: frame.to_parquet(fh, index=False))
    return atomic_write(out, lambda fh: frame.to_csv(fh, index=False))


def score_file(
    model: VAE,
    source: Path,
    out: Path,
    key: str | None = None,
    seed: int = 0,
    latents: bool = False,
    batch_size: int = 4096,
    complexity: bool = False,
    column: str | None = None,
) -> ScoreResult:
    """Scores every image of ``source`` and writes ``image``, ``neg_elbo`` (and ``mu_i``) to ``out``.

    ``image`` is the row's index in the array or Parquet dataset, or the picture's file name in a
    folder.

    Raises:
        ScoreInputError: Bad input or output (see :func:`read_images` and :func:`check_output`).
    """
    start = time.perf_counter()
    check_output(out)
    images = read_images(source, key, column)
    scores = score_pixels(model, images.pixels, seed, latents, batch_size, complexity)
    columns = {"image": images.names, **scores}
    path = write_table(columns, out)
    return ScoreResult(path, len(images.pixels), time.perf_counter() - start)
