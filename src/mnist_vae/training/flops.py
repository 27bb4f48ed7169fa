"""Training budgets in floating-point operations, whatever the machine.

:func:`step_flops` counts one training step's forward and backward pass on one batch with
``torch.utils.flop_counter`` (matrix products and convolutions, two operations per multiply-add;
elementwise work is not counted); :func:`training_flops` multiplies it out over a run.
"""

from __future__ import annotations

import copy

import torch
from torch.utils.flop_counter import FlopCounterMode

from mnist_vae.config import TrainConfig
from mnist_vae.models.networks import N_PIXELS
from mnist_vae.models.objectives import training_loss
from mnist_vae.models.vae import VAE


def step_flops(model: VAE, batch: int, iw_samples: int = 1) -> int:
    """Floating-point operations of one training step (forward and backward) on ``batch`` images,
    counted on a copy of ``model`` on the CPU, the caller's random state untouched."""
    twin = copy.deepcopy(model).cpu().train()
    x = torch.full((batch, N_PIXELS), 0.5)
    with torch.random.fork_rng(devices=[]), FlopCounterMode(display=False) as counter:
        training_loss(twin, x, iw_samples).loss.backward()
    return int(counter.get_total_flops())


def training_flops(model: VAE, cfg: TrainConfig, n_images: int) -> float:
    """Floating-point operations of a whole training run of ``cfg`` on ``n_images`` images: one
    step's count times the steps of every epoch (the last partial batch is dropped, as training
    does)."""
    batch = min(cfg.batch_size, n_images)
    k = cfg.iw_samples if cfg.objective == "iwae" else 1
    return float(step_flops(model, batch, k)) * (n_images // batch) * cfg.epochs
