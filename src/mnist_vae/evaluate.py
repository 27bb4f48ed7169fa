"""Test-set measurements and pictures of a trained VAE."""

from __future__ import annotations

import logging
import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from types import TracebackType
from typing import TYPE_CHECKING

import numpy as np
import torch

from mnist_vae.config import EvaluateConfig
from mnist_vae.errors import UserError
from mnist_vae.images import image_grid, write_png, write_scatter
from mnist_vae.model import N_PIXELS, VAE, importance_weighted_log_likelihood, kl_divergence
from mnist_vae.progress import want_progress

if TYPE_CHECKING:
    from rich.progress import Progress

log = logging.getLogger(__name__)

# Off a terminal, a long evaluation says how far it is at most this often (seconds).
LOG_EVERY = 60.0
# Importance samples decoded at once, in rows of (sample, image). Small chunks stay in the CPU's
# caches: 4096 rows decoded the binarized-conv model about 15% faster than 65,536 on 2 cores, with
# the same random draws and so the same estimate.
IW_CHUNK_ROWS = 4096


class NoImagesError(UserError, ValueError):
    """The selection of test images is empty."""


class ImagesProgress:
    """How far an evaluation is: a bar on a terminal, a log line a minute elsewhere.

    An evaluation with many importance samples takes an hour on a CPU, so it must not be silent;
    one that takes seconds logs nothing off a terminal.
    """

    def __init__(self, total: int, progress: bool | None) -> None:
        """``progress``: True draws the bar; None draws it on a terminal and logs elsewhere; False
        neither."""
        self.total, self.done = total, 0
        self.bar = want_progress(progress)
        self.logs = progress is None and not self.bar
        self._progress: Progress | None = None

    def __enter__(self) -> ImagesProgress:
        self._start = self._logged = time.monotonic()
        if self.bar:
            from rich.console import Console
            from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

            self._progress = Progress(
                TextColumn("evaluating test images"),
                BarColumn(),
                MofNCompleteColumn(),
                TimeRemainingColumn(),
                console=Console(stderr=True),
                transient=True,
            )
            self._progress.start()
            self._task = self._progress.add_task("", total=self.total)
        return self

    def __exit__(
        self, kind: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        if self._progress is not None:
            self._progress.stop()

    def advance(self, images: int) -> None:
        self.done += images
        if self._progress is not None:
            self._progress.advance(self._task, images)
            return
        now = time.monotonic()
        if self.logs and self.done < self.total and now - self._logged >= LOG_EVERY:
            self._logged = now
            left = (now - self._start) * (self.total - self.done) / self.done
            log.info("evaluated %d/%d test images, about %s left", self.done, self.total, _duration(left))


def _duration(seconds: float) -> str:
    minutes, secs = divmod(round(seconds), 60)
    return f"{minutes} min {secs} s" if minutes else f"{secs} s"


@dataclass
class Evaluation:
    """Test metrics (nats per image unless the name says pixel) and per-digit errors."""

    metrics: dict[str, float]
    per_digit_mse: dict[int, float] = field(default_factory=dict)
    n_images: int = 0

    @property
    def hardest_digits(self) -> list[int]:
        """Digits ordered from the worst reconstructed to the best."""
        return sorted(self.per_digit_mse, key=lambda digit: self.per_digit_mse[digit], reverse=True)

    def to_json(self) -> dict:
        """The shape written to metrics.json (``dvc metrics show`` flattens the nesting)."""
        return {
            **{k: round(v, 6) for k, v in self.metrics.items()},
            "per_digit_mse": {str(d): round(v, 6) for d, v in sorted(self.per_digit_mse.items())},
            "hardest_digit": self.hardest_digits[0] if self.per_digit_mse else -1,
            "n_images": self.n_images,
        }

    def mlflow_metrics(self) -> dict[str, float]:
        out = {f"test_{k}": v for k, v in self.metrics.items()}
        out.update({f"test_mse_digit_{d}": v for d, v in self.per_digit_mse.items()})
        return out


def select(
    images: np.ndarray, labels: np.ndarray, limit: int = 0, digits: list[int] | None = None
) -> tuple[np.ndarray, np.ndarray]:
    """Restricts a split to some digits and then to its first ``limit`` images (0: all)."""
    if digits:
        keep = np.isin(labels, digits)
        images, labels = images[keep], labels[keep]
    if limit:
        images, labels = images[:limit], labels[:limit]
    return images, labels


@torch.no_grad()
def evaluate_model(
    model: VAE,
    images: np.ndarray,
    labels: np.ndarray,
    cfg: EvaluateConfig,
    device: torch.device | str = "cpu",
    progress: bool | None = False,
) -> Evaluation:
    """Measures a model on uint8 test images.

    ``neg_elbo`` is BCE on grey levels plus KL with one posterior sample per image, in nats per
    image (what pytorch/examples' VAE reports). MSE, PSNR and the per-digit errors use the
    reconstruction from the posterior mean, the picture a user sees. ``nll_iw`` is the importance-
    weighted estimate of -log p(x) with ``cfg.iw_samples`` samples, ``nll_iw_se`` its standard
    error over the images.

    ``progress``: False says nothing; None draws a bar on a terminal and logs a line a minute
    elsewhere (see :class:`ImagesProgress`); True always draws the bar.
    """
    if len(images) == 0:
        raise NoImagesError("no test images to evaluate (check evaluate.limit and the digit filter)")
    model = model.to(device).eval()
    torch.manual_seed(cfg.seed)
    x_all = torch.from_numpy(images.reshape(len(images), N_PIXELS))
    y_all = torch.from_numpy(labels.astype(np.int64))
    sums = dict.fromkeys(("bce", "kl", "mse", "loss_tutorial", "nll_iw", "nll_iw_sq"), 0.0)
    digit_sse = torch.zeros(10, dtype=torch.float64)
    digit_count = torch.zeros(10, dtype=torch.float64)
    binarizer = torch.Generator(device=device).manual_seed(cfg.seed)
    with ImagesProgress(len(x_all), progress) as meter:
        for start in range(0, len(x_all), cfg.batch_size):
            x = x_all[start : start + cfg.batch_size].to(device).float().div_(255.0)
            if cfg.binarize:
                # One fixed stochastic binarisation of the test set, as in Burda et al. (2015).
                x = torch.bernoulli(x, generator=binarizer)
            y = y_all[start : start + cfg.batch_size]
            mu, logvar = model.encode(x)
            z = model.reparameterize(mu, logvar)
            kl = kl_divergence(mu, logvar)
            sums["bce"] += model.bernoulli_nll(model.decode(z), x).sum().item()
            sums["kl"] += kl.sum().item()
            # The tutorial's loss on the test set, for the seed preset's comparison.
            sampled_sse = (
                (model.decode(z) - x).square().sum(-1)
                if model.arch.likelihood == "gaussian"
                else (torch.sigmoid(model.decode(z)) - x).square().sum(-1)
            )
            sums["loss_tutorial"] += ((sampled_sse + kl) / N_PIXELS).sum().item()
            mean_recon = model.pixel_means(model.decode(mu))
            per_image_mse = (mean_recon - x).square().mean(-1).double().cpu()
            sums["mse"] += per_image_mse.sum().item()
            digit_sse.index_add_(0, y, per_image_mse)
            digit_count.index_add_(0, y, torch.ones_like(per_image_mse))
            nll_iw = -importance_weighted_log_likelihood(
                model, x, cfg.iw_samples, chunk_rows=IW_CHUNK_ROWS
            ).double()
            sums["nll_iw"] += nll_iw.sum().item()
            sums["nll_iw_sq"] += nll_iw.square().sum().item()
            meter.advance(len(x))
    n = len(x_all)
    mse = sums["mse"] / n
    metrics = {
        "neg_elbo": (sums["bce"] + sums["kl"]) / n,
        "recon_bce": sums["bce"] / n,
        "kl": sums["kl"] / n,
        "recon_mse": mse,
        "psnr": 10.0 * math.log10(1.0 / max(mse, 1e-12)),
        "nll_iw": sums["nll_iw"] / n,
        # Standard error of that mean over the test images (their spread, not the estimator's
        # bias): what separates two models measured on a subset.
        "nll_iw_se": math.sqrt(max(sums["nll_iw_sq"] / n - (sums["nll_iw"] / n) ** 2, 0.0) / max(n - 1, 1)),
        "loss_tutorial": sums["loss_tutorial"] / n,
    }
    per_digit = {d: (digit_sse[d] / digit_count[d]).item() for d in range(10) if digit_count[d] > 0}
    return Evaluation(metrics=metrics, per_digit_mse=per_digit, n_images=n)


@torch.no_grad()
def reconstruct(model: VAE, images: np.ndarray, device: torch.device | str = "cpu") -> np.ndarray:
    """Posterior-mean reconstructions of uint8 or [0, 1] images, as floats in [0, 1]."""
    x = torch.as_tensor(np.asarray(images).reshape(len(images), N_PIXELS), device=device).float()
    if np.asarray(images).dtype == np.uint8:
        x = x / 255.0
    mu, _ = model.encode(x)
    return model.pixel_means(model.decode(mu)).cpu().numpy()


@torch.no_grad()
def sample(model: VAE, n: int, seed: int = 0, device: torch.device | str = "cpu") -> np.ndarray:
    """Decodes ``n`` draws from the prior N(0, I) into images in [0, 1]."""
    generator = torch.Generator(device=device).manual_seed(seed)
    z = torch.randn(n, model.latent_dim, generator=generator, device=device)
    return model.pixel_means(model.decode(z)).cpu().numpy()


@torch.no_grad()
def latent_traversal(
    model: VAE,
    image: np.ndarray,
    dims: int = 8,
    steps: int = 11,
    span: float = 3.0,
    device: torch.device | str = "cpu",
) -> np.ndarray:
    """Decodes one image's posterior mean with single latent units swept over [-span, span].

    Uses the units with the largest KL for this image (the ones the model uses to encode it); each
    row of the result is one unit, each column one step.
    """
    x = torch.as_tensor(image.reshape(1, N_PIXELS), device=device).float() / 255.0
    mu, logvar = model.encode(x)
    active = (0.5 * (mu.square() + logvar.exp() - logvar - 1)).squeeze(0).argsort(descending=True)
    rows = []
    for unit in active[: min(dims, model.latent_dim)].tolist():
        z = mu.repeat(steps, 1)
        z[:, unit] = torch.linspace(-span, span, steps, device=device)
        rows.append(model.pixel_means(model.decode(z)).cpu().numpy())
    return np.concatenate(rows)


@torch.no_grad()
def latent_projection(
    model: VAE, images: np.ndarray, device: torch.device | str = "cpu"
) -> tuple[np.ndarray, float]:
    """Posterior means of uint8 images on their first two principal components.

    Returns the (N, 2) points and the share of the means' variance those two components explain.
    """
    x = torch.as_tensor(images.reshape(len(images), N_PIXELS), device=device).float() / 255.0
    mu = torch.cat([model.encode(chunk)[0] for chunk in x.split(1000)]).double()
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
) -> list[Path]:
    """Draws the evaluation figures into ``out_dir`` and returns their paths.

    ``reconstructions.png``: test digits (top panel) above their reconstructions (bottom panel);
    ``samples.png``: 64 draws from the prior; ``traversal.png``: latent units swept one at a time;
    ``latent.png`` (with ``labels``): the first ``latent_points`` images' posterior means on their
    two principal components, coloured by digit.
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
    if labels is not None:
        points, explained = latent_projection(model, images[:latent_points], device)
        paths.append(
            write_scatter(
                out_dir / "latent.png",
                points,
                labels[:latent_points],
                f"posterior means of {len(points):,} test digits, {model.latent_dim}-D latent space "
                f"projected on 2 principal components ({explained:.0%} of the variance)",
            )
        )
    return paths
