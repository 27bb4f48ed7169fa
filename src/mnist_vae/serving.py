"""The MLflow pyfunc flavour of a trained VAE: what ``mlflow models serve`` answers with.

The model is saved with ``loader_module="mnist_vae.serving"``: MLflow calls :func:`_load_pyfunc`
on the folder holding ``model.pt``, and the weights load with ``weights_only=True``; only tensors
and plain containers are unpickled, never arbitrary objects. Input is a batch of 28x28 images
flattened to 784 float32 grey levels in [0, 1] (divide 0-255 pixels by 255). The inference parameter
``output`` picks the answer:

- ``reconstruction`` (default): 784 grey levels per image, decoded from the posterior mean;
- ``latent``: the posterior mean and log-variance per image (``mu_i``, ``logvar_i`` columns);
- ``score``: per-image negative ELBO in nats (higher is more unusual: an anomaly score);
- ``sample``: ``n`` images decoded from the prior (the input batch only has to be valid).
"""

from __future__ import annotations

import os
import re
import socket
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import pandas as pd
import torch

from mnist_vae.errors import UserError
from mnist_vae.model import N_PIXELS, VAE, kl_divergence, load_model

if TYPE_CHECKING:
    from mlflow.models import ModelSignature

OUTPUTS = ("reconstruction", "latent", "score", "sample")
MAX_SAMPLES = 1024
# Images in one request: 10,000 are 31 MB of pixels, and the forward pass holds a few times that.
# A larger body is refused with a 400 before any work; bulk scoring is `mnist-vae score`'s job.
MAX_IMAGES = 10_000
WEIGHTS_FILE = "model.pt"
# torch threads of each serving process; default: the cores divided among the server's workers.
THREADS_ENV = "MNIST_VAE_SERVE_THREADS"


class ServingConfigError(UserError, ValueError):
    """The serving process's environment holds a setting it cannot use."""


def _invalid(message: str) -> Exception:
    # MlflowException with INVALID_PARAMETER_VALUE is what the scoring server turns into HTTP 400.
    from mlflow.exceptions import MlflowException
    from mlflow.protos.databricks_pb2 import INVALID_PARAMETER_VALUE

    return MlflowException(message, error_code=INVALID_PARAMETER_VALUE)


@dataclass(frozen=True)
class PixelMessages:
    """What :func:`checked_pixels` says of each fault, in the words of the caller's input.

    ``shape`` is formatted with ``shape``, ``dtype`` with ``dtype``, ``out_of_range`` with ``low``
    and ``high``.
    """

    shape: str
    empty: str
    dtype: str
    not_finite: str
    out_of_range: str


def checked_pixels(
    array: np.ndarray, messages: PixelMessages, error: Callable[[str], Exception]
) -> np.ndarray:
    """A batch of images as (N, 784): uint8 as it is, any float type as float32 in [0, 1].

    (N, 28, 28) is flattened. Raises ``error(message)`` for another shape, an empty batch, another
    dtype, or grey levels that are not finite or outside [0, 1].
    """
    if array.ndim == 3 and array.shape[1:] == (28, 28):
        array = array.reshape(len(array), N_PIXELS)
    if array.ndim != 2 or array.shape[1] != N_PIXELS:
        raise error(messages.shape.format(shape=tuple(array.shape)))
    if len(array) == 0:
        raise error(messages.empty)
    if array.dtype == np.uint8:
        return array
    if not np.issubdtype(array.dtype, np.floating):
        raise error(messages.dtype.format(dtype=array.dtype))
    array = array.astype(np.float32, copy=False)
    # min and max propagate NaN and keep infinities, so two passes check finiteness and range.
    low, high = float(array.min()), float(array.max())
    if not (np.isfinite(low) and np.isfinite(high)):
        raise error(messages.not_finite)
    if low < 0.0 or high > 1.0:
        raise error(messages.out_of_range.format(low=f"{low:g}", high=f"{high:g}"))
    return array


_REQUEST_MESSAGES = PixelMessages(
    shape=f"expected {N_PIXELS} values per image (28x28 flattened), got an input of shape {{shape}}",
    empty="expected at least one image, got an empty batch",
    dtype="expected numeric pixel values, got dtype {dtype}",
    not_finite="expected finite pixel values, got NaN or infinity",
    out_of_range="expected grey levels in [0, 1] (divide 0-255 pixels by 255), got values in [{low}, {high}]",
)


