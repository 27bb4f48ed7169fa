"""Figures as PNG files: image grids drawn with torchvision's ``make_grid`` and ``save_image``,
and the latent space as a matplotlib scatter plot."""

from __future__ import annotations

import textwrap
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import torch

from mnist_vae.atomic import atomic_open

if TYPE_CHECKING:
    from matplotlib.figure import Figure

_PAD = 2  # grey pixels between cells, and white ones between stacked grids
_SCALE = 3  # nearest-neighbour enlargement: 28-pixel digits are too small to judge on screen


def image_grid(images: np.ndarray | torch.Tensor, columns: int) -> torch.Tensor:
    """Tiles images of shape (N, 28, 28) or (N, 784), grey levels in [0, 1], into one picture."""
    # Imported here: torchvision pulls in torch's compiler stack (1.5 s), which every command that
    # merely imports this module (the evaluate stage, most of the CLI) would pay at start.
    from torchvision.utils import make_grid

    batch = torch.as_tensor(images, dtype=torch.float32).cpu().reshape(-1, 1, 28, 28)
    return make_grid(batch, nrow=columns, padding=_PAD, pad_value=0.5)


def write_png(path: Path, *grids: torch.Tensor) -> Path:
    """Writes grids of equal width one above the other (e.g. originals above their reconstructions),
    enlarged, as one PNG; atomically, so a reader never sees half an image."""
    from torchvision.utils import save_image

    white = torch.ones(3, _PAD, grids[0].shape[2])
    picture = torch.cat([part for g in grids for part in (white, g)][1:], dim=1)
    picture = torch.nn.functional.interpolate(picture[None], scale_factor=_SCALE, mode="nearest")[0]
    with atomic_open(path) as fh:
        save_image(picture, fh, format="png")
    return Path(path)


def write_scatter(path: Path, points: np.ndarray, labels: np.ndarray, title: str) -> Path:
    """Writes 2-D ``points`` coloured by their digit ``labels`` as a PNG, atomically."""
    import matplotlib.pyplot as plt

    figure = scatter_figure(points, labels, title)
    try:
        with atomic_open(path) as fh:
            figure.savefig(fh, format="png")
    finally:
        plt.close(figure)
    return Path(path)


def scatter_figure(points: np.ndarray, labels: np.ndarray, title: str) -> Figure:
    """The figure of :func:`write_scatter`; a long title is wrapped to the figure's width."""
    import matplotlib

    matplotlib.use("Agg")  # no display: figures are files
    import matplotlib.pyplot as plt

    figure, axes = plt.subplots(figsize=(6, 6), dpi=100)
    for digit in range(10):
        chosen = labels == digit
        axes.scatter(
            points[chosen, 0],
            points[chosen, 1],
            s=3,
            alpha=0.6,
            color=plt.get_cmap("tab10")(digit),
            label=str(digit),
            rasterized=True,
        )
    axes.legend(title="digit", markerscale=4, loc="upper right", fontsize=8, ncols=2)
    axes.set_title(textwrap.fill(title, width=70), fontsize=10)
    axes.set_xlabel("first principal component")
    axes.set_ylabel("second principal component")
    figure.tight_layout()
    return figure
