"""The trainer's fast-path switches: each one works or falls back with one warning, never a crash."""

from __future__ import annotations

import logging
from collections.abc import Callable

import numpy as np
import pytest
import torch
from torch._dynamo.exc import TorchDynamoException

from mnist_vae.config import ConfigError, ModelConfig, TrainConfig
from mnist_vae.errors import UserError
from mnist_vae.models.families import build_model
from mnist_vae.models.objectives import training_loss
from mnist_vae.training import trainer as train_module
from mnist_vae.training.flops import step_flops, training_flops
from mnist_vae.training.threads import available_cores
from mnist_vae.training.trainer import (
    DeviceError,
    Trainer,
    TrainingDataError,
    learning_rate,
    resolve_device,
    train_epochs,
)

Losses = Callable[[TrainConfig], list[float]]


@pytest.fixture(scope="module")
def images(tiny_images: Callable[..., tuple[np.ndarray, np.ndarray]]) -> np.ndarray:
    return tiny_images(128)[0]


TINY = {
    "mlp": ModelConfig(preset="mlp", hidden=(32,), latent=4),
    "conv": ModelConfig(preset="conv", channels=(4, 8), blocks=1, dense=32, latent=4),
    "hvae": ModelConfig(preset="hvae", channels=(4, 8), blocks=1, dense=32, latent=4, latent2=2, hidden2=8),
}


@pytest.fixture(params=sorted(TINY))
def losses(images: np.ndarray, request: pytest.FixtureRequest) -> Losses:
    """``losses(cfg)``: the per-epoch training loss of a tiny model of each preset trained with
    ``cfg``: every switch works for the MLP, the convolutional VAE and the two-layer HVAE alike."""

    def train(cfg: TrainConfig) -> list[float]:
        model = build_model(TINY[request.param], seed=cfg.seed)
        return [s.loss for s in list(train_epochs(model, images, cfg))]

    return train


@pytest.mark.parametrize("averaged", [False, True], ids=["plain", "ema-warmup"])
@pytest.mark.parametrize("preset", sorted(TINY))
def test_a_resumed_trainer_ends_where_an_uninterrupted_one_does(
    images: np.ndarray, preset: str, averaged: bool
) -> None:
    cfg = TrainConfig(device="cpu", epochs=3, batch_size=32, lr=3e-3, seed=4, threads=1)
    if averaged:  # the averaged weights and the KL warm-up's step count resume too
        cfg = cfg.replace(ema=0.9, kl_warmup=2)
    straight = Trainer(build_model(TINY[preset], seed=0), images, cfg)
    expected = [s.loss for s in straight.epochs()]
    first = Trainer(build_model(TINY[preset], seed=0), images, cfg.replace(epochs=3))
    stats = [next(first.epochs())]
    state = first.state_dict()  # what the checkpoint holds at the end of epoch 1
    resumed = Trainer(build_model(TINY[preset], seed=9), images, cfg)
    resumed.load_state_dict(state)
    stats += list(resumed.epochs())
    assert [s.epoch for s in stats] == [1, 2, 3]
    assert [s.loss for s in stats] == expected
    x = torch.from_numpy(images[:4].reshape(4, 784)).float() / 255
    assert torch.equal(resumed.model.encode(x)[0], straight.model.encode(x)[0])
    assert torch.equal(resumed.result.encode(x)[0], straight.result.encode(x)[0])
    if averaged:  # the result is the average, not the last weights
        assert not torch.equal(resumed.result.encode(x)[0], resumed.model.encode(x)[0])


