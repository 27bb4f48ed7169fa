"""The training loop: one code path for CPU and CUDA, for every preset."""

from __future__ import annotations

import logging
import math
import random
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass

import numpy as np
import torch

from mnist_vae.config import TrainConfig
from mnist_vae.model import N_PIXELS, VAE, loss_terms

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class EpochStats:
    """What one epoch measured, averaged over its training images."""

    epoch: int
    loss: float  # the minimised objective (nats/image, or per pixel for the seed preset)
    recon: float  # likelihood term per image
    kl: float  # nats per image
    mse_pixel: float  # tutorial-comparable: mean squared error per pixel of the reconstruction
    kl_pixel: float  # tutorial-comparable: KL / 784
    samples_per_sec: float
    lr: float
    seconds: float

    def metrics(self) -> dict[str, float]:
        """The stats as MLflow metric names."""
        return {f"train_{k}": v for k, v in asdict(self).items() if k != "epoch"}


class TrainingDivergedError(RuntimeError):
    """The loss became NaN or infinite."""


def resolve_device(name: str) -> torch.device:
    """Maps ``train.device`` (auto, cpu, cuda) to a torch device.

    Raises:
        RuntimeError: ``cuda`` was asked for on a machine without a usable GPU.
    """
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise RuntimeError("train.device is 'cuda' but no CUDA device is available; use auto or cpu")
    return torch.device(name)


def seed_everything(seed: int) -> None:
    """Seeds Python, NumPy and torch (all devices)."""
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def learning_rate(cfg: TrainConfig, step: int, steps_per_epoch: int) -> float:
    """The schedule: optional linear warm-up, then constant or cosine decay to zero."""
    total = cfg.epochs * steps_per_epoch
    warmup = round(cfg.warmup_epochs * steps_per_epoch)
    if step < warmup:
        return cfg.lr * (step + 1) / warmup
    if cfg.schedule == "burda":
        # Burda et al. (2015): 3^i passes at lr * 10^(-i/7) for i = 0..7; epochs beyond the
        # 3280 of the paper stay at the last rate.
        epoch, i, end = step // steps_per_epoch, 0, 1
        while epoch >= end and i < 7:
            i += 1
            end += 3**i
        return cfg.lr * 10 ** (-i / 7)
    if cfg.schedule == "cosine":
        progress = (step - warmup) / max(1, total - warmup)
        return cfg.lr * 0.5 * (1.0 + math.cos(math.pi * progress))
    return cfg.lr


def train_model(
    model: VAE,
    images: np.ndarray,
    cfg: TrainConfig,
    *,
    on_epoch: Callable[[EpochStats], None] | None = None,
    progress: bool | None = None,
) -> list[EpochStats]:
    """Trains ``model`` in place on uint8 images and returns the per-epoch history.

    Args:
        model: The VAE to train; moved to the training device.
        images: uint8 array of shape (N, 28, 28) or (N, 784).
        cfg: The ``train`` section of params.yaml.
        on_epoch: Called after each epoch, e.g. to log to MLflow.
        progress: Show progress bars; ``None`` means only when stderr is a terminal.

    Raises:
        TrainingDivergedError: The loss became NaN or infinite; names the epoch and step.
    """
    history = []
    for stats in train_epochs(model, images, cfg, progress=progress):
        history.append(stats)
        if on_epoch is not None:
            on_epoch(stats)
    return history


