"""A trained VAE measured on test images: the negative ELBO and its terms, the importance-weighted
estimate of -log p(x), reconstruction errors overall and per digit."""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np
import torch

from mnist_vae.config import EvaluateConfig
from mnist_vae.errors import UserError
from mnist_vae.models import estimate
from mnist_vae.models.networks import N_PIXELS
from mnist_vae.models.objectives import elbo_terms, iw_log_likelihood, tutorial_loss
from mnist_vae.models.vae import VAE
from mnist_vae.progress import CountBar

# Importance samples drawn at once, in rows of (sample, image); iw_log_likelihood decodes them 1024
# rows at a time, which keeps the layers' outputs in the CPU's caches. The draws depend on this
# number: 4096 keeps them, and so the estimates, those of earlier evaluations.
IW_CHUNK_ROWS = 4096


class NoImagesError(UserError, ValueError):
    """The selection of test images is empty."""


@dataclass
class Evaluation:
    """Test metrics (nats per image unless the name says pixel) and per-digit errors."""

    metrics: dict[str, float]
    per_digit_mse: dict[int, float] = field(default_factory=dict)
    n_images: int = 0
    precision: str = "fp32"  # the importance-weighted estimate's decoder: fp32 or bf16

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
    error over the images; its decoder runs in ``cfg.precision`` (:mod:`mnist_vae.models.estimate`),
    everything else in FP32.

    ``progress``: False says nothing; None draws a bar on a terminal and logs a line a minute
    elsewhere (see :class:`mnist_vae.progress.CountBar`); True always draws the bar.
    """
    if len(images) == 0:
        raise NoImagesError("no test images to evaluate (check evaluate.limit and the digit filter)")
    model = model.to(device).eval()
    estimator = estimate.for_estimate(model, cfg.precision)
    torch.manual_seed(cfg.seed)
    x_all = torch.from_numpy(images.reshape(len(images), N_PIXELS))
    y_all = torch.from_numpy(labels.astype(np.int64))
    sums = dict.fromkeys(("bce", "kl", "mse", "loss_tutorial", "nll_iw", "nll_iw_sq"), 0.0)
    digit_sse = torch.zeros(10, dtype=torch.float64)
    digit_count = torch.zeros(10, dtype=torch.float64)
    binarizer = torch.Generator(device=device).manual_seed(cfg.seed)
    with CountBar("evaluating test images", len(x_all), progress) as meter:
        for start in range(0, len(x_all), cfg.batch_size):
            x = x_all[start : start + cfg.batch_size].to(device).float().div_(255.0)
            if cfg.binarize:
                # One fixed stochastic binarisation of the test set, as in Burda et al. (2015).
                x = torch.bernoulli(x, generator=binarizer)
            y = y_all[start : start + cfg.batch_size]
            terms = elbo_terms(model, x, torch.randn(len(x), model.noise_dim, device=device))
            sums["bce"] += terms.recon.sum().item()
            sums["kl"] += terms.kl.sum().item()
            # The tutorial's loss on the test set, for the seed preset's comparison.
            sums["loss_tutorial"] += tutorial_loss(model, terms.out, x, terms.kl).sum().item()
            mean_recon = model.pixel_means(model.reconstruct(x))
            per_image_mse = (mean_recon - x).square().mean(-1).double().cpu()
            sums["mse"] += per_image_mse.sum().item()
            digit_sse.index_add_(0, y, per_image_mse)
            digit_count.index_add_(0, y, torch.ones_like(per_image_mse))
            nll_iw = -iw_log_likelihood(estimator, x, cfg.iw_samples, chunk_rows=IW_CHUNK_ROWS).double()
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
    return Evaluation(
        metrics=metrics, per_digit_mse=per_digit, n_images=n, precision=estimate.precision_of(estimator)
    )
