"""The two-layer family where the one-layer VAE goes: the weights file, evaluation, the figures (a
latent plot per layer), the demo's sliders per layer, scoring and ancestral samples. Training,
resuming and every training switch are in test_train.py, the served outputs in test_serving.py,
the mathematics in test_hvae_math.py."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
import torch

from mnist_vae.config import EvaluateConfig, ModelConfig
from mnist_vae.demo.latents import latent_model
from mnist_vae.evaluation.figures import latent_traversal, write_figures
from mnist_vae.evaluation.metrics import evaluate_model
from mnist_vae.models.families import build_model
from mnist_vae.models.hvae import HVAE
from mnist_vae.models.weights import load_model, save_model
from mnist_vae.serving.scoring import score_pixels

TINY = ModelConfig(preset="hvae", channels=(4, 8), dense=16, latent=5, latent2=3, hidden2=8)


@pytest.fixture(scope="module")
def model() -> HVAE:
    hvae = build_model(TINY, seed=0)
    assert isinstance(hvae, HVAE)
    return hvae.eval()


@pytest.fixture(scope="module")
def images(tiny_images: Callable[..., tuple[np.ndarray, np.ndarray]]) -> tuple[np.ndarray, np.ndarray]:
    return tiny_images(40)


def test_the_weights_file_rebuilds_the_same_family(model: HVAE, tmp_path: Path) -> None:
    save_model(model, tmp_path / "model.pt")
    loaded = load_model(tmp_path / "model.pt")
    assert isinstance(loaded, HVAE)
    assert loaded.arch == model.arch
    x = torch.rand(3, 784)
    eps = torch.randn(3, model.noise_dim)
    with torch.no_grad():
        assert torch.equal(loaded.draw(loaded.posterior(x), eps).out, model.draw(model.posterior(x), eps).out)


def test_evaluation_reports_every_metric(model: HVAE, images: tuple[np.ndarray, np.ndarray]) -> None:
    x, y = images
    result = evaluate_model(model, x, y, EvaluateConfig(batch_size=16, iw_samples=8, binarize=True))
    metrics = result.metrics
    assert all(np.isfinite(v) for v in metrics.values()), metrics
    # The k = 8 estimate is at least as tight as the one-draw bound, on average.
    assert metrics["nll_iw"] <= metrics["neg_elbo"] + 1.0
    assert metrics["neg_elbo"] == pytest.approx(metrics["recon_bce"] + metrics["kl"])


def test_figures_plot_each_latent_layer(
    model: HVAE, images: tuple[np.ndarray, np.ndarray], tmp_path: Path
) -> None:
    x, y = images
    paths = write_figures(model, x, tmp_path, n=4, labels=y, latent_points=40)
    assert sorted(p.name for p in paths) == [
        "latent.png",  # the top layer z2, the model's code
        "latent_z1.png",
        "reconstructions.png",
        "samples.png",
        "traversal.png",
    ]
    # The traversal sweeps the units with the largest KL of either layer: 8 rows of 11 steps.
    assert latent_traversal(model, x[0]).shape == (8 * 11, 784)


def test_the_demo_shows_a_group_of_sliders_per_layer(model: HVAE) -> None:
    page_model = latent_model(model)
    assert [(layer.name, layer.size) for layer in page_model.layers] == [("z2", 3), ("z1", 5)]
    assert page_model.describe() == "hierarchical VAE, 2 latent layers: z2 of 3 units, z1 of 5 units"
    x = torch.rand(2, 784)
    means = page_model.posterior_means(x)
    assert [m.shape for m in means] == [(2, 3), (2, 5)]
    assert [k.shape for k in page_model.kl_per_unit(x)] == [(2, 3), (2, 5)]
    decoded = page_model.decode(means)
    assert decoded.shape == (2, 784) and float(decoded.min()) >= 0 and float(decoded.max()) <= 1
    # Moving the lower layer alone changes the picture: the decoder reads z1.
    moved = [means[0], means[1] + 3.0]
    assert not torch.allclose(page_model.decode(moved), decoded)


def test_scores_do_not_depend_on_the_batch(model: HVAE, images: tuple[np.ndarray, np.ndarray]) -> None:
    """Each image's draw of both layers comes from its own pixels: scoring alone or in a batch gives
    the same negative ELBO."""
    pixels = images[0][:6].reshape(6, 784)
    together = score_pixels(model, pixels, seed=3)["neg_elbo"]
    alone = np.concatenate([score_pixels(model, pixels[i : i + 1], seed=3)["neg_elbo"] for i in range(6)])
    np.testing.assert_allclose(together, alone, rtol=1e-5)


def test_samples_are_ancestral_draws(model: HVAE) -> None:
    """A sample draws z1 from p(z1 | z2): two generators with the same seed agree, and differ from
    decoding z2 with z1 at its prior mean."""
    first = model.sample(4, generator=torch.Generator().manual_seed(5))
    again = model.sample(4, generator=torch.Generator().manual_seed(5))
    assert torch.equal(first, again)
    z2 = torch.randn(4, 3, generator=torch.Generator().manual_seed(5))
    assert not torch.allclose(first, model.decode(z2))