def as_batch(model_input: Any) -> np.ndarray:
    """Validates a request body's data into a (B, 784) float32 array of grey levels in [0, 1]."""
    if isinstance(model_input, dict):
        if len(model_input) != 1:
            raise _invalid(
                f"expected one input tensor of shape (B, {N_PIXELS}), got keys {sorted(model_input)}"
            )
        model_input = next(iter(model_input.values()))
    if isinstance(model_input, pd.DataFrame):
        non_numeric = [c for c in model_input.columns if not pd.api.types.is_numeric_dtype(model_input[c])]
        if non_numeric:
            raise _invalid(f"expected numeric pixel values, column {non_numeric[0]!r} is not")
        model_input = model_input.to_numpy()
    if np.ndim(model_input) > 1 and len(model_input) > MAX_IMAGES:
        raise _invalid(
            f"expected at most {MAX_IMAGES} images in one request, got {len(model_input)}: split the "
            "batch, or score in bulk with `mnist-vae score`"
        )
    try:
        batch = np.asarray(model_input, dtype=np.float32)
    except (TypeError, ValueError):
        raise _invalid("expected numeric pixel values: a batch of 784 floats in [0, 1] per image") from None
    if batch.ndim == 1:
        batch = batch.reshape(1, -1)
    return checked_pixels(batch, _REQUEST_MESSAGES, _invalid)


class ServedVAE:
    """A loaded VAE behind MLflow's ``predict(model_input, params)``."""

    def __init__(self, model: VAE) -> None:
        self.model = model.eval()
        d = model.latent_dim
        self._latent_columns = [f"mu_{i}" for i in range(d)] + [f"logvar_{i}" for i in range(d)]

    def predict(self, model_input: Any, params: dict[str, Any] | None = None) -> Any:
        params = params or {}
        output = params.get("output", "reconstruction")
        if output not in OUTPUTS:
            raise _invalid(f"unknown output {output!r}: expected one of {', '.join(OUTPUTS)}")
        seed = _int_param(params, "seed", 0, 0, 2**31 - 1)
        x = torch.from_numpy(as_batch(model_input))
        with torch.inference_mode():
            if output == "sample":
                n = _int_param(params, "n", 16, 1, MAX_SAMPLES)
                z = torch.randn(n, self.model.latent_dim, generator=torch.Generator().manual_seed(seed))
                return self.model.pixel_means(self.model.decode(z)).numpy()
            if output == "score":
                eps = torch.randn(
                    (len(x), self.model.latent_dim), generator=torch.Generator().manual_seed(seed)
                )
                return pd.DataFrame({"neg_elbo": neg_elbo(self.model, x, eps).numpy()})
            mu, logvar = self.model.encode(x)
            if output == "reconstruction":
                return self.model.pixel_means(self.model.decode(mu)).numpy()
            return pd.DataFrame(torch.cat([mu, logvar], dim=1).numpy(), columns=self._latent_columns)


def neg_elbo(model: VAE, x: torch.Tensor, eps: torch.Tensor) -> torch.Tensor:
    """Per-image negative ELBO in nats with one posterior draw ``z = mu + sigma * eps``.

    The ``score`` output, and what ``mnist-vae score`` writes: -log p(x | z) under the Bernoulli
    likelihood plus KL(q(z | x) || p(z)) (Kingma & Welling 2014, eq. 10).
    """
    mu, logvar = model.encode(x)
    z = mu + torch.exp(0.5 * logvar) * eps
    return model.bernoulli_nll(model.decode(z), x) + kl_divergence(mu, logvar)


def _int_param(params: dict[str, Any], key: str, default: int, low: int, high: int) -> int:
    value = params.get(key, default)
    if isinstance(value, bool) or not isinstance(value, int | np.integer) or not low <= value <= high:
        raise _invalid(f"parameter {key!r}: expected an integer in {low}..{high}, got {value!r}")
    return int(value)


def _load_pyfunc(data_path: str) -> ServedVAE:
    """MLflow's entry point for ``loader_module`` models; maps CUDA-trained weights to the CPU.

    Inside ``mlflow models serve`` it also sets this worker's torch threads and turns Nagle's
    algorithm off on the connections it accepts (see :func:`_tune_server_process`).
    """
    path = Path(data_path)
    weights = path / WEIGHTS_FILE if path.is_dir() else path
    served = ServedVAE(load_model(weights, device="cpu"))
    workers = _server_workers()
    if workers is not None:
        _tune_server_process(workers)
    return served


