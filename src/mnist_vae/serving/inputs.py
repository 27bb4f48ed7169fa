"""What a request or a file of images must hold: (N, 784) or (N, 28, 28) grey levels, checked once for
the served model and for bulk scoring, each fault said in the words of the caller's input."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np
import pandas as pd

from mnist_vae.models.networks import N_PIXELS

# Images in one request: 10,000 are 31 MB of pixels, and the forward pass holds a few times that.
# A larger body is refused with a 400 before any work; bulk scoring is `mnist-vae score`'s job.
MAX_IMAGES = 10_000


def invalid(message: str) -> Exception:
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
    array: np.ndarray, messages: PixelMessages, error: Callable[[str], Exception], top: float = 1.0
) -> np.ndarray:
    """A batch of images as (N, 784): uint8 as it is, any float type as float32 in [0, ``top``].

    (N, 28, 28) is flattened. Raises ``error(message)`` for another shape, an empty batch, another
    dtype, or grey levels that are not finite or outside [0, ``top``].
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
    if low < 0.0 or high > top:
        raise error(messages.out_of_range.format(low=f"{low:g}", high=f"{high:g}"))
    return array


_REQUEST_MESSAGES = PixelMessages(
    shape=f"expected {N_PIXELS} values per image (28x28 flattened), got an input of shape {{shape}}",
    empty="expected at least one image, got an empty batch",
    dtype="expected numeric pixel values, got dtype {dtype}",
    not_finite="expected finite pixel values, got NaN or infinity",
    out_of_range="expected grey levels in [0, 1] (divide 0-255 pixels by 255), got values in [{low}, {high}]",
)


# What the parameter ``pixel_range`` of a request may say: grey levels in [0, 1] (the default), or
# in [0, 255] (as 8-bit pictures store them; the model divides them by 255 itself).
PIXEL_RANGES = ("0-1", "0-255")
_BYTE_MESSAGES = PixelMessages(
    shape=_REQUEST_MESSAGES.shape,
    empty=_REQUEST_MESSAGES.empty,
    dtype=_REQUEST_MESSAGES.dtype,
    not_finite="expected finite pixel values, got NaN or infinity",
    out_of_range="expected grey levels in [0, 255] (pixel_range 0-255), got values in [{low}, {high}]",
)


def as_batch(model_input: Any, pixel_range: str = "0-1") -> np.ndarray:
    """Validates a request body's data into a (B, 784) float32 array of grey levels in [0, 1]; with
    ``pixel_range`` ``0-255`` the values are checked in [0, 255] and divided by 255 here, in float32:
    the same numbers as 8-bit pixels divided anywhere else in this package."""
    if isinstance(model_input, dict):
        if len(model_input) != 1:
            raise invalid(
                f"expected one input tensor of shape (B, {N_PIXELS}), got keys {sorted(model_input)}"
            )
        model_input = next(iter(model_input.values()))
    if isinstance(model_input, pd.DataFrame):
        non_numeric = [c for c in model_input.columns if not pd.api.types.is_numeric_dtype(model_input[c])]
        if non_numeric:
            raise invalid(f"expected numeric pixel values, column {non_numeric[0]!r} is not")
        model_input = model_input.to_numpy()
    if np.ndim(model_input) > 1 and len(model_input) > MAX_IMAGES:
        raise invalid(
            f"expected at most {MAX_IMAGES} images in one request, got {len(model_input)}: split the "
            "batch, or score in bulk with `mnist-vae score`"
        )
    try:
        batch = np.asarray(model_input, dtype=np.float32)
    except (TypeError, ValueError):
        raise invalid("expected numeric pixel values: a batch of 784 floats in [0, 1] per image") from None
    if batch.ndim == 1:
        batch = batch.reshape(1, -1)
    if pixel_range == "0-255":
        return checked_pixels(batch, _BYTE_MESSAGES, invalid, top=255.0) / np.float32(255)
    return checked_pixels(batch, _REQUEST_MESSAGES, invalid)
