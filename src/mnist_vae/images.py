"""Image grids as PNG files, drawn with torchvision's ``make_grid`` and ``save_image``."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from torchvision.utils import make_grid, save_image

from mnist_vae.atomic import atomic_open

_PAD = 2  # grey pixels between cells, and white ones between stacked grids
_SCALE = 3  # nearest-neighbour enlargement: 28-pixel digits are too small to judge on screen


def image_grid(images: np.ndarray | torch.Tensor, columns: int) -> torch.Tensor:
    """Tiles images of shape (N, 28, 28) or (N, 784), grey levels in [0, 1], into one picture."""
    batch = torch.as_tensor(images, dtype=torch.float32).cpu().reshape(-1, 1, 28, 28)
    return make_grid(batch, nrow=columns, padding=_PAD, pad_value=0.5)


def write_png(path: Path, *grids: torch.Tensor) -> Path:
    """Writes grids of equal width one above the other (e.g. originals above their reconstructions),
    enlarged, as one PNG; atomically, so a reader never sees half an image."""
    white = torch.ones(3, _PAD, grids[0].shape[2])
    picture = torch.cat([part for g in grids for part in (white, g)][1:], dim=1)
    picture = torch.nn.functional.interpolate(picture[None], scale_factor=_SCALE, mode="nearest")[0]
    with atomic_open(path) as fh:
        save_image(picture, fh, format="png")
    return Path(path)
