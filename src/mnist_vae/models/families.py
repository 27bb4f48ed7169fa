"""The model families, by the ``kind`` of their architecture: the one-layer VAE
(:mod:`.vae`, kinds mlp and conv, and the tutorial's seed) and the two-layer hierarchical VAE
(:mod:`.hvae`, kind hvae). Whatever builds or loads a model asks this module which class to use.
"""

from __future__ import annotations

import torch

from mnist_vae.config import ModelConfig
from mnist_vae.models.hvae import HVAE
from mnist_vae.models.networks import Architecture
from mnist_vae.models.vae import VAE

FAMILIES: dict[str, type[VAE]] = {"mlp": VAE, "conv": VAE, "hvae": HVAE}


def from_architecture(arch: Architecture) -> VAE:
    """The model of ``arch``, of its family, with fresh weights."""
    return FAMILIES[arch.kind](arch)


def build_model(cfg: ModelConfig, seed: int | None = None) -> VAE:
    """Builds the model that ``model`` in params.yaml describes; ``seed`` fixes its initial weights."""
    if seed is not None:
        torch.manual_seed(seed)
    return from_architecture(Architecture.from_config(cfg))
