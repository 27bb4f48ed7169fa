"""Training speed, measured side by side against the tutorial's loop on the same machine and data.

Rows (issue 4): (a) the tutorial's loop as published (torchvision MNIST + ToTensor, a shuffling
DataLoader with batch 32, the seed model, Adam 1e-3); (b) this project's trainer, seed preset, batch 32,
Adam 1e-3 at a constant rate, fp32 without compile, torch's default threads, and (b2) the same with
``torch.compile``; (c) this project's trainer at its fastest settings; (d) each preset's time to reach a
fixed test negative ELBO (rows d-mlp, d-conv and d-hvae: conv and hvae at batch 256 and lr 3e-3 as in
params.yaml, mlp at batch 128 and lr 1e-3, all with the cosine schedule); (e0)-(e2) one default-preset
training alone and two at once, with ``train.threads: auto`` and with torch's default threads, each
training a process of its own. Speeds of (a)-(c) are training samples per second after a warm-up, the
median of several timed windows; the windows of (a)-(c) take turns, so a shared machine whose speed
drifts slows all rows alike. Each of (a)-(c) also reports its loss after the same number of training
samples, so a faster row that learns worse shows it. (d) reports the speed over its epochs, (e0)-(e2)
the trainings' summed speed in their second epoch (the first warms up).

Over 300 lines because its four rows (the tutorial's loop, the trainer, several trainings at
once and time to a target) share their settings and timing code, which a split would repeat.
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal, TypedDict, cast, get_args

import numpy as np
import torch

from mnist_vae.bench.report import EXPERIMENT, BenchmarkResult, log_run, machine, print_tables, table
from mnist_vae.bench.report import write_json as write_json  # re-exported: the CLI writes through it
from mnist_vae.config import Device, EvaluateConfig, ModelConfig, TrainConfig
from mnist_vae.data.dataset import ImageData
from mnist_vae.evaluation.metrics import evaluate_model
from mnist_vae.models.families import build_model
from mnist_vae.models.networks import N_PIXELS
from mnist_vae.models.objectives import training_loss
from mnist_vae.models.vae import VAE
from mnist_vae.training.trainer import resolve_device, train_epochs

if TYPE_CHECKING:
    from rich.console import Console


@dataclass
class BenchRow:
    name: str
    description: str
    batch_size: int
    samples_per_sec: float
    seconds_per_epoch: float
    loss_after_budget: float | None = None  # seed-preset loss on the first 5000 test images
    seconds_to_target: float | None = None
    ratio: float | None = None
    epochs_to_target: int | None = None  # row (d): the epoch that reached the target
    neg_elbo_per_epoch: list[float] | None = None  # row (d): test neg. ELBO after each epoch


@dataclass(frozen=True)
class BenchSettings:
    chunk: int = 20_000  # samples per timed window
    windows: int = 3  # timed windows after one warm-up window of the same size
    target_neg_elbo: float = 100.0  # row (d)
    max_epochs_d: int = 30
    device: str = "auto"  # train.device: auto, cpu or cuda

    def __post_init__(self) -> None:
        if self.device not in get_args(Device):
            raise ValueError(f"device: expected auto, cpu or cuda, got {self.device!r}")

    @property
    def train_device(self) -> Device:
        """``device`` as ``train.device`` takes it (checked on construction)."""
        return cast(Device, self.device)

    @property
    def budget(self) -> int:
        """Training samples of each of rows (a)-(c): the warm-up window and the timed ones."""
        return self.chunk * (self.windows + 1)


class BenchResult(BenchmarkResult):
    """What :func:`run_benchmark` returns and the JSON holds; ``rows`` are :class:`BenchRow` as dicts."""

    rows: list[dict[str, Any]]


@torch.no_grad()
def _fixed_loss(model: VAE, images: np.ndarray, device: torch.device) -> float:
    """The seed's training objective on the first 5000 test images, with fixed noise."""
    model.eval()
    torch.manual_seed(1234)
    x = torch.from_numpy(images[:5000].reshape(-1, N_PIXELS)).to(device).float() / 255.0
    loss = training_loss(model, x).loss.item()
    model.train()
    return loss


@dataclass
class _TimedRow:
    """A row of (a)-(c) being measured: its timed windows come one at a time, so rows interleave."""

    name: str
    description: str
    batch_size: int
    windows: Iterator[float]  # samples per second of each window, the warm-up first
    final_loss: Callable[[], float]