def train_epochs(
    model: VAE, images: np.ndarray, cfg: TrainConfig, *, progress: bool | None = False
) -> Iterator[EpochStats]:
    """Trains epoch by epoch, yielding each epoch's stats as soon as it ends.

    The whole training set is moved to the device once, as uint8; each batch is a slice of a
    shuffled permutation, converted to float there. This avoids a per-sample DataLoader, which on a
    small MLP costs more than the model itself.
    """
    assert images.dtype == np.uint8, f"expected uint8 images, got {images.dtype}"
    device = resolve_device(cfg.device)
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    seed_everything(cfg.seed)
    data = torch.from_numpy(images.reshape(len(images), N_PIXELS)).to(device)
    if cfg.limit:
        data = data[: cfg.limit]
    n = len(data)
    batch = min(cfg.batch_size, n)
    steps_per_epoch = n // batch  # drop the last partial batch: every step sees a full batch
    model.to(device).train()
    optimizer = torch.optim.Adam(model.parameters(), lr=cfg.lr)
    generator = torch.Generator(device=device).manual_seed(cfg.seed)
    log.info("training on %s: %d images, batch %d, %d epochs", device, n, batch, cfg.epochs)

    bars = _Bars(cfg.epochs, steps_per_epoch, enabled=_want_progress(progress))
    with bars:
        step = 0
        for epoch in range(1, cfg.epochs + 1):
            start = time.perf_counter()
            order = torch.randperm(n, generator=generator, device=device)
            # Sums stay on the device and are read once per epoch: no host sync inside the loop.
            sums = torch.zeros(4, device=device, dtype=torch.float64)
            for i in range(steps_per_epoch):
                lr = learning_rate(cfg, step, steps_per_epoch)
                for group in optimizer.param_groups:
                    group["lr"] = lr
                x = data[order[i * batch : (i + 1) * batch]].float().div_(255.0)
                if cfg.binarize:
                    # Dynamic binarisation: a fresh Bernoulli draw of every image at every visit.
                    x = torch.bernoulli(x, generator=generator)
                terms = loss_terms(model, x, cfg.iw_samples if cfg.objective == "iwae" else 1)
                optimizer.zero_grad(set_to_none=True)
                terms.loss.backward()
                optimizer.step()
                with torch.no_grad():
                    mse = (model.pixel_means(terms.out) - x).square().mean(-1)
                    sums += torch.stack([
                        terms.loss.detach() * batch,
                        terms.recon.sum(),
                        terms.kl.sum(),
                        mse.sum(),
                    ]).double()
                step += 1
                bars.advance_batch()
            seen = steps_per_epoch * batch
            loss, recon, kl, mse = (sums / seen).tolist()
            if not math.isfinite(loss):
                raise TrainingDivergedError(
                    f"loss became {loss} in epoch {epoch} "
                    f"(steps {step - steps_per_epoch + 1}-{step}); lower train.lr or check the data"
                )
            seconds = time.perf_counter() - start
            stats = EpochStats(
                epoch=epoch,
                loss=loss,
                recon=recon,
                kl=kl,
                mse_pixel=mse,
                kl_pixel=kl / N_PIXELS,
                samples_per_sec=seen / seconds,
                lr=lr,
                seconds=seconds,
            )
            bars.end_epoch(stats)
            yield stats
    model.eval()


def _want_progress(progress: bool | None) -> bool:
    return sys.stderr.isatty() if progress is None else progress


class _Bars:
    """Epoch and batch progress bars on a terminal, one log line per epoch otherwise."""

    def __init__(self, epochs: int, steps: int, enabled: bool) -> None:
        self.epochs, self.steps, self.enabled = epochs, steps, enabled
        self._progress = None

    def __enter__(self) -> _Bars:
        if self.enabled:
            from rich.progress import (
                BarColumn,
                MofNCompleteColumn,
                Progress,
                TextColumn,
                TimeRemainingColumn,
            )

            self._progress = Progress(
                TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
                TimeRemainingColumn(), TextColumn("{task.fields[info]}"), transient=False,
            )
            self._progress.start()
            self._epoch_task = self._progress.add_task("epochs", total=self.epochs, info="")
            self._batch_task = self._progress.add_task("batches", total=self.steps, info="")
        return self

    def __exit__(self, *exc: object) -> None:
        if self._progress is not None:
            self._progress.stop()

    def advance_batch(self) -> None:
        if self._progress is not None:
            self._progress.advance(self._batch_task)

    def end_epoch(self, s: EpochStats) -> None:
        line = (f"epoch {s.epoch}/{self.epochs}: loss {s.loss:.4f} recon {s.recon:.3f} "
                f"kl {s.kl:.3f} mse/px {s.mse_pixel:.4f} kl/px {s.kl_pixel:.4f} "
                f"{s.samples_per_sec:,.0f} img/s")
        if self._progress is None:
            log.info(line)
            return
        self._progress.update(self._epoch_task, advance=1, info=f"loss {s.loss:.4f}")
        self._progress.reset(self._batch_task, total=self.steps, info="")
        self._progress.console.log(line)