def test_compile_failure_falls_back_to_eager_with_one_warning(
    losses: Losses, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    def broken_compile(fn, **kwargs):
        def run(*args):
            raise TorchDynamoException("inductor: no C++ compiler\nmore detail")

        return run

    cfg = TrainConfig(device="cpu", epochs=2, batch_size=32, seed=1)
    eager = losses(cfg)
    monkeypatch.setattr(torch, "compile", broken_compile)
    with caplog.at_level(logging.WARNING, logger="mnist_vae.training.precision"):
        compiled = losses(TrainConfig(device="cpu", epochs=2, batch_size=32, seed=1, compile=True))
    warnings = [r.getMessage() for r in caplog.records if "torch.compile" in r.getMessage()]
    assert warnings == ["torch.compile failed (inductor: no C++ compiler); training without it"]
    assert compiled == eager


@pytest.mark.parametrize("when", ["first call", "later call"])
def test_an_error_that_is_not_compiling_propagates(when: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """Out of memory, or a bug, is no reason to change path mid-run: it stops training."""
    from mnist_vae.training.precision import Compiled

    calls = []

    def flaky_compile(fn, **kwargs):
        def run(*args):
            calls.append(args)
            if when == "first call" or len(calls) > 1:
                raise torch.OutOfMemoryError("CPU out of memory")
            return fn(*args)

        return run

    monkeypatch.setattr(torch, "compile", flaky_compile)
    step = Compiled(lambda x: x + 1, torch.device("cpu"))
    if when == "later call":
        assert step(1) == 2
    with pytest.raises(torch.OutOfMemoryError):
        step(1)
    # A compiler error after the first step is an error too, not a reason to go eager.
    monkeypatch.setattr(torch, "compile", lambda fn, **kwargs: _raise_on_second(fn))
    step = Compiled(lambda x: x + 1, torch.device("cpu"))
    assert step(1) == 2
    with pytest.raises(TorchDynamoException):
        step(1)


def _raise_on_second(fn):
    calls = []

    def run(*args):
        calls.append(args)
        if len(calls) > 1:
            raise TorchDynamoException("recompiling failed")
        return fn(*args)

    return run


def test_tf32_without_cuda_warns_and_trains_in_fp32(losses: Losses, caplog: pytest.LogCaptureFixture) -> None:
    if torch.cuda.is_available():
        pytest.skip("tf32 is used on CUDA; the fallback only happens without it")
    with caplog.at_level(logging.WARNING, logger="mnist_vae.training.precision"):
        tf32 = losses(TrainConfig(device="cpu", epochs=2, batch_size=32, precision="tf32"))
    assert any("tf32 needs CUDA" in r.getMessage() for r in caplog.records)
    assert tf32 == losses(TrainConfig(device="cpu", epochs=2, batch_size=32))


def test_bf16_autocast_trains(losses: Losses) -> None:
    history = losses(TrainConfig(device="cpu", epochs=3, batch_size=32, lr=3e-3, precision="bf16"))
    assert all(torch.isfinite(torch.tensor(history)))
    assert history[-1] < history[0]


def test_iwae_objective_and_dynamic_binarisation_train(losses: Losses) -> None:
    history = losses(
        TrainConfig(
            device="cpu", epochs=3, batch_size=32, lr=3e-3, objective="iwae", iw_samples=5, binarize=True
        )
    )
    assert history[-1] < history[0]


def test_burda_schedule_steps_down_after_3_to_the_i_passes() -> None:
    cfg = TrainConfig(epochs=3280, lr=1e-3, schedule="burda")
    per_epoch = 10
    rates = [learning_rate(cfg, epoch * per_epoch, per_epoch) for epoch in (0, 1, 3, 4, 12, 13, 3279)]
    expected = [1e-3 * 10 ** (-i / 7) for i in (0, 1, 1, 2, 2, 3, 7)]
    assert rates == pytest.approx(expected)


def test_validation_split_is_scored_each_epoch_without_changing_training(
    images: np.ndarray, tiny_images: Callable[..., tuple[np.ndarray, np.ndarray]]
) -> None:
    cfg = TrainConfig(device="cpu", epochs=3, batch_size=32, lr=3e-3, seed=2)
    held_out = tiny_images(64, seed=9)[0]

    def run(validation: np.ndarray | None) -> list:
        model = build_model(ModelConfig(preset="mlp", hidden=(32,), latent=4), seed=cfg.seed)
        return list(Trainer(model, images, cfg, validation=validation).epochs())

    with_split, without = run(held_out), run(None)
    scores = [s.val_neg_elbo for s in with_split]
    assert all(score is not None and np.isfinite(score) and score > 0 for score in scores)
    assert scores[-1] < scores[0], "the model learns the bars, also on images it never saw"
    assert [s.val_neg_elbo for s in without] == [None] * 3
    # Validating draws from a generator of its own: training goes exactly as without it.
    assert [s.loss for s in with_split] == [s.loss for s in without]
    assert "val_neg_elbo" in with_split[0].metrics() and "val_neg_elbo" not in without[0].metrics()


def test_threads_auto_takes_a_share_of_the_cores(images: np.ndarray) -> None:
    cfg = TrainConfig(device="cpu", epochs=1, batch_size=32)
    assert cfg.threads == "auto"
    model = build_model(ModelConfig(preset="mlp", hidden=(8,), latent=2), seed=0)
    (stats,) = list(train_epochs(model, images, cfg))
    assert 1 <= stats.threads <= available_cores()


def test_cuda_without_a_gpu_is_a_user_error() -> None:
    if torch.cuda.is_available():
        pytest.skip("this machine has a GPU")
    with pytest.raises(DeviceError, match="train.device is 'cuda' but no CUDA device") as info:
        resolve_device("cuda")
    assert isinstance(info.value, UserError)
    assert resolve_device("auto") == torch.device("cpu")


@pytest.mark.parametrize("which", ["training", "validation"])
def test_images_other_than_uint8_are_a_user_error_naming_the_dtype(images: np.ndarray, which: str) -> None:
    cfg = TrainConfig(device="cpu", epochs=1, batch_size=32)
    floats = images.astype(np.float32) / 255
    train, validation = (floats, images[:32]) if which == "training" else (images, floats[:32])
    model = build_model(TINY["mlp"], seed=0)
    with pytest.raises(
        TrainingDataError,
        match=rf"^{which} images: expected uint8 grey levels 0-255, "
        r"got dtype float32$",
    ) as info:
        Trainer(model, train, cfg, validation=validation)
    assert isinstance(info.value, UserError) and isinstance(info.value, ValueError)


def test_a_batch_that_does_not_split_over_the_processes_is_a_config_error(
    images: np.ndarray, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(train_module, "rank_and_world", lambda: (0, 3))
    model = build_model(TINY["mlp"], seed=0)
    with pytest.raises(
        ConfigError,
        match=r"^train.batch_size: expected a multiple of the 3 processes, "
        r"so that each step's batch splits evenly over them, got 32$",
    ):
        Trainer(model, images, TrainConfig(device="cpu", epochs=1, batch_size=32))
    # Fewer images than train.batch_size: the batch is all of them, and the message says so.
    with pytest.raises(
        ConfigError,
        match=r"got 100 \(the number of training images, fewer than "
        r"train.batch_size\)$",
    ):
        Trainer(model, images[:100], TrainConfig(device="cpu", epochs=1, batch_size=128))


def test_kl_warmup_weighs_the_kl_term_from_zero_to_one(images: np.ndarray) -> None:
    """Over the first ``kl_warmup`` epochs the KL term's weight rises linearly to 1, then stays; the
    loss the trainer minimises at weight w is recon + w * KL."""
    cfg = TrainConfig(device="cpu", epochs=3, batch_size=32, seed=0, threads=1, kl_warmup=2)
    trainer = Trainer(build_model(TINY["conv"], seed=0), images, cfg)
    weights = []
    for step in (0, 3, 7, 8, 20):
        trainer.step = step
        weights.append(trainer.kl_weight())
    assert weights == pytest.approx([1 / 8, 4 / 8, 1.0, 1.0, 1.0])
    x = torch.from_numpy(images[:8].reshape(8, 784)).float() / 255
    torch.manual_seed(0)
    full = training_loss(trainer.model, x)
    torch.manual_seed(0)
    half = training_loss(trainer.model, x, kl_weight=0.5)
    assert half.loss.item() == pytest.approx((full.recon + 0.5 * full.kl).mean().item(), rel=1e-6)


def test_training_flops_count_forward_and_backward() -> None:
    """A linear layer's step costs 2 * in * out operations per row forward and twice that backward
    (the input's gradient and the weights'), except the first, whose input (the images) needs no
    gradient; the hierarchical model costs more than the one-layer model with the same networks."""
    mlp = build_model(ModelConfig(preset="mlp", hidden=(16,), latent=4), seed=0)
    batch = 8
    first = 2 * batch * 784 * 16
    forward = first + 2 * batch * (16 * 8 + 4 * 16 + 16 * 784)
    assert step_flops(mlp, batch) == 3 * forward - first
    cfg = TrainConfig(batch_size=8, epochs=5)
    assert training_flops(mlp, cfg, 100) == (3 * forward - first) * (100 // 8) * 5
    conv, hvae = (build_model(TINY[p], seed=0) for p in ("conv", "hvae"))
    assert step_flops(hvae, batch) > step_flops(conv, batch)