def tutorial_loop(data: ImageData, settings: BenchSettings) -> _TimedRow:
    """(a): the tutorial's own input pipeline, PIL images through ToTensor and a DataLoader."""
    from PIL import Image
    from torchvision import transforms

    to_tensor = transforms.ToTensor()

    class TutorialMnist(torch.utils.data.Dataset):
        """Does per sample what ``torchvision.datasets.MNIST.__getitem__`` does, from our arrays."""

        def __len__(self) -> int:
            return len(data.y_train)

        def __getitem__(self, i: int) -> tuple[torch.Tensor, int]:
            return to_tensor(Image.fromarray(data.x_train[i], mode="L")), int(data.y_train[i])

    device = resolve_device(settings.device)
    loader = torch.utils.data.DataLoader(TutorialMnist(), batch_size=32, shuffle=True)
    torch.manual_seed(0)
    model = build_model(ModelConfig(preset="seed"), seed=0).to(device)
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)
    sync = _sync(device)

    def windows() -> Iterator[float]:
        seen, start = 0, time.perf_counter()
        while True:
            for x, _ in loader:
                x = x.view(-1, N_PIXELS).to(device)
                terms = training_loss(model, x)
                optimizer.zero_grad()
                terms.loss.backward()
                optimizer.step()
                seen += len(x)
                if seen % settings.chunk < len(x):
                    sync()
                    rate = settings.chunk / (time.perf_counter() - start)
                    yield rate  # the other rows run their window now: not timed here
                    start = time.perf_counter()

    return _TimedRow(
        "a",
        "tutorial loop: PIL images, ToTensor, DataLoader",
        32,
        windows(),
        lambda: _fixed_loss(model, data.x_test, device),
    )


def trainer_row(
    data: ImageData, name: str, description: str, train_cfg: TrainConfig, settings: BenchSettings
) -> _TimedRow:
    """(b)/(c): this project's trainer, one epoch of ``chunk`` images per window.

    The budget in samples is the same as row (a)'s; the first epoch is the warm-up window.
    """
    device = resolve_device(settings.device)
    model = build_model(ModelConfig(preset="seed"), seed=train_cfg.seed)
    cfg = train_cfg.replace(epochs=settings.windows + 1, limit=settings.chunk)
    epochs = train_epochs(model, data.x_train, cfg)
    return _TimedRow(
        name,
        description,
        cfg.batch_size,
        (s.samples_per_sec for s in epochs),
        lambda: _fixed_loss(model, data.x_test, device),
    )


def measure_interleaved(rows: list[_TimedRow], settings: BenchSettings) -> list[BenchRow]:
    """Runs the rows' windows in turn (a, b, c, a, b, c, ...), so that a machine whose speed
    drifts (a shared VM) slows every row alike and the ratios stay fair."""
    rates: dict[str, list[float]] = {row.name: [] for row in rows}
    for _ in range(settings.windows + 1):
        for row in rows:
            rates[row.name].append(next(row.windows))
    results: list[BenchRow] = []
    for row in rows:
        rate = statistics.median(rates[row.name][1:])  # the first window is the warm-up
        results.append(
            BenchRow(row.name, row.description, row.batch_size, rate, 60_000 / rate, row.final_loss())
        )
    return results


class RowDTraining(TypedDict):
    batch_size: int
    lr: float


# Row (d)'s presets with the training settings each is run with: the two-layer hvae as in
# params.yaml (the default), conv and mlp as when each was the default (conv: batch 256, lr 3e-3;
# mlp: batch 128, lr 1e-3). All decay the learning rate over max_epochs_d.
ROW_D: dict[str, tuple[ModelConfig, RowDTraining]] = {
    "mlp": (ModelConfig(preset="mlp"), {"batch_size": 128, "lr": 1e-3}),
    "conv": (ModelConfig(), {"batch_size": 256, "lr": 3e-3}),
    "hvae": (ModelConfig(preset="hvae", latent=64), {"batch_size": 256, "lr": 3e-3}),
}


def time_to_target(
    data: ImageData, settings: BenchSettings, preset: str = "conv", test_images: int = 2000
) -> BenchRow:
    """(d): a preset trained epoch by epoch until its negative ELBO on the first ``test_images``
    test images reaches the target; the training seconds up to that epoch (evaluation not counted).
    ``seconds_to_target`` is None when ``max_epochs_d`` epochs do not reach it."""
    device = resolve_device(settings.device)
    model_cfg, train_settings = ROW_D[preset]
    cfg = TrainConfig(
        device=settings.train_device,
        epochs=settings.max_epochs_d,
        validation=0,
        threads=ROW_THREADS,
        **train_settings,
    )
    model = build_model(model_cfg, seed=cfg.seed)
    test_x, test_y = data.x_test[:test_images], data.y_test[:test_images]
    eval_cfg = EvaluateConfig(iw_samples=1)
    elapsed, samples = 0.0, 0.0
    reached: float | None = None
    history: list[float] = []
    for stats in train_epochs(model, data.x_train, cfg):
        elapsed += stats.seconds
        samples += stats.samples_per_sec * stats.seconds
        history.append(evaluate_model(model, test_x, test_y, eval_cfg, device).metrics["neg_elbo"])
        model.train()
        if history[-1] <= settings.target_neg_elbo:
            reached = elapsed
            break
    rate = samples / elapsed
    return BenchRow(
        f"d-{preset}",
        f"{preset} preset to test neg. ELBO <= {settings.target_neg_elbo:g}",
        cfg.batch_size,
        rate,
        60_000 / rate,
        seconds_to_target=reached,
        epochs_to_target=len(history) if reached is not None else None,
        neg_elbo_per_epoch=history,
    )


