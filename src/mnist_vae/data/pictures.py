"""Turning an arbitrary picture of a handwritten digit into an MNIST-like 28x28 image.

MNIST digits are white on black, fit a 20x20 box with their aspect ratio kept, and sit in a 28x28
field with their centre of mass at the centre (LeCun et al., "The MNIST database"). A VAE trained on
MNIST only reconstructs inputs prepared the same way, so :func:`load_digit` repeats those steps on a
PNG or JPEG of any size.
"""

from __future__ import annotations

import warnings
from pathlib import Path

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from mnist_vae.errors import UserError

SIDE = 28
BOX = 20
# Pixels fainter than this fraction of the brightest stroke are background noise (JPEG ringing,
# paper texture); dropping them keeps specks out of the bounding box.
_INK_FRACTION = 0.2
# Large photos are shrunk first: a digit needs far fewer pixels than this, and it bounds the work.
_WORKING_SIDE = 1024


class ImageError(UserError, ValueError):
    """A file is not a readable image, or holds no digit."""


def load_digit(path: Path | str) -> np.ndarray:
    """Reads a picture of one digit and prepares it as MNIST's images were made.

    Steps: grey levels (transparent pixels count as white paper); inverted when the border is light,
    since MNIST is a white digit on black; the background level subtracted and faint noise dropped;
    cropped to the bounding box of the ink; scaled so the longer side is 20 pixels, aspect ratio
    kept; pasted into a 28x28 field so the centre of mass sits at the centre.

    Args:
        path: A PNG, JPEG or any other format Pillow reads.

    Returns:
        A (28, 28) uint8 array, 0 for background and 255 for the strongest ink.

    Raises:
        ImageError: The file is missing, unreadable or not an image, or shows no digit.
    """
    grey = _read_grey(Path(path))
    return _center(_crop_to_ink(_white_on_black(grey), Path(path)))


def _read_grey(path: Path) -> np.ndarray:
    """The picture as float grey levels in 0..255, upright as the camera's EXIF tag says."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            with Image.open(path) as opened:
                opened.draft("L", (_WORKING_SIDE, _WORKING_SIDE))  # JPEG decodes at reduced size
                img = ImageOps.exif_transpose(opened)
                img.thumbnail((_WORKING_SIDE, _WORKING_SIDE))
                if img.mode in ("RGBA", "LA", "PA") or "transparency" in img.info:
                    rgba = img.convert("RGBA")
                    paper = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
                    img = Image.alpha_composite(paper, rgba)
                if img.mode in ("I", "I;16", "I;16B", "I;16L", "F"):
                    # 16-bit and float scans: stretch to 0..255 rather than clip at 255.
                    raw = np.asarray(img, dtype=np.float64)
                    top = raw.max()
                    return raw * (255.0 / top) if top > 255 else raw
                return np.asarray(img.convert("L"), dtype=np.float64)
    except FileNotFoundError:
        raise ImageError(f"{path}: no such file") from None
    except IsADirectoryError:
        raise ImageError(f"{path}: is a directory, expected an image file") from None
    except UnidentifiedImageError:
        raise ImageError(f"{path}: not an image Pillow can read (expected PNG, JPEG, ...)") from None
    except (Image.DecompressionBombError, Image.DecompressionBombWarning):
        raise ImageError(f"{path}: image too large to be a picture of one digit") from None
    except (OSError, SyntaxError, ValueError) as exc:  # truncated or corrupt files, no permission
        raise ImageError(f"{path}: could not read the image ({exc})") from None


def _white_on_black(grey: np.ndarray) -> np.ndarray:
    """Light ink on a zero background; which side is paper is decided by the border's mean."""
    border = np.concatenate([grey[0], grey[-1], grey[1:-1, 0], grey[1:-1, -1]])
    if border.mean() > 127.5:
        grey = 255.0 - grey
        border = 255.0 - border
    return np.clip(grey - np.median(border), 0.0, None)


def _crop_to_ink(ink: np.ndarray, path: Path) -> np.ndarray:
    """The bounding box of the strokes, stretched so the strongest ink is 255."""
    peak = ink.max()
    if peak < 1.0:
        raise ImageError(f"{path}: no digit found (the image is one flat colour)")
    ink = np.where(ink >= _INK_FRACTION * peak, ink * (255.0 / peak), 0.0)
    rows = np.flatnonzero(ink.any(axis=1))
    cols = np.flatnonzero(ink.any(axis=0))
    return ink[rows[0] : rows[-1] + 1, cols[0] : cols[-1] + 1]


def _center(ink: np.ndarray) -> np.ndarray:
    """Scales the longer side to 20 px and places the centre of mass at the field's centre."""
    height, width = ink.shape
    scale = BOX / max(height, width)
    size = (max(1, round(width * scale)), max(1, round(height * scale)))
    # Pillow's bilinear filter widens with the reduction, so shrinking anti-aliases (the grey edges
    # MNIST's digits have) without the ringing halo that LANCZOS leaves around strokes.
    small = np.asarray(Image.fromarray(ink.astype(np.float32)).resize(size, Image.Resampling.BILINEAR))
    h, w = small.shape
    ys, xs = np.indices(small.shape)
    mass = small.sum()
    assert mass > 0, "a cropped digit always keeps its brightest pixel"
    cy, cx = (ys * small).sum() / mass, (xs * small).sum() / mass
    # MNIST's own test digits have their centre of mass at index 14.0, not 13.5, on average; aiming
    # elsewhere shifts every input by a pixel. Clamping keeps the whole digit inside the field when
    # its mass is far off its box's middle (a 7's top bar).
    top = min(max(round(SIDE / 2 - cy), 0), SIDE - h)
    left = min(max(round(SIDE / 2 - cx), 0), SIDE - w)
    field = np.zeros((SIDE, SIDE), dtype=np.float32)
    field[top : top + h, left : left + w] = small
    return field.round().astype(np.uint8)
