"""The training loop: one code path for CPU and CUDA, for every preset.

Its objective is :func:`mnist_vae.models.objectives.training_loss`, its speed switches live in
:mod:`.precision` and :mod:`.threads`, its progress bars in :mod:`mnist_vae.progress`.

Over 300 lines because the loop and the state it resumes from are one class: every line of
:meth:`Trainer.state_dict` mirrors one of the loop.
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import math
import time
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass
from typing import cast

import numpy as np
import torch

from mnist_vae.config import ConfigError, TrainConfig
from mnist_vae.errors import UserError
from mnist_vae.models.networks import N_PIXELS
from mnist_vae.models.objectives import neg_elbo, training_loss
from mnist_vae.models.vae import VAE
from mnist_vae.progress import EpochBars, want_progress
from mnist_vae.training.distributed import rank_and_world
from mnist_vae.training.precision import Compiled, autocast_for
from mnist_vae.training.threads import Threads

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
    threads: int = 0  # torch CPU threads used in this epoch
    val_neg_elbo: float | None = None  # nats/image on the validation split (None: no split)

    def summary(self, epochs: int) -> str:
        """One line for the log: ``epoch 3/42: loss ... img/s``."""
        return (
            f"epoch {self.epoch}/{epochs}: loss {self.loss:.4f} recon {self.recon:.3f} "
            f"kl {self.kl:.3f} mse/px {self.mse_pixel:.4f} kl/px {self.kl_pixel:.4f} "
            f"{self.samples_per_sec:,.0f} img/s"
        )

    def metrics(self) -> dict[str, float]:
        """The stats as MLflow metric names (``val_neg_elbo``, the rest ``train_*``)."""
        out = {f"train_{k}": v for k, v in asdict(self).items() if k not in ("epoch", "val_neg_elbo")}
        if self.val_neg_elbo is not None:
            out["val_neg_elbo"] = self.val_neg_elbo
        return out


class TrainingDivergedError(UserError):
    """The loss became NaN or infinite."""


class DeviceError(UserError):
    """The device asked for cannot train: none present, or out of memory."""


class TrainingDataError(UserError, ValueError):
    """The images given to the trainer are not uint8 grey levels."""


def resolve_device(name: str) -> torch.device:
    """Maps ``train.device`` (auto, cpu, cuda) to a torch device.

    Raises:
        DeviceError: ``cuda`` was asked for on a machine without a usable GPU.
    """
    if name == "cuda" and not torch.cuda.is_available():
        raise DeviceError("train.device is 'cuda' but no CUDA device is available; use auto or cpu")
    if name in ("auto", "cuda") and torch.cuda.is_available():
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def seed_everything(seed: int) -> None:
    """Seeds torch (all devices). Python's ``random`` and NumPy's global generator are left alone:
    other libraries draw from them (MLflow names its runs with ``random``), and training uses only
    torch's generators."""
    torch.manual_seed(seed)


def learning_rate(cfg: TrainConfig, step: int, steps_per_epoch: int) -> float:
    """The schedule: optional linear warm-up, then constant, cosine decay to zero, or ``burda`` (Burda
    et al. 2015: 3^i epochs at lr * 10^(-i/7), counted from the first epoch)."""
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


_Tensors = tuple[torch.Tensor, ...] | list[torch.Tensor]


def _ema_update(decay: float) -> Callable[[_Tensors, _Tensors, torch.Tensor | int], None]:
    """The averaging step of ``train.ema``: ``average += (1 - d) (weights - average)`` with
    ``d = min(decay, (1 + n) / (10 + n))`` after n updates.

    A fixed decay of 0.999 keeps the random initial weights in the average for thousands of steps
    (still 46% of it after 784 steps: a validation negative ELBO of 204 nats where the weights
    themselves scored 100); the rising decay follows the weights closely early on and averages over
    about 1/(1 - decay) steps later.
    """

    def update(average: _Tensors, current: _Tensors, updates: torch.Tensor | int) -> None:
        n = int(updates)
        torch._foreach_lerp_(average, current, 1.0 - min(decay, (1 + n) / (10 + n)))

    return update