# Rows (a)-(d) run in this one process, one window at a time, with torch's own thread count like the
# tutorial's loop. ``train.threads: auto`` would count each row's open trainer as a training of its
# own and give each a share of the cores.
ROW_THREADS = 0


def run_benchmark(
    data: ImageData, settings: BenchSettings = BenchSettings(), fast: TrainConfig | None = None
) -> BenchResult:
    """Runs rows (a)-(e) and returns them with the machine's description."""
    base = TrainConfig(
        device=settings.train_device, batch_size=32, lr=1e-3, schedule="constant", threads=ROW_THREADS
    )
    # The fastest settings measured on a 2-core CPU (README): batch 256 with torch.compile, lr raised
    # for the larger batch. On a GPU the same settings add CUDA graphs (compile's reduce-overhead).
    fast = fast or base.replace(batch_size=256, lr=3e-3, compile=True)
    timed = [
        tutorial_loop(data, settings),
        trainer_row(data, "b", "this trainer, seed preset", base, settings),
        trainer_row(data, "b2", "row b with torch.compile", base.replace(compile=True), settings),
        trainer_row(
            data,
            "c",
            f"this trainer, seed, lr {fast.lr:g}{', compile' if fast.compile else ''}, {fast.precision}",
            fast,
            settings,
        ),
    ]
    rows = measure_interleaved(timed, settings)
    rows.extend(time_to_target(data, settings, preset) for preset in ROW_D)
    rows.extend(concurrent_rows(data, settings))
    for row in rows:
        row.ratio = row.samples_per_sec / rows[0].samples_per_sec
    return {
        "machine": machine(settings.device),
        "settings": asdict(settings),
        "rows": [asdict(r) for r in rows],
    }


def _speed_of_one_training(images: np.ndarray, threads: int | Literal["auto"], device: Device) -> float:
    """Images/s of the default preset's second epoch over ``images`` (the first warms up)."""
    cfg = TrainConfig(device=device, epochs=2, threads=threads, validation=0)
    epochs = list(train_epochs(build_model(ModelConfig(), seed=0), images, cfg))
    return epochs[-1].samples_per_sec


def concurrent_rows(data: ImageData, settings: BenchSettings) -> list[BenchRow]:
    """(e1) one default-preset training alone, (e2) two at once with ``train.threads: auto`` and
    (e0) two at once with torch's default threads (what two trainings did before ``auto``);
    aggregate images/s. Each training is a process of its own, as under ``dvc queue start -j 2``."""
    import multiprocessing

    images = data.x_train[: settings.chunk]
    context = multiprocessing.get_context("spawn")
    runs: list[tuple[str, str, int, int | Literal["auto"]]] = [
        ("e1", "default preset, one training alone (threads auto)", 1, "auto"),
        ("e2", "default preset, two trainings at once (threads auto), together", 2, "auto"),
        ("e0", "default preset, two at once with torch's default threads, together", 2, 0),
    ]
    rows: list[BenchRow] = []
    for name, description, n, threads in runs:
        with context.Pool(n) as pool:
            rates = pool.starmap(_speed_of_one_training, [(images, threads, settings.train_device)] * n)
        rate = sum(rates)
        rows.append(BenchRow(name, description, TrainConfig().batch_size, rate, 60_000 / rate))
    return rows


def print_table(result: BenchResult, console: Console | None = None) -> None:
    """The rows as a rich table, with the machine in the title."""
    m = result["machine"]
    title = (
        f"training speed on {m['device']} ({m['gpu'] or m['cpu']}, {m['threads']} threads, "
        f"torch {m['torch']})"
    )
    columns = ("row", "what", "batch", "samples/s", "s/epoch", "x (a)", "loss at budget", "s to target")
    rows = (_cells(BenchRow(**r)) for r in result["rows"])
    print_tables([table(title, columns, rows, left="what")], console)


def _cells(r: BenchRow) -> list[str]:
    return [
        r.name,
        r.description,
        str(r.batch_size),
        f"{r.samples_per_sec:,.0f}",
        f"{r.seconds_per_epoch:.1f}",
        f"{r.ratio:.2f}",
        "" if r.loss_after_budget is None else f"{r.loss_after_budget:.4f}",
        "" if r.seconds_to_target is None else f"{r.seconds_to_target:.1f}",
    ]


def log_to_mlflow(result: BenchResult, json_path: Path, experiment: str = EXPERIMENT) -> str:
    """Logs the result as a run of its own experiment; returns the run id."""
    metrics = {
        f"{r['name']}_{key}": r[key]
        for r in result["rows"]
        for key in ("samples_per_sec", "seconds_per_epoch", "ratio", "loss_after_budget", "seconds_to_target")
        if r[key] is not None
    }
    return log_run(result, json_path, experiment, "bench", metrics)


def _sync(device: torch.device) -> Callable[[], None]:
    return torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
