"""Row (d) of the benchmark: the training seconds until a preset reaches a test negative ELBO."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import replace

import numpy as np
import pytest

from mnist_vae.bench import ROW_D, BenchSettings, time_to_target
from mnist_vae.config import ModelConfig
from mnist_vae.data import MnistData


@pytest.fixture(scope="module")
def data(tiny_images: Callable[..., tuple[np.ndarray, np.ndarray]]) -> MnistData:
    x_train, y_train = tiny_images(640, seed=1)
    x_test, y_test = tiny_images(100, seed=2)
    return MnistData(x_train=x_train, y_train=y_train, x_test=x_test, y_test=y_test)


def test_row_d_stops_at_the_first_epoch_that_reaches_the_target(data: MnistData) -> None:
    unreachable = BenchSettings(device="cpu", max_epochs_d=3, target_neg_elbo=-1.0)
    never = time_to_target(data, unreachable, "mlp", test_images=100)
    assert never.name == "d-mlp"
    assert never.seconds_to_target is None and never.epochs_to_target is None
    history = never.neg_elbo_per_epoch
    assert history is not None and len(history) == 3 and history[2] < history[1] < history[0]
    # A target first met after epoch 2: the same (seeded) training stops there, and counts the
    # training seconds of those two epochs only.
    target = history[1] + 0.25 * (history[0] - history[1])
    reached = time_to_target(data, replace(unreachable, target_neg_elbo=target), "mlp",
                             test_images=100)
    assert reached.epochs_to_target == 2
    assert reached.neg_elbo_per_epoch == pytest.approx(history[:2], rel=1e-4)
    assert reached.seconds_to_target is not None and reached.seconds_to_target > 0
    # Its speed is over those epochs: 2 x 640 images (5 full batches of 128) in that time.
    assert reached.seconds_to_target * reached.samples_per_sec == pytest.approx(2 * 640)


def test_row_d_trains_the_conv_preset_as_params_yaml_does(repo_root) -> None:
    import yaml

    params = yaml.safe_load((repo_root / "params.yaml").read_text())
    conv, settings = ROW_D["conv"]
    assert conv == ModelConfig(**{k: tuple(v) if isinstance(v, list) else v
                                  for k, v in params["model"].items()})
    assert settings == {"batch_size": params["train"]["batch_size"], "lr": params["train"]["lr"]}
    assert ROW_D["mlp"][0].preset == "mlp"