def _server_workers() -> int | None:
    """``--workers`` of the uvicorn that runs MLflow's scoring server in this process, else None.

    With one worker uvicorn serves in its own process; with more, each worker is a child of the
    uvicorn supervisor. MLflow always passes ``--workers N``.
    """
    for pid in ("self", str(os.getppid())):
        try:
            args = Path(f"/proc/{pid}/cmdline").read_bytes().decode(errors="replace").split("\0")
        except OSError:  # not Linux, or the parent is gone
            return None
        if len(args) > 1 and any(Path(a).name == "uvicorn" for a in args[:2]):
            match = re.search(r"--workers[= ](\d+)", " ".join(args))
            return int(match.group(1)) if match else 1
    return None


def _tune_server_process(workers: int) -> None:
    """Per-worker settings of a serving process.

    Threads: torch uses every core by default, so with two workers on two cores each request's
    forward pass asks for both cores while the other worker and the event loops want them too.
    Each worker takes its share, ``cores // workers`` (all of them for one worker), unless
    ``$MNIST_VAE_SERVE_THREADS`` says otherwise.

    TCP_NODELAY: with ``--workers`` > 1, uvicorn (0.54) binds the listening socket itself with
    ``proto`` 0, so asyncio does not set TCP_NODELAY on accepted connections; every keep-alive
    response's body then waits for the client's delayed ACK, ~40 ms on Linux
    (github.com/Kludex/uvicorn/issues/3149). Linux copies TCP_NODELAY from a listening socket to
    the connections it accepts, so it is set on the server socket this worker inherited.
    """
    threads = os.environ.get(THREADS_ENV, "").strip()
    if threads and not (threads.isdigit() and int(threads) > 0):
        raise ServingConfigError(f"${THREADS_ENV}: expected a positive integer, got {threads!r}")
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    torch.set_num_threads(int(threads) if threads else max(1, cores // workers))
    sockets = _nodelay_on_server_sockets()
    # One line per worker in the server's log: what it runs with, read back from torch and the socket.
    print(
        f"mnist-vae serving worker {os.getpid()}: {torch.get_num_threads()} torch threads "
        f"({workers} workers, {cores} cores), TCP_NODELAY on {sockets} server sockets",
        file=sys.stderr,
        flush=True,
    )


def _nodelay_on_server_sockets() -> int:
    """Sets TCP_NODELAY on this process's bound, unconnected TCP sockets (the server's socket);
    returns how many it set it on.

    Not only listening ones: the first worker loads the model before its server calls ``listen()``
    on the socket the supervisor bound, and may finish loading before any other worker does.
    """
    try:
        fds = [int(fd) for fd in os.listdir("/proc/self/fd")]
    except OSError:  # not Linux: nothing to do, asyncio's behaviour elsewhere differs anyway
        return 0
    done = 0
    for fd in fds:
        try:
            sock = socket.socket(fileno=fd)  # reads family, type and protocol from the fd
        except OSError:  # not a socket, or closed since listed
            continue
        try:
            if (
                sock.family in (socket.AF_INET, socket.AF_INET6)
                and sock.type == socket.SOCK_STREAM
                and sock.getsockname()[1] != 0
                and not _connected(sock)
            ):
                sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
                done += sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY) != 0
        except OSError:
            pass
        finally:
            sock.detach()  # the fd stays open: it belongs to the server
    return done


def _connected(sock: socket.socket) -> bool:
    try:
        sock.getpeername()
    except OSError:
        return False
    return True


def pip_requirements() -> list[str]:
    """The pinned packages a logged model of this flavour needs, at this environment's versions.

    Given explicitly: MLflow would infer them by loading the model in a subprocess (seconds).
    """
    import importlib.metadata as md

    return [f"{pkg}=={md.version(pkg)}" for pkg in ("torch", "numpy", "pandas", "mlflow")]


def signature() -> ModelSignature:
    """Input: float32 (B, 784) in [0, 1]. Params: ``output``, ``n`` (sample count) and ``seed``.

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
            ]
        ),
    )
