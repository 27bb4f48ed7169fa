"""The conv decoder's likelihood in its own pixel order (:meth:`ConvDecoder.phase_logits`, what
``likelihood_nll`` and so the importance-weighted estimate and ``neg_elbo`` use) against the plain
path: the decoder's images and :func:`reconstruction_nll`, on the same draws.

Tiny models in float64 with random weights (the zero-started residual convolutions and pixel bias
randomised too, so that every layer counts), one and two convolution stages, with and without
residual blocks and the pixel bias, binary and grey images, and the two-layer HVAE.
"""

from __future__ import annotations

import dataclasses

import pytest
import torch

from mnist_vae.config import ModelConfig
from mnist_vae.models.families import build_model, from_architecture
from mnist_vae.models.networks import N_PIXELS, ConvDecoder
from mnist_vae.models.objectives import elbo_terms, iw_bound, neg_elbo, reconstruction_nll
from mnist_vae.models.vae import VAE

F64 = torch.float64
TOL = 1e-4  # nats per image


def _randomised(model: VAE) -> VAE:
    generator = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for param in model.parameters():
            param.copy_(0.3 * torch.randn(param.shape, generator=generator, dtype=param.dtype))
    return model.eval()


def _conv(channels: tuple[int, ...], blocks: int, pixel_bias: bool) -> VAE:
    torch.manual_seed(0)
    model = build_model(ModelConfig(preset="conv", channels=channels, blocks=blocks, dense=16, latent=3))
    if not pixel_bias:
        model = from_architecture(dataclasses.replace(model.arch, pixel_bias=False))
    return _randomised(model.to(F64))


def _hvae() -> VAE:
    torch.manual_seed(0)
    cfg = ModelConfig(preset="hvae", channels=(4, 8), dense=16, latent=3, latent2=2, hidden2=8)
    return _randomised(build_model(cfg).to(F64))


MODELS = {
    "conv-1-stage": lambda: _conv((4,), 0, True),
    "conv-2-stages": lambda: _conv((4, 8), 0, True),
    "conv-blocks": lambda: _conv((4, 8), 1, True),
    "conv-1-stage-blocks-no-bias": lambda: _conv((4,), 1, False),
    "conv-no-bias": lambda: _conv((4, 8), 0, False),
    "hvae": _hvae,
}


def _images(binary: bool) -> torch.Tensor:
    grey = torch.rand(5, N_PIXELS, generator=torch.Generator().manual_seed(2), dtype=F64)
    return torch.bernoulli(grey, generator=torch.Generator().manual_seed(3)) if binary else grey


def test_phase_order_is_the_pixel_shuffle() -> None:
    """Channel a * 2 + b of the last convolution at (i, j) is pixel (2i + a, 2j + b)."""
    channels = torch.randn(2, 4, 14, 14)
    images = torch.nn.functional.pixel_shuffle(channels, 2).reshape(2, N_PIXELS)
    assert torch.equal(ConvDecoder.to_phase_order(images), channels.permute(0, 2, 3, 1).reshape(2, N_PIXELS))


@pytest.mark.parametrize("binary", [True, False], ids=["binary", "grey"])
@pytest.mark.parametrize("name", list(MODELS))
def test_likelihood_nll_equals_the_decoded_images(name: str, binary: bool) -> None:
    model = MODELS[name]()
    assert isinstance(model.decoder, ConvDecoder)
    x = _images(binary)
    eps = torch.randn(3, len(x), model.noise_dim, generator=torch.Generator().manual_seed(4), dtype=F64)
    with torch.inference_mode():
        latents = model.latents(model.posterior(x), eps)
        want = reconstruction_nll(model, model.decoder(latents.decoder_input), x)
        got = model.likelihood_nll(latents.decoder_input, x)
        assert got.shape == want.shape == (3, len(x))
        assert (got - want).abs().max().item() < TOL
        # neg_elbo (the score) takes the same path; elbo_terms decodes the images.
        assert (neg_elbo(model, x, eps[0]) - elbo_terms(model, x, eps[0]).neg_elbo).abs().max().item() < TOL


def test_likelihood_nll_has_the_plain_gradient() -> None:
    """Training does not use it, but nothing in it stops gradients."""
    model = MODELS["conv-blocks"]().train()
    x = _images(True)
    z = torch.randn(2, len(x), model.arch.latent, dtype=F64)
    plain = torch.autograd.grad(
        reconstruction_nll(model, model.decoder(z), x).sum(), list(model.decoder.parameters())
    )
    fast = torch.autograd.grad(model.likelihood_nll(z, x).sum(), list(model.decoder.parameters()))
    for a, b in zip(plain, fast, strict=True):
        assert torch.allclose(a, b, atol=1e-8)


@pytest.mark.parametrize("name", ["conv-2-stages", "hvae"])
def test_iw_log_likelihood_unchanged_on_fixed_draws(name: str) -> None:
    """The estimate from the plain decoder on the draws that iw_log_likelihood makes from a seed."""
    from mnist_vae.models.objectives import iw_log_likelihood

    model = MODELS[name]()
    x = _images(True)
    k, chunk_rows = 7, 3 * len(x)
    torch.manual_seed(5)
    got = iw_log_likelihood(model, x, k, chunk_rows=chunk_rows)
    torch.manual_seed(5)
    with torch.inference_mode():
        posterior = model.posterior(x)
        log_w = []
        for start in range(0, k, 3):
            eps = torch.randn(min(3, k - start), len(x), model.noise_dim, dtype=F64)
            draw = model.draw(posterior, eps)
            log_w.append(draw.log_ratio - reconstruction_nll(model, draw.out, x))
        want = iw_bound(torch.cat(log_w))
    assert (got - want).abs().max().item() < TOL
