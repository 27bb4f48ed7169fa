"""Tests for :mod:`mnist_vae.serving.pyfunc` in this process, on an untrained tiny model: the input checks
and every output of the pyfunc model. The real `mlflow models serve` is in tests/e2e/test_serving.py."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from mlflow.exceptions import MlflowException

from mnist_vae.config import ModelConfig
from mnist_vae.evaluation.figures import reconstruct
from mnist_vae.models.families import build_model
from mnist_vae.models.weights import save_model
from mnist_vae.serving.inputs import as_batch
from mnist_vae.serving.pyfunc import WEIGHTS_FILE, ServedVAE, _load_pyfunc, signature

LATENT = 3


# The presets a user registers: every output works for the MLP, the convolutional model and the
# two-layer HVAE (whose `latent` output is its top layer z2's posterior, LATENT units here).
PRESETS = {
    "mlp": ModelConfig(preset="mlp", hidden=(16,), latent=LATENT),
    "conv": ModelConfig(preset="conv", channels=(4, 8), blocks=1, dense=16, latent=LATENT),
    "hvae": ModelConfig(
        preset="hvae", channels=(4, 8), blocks=1, dense=16, latent=5, latent2=LATENT, hidden2=8
    ),
}


@pytest.fixture(params=sorted(PRESETS))
def served(request: pytest.FixtureRequest) -> ServedVAE:
    return ServedVAE(build_model(PRESETS[request.param], seed=0))


def _batch(n: int) -> np.ndarray:
    return np.random.default_rng(n).random((n, 784), dtype=np.float32)


def test_as_batch_accepts_each_shape_a_body_gives() -> None:
    x = _batch(2)
    assert as_batch(np.zeros((2, 28, 28))).shape == (2, 784)
    np.testing.assert_array_equal(as_batch(x[0]), x[:1])  # one image, flat
    np.testing.assert_array_equal(as_batch(x.tolist()), x)
    np.testing.assert_array_equal(as_batch(pd.DataFrame(x)), x)
    np.testing.assert_array_equal(as_batch({"images": x}), x)  # a named input tensor
    assert as_batch(x).dtype == np.float32
    assert as_batch(np.zeros((10_000, 784), np.float32)).shape == (10_000, 784)  # the limit itself


@pytest.mark.parametrize(
    ("model_input", "expected"),
    [
        (np.zeros((2, 10)), "expected 784 values per image (28x28 flattened), got an input of shape (2, 10)"),
        (np.zeros((0, 784)), "expected at least one image, got an empty batch"),
        (np.full((1, 784), np.nan), "expected finite pixel values, got NaN or infinity"),
        (np.full((1, 784), np.inf), "expected finite pixel values"),
        (np.full((1, 784), 2.0), "expected grey levels in [0, 1] (divide 0-255 pixels by 255)"),
        (np.full((1, 784), -0.5), "expected grey levels in [0, 1]"),
        (pd.DataFrame({"a": ["x"], "b": ["y"]}), "expected numeric pixel values, column 'a' is not"),
        ([["x"] * 784], "expected numeric pixel values"),
        ({"a": np.zeros((1, 784)), "b": np.zeros((1, 784))}, "expected one input tensor"),
        (np.zeros((10_001, 784), np.float32), "expected at most 10000 images in one request, got 10001"),
        ([[0.0] * 784] * 10_001, "expected at most 10000 images in one request"),
    ],
    ids=[
        "10-values",
        "empty",
        "nan",
        "infinity",
        "above-1",
        "below-0",
        "text-columns",
        "text",
        "two-tensors",
        "too-many-images",
        "too-many-images-as-lists",
    ],
)
def test_as_batch_rejects_bad_input_as_invalid_parameter(model_input: object, expected: str) -> None:
    with pytest.raises(MlflowException) as info:
        as_batch(model_input)
    assert expected in info.value.message
    # What the scoring server turns into HTTP 400.
    assert info.value.error_code == "INVALID_PARAMETER_VALUE"


def test_reconstruction_is_the_default_output(served: ServedVAE) -> None:
    x = _batch(4)
    out = served.predict(x)
    assert out.shape == (4, 784) and out.dtype == np.float32
    assert out.min() >= 0.0 and out.max() <= 1.0
    np.testing.assert_allclose(out, reconstruct(served.model, x), atol=1e-6)
    np.testing.assert_array_equal(served.predict(x, {"output": "reconstruction"}), out)


def test_latent_output_has_mu_and_logvar_columns(served: ServedVAE) -> None:
    x = _batch(4)
    latent = served.predict(x, {"output": "latent"})
    assert list(latent.columns) == [f"mu_{i}" for i in range(LATENT)] + [f"logvar_{i}" for i in range(LATENT)]
    mu, logvar = served.model.encode(torch.from_numpy(x))
    np.testing.assert_allclose(latent.iloc[:, :LATENT].to_numpy(), mu.detach().numpy(), atol=1e-6)
    np.testing.assert_allclose(latent.iloc[:, LATENT:].to_numpy(), logvar.detach().numpy(), atol=1e-6)


def test_score_is_a_per_image_negative_elbo_fixed_by_the_seed(served: ServedVAE) -> None:
    x = _batch(4)
    score = served.predict(x, {"output": "score"})
    assert list(score.columns) == ["neg_elbo"] and len(score) == 4
    assert (score["neg_elbo"] > 0).all() and np.isfinite(score["neg_elbo"]).all()
    pd.testing.assert_frame_equal(served.predict(x, {"output": "score", "seed": 0}), score)
    assert not served.predict(x, {"output": "score", "seed": 1}).equals(score)


def test_sample_draws_n_images_whatever_the_input(served: ServedVAE) -> None:
    first = served.predict(_batch(1), {"output": "sample", "n": 5, "seed": 3})
    again = served.predict(_batch(2), {"output": "sample", "n": 5, "seed": 3})
    assert first.shape == (5, 784) and first.min() >= 0.0 and first.max() <= 1.0
    np.testing.assert_array_equal(first, again)
    assert served.predict(_batch(1), {"output": "sample"}).shape == (16, 784)  # n's default


@pytest.mark.parametrize(
    ("params", "expected"),
    [
        (
            {"output": "everything"},
            "unknown output 'everything': expected one of reconstruction, latent, score, sample",
        ),
        ({"output": "sample", "n": 0}, "parameter 'n': expected an integer in 1..1024, got 0"),
        ({"output": "sample", "n": 1025}, "parameter 'n': expected an integer in 1..1024"),
        ({"output": "sample", "n": True}, "parameter 'n': expected an integer in 1..1024, got True"),
        ({"seed": -1}, "parameter 'seed': expected an integer in 0..2147483647, got -1"),
        ({"output": "score", "latents": "yes"}, "parameter 'latents': expected true or false, got 'yes'"),
        ({"pixel_range": "0-100"}, "parameter 'pixel_range': expected one of 0-1, 0-255, got '0-100'"),
    ],
)
def test_bad_params_are_invalid_parameter_values(served: ServedVAE, params: dict, expected: str) -> None:
    with pytest.raises(MlflowException) as info:
        served.predict(_batch(1), params)
    assert expected in info.value.message and info.value.error_code == "INVALID_PARAMETER_VALUE"


def test_mlflow_loads_the_weights_folder(served: ServedVAE, tmp_path: Path) -> None:
    save_model(served.model, tmp_path / WEIGHTS_FILE)
    for path in (tmp_path, tmp_path / WEIGHTS_FILE):  # the data folder, or the file itself
        loaded = _load_pyfunc(str(path))
        assert isinstance(loaded, ServedVAE)
        np.testing.assert_array_equal(loaded.predict(_batch(3)), served.predict(_batch(3)))


def test_versions_logged_before_the_move_still_load(served: ServedVAE, tmp_path: Path) -> None:
    """Their MLmodel names ``loader_module: mnist_vae.serving``, the package now."""
    import importlib

    save_model(served.model, tmp_path / WEIGHTS_FILE)
    loaded = importlib.import_module("mnist_vae.serving")._load_pyfunc(str(tmp_path))
    np.testing.assert_array_equal(loaded.predict(_batch(2)), served.predict(_batch(2)))


def test_outside_a_server_the_model_takes_the_threads_the_environment_asks_for(
    served: ServedVAE, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """What the Spark engine relies on: spark_udf loads the model with MNIST_VAE_SERVE_THREADS=1."""
    save_model(served.model, tmp_path / WEIGHTS_FILE)
    before = torch.get_num_threads()
    try:
        monkeypatch.setenv("MNIST_VAE_SERVE_THREADS", "1")
        _load_pyfunc(str(tmp_path))
        assert torch.get_num_threads() == 1
        torch.set_num_threads(2)
        monkeypatch.delenv("MNIST_VAE_SERVE_THREADS")
        _load_pyfunc(str(tmp_path))
        assert torch.get_num_threads() == 2  # unset: left as it was
    finally:
        torch.set_num_threads(before)


def test_8_bit_grey_levels_give_the_numbers_of_their_0_1_twins(served: ServedVAE) -> None:
    """pixel_range 0-255: the model divides by 255 as everything else here does, to the last bit."""
    pixels = np.random.default_rng(0).integers(0, 256, (4, 784)).astype(np.uint8)
    grey = torch.from_numpy(pixels).float().div_(255.0).numpy()
    for output in ("score", "latent", "reconstruction"):
        a = served.predict(grey, {"output": output})
        b = served.predict(pixels.astype(np.float32), {"output": output, "pixel_range": "0-255"})
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    with pytest.raises(MlflowException, match=r"expected grey levels in \[0, 255\] \(pixel_range 0-255\)"):
        served.predict(np.full((1, 784), 256.0), {"pixel_range": "0-255"})


def test_signature_declares_the_input_and_params() -> None:
    sig = signature()
    assert sig.inputs.to_dict() == [
        {"type": "tensor", "tensor-spec": {"dtype": "float32", "shape": (-1, 784)}}
    ]
    assert {p.name: p.default for p in sig.params} == {
        "output": "reconstruction",
        "n": 16,
        "seed": 0,
        "latents": False,
        "complexity": False,
        "pixel_range": "0-1",
    }
