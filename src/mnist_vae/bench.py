"""Training speed, measured side by side against the tutorial's loop on the same machine and data.

Rows (issue 4): (a) the tutorial's loop as published (torchvision MNIST + ToTensor, a shuffling
DataLoader with batch 32, the seed model, Adam 1e-3); (b) this project's trainer, seed preset, batch
32; (c) this project's trainer at its fastest settings; (d) the default preset's time to reach a fixed
test negative ELBO. Speeds are training samples per second after a warm-up, the median of several
timed windows; each of (a)-(c) also reports its training loss after the same number of samples, so a
faster row that learns worse shows it.
"""

from __future__ import annotations

import json
import os
import platform
import statistics
import tempfile
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import numpy as np
import torch

from mnist_vae.config import EvaluateConfig, ModelConfig, TrainConfig
from mnist_vae.data import MnistData
from mnist_vae.evaluate import evaluate_model
from mnist_vae.model import N_PIXELS, build_model, loss_terms
from mnist_vae.train import resolve_device, train_epochs, train_model


@dataclass
class BenchRow:
    name: str
    description: str
    batch_size: int
    samples_per_sec: float
    seconds_per_epoch: float
    loss_after_budget: float | None = None  # seed-preset loss on a fixed training subset
    seconds_to_target: float | None = None
    ratio: float | None = None


@dataclass(frozen=True)
class BenchSettings:
    chunk: int = 20_000  # samples per timed window
    windows: int = 3  # timed windows; the budget of rows (a)-(c) is chunk * windows samples
    target_neg_elbo: float = 110.0  # row (d)
    max_epochs_d: int = 20
    device: str = "auto"

    @property
    def budget(self) -> int:
        return self.chunk * self.windows


@torch.no_grad()
def _fixed_loss(model, images: np.ndarray, device: torch.device) -> float:
    """The training objective on the first 5000 training images, with fixed noise."""
    model.eval()
    torch.manual_seed(1234)
    x = torch.from_numpy(images[:5000].reshape(-1, N_PIXELS)).to(device).float() / 255.0
    loss = loss_terms(model, x).loss.item()
    model.train()
    return loss


def tutorial_loop(data: MnistData, settings: BenchSettings, workdir: Path) -> BenchRow:
    """(a): the tutorial's own input pipeline, PIL images through ToTensor and a DataLoader."""
    from torchvision import datasets, transforms

    _write_torchvision_raw(data, workdir)
    device = resolve_device(settings.device)
    dataset = datasets.MNIST(str(workdir), train=True, download=False,
                             transform=transforms.ToTensor())
    loader = torch.utils.data.DataLoader(dataset, batch_size=32, shuffle=True)
    torch.manual_seed(0)
    model = build_model(ModelConfig(preset="seed"), seed=0).to(device)
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)
    sync = _sync(device)
    rates, seen, start = [], 0, time.perf_counter()
    while seen < settings.budget:
        for x, _ in loader:
            x = x.view(-1, N_PIXELS).to(device)
            terms = loss_terms(model, x)
            optimizer.zero_grad()
            terms.loss.backward()
            optimizer.step()
            seen += len(x)
            if seen % settings.chunk < len(x):
                sync()
                now = time.perf_counter()
                rates.append(settings.chunk / (now - start))
                start = now
            if seen >= settings.budget:
                break
    rate = statistics.median(rates)
    return BenchRow("a", "tutorial loop: torchvision MNIST + ToTensor + DataLoader, seed, batch 32",
                    32, rate, 60_000 / rate, _fixed_loss(model, data.x_train, device))


def trainer_row(data: MnistData, name: str, description: str, train_cfg: TrainConfig,
                settings: BenchSettings) -> BenchRow:
    """(b)/(c): this project's trainer, ``windows`` epochs over ``chunk`` images (the same budget)."""
    device = resolve_device(settings.device)
    model = build_model(ModelConfig(preset="seed"), seed=train_cfg.seed)
    cfg = replace(train_cfg, epochs=settings.windows, limit=settings.chunk)
    history = train_model(model, data.x_train, cfg, progress=False)
    rate = statistics.median(s.samples_per_sec for s in history)
    return BenchRow(name, description, cfg.batch_size, rate, 60_000 / rate,
                    _fixed_loss(model, data.x_train, device))


