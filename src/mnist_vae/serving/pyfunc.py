"""The MLflow pyfunc flavour of a trained VAE: what ``mlflow models serve`` answers with.

The model is saved with ``loader_module="mnist_vae.serving.pyfunc"``: MLflow calls :func:`_load_pyfunc`
on the folder holding ``model.pt``, and the weights load with ``weights_only=True``; only tensors
and plain containers are unpickled, never arbitrary objects. Input is a batch of 28x28 images
flattened to 784 float32 grey levels in [0, 1] (divide 0-255 pixels by 255, or send them with the
parameter ``pixel_range`` set to ``0-255``). The inference parameter ``output`` picks the answer:

- ``reconstruction`` (default): 784 grey levels per image, decoded from the posterior mean;
- ``latent``: the posterior mean and log-variance per image (``mu_i``, ``logvar_i`` columns);
- ``score``: per-image negative ELBO in nats (higher is more unusual: an anomaly score), one
  posterior draw per image fixed by ``seed`` and the image alone (:mod:`mnist_vae.serving.scores`);
  with ``latents`` also the posterior means ``mu_i``, with ``complexity`` also ``png_bits`` and
  ``corrected_bits`` (the score corrected for the image's complexity);
- ``sample``: ``n`` images decoded from the prior (the input batch only has to be valid).
"""

from __future__ import annotations

import shutil
import tempfile
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import pandas as pd
import torch

from mnist_vae.models.estimate import for_estimate
from mnist_vae.models.networks import N_PIXELS
from mnist_vae.models.vae import VAE
from mnist_vae.models.weights import load_model
from mnist_vae.serving import worker
from mnist_vae.serving.inputs import PIXEL_RANGES, as_batch, invalid
from mnist_vae.serving.scores import score_batch

if TYPE_CHECKING:
    from mlflow.models import ModelSignature
    from mlflow.models.model import ModelInfo

OUTPUTS = ("reconstruction", "latent", "score", "sample")
MAX_SAMPLES = 1024
WEIGHTS_FILE = "model.pt"


class ServedVAE:
    """A loaded VAE behind MLflow's ``predict(model_input, params)``."""

    def __init__(self, model: VAE) -> None:
        self.model = model.eval()
        # The score's decoder rewritten for speed (FP32, the same numbers as mnist-vae score's).
        self.scorer = for_estimate(self.model, "fp32")
        d = model.latent_dim
        self._latent_columns = [f"mu_{i}" for i in range(d)] + [f"logvar_{i}" for i in range(d)]

    def predict(self, model_input: Any, params: dict[str, Any] | None = None) -> Any:
        params = params or {}
        output = params.get("output", "reconstruction")
        if output not in OUTPUTS:
            raise invalid(f"unknown output {output!r}: expected one of {', '.join(OUTPUTS)}")
        seed = _int_param(params, "seed", 0, 0, 2**31 - 1)
        pixel_range = params.get("pixel_range", "0-1")
        if pixel_range not in PIXEL_RANGES:
            raise invalid(
                f"parameter 'pixel_range': expected one of {', '.join(PIXEL_RANGES)}, got {pixel_range!r}"
            )
        x = torch.from_numpy(as_batch(model_input, pixel_range))
        with torch.inference_mode():
            if output == "sample":
                n = _int_param(params, "n", 16, 1, MAX_SAMPLES)
                samples = self.model.sample(n, generator=torch.Generator().manual_seed(seed))
                return self.model.pixel_means(samples).numpy()
            if output == "score":
                latents, complexity = _bool_param(params, "latents"), _bool_param(params, "complexity")
                return pd.DataFrame(score_batch(self.scorer, x, seed, latents, complexity))
            if output == "reconstruction":
                return self.model.pixel_means(self.model.reconstruct(x)).numpy()
            mu, logvar = self.model.encode(x)
            return pd.DataFrame(torch.cat([mu, logvar], dim=1).numpy(), columns=self._latent_columns)


def _int_param(params: dict[str, Any], key: str, default: int, low: int, high: int) -> int:
    value = params.get(key, default)
    if isinstance(value, bool) or not isinstance(value, int | np.integer) or not low <= value <= high:
        raise invalid(f"parameter {key!r}: expected an integer in {low}..{high}, got {value!r}")
    return int(value)


