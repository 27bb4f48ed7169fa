"""Tests for :mod:`mnist_vae.data.pictures`: any picture of a digit is made MNIST-like."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
from PIL import Image, ImageDraw

from mnist_vae.data.pictures import ImageError, load_digit
from mnist_vae.errors import UserError

StrokePicture = Callable[..., Path]


def center_of_mass(image: np.ndarray) -> tuple[float, float]:
    ys, xs = np.indices(image.shape)
    mass = image.astype(np.float64).sum()
    return (ys * image).sum() / mass, (xs * image).sum() / mass


def test_load_digit_inverts_dark_ink_on_light_paper(tmp_path: Path, stroke_picture: StrokePicture) -> None:
    digit = load_digit(stroke_picture(tmp_path / "seven.png"))
    assert digit.shape == (28, 28) and digit.dtype == np.uint8
    assert digit.max() == 255
    assert digit[0].max() == digit[-1].max() == digit[:, 0].max() == digit[:, -1].max() == 0


def test_load_digit_keeps_light_ink_on_dark_paper(tmp_path: Path, stroke_picture: StrokePicture) -> None:
    dark = load_digit(stroke_picture(tmp_path / "dark.png", ink="white", paper="black"))
    light = load_digit(stroke_picture(tmp_path / "light.png"))
    np.testing.assert_array_equal(dark, light)


def test_load_digit_fits_20_pixels_centred_by_mass(tmp_path: Path, stroke_picture: StrokePicture) -> None:
    digit = load_digit(stroke_picture(tmp_path / "seven.jpg"))
    rows, cols = np.flatnonzero(digit.any(axis=1)), np.flatnonzero(digit.any(axis=0))
    assert max(rows[-1] - rows[0] + 1, cols[-1] - cols[0] + 1) == 20
    cy, cx = center_of_mass(digit)
    assert abs(cy - 14) <= 1.0 and abs(cx - 14) <= 1.0, (cy, cx)


def test_load_digit_composites_transparency_on_white(tmp_path: Path) -> None:
    path = tmp_path / "transparent.png"
    picture = Image.new("RGBA", (40, 80), (0, 0, 0, 0))
    ImageDraw.Draw(picture).ellipse([10, 10, 30, 70], outline=(0, 0, 0, 255), width=4)
    picture.save(path)
    digit = load_digit(path)
    assert digit.max() == 255 and digit[0, 0] == 0


@pytest.mark.parametrize("content", [b"not an image at all\n", b""])
def test_load_digit_rejects_non_images(tmp_path: Path, content: bytes) -> None:
    path = tmp_path / "notes.png"
    path.write_bytes(content)
    with pytest.raises(ImageError, match="notes.png: not an image Pillow can read") as info:
        load_digit(path)
    assert isinstance(info.value, UserError)


def test_load_digit_rejects_blank_and_missing_files(tmp_path: Path) -> None:
    Image.new("L", (30, 30), 255).save(tmp_path / "blank.png")
    with pytest.raises(ImageError, match="no digit"):
        load_digit(tmp_path / "blank.png")
    with pytest.raises(ImageError, match="no such file"):
        load_digit(tmp_path / "missing.png")
    with pytest.raises(ImageError, match="is a directory"):
        load_digit(tmp_path)
