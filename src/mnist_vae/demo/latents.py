"""The latent layers of a model family, as the demo page reads and writes them.

The page never calls a network directly: it asks a :class:`LatentModel` for the posterior of each
latent layer, decodes a code given for every layer, scores images and draws from the prior.
:class:`Layers` reads both families of :mod:`mnist_vae.models` (the one-layer VAE and the
two-layer hierarchical VAE) through their ``layers``; the page shows one group of sliders per
layer, and nothing else of the page changes. A family without those methods gets an adapter of its
own here, returned by :func:`latent_model`.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Protocol

import numpy as np
import torch

from mnist_vae.errors import UserError
from mnist_vae.evaluation.figures import sample
from mnist_vae.models.vae import VAE
from mnist_vae.serving.scoring import score_pixels


class UnknownFamilyError(UserError, TypeError):
    """The model is of a family whose latent layers the demo does not know."""


@dataclass(frozen=True)
class LatentLayer:
    """One stochastic layer: its name on the page and its number of units."""

    name: str
    size: int


class LatentModel(Protocol):
    """What the page needs of a model, whatever its family. Images are flat (B, 784) floats in
    [0, 1]; a code is one (B, size) tensor per layer, in the order of :attr:`layers`."""

    @property
    def layers(self) -> tuple[LatentLayer, ...]: ...

    def describe(self) -> str:
        """The family and its layers in a few words, for the model card."""
        ...

    def posterior_means(self, x: torch.Tensor) -> list[torch.Tensor]:
        """The mean of q(z | x) of each layer."""
        ...

    def kl_per_unit(self, x: torch.Tensor) -> list[torch.Tensor]:
        """KL(q || p) of each unit of each layer, per image, in nats: how much the model uses it."""
        ...

    def decode(self, code: Sequence[torch.Tensor]) -> torch.Tensor:
        """The pixel means (grey levels in [0, 1]) of the images that ``code`` stands for."""
        ...

    def neg_elbo(self, pixels: np.ndarray, seed: int) -> np.ndarray:
        """The negative ELBO in nats of uint8 (N, 784) images, one posterior draw each from
        ``seed``: the numbers of ``mnist-vae score`` and of the served model's ``score``."""
        ...

    def sample(self, n: int, seed: int) -> np.ndarray:
        """Pixel means (n, 784) of ``n`` draws from the prior."""
        ...


class Layers:
    """Any model of :mod:`mnist_vae.models`, read through its latent layers: the one-layer VAE's
    ``z``, or the hierarchical VAE's ``z2`` (top) and ``z1``."""

    def __init__(self, model: VAE) -> None:
        self.model = model.eval()
        self._layers = tuple(LatentLayer(name, size) for name, size in model.layers)

    @property
    def layers(self) -> tuple[LatentLayer, ...]:
        return self._layers

    def describe(self) -> str:
        if len(self._layers) == 1:
            return f"VAE, one latent layer z of {self._layers[0].size} units"
        parts = ", ".join(f"{layer.name} of {layer.size} units" for layer in self._layers)
        return f"hierarchical VAE, {len(self._layers)} latent layers: {parts}"

    @torch.inference_mode()
    def posterior_means(self, x: torch.Tensor) -> list[torch.Tensor]:
        return [mu for mu, _ in self.model.layer_posteriors(x)]

    @torch.inference_mode()
    def kl_per_unit(self, x: torch.Tensor) -> list[torch.Tensor]:
        return self.model.layer_kl(x)

    @torch.inference_mode()
    def decode(self, code: Sequence[torch.Tensor]) -> torch.Tensor:
        assert len(code) == len(self._layers), f"{len(self._layers)} latent layers, got a code of {len(code)}"
        return self.model.pixel_means(self.model.decode_layers(list(code)))

    def neg_elbo(self, pixels: np.ndarray, seed: int) -> np.ndarray:
        return score_pixels(self.model, pixels, seed=seed)["neg_elbo"]

    def sample(self, n: int, seed: int) -> np.ndarray:
        return sample(self.model, n, seed=seed)


# The one-layer VAE's adapter, by its earlier name.
OneLayer = Layers


def latent_model(model: object) -> LatentModel:
    """The adapter of ``model``'s family; a new family adds its branch here.

    Raises:
        UnknownFamilyError: No adapter knows the model's class.
    """
    if isinstance(model, VAE):  # both families of mnist_vae.models
        return Layers(model)
    raise UnknownFamilyError(
        f"the demo knows no latent layers of a {type(model).__name__}; expected an mnist-vae VAE"
    )
