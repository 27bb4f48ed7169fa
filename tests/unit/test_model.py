"""Tests for :mod:`mnist_vae.models.vae`: architectures, the loss terms, the bounds, saving and loading."""

from __future__ import annotations

import math
import os
import pickle
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
import torch

from mnist_vae.config import ModelConfig, TrainConfig
from mnist_vae.errors import UserError
from mnist_vae.models.families import build_model
from mnist_vae.models.objectives import iw_log_likelihood, kl_divergence, training_loss
from mnist_vae.models.vae import Architecture
from mnist_vae.models.weights import ModelFileError, load_model, save_model
from mnist_vae.training.trainer import Trainer, learning_rate, train_epochs

TinyImages = Callable[..., tuple[np.ndarray, np.ndarray]]


def test_seed_preset_is_the_tutorial_architecture() -> None:
    model = build_model(ModelConfig(preset="seed"))
    layers = [*model.encoder, *model.decoder]
    linear = [m for m in layers if isinstance(m, torch.nn.Linear)]
    assert sum(isinstance(m, torch.nn.ReLU) for m in layers) == 4
    shapes = [(m.in_features, m.out_features) for m in linear]
    assert shapes == [(784, 256), (256, 64), (64, 20), (10, 64), (64, 256), (256, 784)]
    assert model.loss_scale == 784


@pytest.mark.parametrize("preset", ["conv", "mlp", "seed"])
def test_shapes(preset: str) -> None:
    model = build_model(ModelConfig(preset=preset, hidden=(32, 16), latent=5))
    x = torch.rand(7, 784)
    out = model(x).out
    mu, logvar = model.encode(x)
    assert out.shape == (7, 784)
    assert mu.shape == logvar.shape == (7, model.latent_dim)
    means = model.pixel_means(out)
    assert means.min() >= 0 and means.max() <= 1


TINY_CONV = ModelConfig(preset="conv", channels=(4, 8), blocks=1, dense=16, latent=3)


def test_conv_preset_maps_images_through_two_stride_two_stages() -> None:
    model = build_model(TINY_CONV)
    convs = [m for m in model.encoder.modules() if isinstance(m, torch.nn.Conv2d)]
    # Two stride-2 stages (1->4, 4->8 channels) and one residual block of two convolutions each.
    assert [(c.in_channels, c.out_channels, c.stride) for c in convs if c.stride == (2, 2)] == [
        (1, 4, (2, 2)),
        (4, 8, (2, 2)),
    ]
    assert sum(c.stride == (1, 1) for c in convs) == 4
    # Upsampling 7 -> 14 by a transposed convolution, 14 -> 28 by a convolution to 4 channels
    # and a pixel shuffle.
    decoder = list(model.decoder.body)
    (transposed,) = [m for m in decoder if isinstance(m, torch.nn.ConvTranspose2d)]
    assert (transposed.in_channels, transposed.out_channels, transposed.stride) == (8, 4, (2, 2))
    (shuffle,) = [i for i, m in enumerate(decoder) if isinstance(m, torch.nn.PixelShuffle)]
    assert shuffle == len(decoder) - 1
    assert (decoder[shuffle - 1].in_channels, decoder[shuffle - 1].out_channels) == (4, 4)
    # Every sample dimension in front of the latent code passes through (the IWAE bound's k).
    z = torch.randn(5, 2, 3)
    assert model.decode(z).shape == (5, 2, 784)
    assert torch.allclose(model.decode(z)[1], model.decode(z[1]), atol=1e-6)


def test_residual_blocks_start_as_the_identity() -> None:
    blocks = [
        m
        for m in build_model(TINY_CONV.replace(blocks=2), seed=0).modules()
        if type(m).__name__ == "_Residual"
    ]
    assert len(blocks) == 8  # two per stage, encoder and decoder
    for block in blocks:
        h = torch.randn(3, block.body[1].in_channels, 7, 7)
        assert torch.equal(block(h), h)


def test_conv_weights_are_channels_last_and_survive_a_round_trip(tmp_path: Path) -> None:
    model = build_model(TINY_CONV, seed=0)
    first = next(m for m in model.modules() if isinstance(m, torch.nn.Conv2d))
    assert first.weight.is_contiguous(memory_format=torch.channels_last)
    save_model(model, tmp_path / "conv.pt")
    loaded = load_model(tmp_path / "conv.pt")
    assert loaded.arch == model.arch and loaded.arch.kind == "conv"
    x = torch.rand(4, 784)
    assert torch.allclose(loaded.encode(x)[0], model.eval().encode(x)[0], atol=1e-6)


def test_files_from_before_the_conv_preset_load_as_mlp() -> None:
    old = {"hidden": [16], "latent": 3, "activation": "silu", "likelihood": "bernoulli", "sigma_head": False}
    arch = Architecture.from_dict(old)
    assert arch.kind == "mlp" and arch.channels == () and arch.hidden == (16,)