def _bool_param(params: dict[str, Any], key: str) -> bool:
    value = params.get(key, False)
    if not isinstance(value, bool | np.bool_):
        raise invalid(f"parameter {key!r}: expected true or false, got {value!r}")
    return bool(value)


def _load_pyfunc(data_path: str) -> ServedVAE:
    """MLflow's entry point for ``loader_module`` models; maps CUDA-trained weights to the CPU.

    Inside ``mlflow models serve`` it also sets this worker's torch threads and turns Nagle's
    algorithm off on the connections it accepts (see :func:`mnist_vae.serving.worker.tune`);
    elsewhere (a Spark task) it sets the threads that ``$MNIST_VAE_SERVE_THREADS`` asks for.
    """
    path = Path(data_path)
    weights = path / WEIGHTS_FILE if path.is_dir() else path
    served = ServedVAE(load_model(weights, device="cpu"))
    workers = worker.server_workers()
    if workers is not None:
        worker.tune(workers)
    else:  # a Spark task or a script: the threads asked for, if any (the Spark engine asks for 1)
        worker.threads_from_env()
    return served


def pip_requirements() -> list[str]:
    """The pinned packages a logged model of this flavour needs, at this environment's versions.

    Given explicitly: MLflow would infer them by loading the model in a subprocess (seconds).
    """
    import importlib.metadata as md

    return [f"{pkg}=={md.version(pkg)}" for pkg in ("torch", "numpy", "pandas", "mlflow")]


def signature() -> ModelSignature:
    """Input: float32 (B, 784) in [0, 1]. Params: ``output``, ``n`` (sample count), ``seed``,
    ``latents`` and ``complexity`` (extra columns of ``score``), and ``pixel_range`` (``0-255``: the
    input holds 8-bit grey levels, which the model divides by 255).

    The declared output is the default one, ``reconstruction``: float32 (B, 784) in [0, 1].
    """
    from mlflow.models import ModelSignature
    from mlflow.types import ParamSchema, ParamSpec, Schema, TensorSpec

    return ModelSignature(
        inputs=Schema([TensorSpec(np.dtype(np.float32), (-1, N_PIXELS))]),
        outputs=Schema([TensorSpec(np.dtype(np.float32), (-1, N_PIXELS))]),
        params=ParamSchema(
            [
                ParamSpec("output", "string", "reconstruction"),
                ParamSpec("n", "long", 16),
                ParamSpec("seed", "long", 0),
                ParamSpec("latents", "boolean", False),
                ParamSpec("complexity", "boolean", False),
                ParamSpec("pixel_range", "string", "0-1"),
            ]
        ),
    )


def log_pyfunc(weights: Path, input_example: np.ndarray) -> ModelInfo:
    """Logs the weights file as this flavour's model ``model`` of the active MLflow run."""
    import mlflow

    # MLflow logs a folder as the model's data: one holding just the weights, removed also when
    # logging fails.
    with tempfile.TemporaryDirectory(prefix="mnist-vae-weights-") as data:
        shutil.copy2(weights, Path(data) / WEIGHTS_FILE)
        return mlflow.pyfunc.log_model(name="model", **_flavour(Path(data), input_example))


def save_pyfunc(weights: Path, folder: Path) -> Path:
    """Saves a weights file as a model folder of this flavour (what ``mlflow models serve`` takes),
    as :func:`log_pyfunc` logs it; its data goes beside it, in ``<folder>-data``.

    Raises:
        ModelFileError: ``weights`` is missing or not one of this project's weights files.
    """
    import mlflow

    load_model(weights)  # a missing or foreign file fails here, in one line
    data = folder.with_name(folder.name + "-data")
    data.mkdir(parents=True)
    shutil.copy2(weights, data / WEIGHTS_FILE)
    mlflow.pyfunc.save_model(str(folder), **_flavour(data, np.zeros((1, N_PIXELS), dtype=np.float32)))
    return folder


def _flavour(data: Path, input_example: np.ndarray) -> dict[str, Any]:
    """The arguments of ``mlflow.pyfunc.log_model`` and ``save_model`` for this flavour; the
    package's source goes with the model, so the served code is the code that logged it."""
    import mnist_vae

    return {
        "loader_module": __name__,
        "data_path": str(data),
        "code_paths": [str(Path(mnist_vae.__file__).parent)],
        "signature": signature(),
        "input_example": input_example,
        "pip_requirements": pip_requirements(),
    }
