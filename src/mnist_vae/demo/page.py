"""What the demo page computes, as plain functions on arrays: no Gradio here, so each is tested
without a server (tests/unit/test_demo.py).

A digit comes from the sketchpad or an upload and is prepared exactly as ``mnist-vae reconstruct``
prepares a picture (:func:`mnist_vae.data.pictures.load_digit` on the file Gradio received: the
sketchpad's transparent canvas counts as white paper). The page then shows its reconstruction, its
negative ELBO (one posterior draw from seed 0, the number ``mnist-vae score`` writes) and how it
ranks among the test digits' scores, computed once at start-up; sliders for the latent units the
model uses most (the largest mean KL per unit over the test digits) starting at the digit's
posterior mean; an interpolation between two digits; samples from the prior.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from mnist_vae.data.dataset import DATASETS, DatasetFormatError, DatasetMissingError, load_dataset
from mnist_vae.data.pictures import ImageError, load_digit
from mnist_vae.demo.latents import LatentModel
from mnist_vae.errors import UserError
from mnist_vae.evaluation.figures import image_grid
from mnist_vae.models.networks import N_PIXELS

SEED = 0  # the posterior draw of a score, as `mnist-vae score` and the served model draw it by default
SLIDERS_PER_LAYER = 8
SLIDER_SPAN = 4.0  # sliders run over [-4, 4]: the prior puts 99.99% of a unit's mass inside
SCALE = 6  # 28-pixel digits are shown at 168 pixels, each pixel a square (nearest neighbour)
MAX_STEPS = 16
MAX_SAMPLES = 64
_BATCH = 1000
NO_PICTURE = "No picture: upload a PNG or JPEG of one digit first."


class PageInputError(UserError, ValueError):
    """A drawing, picture or setting the page cannot use; said on the page in one line."""


class EmptyCanvasError(PageInputError):
    """Nothing is drawn on a canvas (before the first stroke, or after clearing it)."""


@dataclass(frozen=True)
class Dimension:
    """A latent unit with a slider: its layer (index into the model's layers), its index in that
    layer and its mean KL over the digits it was ranked on, in nats."""

    layer: int
    unit: int
    kl: float


@dataclass(frozen=True, eq=False)
class ScoredDigits:
    """The test split: images (N, 28, 28) uint8, labels, and every image's score, sorted."""

    path: Path
    images: np.ndarray
    labels: np.ndarray
    scores: np.ndarray


@dataclass(frozen=True, eq=False)
class Page:
    """Everything the page's functions share, made once at start-up by :func:`open_page`."""

    model: LatentModel
    test: ScoredDigits | None
    missing: str  # why there is no test split to compare with ("" when there is)
    dims: tuple[Dimension, ...]

    def default_code(self) -> list[np.ndarray]:
        """The prior's mean, zero in every unit: where the sliders start before any digit."""
        return [np.zeros(layer.size, dtype=np.float32) for layer in self.model.layers]


@dataclass(frozen=True, eq=False)
class Digit:
    """One prepared digit and what the model makes of it."""

    pixels: np.ndarray  # (28, 28) uint8, as reconstruct prepares it
    reconstruction: np.ndarray  # (784,) grey levels in [0, 1], decoded from the posterior means
    neg_elbo: float  # nats
    code: list[np.ndarray]  # the posterior means, one (size,) array per layer


def open_page(model: LatentModel, data: Path) -> Page:
    """Scores the test split of ``data`` (an ``.npz`` as the download stage writes it) and ranks
    the latent units by their mean KL over it. Without a readable file the page says why instead
    of a percentile, and ranks the units on the model's own samples."""
    try:
        mnist = load_dataset(data)
        if not len(mnist.x_test):
            raise DatasetFormatError(f"{data}: its test split holds no images")
    except (DatasetMissingError, DatasetFormatError) as exc:
        own = torch.from_numpy(model.sample(_BATCH, seed=SEED))
        return Page(model, None, str(exc), active_dimensions(model, own))
    flat = mnist.x_test.reshape(len(mnist.x_test), N_PIXELS)
    scores = np.sort(model.neg_elbo(flat, SEED))
    test = ScoredDigits(Path(data), mnist.x_test, mnist.y_test, scores)
    return Page(model, test, "", active_dimensions(model, torch.from_numpy(flat).float() / 255.0))


def active_dimensions(
    model: LatentModel, x: torch.Tensor, per_layer: int = SLIDERS_PER_LAYER
) -> tuple[Dimension, ...]:
    """The ``per_layer`` units of each layer with the largest mean KL over images ``x`` (N, 784):
    the units the model spends information on; the rest stay near the prior and change little."""
    totals = [torch.zeros(layer.size, dtype=torch.float64) for layer in model.layers]
    for chunk in x.split(_BATCH):
        for total, kl in zip(totals, model.kl_per_unit(chunk), strict=True):
            total += kl.sum(0, dtype=torch.float64)
    dims: list[Dimension] = []
    for layer, total in enumerate(totals):
        mean = total / max(len(x), 1)
        top = mean.argsort(descending=True)[:per_layer]
        dims.extend(Dimension(layer, int(unit), float(mean[unit])) for unit in top)
    return tuple(dims)


def drawing(value: object, what: str = "the canvas") -> np.ndarray:
    """The sketchpad's picture prepared as ``mnist-vae reconstruct`` prepares a file.

    Args:
        value: Gradio's unprocessed ImageEditor value: a dict whose ``composite`` is the drawing
            flattened into one RGBA picture (a file's data, a path, or None before any stroke).
        what: The canvas, as messages name it.

    Raises:
        EmptyCanvasError: Nothing is drawn on it.
        PageInputError: Its picture cannot be read.
    """
    empty = f"{what[0].upper()}{what[1:]} is empty: draw a digit with the brush first."
    path = _file_path(value.get("composite")) if isinstance(value, dict) else None
    if path is None:
        raise EmptyCanvasError(empty)
    try:
        return load_digit(path)
    except ImageError as exc:
        if _is_flat(path):
            raise EmptyCanvasError(empty) from None
        raise PageInputError(str(exc).replace(str(path), what)) from None


def upload(value: object) -> np.ndarray:
    """An uploaded picture prepared as ``mnist-vae reconstruct`` prepares it; the message of a
    picture it refuses (not an image, too large, no digit) names the file as the person called it.

    Raises:
        PageInputError: No file, or one that is not a picture of a digit.
    """
    path = _file_path(value)
    if path is None:
        raise PageInputError(NO_PICTURE)
    name = value.get("orig_name") if isinstance(value, dict) else None
    try:
        return load_digit(path)
    except ImageError as exc:
        raise PageInputError(str(exc).replace(str(path), name or Path(path).name)) from None


def _file_path(value: object) -> str | None:
    """The server-side path of a file value (Gradio's file data, or a plain path)."""
    if isinstance(value, dict):
        value = value.get("path")
    return value if isinstance(value, str) and value else None


def _is_flat(path: str) -> bool:
    """Whether a picture, transparent pixels taken as white paper, is one colour all over."""
    with Image.open(path) as opened:
        rgba = opened.convert("RGBA")
    flat = Image.alpha_composite(Image.new("RGBA", rgba.size, "white"), rgba).convert("L")
    low, high = flat.getextrema()
    return low == high


def analyse(page: Page, pixels: np.ndarray) -> Digit:
    """Reconstruction, score and posterior means of one prepared (28, 28) uint8 digit."""
    flat = pixels.reshape(1, N_PIXELS)
    x = torch.from_numpy(flat).float() / 255.0
    means = page.model.posterior_means(x)
    reconstruction = page.model.decode(means)[0].numpy()
    score = float(page.model.neg_elbo(flat, SEED)[0])
    return Digit(pixels, reconstruction, score, [m[0].numpy() for m in means])


def percentile(scores: np.ndarray, score: float) -> float:
    """The share (0-100) of sorted ``scores`` strictly below ``score``: how many test digits the
    model finds more usual than this one."""
    return 100.0 * int(np.searchsorted(scores, score, side="left")) / len(scores)


def score_text(page: Page, score: float) -> str:
    """The score in words, for a person: its value and where it stands among the test digits."""
    head = f"**Negative ELBO: {score:.1f} nats** (higher is more unusual to the model)."
    if page.test is None:
        return f"{head}\n\nNo test digits to compare with: {page.missing}"
    n = len(page.test.scores)
    share = percentile(page.test.scores, score)
    # Rounded down, so that a digit above all but a few never reads "100%".
    shown = math.floor(share * 10) / 10
    known = DATASETS.get(page.test.path.stem)
    images = f"{known.title} test images" if known is not None else "test images"
    if share >= 100.0:
        rank = f"More unusual than all {n:,} {images}."
    else:
        rank = f"More unusual than {shown:.1f}% of the {n:,} {images}."
    return f"{head}\n\n{rank}"


def slider_values(page: Page, code: Sequence[np.ndarray]) -> list[float]:
    """The sliders' positions for a code: its value in each slider's unit, kept on the slider and
    rounded to the slider's step of 0.01."""
    return [round(float(np.clip(code[d.layer][d.unit], -SLIDER_SPAN, SLIDER_SPAN)), 2) for d in page.dims]


def explore(
    page: Page, code: Sequence[Sequence[float] | np.ndarray] | None, values: Sequence[float]
) -> np.ndarray:
    """Decodes ``code`` (the prior's mean when None) with the sliders' units set to ``values``;
    returns the (784,) pixel means."""
    if len(values) != len(page.dims):
        raise PageInputError(f"expected {len(page.dims)} slider values, got {len(values)}")
    base = page.default_code() if code is None else code
    tensors = [torch.tensor(np.asarray(layer, dtype=np.float32)).reshape(1, -1) for layer in base]
    for dim, value in zip(page.dims, values, strict=True):
        tensors[dim.layer][0, dim.unit] = float(value)
    return page.model.decode(tensors)[0].numpy()


def pick_test_digit(page: Page, index: object) -> np.ndarray:
    """Test image number ``index`` as a (28, 28) uint8 array.

    Raises:
        PageInputError: There is no test split, or no such image in it.
    """
    if page.test is None:
        raise PageInputError(f"No test digits to pick from: {page.missing}")
    n = len(page.test.images)
    return page.test.images[_whole(index, "test digit", 0, n - 1)]


def interpolate(page: Page, first: np.ndarray, last: np.ndarray, steps: object) -> np.ndarray:
    """Decodes ``steps`` codes on the straight line between two digits' posterior means (both ends
    included, each layer alike); returns (steps, 784) pixel means."""
    count = _whole(steps, "steps", 2, MAX_STEPS)
    x = torch.from_numpy(np.stack([first, last]).reshape(2, N_PIXELS)).float() / 255.0
    t = torch.linspace(0.0, 1.0, count).reshape(-1, 1)
    code = [(1 - t) * means[0] + t * means[1] for means in page.model.posterior_means(x)]
    return page.model.decode(code).numpy()


def samples(page: Page, number: object, seed: object) -> np.ndarray:
    """``number`` draws from the prior, the same for the same ``seed``; (number, 784) pixel means."""
    return page.model.sample(_whole(number, "samples", 1, MAX_SAMPLES), _whole(seed, "seed", 0, 2**31 - 1))


def _whole(value: object, what: str, low: int, high: int) -> int:
    """``value`` as an integer in [low, high]; Gradio's number fields send floats."""
    number = value if isinstance(value, int | float) and not isinstance(value, bool) else None
    if number is None or not math.isfinite(number) or number != int(number) or not low <= number <= high:
        raise PageInputError(f"{what}: expected a whole number from {low} to {high}, got {value!r}")
    return int(number)


def picture(images: np.ndarray, columns: int | None = None, scale: int = SCALE) -> np.ndarray:
    """Images (N, 784) or one (784,) / (28, 28), uint8 or grey levels in [0, 1], as one uint8 picture:
    a single digit alone, several on a grid of ``columns`` (default: one row); enlarged ``scale``
    times with square pixels, since a browser would blur a 28-pixel image it scales up."""
    grey = np.asarray(images, dtype=np.float32)
    if np.asarray(images).dtype == np.uint8:
        grey = grey / 255.0
    grey = grey.reshape(-1, 28, 28)
    tile = grey[0] if len(grey) == 1 else image_grid(grey, columns=columns or len(grey))[0].numpy()
    out = np.rint(np.clip(tile, 0.0, 1.0) * 255.0).astype(np.uint8)
    return out.repeat(scale, axis=0).repeat(scale, axis=1)