def test_conv_files_from_before_the_pixel_bias_load_without_it(tmp_path: Path) -> None:
    model = build_model(TINY_CONV, seed=0)
    assert model.arch.pixel_bias and model.decoder.pixel_bias is not None
    old = {**model.arch.to_dict()}
    del old["pixel_bias"]
    arch = Architecture.from_dict(old)
    assert arch.kind == "conv" and not arch.pixel_bias
    state = {k: v for k, v in model.state_dict().items() if k != "decoder.pixel_bias"}
    torch.save({"architecture": old, "state_dict": state}, tmp_path / "old.pt")
    loaded = load_model(tmp_path / "old.pt")
    assert loaded.decoder.pixel_bias is None
    z = torch.randn(2, TINY_CONV.latent)
    with torch.no_grad():
        expected = model.eval().decode(z) - model.decoder.pixel_bias
    assert torch.allclose(loaded.decode(z), expected, atol=1e-6)


def test_training_starts_the_conv_decoder_at_the_mean_digit(tiny_images: TinyImages) -> None:
    images, _ = tiny_images(64)
    conv, mlp = build_model(TINY_CONV, seed=0), build_model(ModelConfig(preset="mlp", hidden=[8], latent=2))
    mlp_before = {k: v.clone() for k, v in mlp.state_dict().items()}
    cfg = TrainConfig(device="cpu", epochs=1, batch_size=32, threads=1)
    Trainer(conv, images, cfg)
    Trainer(mlp, images, cfg)
    mean = torch.from_numpy(images.reshape(64, 784)).double().mean(0) / 255
    start = torch.sigmoid(conv.decoder.pixel_bias.detach().double())
    assert torch.allclose(start, mean.clamp(1e-3, 1 - 1e-3), atol=1e-6)
    assert start.min() < 0.01 and start.max() > 0.3  # blank and inked pixels, not one value
    assert all(torch.equal(v, mlp_before[k]) for k, v in mlp.state_dict().items())


def test_conv_preset_learns_tiny_bars(tiny_images: TinyImages) -> None:
    images, _ = tiny_images(256)
    cfg = TrainConfig(device="cpu", epochs=5, batch_size=16, lr=1e-2, seed=3, threads=1)
    model = build_model(TINY_CONV, seed=cfg.seed)
    losses = [s.loss for s in list(train_epochs(model, images, cfg))]
    # The first epoch stays near the mean digit it starts at; the code must then carry the bars.
    assert losses[-1] < losses[0] - 20, losses


def test_kl_matches_closed_form_and_monte_carlo() -> None:
    mu = torch.tensor([[0.0, 0.0], [1.0, -2.0]])
    logvar = torch.tensor([[0.0, 0.0], [math.log(0.25), math.log(4.0)]])
    kl = kl_divergence(mu, logvar)
    # Per dimension: 0.5 * (sigma^2 + mu^2 - 1 - log sigma^2).
    expected_row2 = 0.5 * (0.25 + 1 - 1 - math.log(0.25)) + 0.5 * (4 + 4 - 1 - math.log(4))
    assert kl[0].item() == pytest.approx(0.0, abs=1e-7)
    assert kl[1].item() == pytest.approx(expected_row2, rel=1e-6)
    q = torch.distributions.Normal(mu[1], torch.exp(0.5 * logvar[1]))
    z = q.sample((200_000,))
    p = torch.distributions.Normal(0.0, 1.0)
    monte_carlo = (q.log_prob(z) - p.log_prob(z)).sum(-1).mean()
    assert monte_carlo.item() == pytest.approx(expected_row2, rel=0.02)


def test_seed_loss_is_the_tutorial_formula() -> None:
    torch.manual_seed(0)
    model = build_model(ModelConfig(preset="seed"))
    x = torch.rand(4, 784)
    torch.manual_seed(1)
    terms = training_loss(model, x)
    torch.manual_seed(1)
    out = model(x).out
    mu, logvar = model.encode(x)
    sigma2 = logvar.exp() - 1e-8
    kl = 0.5 * (mu**2 + sigma2 - torch.log(1e-8 + sigma2) - 1).sum() / (4 * 784)
    expected = torch.nn.functional.mse_loss(out, x) + kl
    assert terms.loss.item() == pytest.approx(expected.item(), rel=1e-5)


def test_one_optimisation_step_lowers_the_loss(tiny_images: TinyImages) -> None:
    torch.manual_seed(0)
    model = build_model(ModelConfig(preset="mlp", hidden=(64,), latent=4))
    x = torch.from_numpy(tiny_images(64)[0].reshape(64, 784)).float() / 255
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)

    def loss() -> float:
        torch.manual_seed(5)  # the same noise before and after the step
        return training_loss(model, x).loss

    before = loss()
    optimizer.zero_grad()
    before.backward()
    optimizer.step()
    with torch.no_grad():
        after = loss()
    assert after.item() < before.item()


