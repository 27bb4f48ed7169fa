"""Image grids as PNG files, drawn with Pillow (no plotting stack needed)."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
from PIL import Image

_PAD = 2


def to_grid(images: np.ndarray, columns: int, scale: int = 3) -> Image.Image:
    """Tiles images of shape (N, 28, 28) or (N, 784), grey levels in [0, 1], into one picture."""
    images = np.asarray(images, dtype=np.float32).reshape(-1, 28, 28)
    rows = max(1, -(-len(images) // columns))
    cell = 28 + _PAD
    canvas = np.ones((rows * cell + _PAD, columns * cell + _PAD), dtype=np.float32) * 0.5
    for i, img in enumerate(images):
        r, c = divmod(i, columns)
        top, left = _PAD + r * cell, _PAD + c * cell
        canvas[top : top + 28, left : left + 28] = img
    pixels = (np.clip(canvas, 0.0, 1.0) * 255).round().astype(np.uint8)
    picture = Image.fromarray(pixels, mode="L")
    return picture.resize((picture.width * scale, picture.height * scale), Image.NEAREST)


def stack_panels(*panels: Image.Image, gap: int = 6) -> Image.Image:
    """Puts pictures one above the other, e.g. originals above their reconstructions."""
    width = max(p.width for p in panels)
    height = sum(p.height for p in panels) + gap * (len(panels) - 1)
    out = Image.new("L", (width, height), color=255)
    top = 0
    for panel in panels:
        out.paste(panel, (0, top))
        top += panel.height + gap
    return out


def save_png(picture: Image.Image, path: Path) -> Path:
    """Writes a PNG atomically: a reader never sees half an image."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    picture.save(tmp, format="PNG")
    os.replace(tmp, path)
    return path
