"""Per-image scores, computed in one place for the served model's ``score`` output and for
``mnist-vae score`` (in this process or on Spark).

- ``neg_elbo``: the negative ELBO of an image in nats (:func:`mnist_vae.models.objectives.neg_elbo`)
  with one posterior draw ``z = mu + sigma * eps``. ``eps`` is a function of the seed and of the
  image's own bytes (:func:`image_noise`), never of a stream shared by a batch: an image scores the
  same alone, in any batch, in any order and in any Spark partition.
- ``mu_i`` (with ``latents``): the posterior means.
- ``png_bits`` and ``corrected_bits`` (with ``complexity``): the image's length in bits as a
  losslessly compressed PNG, and the negative ELBO in bits minus that length, the input-complexity
  correction of Serrà et al. (2020), "Input complexity and out-of-distribution detection with
  likelihood-based generative models" (ICLR). Simple images (a blank T-shirt, a thin 1) get a high
  likelihood from any model; subtracting what a generic coder needs for them leaves what this
  model finds unusual.
"""

from __future__ import annotations

import hashlib
import io
import math

import numpy as np
import torch
from PIL import Image

from mnist_vae.models.networks import N_PIXELS
from mnist_vae.models.objectives import neg_elbo
from mnist_vae.models.vae import VAE

SCORE = "neg_elbo"
PNG_BITS = "png_bits"
CORRECTED = "corrected_bits"

# SplitMix64 (Steele, Lea & Flood 2014): its increment and finaliser constants.
_GOLDEN = np.uint64(0x9E3779B97F4A7C15)
_MIX1 = np.uint64(0xBF58476D1CE4E5B9)
_MIX2 = np.uint64(0x94D049BB133111EB)


def image_noise(x: torch.Tensor, seed: int, dim: int) -> torch.Tensor:
    """Standard normal draws of shape (B, ``dim``), row i a function of ``seed`` and the float32
    grey levels of ``x[i]`` only.

    Each image's bytes are hashed with BLAKE2b keyed by the seed into a 64-bit key; the key's
    SplitMix64 stream gives ``dim`` uniforms in (0, 1), and the normal's inverse CDF the draws.
    Written by hand because no library draws from one key per row at once: a numpy or torch
    generator per image costs 7 us or more each, a tenth of the scoring time, where this costs one
    hash per image and a few vectorised operations.
    """
    rows = np.ascontiguousarray(x.detach().cpu().numpy(), dtype="<f4")
    assert rows.ndim == 2, f"expected (B, pixels), got {rows.shape}"
    secret = int(seed).to_bytes(8, "little")
    keys = np.frombuffer(
        b"".join(hashlib.blake2b(row, digest_size=8, key=secret).digest() for row in rows), dtype="<u8"
    )
    steps = np.arange(1, dim + 1, dtype=np.uint64) * _GOLDEN
    with np.errstate(over="ignore"):  # uint64 arithmetic wraps around, as SplitMix64 wants
        z = keys[:, None] + steps[None, :]
        z = (z ^ (z >> np.uint64(30))) * _MIX1
        z = (z ^ (z >> np.uint64(27))) * _MIX2
        z ^= z >> np.uint64(31)
    # The top 53 bits, centred in their interval: uniforms strictly inside (0, 1).
    uniform = ((z >> np.uint64(11)).astype(np.float64) + 0.5) * 2.0**-53
    return torch.special.ndtri(torch.from_numpy(uniform)).to(torch.float32)


def png_bits(x: torch.Tensor) -> np.ndarray:
    """Each image's size in bits as a PNG (8-bit grey, zlib level 9), grey levels rounded to 0..255."""
    side = math.isqrt(N_PIXELS)
    pixels = x.detach().cpu().mul(255.0).round().clamp(0, 255).to(torch.uint8).numpy()
    sizes = np.empty(len(pixels), dtype=np.float32)
    for i, image in enumerate(pixels):
        buffer = io.BytesIO()
        Image.fromarray(image.reshape(side, side), mode="L").save(buffer, format="PNG", compress_level=9)
        sizes[i] = 8 * buffer.tell()
    return sizes


@torch.inference_mode()
def score_batch(
    model: VAE, x: torch.Tensor, seed: int = 0, latents: bool = False, complexity: bool = False
) -> dict[str, np.ndarray]:
    """The score columns of a batch ``x`` of (B, 784) float32 grey levels in [0, 1]: ``neg_elbo``,
    then ``png_bits`` and ``corrected_bits`` with ``complexity``, then ``mu_i`` with ``latents``."""
    posterior = model.posterior(x)
    scores = neg_elbo(model, x, image_noise(x, seed, model.noise_dim), posterior).numpy()
    out = {SCORE: scores}
    if complexity:
        bits = png_bits(x)
        out[PNG_BITS] = bits
        out[CORRECTED] = (scores / math.log(2) - bits).astype(np.float32)
    if latents:
        means = model.encode(x)[0].numpy()
        out.update({f"mu_{i}": means[:, i] for i in range(model.latent_dim)})
    return out


def score_columns(latent_dim: int, latents: bool = False, complexity: bool = False) -> list[str]:
    """The names :func:`score_batch` returns, in its order."""
    names = [SCORE]
    if complexity:
        names += [PNG_BITS, CORRECTED]
    if latents:
        names += [f"mu_{i}" for i in range(latent_dim)]
    return names
