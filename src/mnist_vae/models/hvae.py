"""The hierarchical VAE: two stochastic layers, z2 -> z1 -> x, with top-down inference.

The generative model is ``p(z2) p(z1 | z2) p(x | z1, z2)``: a standard normal top layer z2, a
diagonal Gaussian z1 whose mean and log-variance a small network computes from z2, and the conv
decoder of the one-layer VAE reading z1 beside the top-down features of z2 (the decoder sees both
layers, so the top one cannot be ignored for free).

Inference runs the other way and shares the generative path, as in the Ladder VAE (Sonderby et
al. 2016) and the IAF paper's top-down ResNet VAE (Kingma et al. 2016): the conv encoder reads x
once (bottom-up features h), ``q(z2 | x)`` comes from h, and ``q(z1 | x, z2)`` is the prior
``p(z1 | z2)`` corrected by h and the top-down features: its mean and log-variance are the prior's
plus a learned shift.

For one draw, the ELBO's KL term is ``KL(q(z2 | x) || p(z2)) + KL(q(z1 | x, z2) || p(z1 | z2))``,
both in closed form (the second at the drawn z2); the importance weight's latent part is
``log p(z2) + log p(z1 | z2) - log q(z2 | x) - log q(z1 | x, z2)`` at the drawn pair. Each draw
takes ``latent2 + latent`` standard normal numbers: eps[..., :latent2] for z2, the rest for z1.

Everything else (the ELBO, the importance-weighted estimate, training, serving, scoring) is the
one-layer VAE's code in :mod:`.vae` and :mod:`.objectives`, through the methods below.
"""

from __future__ import annotations

import dataclasses
from typing import NamedTuple

import torch
from torch import nn

from mnist_vae.models.networks import (
    _ACTIVATIONS,
    N_PIXELS,
    Architecture,
    ConvDecoder,
    as_images,
    conv_trunk,
    mlp,
)
from mnist_vae.models.objectives import (
    Latents,
    gaussian_kl,
    gaussian_kl_per_unit,
    kl_divergence,
    kl_per_unit,
    posterior_log_prob,
    standard_normal_log_prob,
)
from mnist_vae.models.vae import VAE


class TwoLayerPosterior:
    """What the bottom-up pass says of images x: their features h and q(z2 | x) = N(mu2, exp(logvar2)).

    ``shift_h`` is h's part of the correction of the lower layer, computed once per image.
    """

    def __init__(self, mu2: torch.Tensor, logvar2: torch.Tensor, shift_h: torch.Tensor) -> None:
        self.mu2, self.logvar2, self.shift_h = mu2, logvar2, shift_h


class _AtMean(NamedTuple):
    """An image's posterior, and at z2's posterior mean: the top-down features t, p(z1 | z2) and
    q(z1 | x, z2)."""

    post: TwoLayerPosterior
    t: torch.Tensor
    mu_p: torch.Tensor
    logvar_p: torch.Tensor
    mu_q: torch.Tensor
    logvar_q: torch.Tensor


