"""What a model looks like: reconstructions, samples from the prior, latent traversals and the latent
space, as PNG files (image grids drawn with torchvision's ``make_grid`` and ``save_image``, the
latent space as a matplotlib scatter plot)."""

from __future__ import annotations

import textwrap
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import torch

from mnist_vae.atomic import atomic_open
from mnist_vae.data.dataset import DATASETS, DatasetInfo
from mnist_vae.models.networks import N_PIXELS
from mnist_vae.models.vae import VAE

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


def write_scatter(
    path: Path, points: np.ndarray, labels: np.ndarray, title: str, dataset: DatasetInfo = DATASETS["mnist"]
) -> Path:
    """Writes 2-D ``points`` coloured by their ``labels`` (named as ``dataset`` names them) as a
    PNG, atomically."""
    import matplotlib.pyplot as plt

    figure = scatter_figure(points, labels, title, dataset)
    try:
        with atomic_open(path) as fh:
            figure.savefig(fh, format="png")
    finally:
        plt.close(figure)
    return Path(path)


def scatter_figure(
    points: np.ndarray, labels: np.ndarray, title: str, dataset: DatasetInfo = DATASETS["mnist"]
) -> Figure:
    """The figure of :func:`write_scatter`; a long title is wrapped to the figure's width."""
    import matplotlib

    matplotlib.use("Agg")  # no display: figures are files
    import matplotlib.pyplot as plt

    figure, axes = plt.subplots(figsize=(6, 6), dpi=100)
    for label, name in enumerate(dataset.classes):
        chosen = labels == label
        axes.scatter(
            points[chosen, 0],
            points[chosen, 1],
            s=3,
            alpha=0.6,
            color=plt.get_cmap("tab10")(label),
            label=name,
            rasterized=True,
        )
    axes.legend(title=dataset.label, markerscale=4, loc="upper right", fontsize=8, ncols=2)
    axes.set_title(textwrap.fill(title, width=70), fontsize=10)
    axes.set_xlabel("first principal component")
    axes.set_ylabel("second principal component")
    figure.tight_layout()
    return figure


@torch.no_grad()
def reconstruct(model: VAE, images: np.ndarray, device: torch.device | str = "cpu") -> np.ndarray:
    """Posterior-mean reconstructions of uint8 or [0, 1] images, as floats in [0, 1]."""
    x = torch.as_tensor(np.asarray(images).reshape(len(images), N_PIXELS), device=device).float()
    if np.asarray(images).dtype == np.uint8:
        x = x / 255.0
    return model.pixel_means(model.reconstruct(x)).cpu().numpy()


@torch.no_grad()
def sample(model: VAE, n: int, seed: int = 0, device: torch.device | str = "cpu") -> np.ndarray:
    """Decodes ``n`` draws from the prior N(0, I) into images in [0, 1]."""
    generator = torch.Generator(device=device).manual_seed(seed)
    return model.pixel_means(model.sample(n, generator=generator, device=device)).cpu().numpy()


@torch.no_grad()
def latent_traversal(
    model: VAE,
    image: np.ndarray,
    dims: int = 8,
    steps: int = 11,
    span: float = 3.0,
    device: torch.device | str = "cpu",
) -> np.ndarray:
    """Decodes one image's posterior means with single latent units swept over [-span, span].

    Uses the units with the largest KL for this image (the ones the model uses to encode it), of
    whichever latent layer; each row of the result is one unit, each column one step.
    """
    x = torch.as_tensor(image.reshape(1, N_PIXELS), device=device).float() / 255.0
    means = [mu for mu, _ in model.layer_posteriors(x)]
    kl = torch.cat([unit_kl.squeeze(0) for unit_kl in model.layer_kl(x)])
    starts = np.cumsum([0] + [mu.shape[-1] for mu in means])
    rows = []
    for unit in kl.argsort(descending=True)[: min(dims, len(kl))].tolist():
        layer = int(np.searchsorted(starts, unit, side="right")) - 1
        codes = [mu.repeat(steps, 1) for mu in means]
        codes[layer][:, unit - starts[layer]] = torch.linspace(-span, span, steps, device=device)
        rows.append(model.pixel_means(model.decode_layers(codes)).cpu().numpy())
    return np.concatenate(rows)


@torch.no_grad()
def latent_projection(
    model: VAE, images: np.ndarray, device: torch.device | str = "cpu", layer: int = 0
) -> tuple[np.ndarray, float]:
    """Posterior means of uint8 images in latent layer ``layer`` (the code, by default) on their
    first two principal components.

    Returns the (N, 2) points and the share of the means' variance those two components explain.
    """
    x = torch.as_tensor(images.reshape(len(images), N_PIXELS), device=device).float() / 255.0
    mu = torch.cat([model.layer_posteriors(chunk)[layer][0] for chunk in x.split(1000)]).double()
    centred = mu - mu.mean(0)
    _, singular, basis = torch.linalg.svd(centred, full_matrices=False)
    explained = (singular[:2].square().sum() / singular.square().sum()).item()
    return (centred @ basis[:2].T).float().cpu().numpy(), explained


def write_figures(
    model: VAE,
    images: np.ndarray,
    out_dir: Path,
    n: int = 8,
    seed: int = 0,
    device: torch.device | str = "cpu",
    labels: np.ndarray | None = None,
    latent_points: int = 5000,
    dataset: DatasetInfo = DATASETS["mnist"],
) -> list[Path]:
    """Draws the evaluation figures into ``out_dir`` and returns their paths.

    ``reconstructions.png``: test images (top panel) above their reconstructions (bottom panel);
    ``samples.png``: 64 draws from the prior; ``traversal.png``: latent units swept one at a time;
    ``latent.png`` (with ``labels``): the first ``latent_points`` images' posterior means on their
    two principal components, coloured by label and titled with ``dataset``'s name.
    """
    out_dir = Path(out_dir)
    originals = images[: 2 * n]
    recon = reconstruct(model, originals, device)
    paths = [
        write_png(
            out_dir / "reconstructions.png",
            image_grid(originals / 255.0, columns=n),
            image_grid(recon, columns=n),
        )
    ]
    paths.append(write_png(out_dir / "samples.png", image_grid(sample(model, 64, seed, device), columns=8)))
    steps = 11
    traversal = latent_traversal(model, images[0], steps=steps, device=device)
    paths.append(write_png(out_dir / "traversal.png", image_grid(traversal, columns=steps)))
    if labels is None:
        return paths
    for layer, (name, units) in enumerate(model.layers):
        # The code (the only layer, or the top one) in latent.png, any other in latent_<name>.png.
        points, explained = latent_projection(model, images[:latent_points], device, layer)
        which = "" if len(model.layers) == 1 else f"layer {name}, "
        paths.append(
            write_scatter(
                out_dir / ("latent.png" if layer == 0 else f"latent_{name}.png"),
                points,
                labels[:latent_points],
                f"posterior means of {len(points):,} {dataset.title} test images, {which}{units}-D "
                f"latent space projected on 2 principal components ({explained:.0%} of the variance)",
                dataset,
            )
        )
    return paths
