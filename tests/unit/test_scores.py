"""Tests for :mod:`mnist_vae.serving.scores`: the per-image posterior draw (a function of the seed and
the image alone, standard normal, pinned against a plain-Python computation) and the
complexity-corrected score."""

from __future__ import annotations

import hashlib
import io
import math
from collections.abc import Callable
from statistics import NormalDist

import numpy as np
import pytest
import torch
from PIL import Image

from mnist_vae.config import ModelConfig
from mnist_vae.models.families import build_model
from mnist_vae.models.objectives import neg_elbo
from mnist_vae.models.vae import VAE
from mnist_vae.serving.pyfunc import ServedVAE
from mnist_vae.serving.scores import image_noise, png_bits, score_batch
from mnist_vae.serving.scoring import score_pixels

LATENT = 3


@pytest.fixture(scope="module")
def vae() -> VAE:
    return build_model(ModelConfig(channels=(4, 8), blocks=0, dense=16, latent=LATENT), seed=0)


@pytest.fixture
def images(tiny_images: Callable[..., tuple[np.ndarray, np.ndarray]]) -> np.ndarray:
    """Six uint8 images as (6, 784), two of them equal."""
    x = tiny_images(5, seed=4)[0].reshape(5, 784)
    return np.concatenate([x, x[1:2]])


def _grey(pixels: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(pixels).float().div_(255.0)


def _noise_by_hand(row: np.ndarray, seed: int, dim: int) -> list[float]:
    """The draw of one image, computed with Python integers and the standard library's inverse CDF."""
    mask = (1 << 64) - 1
    key = int.from_bytes(
        hashlib.blake2b(row.astype("<f4").tobytes(), digest_size=8, key=seed.to_bytes(8, "little")).digest(),
        "little",
    )
    out = []
    for i in range(1, dim + 1):
        z = (key + i * 0x9E3779B97F4A7C15) & mask
        z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & mask
        z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & mask
        z ^= z >> 31
        out.append(NormalDist().inv_cdf(((z >> 11) + 0.5) / 2**53))
    return out


def test_the_draw_is_pinned_to_an_independent_computation(images: np.ndarray) -> None:
    x = _grey(images)
    for seed in (0, 12345):
        noise = image_noise(x, seed, 7).numpy()
        for i in range(len(x)):
            np.testing.assert_allclose(noise[i], _noise_by_hand(x[i].numpy(), seed, 7), rtol=1e-6, atol=1e-6)


def test_an_image_draws_the_same_alone_in_any_batch_and_order(images: np.ndarray) -> None:
    x = _grey(images)
    together = image_noise(x, 3, LATENT)
    alone = torch.cat([image_noise(x[i : i + 1], 3, LATENT) for i in range(len(x))])
    torch.testing.assert_close(together, alone, rtol=0, atol=0)
    order = torch.tensor([4, 0, 5, 2, 1, 3])
    torch.testing.assert_close(image_noise(x[order], 3, LATENT), together[order], rtol=0, atol=0)
    assert torch.equal(together[1], together[5])  # the same image, the same draw
    assert not torch.equal(together[0], together[1])  # another image, another draw
    assert not torch.equal(image_noise(x, 4, LATENT), together)  # another seed, other draws


def test_the_draws_are_standard_normal_and_uncorrelated() -> None:
    rng = np.random.default_rng(0)
    x = torch.from_numpy(rng.integers(0, 256, (20_000, 784)).astype(np.float32) / 255)
    noise = image_noise(x, 0, 8).double()
    assert abs(noise.mean().item()) < 0.01 and abs(noise.std().item() - 1) < 0.01
    correlation = torch.corrcoef(noise.T) - torch.eye(8, dtype=torch.float64)
    assert correlation.abs().max().item() < 0.03
    # The empirical CDF against the normal one (Kolmogorov-Smirnov distance; 0.005 is far beyond
    # the 0.0043 that 160,000 draws exceed with probability 1e-6).
    values = noise.flatten().sort().values.numpy()
    cdf = np.array([NormalDist().cdf(v) for v in values[::97]])
    empirical = (np.arange(len(values))[::97] + 0.5) / len(values)
    assert np.abs(cdf - empirical).max() < 0.005


def test_a_score_does_not_depend_on_the_batch(vae: VAE, images: np.ndarray) -> None:
    expected = np.array([score_pixels(vae, images[i : i + 1])["neg_elbo"][0] for i in range(len(images))])
    np.testing.assert_allclose(score_pixels(vae, images)["neg_elbo"], expected, rtol=1e-6)
    np.testing.assert_allclose(score_pixels(vae, images, batch_size=4)["neg_elbo"], expected, rtol=1e-6)
    np.testing.assert_allclose(score_pixels(vae, images[::-1])["neg_elbo"], expected[::-1], rtol=1e-6)
    # The served model's score output gives the same numbers, alone or in a batch.
    served = ServedVAE(vae).predict(images.astype(np.float32) / 255, {"output": "score"})
    np.testing.assert_allclose(served["neg_elbo"], expected, rtol=1e-6)
    # ...which are the objective's negative ELBO at the drawn eps.
    x = _grey(images)
    with torch.no_grad():
        direct = neg_elbo(vae, x, image_noise(x, 0, LATENT)).numpy()
    np.testing.assert_allclose(expected, direct, rtol=1e-6)


def test_complexity_is_the_png_length_and_corrects_the_score_in_bits(vae: VAE, images: np.ndarray) -> None:
    x = _grey(images)
    blank = torch.zeros(1, 784)
    noisy = torch.from_numpy(np.random.default_rng(1).random((1, 784), dtype=np.float32))
    bits = png_bits(torch.cat([x, blank, noisy]))
    for i, image in enumerate(images):
        buffer = io.BytesIO()
        Image.fromarray(image.reshape(28, 28)).save(buffer, format="PNG", compress_level=9)
        assert bits[i] == 8 * len(buffer.getvalue())
    assert bits[-2] < bits[0] < bits[-1]  # a blank image codes shortest, noise longest
    out = score_batch(vae, x, seed=2, latents=True, complexity=True)
    assert list(out) == ["neg_elbo", "png_bits", "corrected_bits", "mu_0", "mu_1", "mu_2"]
    np.testing.assert_allclose(out["corrected_bits"], out["neg_elbo"] / math.log(2) - bits[:6], rtol=1e-6)
    np.testing.assert_array_equal(out["neg_elbo"], score_batch(vae, x, seed=2)["neg_elbo"])