def time_to_target(data: MnistData, settings: BenchSettings) -> BenchRow:
    """(d): the default preset, epoch by epoch, until the test negative ELBO reaches the target."""
    device = resolve_device(settings.device)
    cfg = TrainConfig(device=settings.device, epochs=settings.max_epochs_d)
    model = build_model(ModelConfig(), seed=cfg.seed)
    test_x, test_y = data.x_test[:2000], data.y_test[:2000]
    eval_cfg = EvaluateConfig(iw_samples=1)
    elapsed, samples, reached = 0.0, 0.0, None
    for stats in train_epochs(model, data.x_train, cfg):
        elapsed += stats.seconds
        samples += stats.samples_per_sec * stats.seconds
        neg_elbo = evaluate_model(model, test_x, test_y, eval_cfg, device).metrics["neg_elbo"]
        model.train()
        if neg_elbo <= settings.target_neg_elbo:
            reached = elapsed
            break
    rate = samples / elapsed
    return BenchRow("d", f"default preset: training seconds to test neg. ELBO <= "
                    f"{settings.target_neg_elbo:g} (2000 test images)", cfg.batch_size, rate,
                    60_000 / rate, seconds_to_target=reached)


def run_benchmark(data: MnistData, settings: BenchSettings = BenchSettings(),
                  fast: TrainConfig | None = None) -> dict:
    """Runs rows (a)-(d) and returns them with the machine's description."""
    base = TrainConfig(device=settings.device, batch_size=32, lr=1e-3, schedule="constant")
    fast = fast or replace(base, batch_size=256, lr=3e-3)
    with tempfile.TemporaryDirectory() as workdir:
        rows = [tutorial_loop(data, settings, Path(workdir))]
    rows.append(trainer_row(data, "b", "this trainer, seed preset, batch 32", base, settings))
    rows.append(trainer_row(data, "c", f"this trainer, seed preset, batch {fast.batch_size}, "
                            f"lr {fast.lr:g}", fast, settings))
    rows.append(time_to_target(data, settings))
    for row in rows:
        row.ratio = row.samples_per_sec / rows[0].samples_per_sec
    return {"machine": machine(settings.device), "settings": asdict(settings),
            "rows": [asdict(r) for r in rows]}


def machine(device: str = "auto") -> dict[str, str]:
    dev = resolve_device(device)
    gpu = torch.cuda.get_device_name(0) if dev.type == "cuda" else ""
    return {"device": str(dev), "torch": torch.__version__, "cpu": _cpu_model(),
            "cpu_count": str(os.cpu_count()), "threads": str(torch.get_num_threads()), "gpu": gpu,
            "python": platform.python_version()}


def write_json(result: dict, path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(json.dumps(result, indent=2) + "\n")
    tmp.replace(path)
    return path


def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def _sync(device: torch.device):
    return torch.cuda.synchronize if device.type == "cuda" else (lambda: None)


def _write_torchvision_raw(data: MnistData, root: Path) -> None:
    """Writes the verified arrays back as the uncompressed IDX files torchvision.datasets.MNIST reads."""
    raw = root / "MNIST" / "raw"
    raw.mkdir(parents=True, exist_ok=True)
    for name, array in (("train-images-idx3-ubyte", data.x_train),
                        ("train-labels-idx1-ubyte", data.y_train),
                        ("t10k-images-idx3-ubyte", data.x_test),
                        ("t10k-labels-idx1-ubyte", data.y_test)):
        header = bytes([0, 0, 0x08, array.ndim]) + b"".join(
            int(d).to_bytes(4, "big") for d in array.shape)
        (raw / name).write_bytes(header + np.ascontiguousarray(array, dtype=np.uint8).tobytes())
