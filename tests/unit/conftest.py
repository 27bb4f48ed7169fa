"""Helpers of the unit tier's mathematics tests, as fixtures that return the function."""

from __future__ import annotations

import math
from collections.abc import Callable

import pytest
import torch

from mnist_vae.models.objectives import VAE, iw_log_likelihood


def _assert_iw_tightens(
    model: VAE, x: torch.Tensor, log_px: torch.Tensor, repeats: dict[int, int], seed: int
) -> None:
    """The gap log p(x) - estimate, averaged over the images and ``repeats[k]`` repeated draws for
    each k of 1, 10, 100, 1000: falls from k = 1 to 10 to 100 by more than 3 standard errors each
    time, is never below -4 standard errors (the estimate is a lower bound on average; 4 rather than
    3 as the error is itself estimated from as few as 10 repeats of a skewed estimator), and at
    k = 1000 is within 0.05 nats of zero."""
    torch.manual_seed(seed)
    gaps: dict[int, tuple[float, float]] = {}
    for k, r in repeats.items():
        estimates = iw_log_likelihood(model, x.repeat(r, 1), k).reshape(r, len(x)).to(log_px.dtype)
        gap = (log_px - estimates).mean(1)
        gaps[k] = (float(gap.mean()), float(gap.std() / math.sqrt(r)))
    for k, (gap, se) in gaps.items():
        assert gap > -4 * se, f"k={k}: the estimate is above log p(x) by {-gap:.4f} nats (se {se:.4f})"
    for k in (1, 10):
        (gap, se), (next_gap, next_se) = gaps[k], gaps[10 * k]
        assert gap - next_gap > 3 * math.hypot(se, next_se), f"k={k} -> {10 * k}: {gaps}"
    gap, se = gaps[1000]
    assert se < 0.02 and abs(gap) < 0.05, gaps


@pytest.fixture(scope="session")
def assert_iw_tightens() -> Callable[..., None]:
    """``assert_iw_tightens(model, x, log_px, repeats, seed)``: the importance-weighted estimate
    closes in on the exact log p(x) as k grows (see :func:`_assert_iw_tightens`)."""
    return _assert_iw_tightens
