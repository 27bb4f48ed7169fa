"""The MLflow pyfunc flavour of a trained VAE: what ``mlflow models serve`` answers with.

The model is saved with ``loader_module="mnist_vae.serving"``: MLflow calls :func:`_load_pyfunc`
on the folder holding ``model.pt``, and the weights load with ``weights_only=True``; nothing is
unpickled. Input is a batch of 28x28 images flattened to 784 float32 grey levels in [0, 1] (divide
0-255 pixels by 255). The inference parameter ``output`` picks the answer:

- ``reconstruction`` (default): 784 grey levels per image, decoded from the posterior mean;
- ``latent``: the posterior mean and log-variance per image (``mu_i``, ``logvar_i`` columns);
- ``score``: per-image negative ELBO in nats (higher is more unusual: an anomaly score);
- ``sample``: ``n`` images decoded from the prior (the input batch only has to be valid).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch

from mnist_vae.model import N_PIXELS, VAE, kl_divergence, load_model

OUTPUTS = ("reconstruction", "latent", "score", "sample")
MAX_SAMPLES = 1024
WEIGHTS_FILE = "model.pt"


def _invalid(message: str) -> Exception:
    # MlflowException with INVALID_PARAMETER_VALUE is what the scoring server turns into HTTP 400.
    from mlflow.exceptions import MlflowException
    from mlflow.protos.databricks_pb2 import INVALID_PARAMETER_VALUE

    return MlflowException(message, error_code=INVALID_PARAMETER_VALUE)


def as_batch(model_input: Any) -> np.ndarray:
    """Validates a request body's data into a (B, 784) float32 array of grey levels in [0, 1]."""
    if isinstance(model_input, dict):
        if len(model_input) != 1:
            raise _invalid(f"expected one input tensor of shape (B, {N_PIXELS}), got keys "
                           f"{sorted(model_input)}")
        model_input = next(iter(model_input.values()))
    if isinstance(model_input, pd.DataFrame):
        non_numeric = [c for c in model_input.columns
                       if not pd.api.types.is_numeric_dtype(model_input[c])]
        if non_numeric:
            raise _invalid(f"expected numeric pixel values, column {non_numeric[0]!r} is not")
        model_input = model_input.to_numpy()
    try:
        batch = np.asarray(model_input, dtype=np.float32)
    except (TypeError, ValueError):
        raise _invalid("expected numeric pixel values: a batch of 784 floats in [0, 1] per image") from None
    if batch.ndim == 1:
        batch = batch.reshape(1, -1)
    if batch.ndim == 3 and batch.shape[1:] == (28, 28):
        batch = batch.reshape(len(batch), N_PIXELS)
    if batch.ndim != 2 or batch.shape[1] != N_PIXELS:
        raise _invalid(f"expected {N_PIXELS} values per image (28x28 flattened), got an input of "
                       f"shape {tuple(batch.shape)}")
    if len(batch) == 0:
        raise _invalid("expected at least one image, got an empty batch")
    if not np.isfinite(batch).all():
        raise _invalid("expected finite pixel values, got NaN or infinity")
    if batch.min() < 0.0 or batch.max() > 1.0:
        raise _invalid(f"expected grey levels in [0, 1] (divide 0-255 pixels by 255), got values "
                       f"in [{batch.min():g}, {batch.max():g}]")
    return batch


class ServedVAE:
    """A loaded VAE behind MLflow's ``predict(model_input, params)``."""

    def __init__(self, model: VAE) -> None:
        self.model = model.eval()

    def predict(self, model_input: Any, params: dict[str, Any] | None = None) -> Any:
        params = params or {}
        output = params.get("output", "reconstruction")
        if output not in OUTPUTS:
            raise _invalid(f"unknown output {output!r}: expected one of {', '.join(OUTPUTS)}")
        seed = _int_param(params, "seed", 0, 0, 2**31 - 1)
        generator = torch.Generator().manual_seed(seed)
        x = torch.from_numpy(as_batch(model_input))
        with torch.no_grad():
            if output == "sample":
                n = _int_param(params, "n", 16, 1, MAX_SAMPLES)
                z = torch.randn(n, self.model.latent_dim, generator=generator)
                return self.model.pixel_means(self.model.decode(z)).numpy()
            mu, logvar = self.model.encode(x)
            if output == "reconstruction":
                return self.model.pixel_means(self.model.decode(mu)).numpy()
            if output == "latent":
                d = self.model.latent_dim
                columns = [f"mu_{i}" for i in range(d)] + [f"logvar_{i}" for i in range(d)]
                return pd.DataFrame(torch.cat([mu, logvar], dim=1).numpy(), columns=columns)
            eps = torch.randn(mu.shape, generator=generator)
            z = mu + torch.exp(0.5 * logvar) * eps
            score = self.model.bernoulli_nll(self.model.decode(z), x) + kl_divergence(mu, logvar)
            return pd.DataFrame({"neg_elbo": score.numpy()})


def _int_param(params: dict[str, Any], key: str, default: int, low: int, high: int) -> int:
    value = params.get(key, default)
    if isinstance(value, bool) or not isinstance(value, int | np.integer) or not low <= value <= high:
        raise _invalid(f"parameter {key!r}: expected an integer in {low}..{high}, got {value!r}")
    return int(value)


def _load_pyfunc(data_path: str) -> ServedVAE:
    """MLflow's entry point for ``loader_module`` models; maps CUDA-trained weights to the CPU."""
    path = Path(data_path)
    weights = path / WEIGHTS_FILE if path.is_dir() else path
    return ServedVAE(load_model(weights, device="cpu"))


def signature():
    """Input: float32 (B, 784) in [0, 1]. Params: ``output``, ``n`` (sample count) and ``seed``.

    The declared output is the default one, ``reconstruction``: float32 (B, 784) in [0, 1].
    """
    from mlflow.models import ModelSignature
    from mlflow.types import ParamSchema, ParamSpec, Schema, TensorSpec

    return ModelSignature(
        inputs=Schema([TensorSpec(np.dtype(np.float32), (-1, N_PIXELS))]),
        outputs=Schema([TensorSpec(np.dtype(np.float32), (-1, N_PIXELS))]),
        params=ParamSchema([
            ParamSpec("output", "string", "reconstruction"),
            ParamSpec("n", "long", 16),
            ParamSpec("seed", "long", 0),
        ]),
    )
