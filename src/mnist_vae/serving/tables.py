"""Parquet datasets of images, as both engines of ``mnist-vae score`` read them.

One row per image. The image column holds one of:

- 784 numbers (a list, 28x28 flattened row by row): integers are grey levels 0..255, floats grey
  levels in [0, 1];
- the bytes of a 28x28 picture in a format Pillow reads (PNG, JPEG...), as a binary column, or as a
  struct with a binary field ``bytes`` (the layout of Hugging Face datasets' images).

The column is the one ``--column`` names, else the only column of such a type. The rows are
numbered (the ``image`` column of the scores) in the order of the files' paths, then of the rows
in each file: the order in which Spark and pyarrow list a dataset's files.
"""

from __future__ import annotations

import io
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Literal

import numpy as np

from mnist_vae.models.networks import N_PIXELS

SUFFIX = ".parquet"
SIDE = 28

# How a column holds its images: "int" and "float" lists of 784 numbers, "picture" encoded bytes.
Layout = Literal["int", "float", "picture"]


class PictureError(ValueError):
    """Bytes that are no 28x28 picture Pillow can read."""


def is_dataset(source: Path) -> bool:
    """Whether ``source`` is a Parquet file or a folder holding Parquet files (a Spark output)."""
    if source.is_file():
        return source.suffix.lower() == SUFFIX
    return source.is_dir() and bool(files(source))


def files(source: Path) -> list[Path]:
    """The Parquet files of a dataset, sorted by path; names starting with ``_`` or ``.`` are
    skipped, as Spark skips them (``_SUCCESS``, checksums)."""
    if source.is_file():
        return [source]
    return sorted(
        p
        for p in source.rglob(f"*{SUFFIX}")
        if p.is_file() and not any(part.startswith(("_", ".")) for part in p.relative_to(source).parts)
    )


def choose_column(layouts: Mapping[str, tuple[str, Layout | None]], requested: str | None, where: str) -> str:
    """The image column among ``layouts`` (name: (type as the engine writes it, its layout or None)).

    Raises:
        LookupError: The requested column is missing or of another type, or none or several columns
            could hold images; the message lists the columns and their types.
    """
    listed = ", ".join(f"{name} ({kind})" for name, (kind, _) in layouts.items()) or "none"
    expected = (
        f"a column of {N_PIXELS} numbers (a list of integers 0..255 or floats in [0, 1]) or of "
        "28x28 picture bytes (binary, or a struct with a binary field 'bytes')"
    )
    if requested is not None:
        if requested not in layouts:
            raise LookupError(f"{where}: no column {requested!r}; its columns: {listed}")
        if layouts[requested][1] is None:
            raise LookupError(
                f"{where}: column {requested!r} is {layouts[requested][0]}; expected {expected}"
            )
        return requested
    found = [name for name, (_, layout) in layouts.items() if layout is not None]
    if not found:
        raise LookupError(f"{where}: no image column; expected {expected}; its columns: {listed}")
    if len(found) > 1:
        raise LookupError(
            f"{where}: several columns could hold images ({', '.join(found)}); choose one with --column"
        )
    return found[0]


def decode_picture(blob: bytes | None) -> np.ndarray:
    """A picture's bytes as (784,) uint8 grey levels (colour converted to grey, as Pillow's ``L``).

    Raises:
        PictureError: The bytes are missing, not a picture Pillow reads, or not 28x28.
    """
    from PIL import Image, UnidentifiedImageError

    if blob is None:
        raise PictureError("no picture (null)")
    try:
        with Image.open(io.BytesIO(blob)) as picture:
            if picture.size != (SIDE, SIDE):
                raise PictureError(f"a picture of {picture.size[0]}x{picture.size[1]}, expected 28x28")
            return np.asarray(picture.convert("L"), dtype=np.uint8).reshape(N_PIXELS)
    except (UnidentifiedImageError, OSError, SyntaxError):
        raise PictureError("not a picture Pillow reads (PNG, JPEG, ...)") from None


def arrow_layout(kind: Any) -> Layout | None:
    """The layout of a pyarrow column type, None when it cannot hold images."""
    import pyarrow as pa

    if pa.types.is_list(kind) or pa.types.is_large_list(kind) or pa.types.is_fixed_size_list(kind):
        item = kind.value_type
        if pa.types.is_integer(item):
            return "int"
        return "float" if pa.types.is_floating(item) else None
    if pa.types.is_binary(kind) or pa.types.is_large_binary(kind):
        return "picture"
    if pa.types.is_struct(kind) and kind.get_field_index("bytes") >= 0:
        inner = kind.field(kind.get_field_index("bytes")).type
        return "picture" if pa.types.is_binary(inner) or pa.types.is_large_binary(inner) else None
    return None


# What is wrong with a column, said the same way by both engines.


def wrong_length(where: str, row: int, length: int | None) -> str:
    has = "is null" if length is None else f"has {length}"
    return f"{where}: expected {N_PIXELS} values per image (28x28 flattened), row {row} {has}"


def null_values(where: str, row: int) -> str:
    return f"{where}: expected {N_PIXELS} grey levels per image, row {row} holds null values"


def out_of_range(where: str, layout: Layout, low: float, high: float) -> str:
    if not (np.isfinite(low) and np.isfinite(high)):
        return f"{where}: expected finite grey levels in [0, 1], got NaN or infinity"
    if layout == "int":
        return f"{where}: expected integer grey levels in 0..255, got values in [{low:g}, {high:g}]"
    return (
        f"{where}: expected grey levels in [0, 1] (divide 0-255 pixels by 255), "
        f"got values in [{low:g}, {high:g}]"
    )


def in_range(layout: Layout, low: float, high: float) -> bool:
    top = 255 if layout == "int" else 1
    return bool(np.isfinite(low) and np.isfinite(high) and low >= 0 and high <= top)


def bad_picture(where: str, row: int, reason: str) -> str:
    return f"{where}: row {row}: {reason}"