def test_training_is_deterministic_and_learns(tiny_images: TinyImages) -> None:
    images, _ = tiny_images(256)
    cfg = TrainConfig(device="cpu", epochs=3, batch_size=32, lr=3e-3, seed=3)
    runs = []
    for _ in range(2):
        model = build_model(ModelConfig(preset="mlp", hidden=(32,), latent=4), seed=cfg.seed)
        runs.append([s.loss for s in list(train_epochs(model, images, cfg))])
    assert runs[0] == runs[1]
    assert runs[0][-1] < runs[0][0]


def test_cosine_schedule_with_warmup() -> None:
    cfg = TrainConfig(epochs=2, lr=1e-3, schedule="cosine", warmup_epochs=1)
    assert learning_rate(cfg, 0, 10) == pytest.approx(1e-4)
    assert learning_rate(cfg, 9, 10) == pytest.approx(1e-3)
    assert learning_rate(cfg, 19, 10) < 3e-5
    assert learning_rate(TrainConfig(schedule="constant"), 500, 10) == 1e-3


def test_importance_weighting_tightens_the_bound(tiny_images: TinyImages) -> None:
    torch.manual_seed(0)
    model = build_model(ModelConfig(preset="mlp", hidden=(32,), latent=4))
    x = torch.from_numpy(tiny_images(32)[0].reshape(32, 784)).float() / 255
    torch.manual_seed(0)
    k1 = iw_log_likelihood(model, x, 1).mean()
    torch.manual_seed(0)
    k64 = iw_log_likelihood(model, x, 64).mean()
    assert k64 > k1


def test_save_and_load_round_trip(tmp_path: Path) -> None:
    model = build_model(ModelConfig(preset="mlp", hidden=(16,), latent=3))
    save_model(model, tmp_path / "m.pt")
    loaded = load_model(tmp_path / "m.pt")
    assert loaded.arch == model.arch == Architecture.from_dict(model.arch.to_dict())
    x = torch.rand(2, 784)
    assert torch.equal(loaded.encode(x)[0], model.eval().encode(x)[0])
    assert [p.name for p in tmp_path.iterdir()] == ["m.pt"]  # no temporary file left behind


def test_loading_a_foreign_file_is_a_clear_error(tmp_path: Path) -> None:
    (tmp_path / "x.pt").write_bytes(b"not a checkpoint")
    with pytest.raises(ModelFileError, match=r"x\.pt is not a mnist-vae model") as foreign:
        load_model(tmp_path / "x.pt")
    with pytest.raises(ModelFileError, match=r"missing\.pt: no such model file") as missing:
        load_model(tmp_path / "missing.pt")
    # User errors: the stages and the CLI print them as one line.
    assert isinstance(foreign.value, UserError) and isinstance(missing.value, UserError)


class _RunsAShellCommand:
    """Unpickling this would run ``touch`` on the marker file: it must never happen."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self) -> tuple:
        return (os.system, (f"touch {self.marker}",))


def _foreign_files(folder: Path) -> dict[str, tuple[Path, str]]:
    """Files that are not models, each with what the error must say about it."""
    good = folder / "good.pt"
    save_model(build_model(ModelConfig(preset="mlp", hidden=(8,), latent=2)), good)
    files = {
        "random": (folder / "random.pt", "not a torch zip archive"),
        "truncated": (folder / "truncated.pt", "not a torch zip archive (or a truncated one)"),
        "numpy": (folder / "numpy.pt", "objects other than tensors and plain containers"),
        "code": (folder / "code.pt", "objects other than tensors and plain containers"),
        "plain pickle": (folder / "code.pkl", "not a torch zip archive"),
        "other dict": (folder / "dict.pt", "it holds a dict of ['weights']"),
        "bad architecture": (folder / "arch.pt", "its architecture or weights do not fit"),
    }
    files["random"][0].write_bytes(np.random.default_rng(0).bytes(4096))
    files["truncated"][0].write_bytes(good.read_bytes()[: good.stat().st_size // 2])
    torch.save(np.arange(5), files["numpy"][0])
    marker = folder / "code-ran"
    torch.save({"architecture": _RunsAShellCommand(marker), "state_dict": {}}, files["code"][0])
    files["plain pickle"][0].write_bytes(pickle.dumps(_RunsAShellCommand(marker)))
    torch.save({"weights": torch.zeros(2)}, files["other dict"][0])
    torch.save({"architecture": {"latent": 2}, "state_dict": {}}, files["bad architecture"][0])
    return files


def test_a_file_that_is_not_a_model_is_named_for_what_it_is_and_runs_nothing(tmp_path: Path) -> None:
    for kind, (path, expected) in _foreign_files(tmp_path).items():
        with pytest.raises(ModelFileError) as error:
            load_model(path)
        message = str(error.value)
        assert message.startswith(f"{path} is not a mnist-vae model: "), (kind, message)
        assert expected in message, (kind, message)
        assert "\n" not in message, (kind, message)
        # torch's own advice for such files is to load them unsafely: never ours.
        assert "weights_only" not in message and "WeightsUnpickler" not in message, (kind, message)
    assert not (tmp_path / "code-ran").exists(), "unpickling ran the file's code"