def train_epochs(
    model: VAE,
    images: np.ndarray,
    cfg: TrainConfig,
    *,
    progress: bool | None = False,
    validation: np.ndarray | None = None,
) -> Iterator[EpochStats]:
    """Trains epoch by epoch, yielding each epoch's stats as soon as it ends."""
    trainer = Trainer(model, images, cfg, validation=validation)
    yield from trainer.epochs(progress=progress)


class Trainer:
    """The training loop with its whole state, so that it can stop and resume at an epoch's end.

    The whole training set is moved to the device once, as uint8; each batch is a slice of a
    shuffled permutation, converted to float there. This avoids a per-sample DataLoader, which on a
    small MLP costs more than the model itself.
    """

    def __init__(
        self, model: VAE, images: np.ndarray, cfg: TrainConfig, validation: np.ndarray | None = None
    ) -> None:
        """``images`` are the training images, ``validation`` the held-out ones (uint8 both).

        Raises:
            TrainingDataError: The images are not uint8.
            ConfigError: The batch does not split evenly over the processes of a distributed run.
        """
        for what, array in (("training", images), ("validation", validation)):
            if array is not None and array.dtype != np.uint8:
                raise TrainingDataError(
                    f"{what} images: expected uint8 grey levels 0-255, got dtype {array.dtype}"
                )
        self.cfg = cfg
        self.device = resolve_device(cfg.device)
        self.threads = Threads(cfg.threads)
        seed_everything(cfg.seed)
        data = torch.from_numpy(images.reshape(len(images), N_PIXELS)).to(self.device)
        self.data = data[: cfg.limit] if cfg.limit else data
        self.validation = (
            None
            if validation is None or len(validation) == 0
            else torch.from_numpy(validation.reshape(len(validation), N_PIXELS)).to(self.device)
        )
        self.batch = min(cfg.batch_size, len(self.data))
        # Drop the last partial batch: every step sees a full batch.
        self.steps_per_epoch = len(self.data) // self.batch
        self.model = model.to(self.device).train()
        # The conv decoder starts at the mean digit; a resumed run then loads its checkpoint over it.
        model.start_at_mean(self.data)
        self.rank, self.world = rank_and_world()
        if self.batch % self.world:
            got = (
                str(self.batch)
                if self.batch == cfg.batch_size
                else f"{self.batch} (the number of training images, fewer than train.batch_size)"
            )
            raise ConfigError(
                f"train.batch_size: expected a multiple of the {self.world} processes, "
                f"so that each step's batch splits evenly over them, got {got}"
            )
        # Each process has its own noise; all share the permutation generator's seed below.
        torch.manual_seed(cfg.seed + self.rank)
        self.net: torch.nn.Module = model
        if self.world > 1:
            from torch.nn.parallel import DistributedDataParallel

            self.net = DistributedDataParallel(
                model, device_ids=[self.device.index] if self.device.type == "cuda" else None
            )
        # Fused Adam: one pass over all parameters. On a 2-core CPU it trains the seed preset at
        # batch 32 about 1.3x faster than the default (foreach) implementation; on CUDA, one kernel.
        self.optimizer = torch.optim.Adam(model.parameters(), lr=cfg.lr, eps=cfg.adam_eps, fused=True)
        # Polyak averaging (train.ema): a running average of the weights after each step, which
        # validation, the saved model and everything after use; training goes on with the raw ones.
        self.average = (
            torch.optim.swa_utils.AveragedModel(model, multi_avg_fn=_ema_update(cfg.ema), use_buffers=True)
            if cfg.ema
            else None
        )
        self.autocast = autocast_for(cfg.precision, self.device)
        self.loss_fn = Compiled(training_loss, self.device) if cfg.compile else training_loss
        self.generator = torch.Generator(device=self.device).manual_seed(cfg.seed)
        # The binarisation's draws: from the shared generator in one process (as the permutation,
        # saved in the checkpoint); with several, from each rank's own.
        self.noise = self.generator
        if self.world > 1:
            text = f"{cfg.seed}:{self.rank}".encode()
            self.noise = torch.Generator(device=self.device).manual_seed(
                int.from_bytes(hashlib.sha256(text).digest()[:8], "little") >> 1
            )
        # With several processes, every rank's random states at the end of the last epoch: rank 0
        # alone writes the checkpoint, and each rank resumes from its own states, not rank 0's.
        self._rank_states: list | None = None
        self.epoch = 0  # epochs completed
        self.step = 0

    def state_dict(self) -> dict:
        """Everything a resumed run needs to continue exactly where this one stands."""
        state = {
            "model": self.model.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "generator": self.generator.get_state(),
            "torch_rng": torch.get_rng_state(),
            "epoch": self.epoch,
            "step": self.step,
        }
        if self.average is not None:
            state["average"] = self.average.state_dict()
        if self.device.type == "cuda":
            state["cuda_rng"] = torch.cuda.get_rng_state(self.device)
        if self._rank_states is not None:
            state["rank_rng"] = self._rank_states
        return state

    def load_state_dict(self, state: dict) -> None:
        self.model.load_state_dict(state["model"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.generator.set_state(state["generator"])
        torch.set_rng_state(state["torch_rng"])
        if "cuda_rng" in state and self.device.type == "cuda":
            torch.cuda.set_rng_state(state["cuda_rng"], self.device)
        ranks = state.get("rank_rng")
        if self.world > 1 and ranks is not None and len(ranks) == self.world:
            # This rank's own states (the file is rank 0's: its torch_rng is rank 0's noise).
            mine = ranks[self.rank]
            torch.set_rng_state(mine["torch_rng"])
            self.noise.set_state(mine["noise"])
            if "cuda_rng" in mine and self.device.type == "cuda":
                torch.cuda.set_rng_state(mine["cuda_rng"], self.device)
        if self.average is not None and "average" in state:
            self.average.load_state_dict(state["average"])
        self.epoch, self.step = state["epoch"], state["step"]

    def epochs(self, progress: bool | None = False) -> Iterator[EpochStats]:
        """Runs the remaining epochs, yielding each one's stats when it ends."""
        cfg = self.cfg
        log.info(
            "training on %s: %d images, batch %d, epochs %d-%d",
            self.device,
            len(self.data),
            self.batch,
            self.epoch + 1,
            cfg.epochs,
        )
        bars = EpochBars(cfg.epochs, self.steps_per_epoch, enabled=want_progress(progress), done=self.epoch)
        with bars, contextlib.closing(self.threads):
            while self.epoch < cfg.epochs:
                try:
                    stats = self._run_epoch(bars)
                except torch.OutOfMemoryError:
                    raise DeviceError(
                        f"out of memory on {self.device} training batches of {self.batch}; lower "
                        "train.batch_size (or train.iw_samples), or train on another device"
                    ) from None
                bars.end_epoch(stats.summary(cfg.epochs), stats.loss)
                yield stats
        self.model.eval()

    @property
    def result(self) -> VAE:
        """The trained model: the averaged weights with ``train.ema``, else the model itself."""
        if self.average is None:
            return self.model
        return cast(VAE, self.average.module).eval()

    def kl_weight(self) -> float:
        """The KL term's weight at the current step: rising linearly over ``train.kl_warmup`` epochs."""
        if not self.cfg.kl_warmup:
            return 1.0
        return min(1.0, (self.step + 1) / (self.cfg.kl_warmup * self.steps_per_epoch))

    def _run_epoch(self, bars: EpochBars) -> EpochStats:
        cfg, model, optimizer, batch = self.cfg, self.model, self.optimizer, self.batch
        epoch = self.epoch + 1
        threads = self.threads.update()
        start = time.perf_counter()
        order = torch.randperm(len(self.data), generator=self.generator, device=self.device)
        # Sums and the first bad step stay on the device and are read once per epoch: no host
        # synchronisation inside the loop.
        sums = torch.zeros(4, device=self.device, dtype=torch.float64)
        first_bad = torch.full((), -1, device=self.device, dtype=torch.long)
        k = cfg.iw_samples if cfg.objective == "iwae" else 1
        lr = cfg.lr
        for i in range(self.steps_per_epoch):
            lr = learning_rate(cfg, self.step, self.steps_per_epoch)
            for group in optimizer.param_groups:
                group["lr"] = lr
            index = order[i * batch : (i + 1) * batch]
            if self.world > 1:
                index = index[self.rank :: self.world]  # this process's shard of the global batch
            x = self.data[index].float().div_(255.0)
            if cfg.binarize:
                # Dynamic binarisation: a fresh Bernoulli draw of every image at every visit.
                x = torch.bernoulli(x, generator=self.noise)
            with self.autocast():
                terms = self.loss_fn(self.net, x, k, self.kl_weight())
            optimizer.zero_grad(set_to_none=True)
            terms.loss.backward()
            optimizer.step()
            if self.average is not None:
                self.average.update_parameters(model)
            with torch.no_grad():
                mse = (model.pixel_means(terms.out) - x).square().mean(-1)
                sums += torch.stack(
                    [terms.loss.detach() * len(x), terms.recon.sum(), terms.kl.sum(), mse.sum()]
                ).double()
                bad = ~torch.isfinite(terms.loss) & (first_bad < 0)
                first_bad = torch.where(bad, self.step + 1, first_bad)
            self.step += 1
            bars.advance_batch()
        if self.world > 1:
            import torch.distributed as dist

            dist.all_reduce(sums)
            dist.all_reduce(first_bad, op=dist.ReduceOp.MAX)
            mine = {"torch_rng": torch.get_rng_state(), "noise": self.noise.get_state()}
            if self.device.type == "cuda":
                mine["cuda_rng"] = torch.cuda.get_rng_state(self.device)
            states: list = [None] * self.world
            dist.all_gather_object(states, mine)
            self._rank_states = states
        seen = self.steps_per_epoch * batch
        loss, recon, kl, mse = (sums / seen).tolist()
        if first_bad.item() >= 0 or not math.isfinite(loss):
            raise TrainingDivergedError(
                f"loss became NaN or infinite in epoch {epoch} at step {first_bad.item()} "
                f"(batch {first_bad.item() - (self.step - self.steps_per_epoch)} of the epoch); "
                "lower train.lr or check the data"
            )
        self.epoch = epoch
        seconds = time.perf_counter() - start
        return EpochStats(
            epoch=epoch,
            loss=loss,
            recon=recon,
            kl=kl,
            mse_pixel=mse,
            kl_pixel=kl / N_PIXELS,
            samples_per_sec=seen / seconds,
            lr=lr,
            seconds=seconds,
            threads=threads,
            val_neg_elbo=self.validate(),
        )

    @torch.no_grad()
    def validate(self, batch: int = 1000) -> float | None:
        """Negative ELBO in nats/image on the validation split (BCE on grey levels plus KL, one
        posterior sample, as the evaluate stage measures the test set); None without a split.

        Its noise comes from a generator of its own, so validating leaves training's random
        stream, and hence its result, as it would be without.
        """
        if self.validation is None:
            return None
        model = self.result.eval()
        generator = torch.Generator(device=self.device).manual_seed(self.cfg.seed)
        total = torch.zeros((), device=self.device, dtype=torch.float64)
        for chunk in self.validation.split(batch):
            x = chunk.float().div_(255.0)
            if self.cfg.binarize:
                x = torch.bernoulli(x, generator=generator)
            eps = torch.randn((len(x), model.noise_dim), generator=generator, device=self.device)
            nll = neg_elbo(model, x, eps)
            total += nll.sum().double()
        self.model.train()
        return total.item() / len(self.validation)