class HVAE(VAE):
    """A VAE with two diagonal Gaussian latent layers: ``latent2`` units on top, ``latent`` below."""

    def _build(self, arch: Architecture) -> None:
        assert arch.activation is not None and arch.latent2 > 0 and arch.hidden2 > 0, arch
        act = _ACTIVATIONS[arch.activation]
        l1, l2, width = arch.latent, arch.latent2, arch.hidden2
        if arch.channels:
            layers, features = conv_trunk(arch)
            self.trunk: nn.Module = nn.Sequential(*layers)
            self._images = True
        else:  # MLP on the image side (small models, tests)
            self.trunk = nn.Sequential(mlp([N_PIXELS, *arch.hidden], arch.activation), act())
            features = arch.hidden[-1]
            self._images = False
        # Bottom-up: h -> q(z2 | x).
        self.up = nn.Sequential(nn.Linear(features, width), act(), nn.Linear(width, 2 * l2))
        # Top-down: z2 -> features t -> p(z1 | z2).
        self.down = nn.Sequential(nn.Linear(l2, width), act(), nn.Linear(width, width), act())
        self.prior1 = nn.Linear(width, 2 * l1)
        # q(z1 | x, z2) = p(z1 | z2) shifted by shift_h(h) + shift_t(t). (Started near zero, the
        # shift left z1 unused for epochs: 1.7 nats behind the one-layer VAE after 8 epochs.)
        self.shift_h = nn.Linear(features, 2 * l1)
        self.shift_t = nn.Linear(width, 2 * l1, bias=False)
        below = dataclasses.replace(arch, latent=l1 + width)  # the decoder reads [z1, t]
        if arch.channels:
            self.decoder = ConvDecoder(below)
        else:
            self.decoder = nn.Sequential(mlp([l1 + width, *reversed(arch.hidden), N_PIXELS], arch.activation))
        self.to(memory_format=torch.channels_last)

    @property
    def latent_dim(self) -> int:
        """Units of the code (:meth:`encode`, the served ``latent`` output): the top layer z2."""
        return self.arch.latent2

    @property
    def noise_dim(self) -> int:
        return self.arch.latent2 + self.arch.latent

    @property
    def layers(self) -> tuple[tuple[str, int], ...]:
        return (("z2", self.arch.latent2), ("z1", self.arch.latent))

    def _features(self, x: torch.Tensor) -> torch.Tensor:
        return self.trunk(as_images(x) if self._images else x).reshape(*x.shape[:-1], -1)

    def posterior(self, x: torch.Tensor) -> TwoLayerPosterior:
        h = self._features(x)
        mu2, logvar2 = self.up(h).chunk(2, dim=-1)
        return TwoLayerPosterior(mu2, logvar2, self.shift_h(h))

    def encode(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The top layer's posterior q(z2 | x): (mean, log-variance), the model's code."""
        post = self.posterior(x)
        return post.mu2, post.logvar2

    def _top_down(self, z2: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """z2 -> (features t, mean and log-variance of p(z1 | z2))."""
        t = self.down(z2)
        mu, logvar = self.prior1(t).chunk(2, dim=-1)
        return t, mu, logvar

    def _lower_posterior(
        self, post: TwoLayerPosterior, t: torch.Tensor, mu_p: torch.Tensor, logvar_p: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        d_mu, d_logvar = (post.shift_h + self.shift_t(t)).chunk(2, dim=-1)
        return mu_p + d_mu, logvar_p + d_logvar

    def _decode_pair(self, z1: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        return self.decoder(torch.cat([z1, t], dim=-1))

    def latents(self, posterior: object, eps: torch.Tensor) -> Latents:
        assert isinstance(posterior, TwoLayerPosterior)
        l2 = self.arch.latent2
        eps2, eps1 = eps[..., :l2], eps[..., l2:]
        z2 = posterior.mu2 + torch.exp(0.5 * posterior.logvar2) * eps2
        t, mu_p, logvar_p = self._top_down(z2)
        mu_q, logvar_q = self._lower_posterior(posterior, t, mu_p, logvar_p)
        z1 = mu_q + torch.exp(0.5 * logvar_q) * eps1
        # log p(z1 | z2) - log q(z1 | x, z2): z1 standardised under the prior, minus its posterior.
        log_p1 = standard_normal_log_prob((z1 - mu_p) * torch.exp(-0.5 * logvar_p)) - 0.5 * logvar_p.sum(-1)
        log_ratio = (
            standard_normal_log_prob(z2)
            - posterior_log_prob(eps2, posterior.logvar2)
            + log_p1
            - posterior_log_prob(eps1, logvar_q)
        )
        kl = kl_divergence(posterior.mu2, posterior.logvar2) + gaussian_kl(mu_q, logvar_q, mu_p, logvar_p)
        return Latents(decoder_input=torch.cat([z1, t], dim=-1), kl=kl, log_ratio=log_ratio)

    def decode(self, z: torch.Tensor) -> torch.Tensor:
        """The decoder's output at top-layer codes z2, the lower layer at its prior mean."""
        t, mu_p, _ = self._top_down(z)
        return self._decode_pair(mu_p, t)

    def decode_layers(self, codes: list[torch.Tensor]) -> torch.Tensor:
        """The decoder's output at given codes of both layers, ``[z2, z1]``."""
        z2, z1 = codes
        return self._decode_pair(z1, self.down(z2))

    def _at_mean(self, x: torch.Tensor) -> _AtMean:
        post = self.posterior(x)
        t, mu_p, logvar_p = self._top_down(post.mu2)
        return _AtMean(post, t, mu_p, logvar_p, *self._lower_posterior(post, t, mu_p, logvar_p))

    def layer_posteriors(self, x: torch.Tensor) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """q(z2 | x), then q(z1 | x, z2) at z2's posterior mean."""
        at = self._at_mean(x)
        return [(at.post.mu2, at.post.logvar2), (at.mu_q, at.logvar_q)]

    def layer_kl(self, x: torch.Tensor) -> list[torch.Tensor]:
        """Each unit's KL term per image, layer by layer (z1's at z2's posterior mean)."""
        at = self._at_mean(x)
        return [
            kl_per_unit(at.post.mu2, at.post.logvar2),
            gaussian_kl_per_unit(at.mu_q, at.logvar_q, at.mu_p, at.logvar_p),
        ]

    def reconstruct(self, x: torch.Tensor) -> torch.Tensor:
        """The decoder's output at z2's posterior mean and z1's posterior mean given it."""
        at = self._at_mean(x)
        return self._decode_pair(at.mu_q, at.t)

    def sample(
        self, n: int, generator: torch.Generator | None = None, device: str | torch.device = "cpu"
    ) -> torch.Tensor:
        """Ancestral samples: z2 from its prior, then z1 from p(z1 | z2); the decoder's output."""
        dtype = next(self.parameters()).dtype
        z2 = torch.randn(n, self.arch.latent2, generator=generator, device=device, dtype=dtype)
        t, mu_p, logvar_p = self._top_down(z2)
        eps = torch.randn(n, self.arch.latent, generator=generator, device=device, dtype=dtype)
        return self._decode_pair(mu_p + torch.exp(0.5 * logvar_p) * eps, t)
