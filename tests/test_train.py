"""The trainer's fast-path switches: each one works or falls back with one warning, never a crash."""

from __future__ import annotations

import logging

import pytest
import torch

from mnist_vae.config import ModelConfig, TrainConfig
from mnist_vae.model import build_model
from mnist_vae.train import learning_rate, train_model

from .conftest import tiny_images

IMAGES = tiny_images(128)[0]


def _losses(cfg: TrainConfig) -> list[float]:
    model = build_model(ModelConfig(hidden=(32,), latent=4), seed=cfg.seed)
    return [s.loss for s in train_model(model, IMAGES, cfg, progress=False)]


def test_compile_failure_falls_back_to_eager_with_one_warning(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    def broken_compile(fn, **kwargs):
        def run(*args):
            raise RuntimeError("inductor: no C++ compiler\nmore detail")
        return run

    cfg = TrainConfig(device="cpu", epochs=2, batch_size=32, seed=1)
    eager = _losses(cfg)
    monkeypatch.setattr(torch, "compile", broken_compile)
    with caplog.at_level(logging.WARNING, logger="mnist_vae.train"):
        compiled = _losses(TrainConfig(device="cpu", epochs=2, batch_size=32, seed=1, compile=True))
    warnings = [r.getMessage() for r in caplog.records if "torch.compile" in r.getMessage()]
    assert warnings == ["torch.compile failed (inductor: no C++ compiler); training without it"]
    assert compiled == eager


def test_tf32_without_cuda_warns_and_trains_in_fp32(caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.WARNING, logger="mnist_vae.train"):
        tf32 = _losses(TrainConfig(device="cpu", epochs=2, batch_size=32, precision="tf32"))
    assert any("tf32 needs CUDA" in r.getMessage() for r in caplog.records)
    assert tf32 == _losses(TrainConfig(device="cpu", epochs=2, batch_size=32))


def test_bf16_autocast_trains() -> None:
    losses = _losses(TrainConfig(device="cpu", epochs=3, batch_size=32, lr=3e-3, precision="bf16"))
    assert all(torch.isfinite(torch.tensor(losses)))
    assert losses[-1] < losses[0]


def test_iwae_objective_and_dynamic_binarisation_train() -> None:
    losses = _losses(TrainConfig(device="cpu", epochs=3, batch_size=32, lr=3e-3, objective="iwae",
                                 iw_samples=5, binarize=True))
    assert losses[-1] < losses[0]


def test_burda_schedule_steps_down_after_3_to_the_i_passes() -> None:
    cfg = TrainConfig(epochs=3280, lr=1e-3, schedule="burda")
    per_epoch = 10
    rates = [learning_rate(cfg, epoch * per_epoch, per_epoch) for epoch in (0, 1, 3, 4, 12, 13, 3279)]
    expected = [1e-3 * 10 ** (-i / 7) for i in (0, 1, 1, 2, 2, 3, 7)]
    assert rates == pytest.approx(expected)
