"""evaluate_model's progress reports: a long evaluation is never silent off a terminal."""

from __future__ import annotations

import logging
from collections.abc import Callable

import numpy as np
import pytest

from mnist_vae import progress as progress_module
from mnist_vae.config import EvaluateConfig, ModelConfig
from mnist_vae.evaluation import metrics as evaluate
from mnist_vae.models.families import build_model


@pytest.mark.parametrize(("progress", "lines"), [(None, 3), (False, 0)])
def test_off_a_terminal_a_long_evaluation_logs_how_far_it_is(
    progress: bool | None,
    lines: int,
    tiny_images: Callable[..., tuple[np.ndarray, np.ndarray]],
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
) -> None:
    monkeypatch.setattr(progress_module, "LOG_EVERY", 0.0)  # as if every batch took a minute
    images, labels = tiny_images(40, seed=1)
    model = build_model(ModelConfig(preset="mlp", hidden=(16,), latent=2), seed=0)
    cfg = EvaluateConfig(batch_size=10, iw_samples=4)
    with caplog.at_level(logging.INFO, logger="mnist_vae.progress"):
        quiet = evaluate.evaluate_model(model, images, labels, cfg, progress=False)
        caplog.clear()
        measured = evaluate.evaluate_model(model, images, labels, cfg, progress=progress)
    said = [r.getMessage() for r in caplog.records if r.name == "mnist_vae.progress"]
    # A line after each batch but the last, which the result itself reports.
    assert len(said) == lines
    if lines:
        assert said[0].startswith("evaluating test images: 10/40, about ") and said[0].endswith(" s left")
    assert measured.metrics == quiet.metrics  # reporting changes no number


def test_the_duration_reads_in_minutes_and_seconds() -> None:
    assert progress_module.duration(42.4) == "42 s"
    assert progress_module.duration(3725) == "62 min 5 s"


def test_the_latent_plots_long_title_stays_inside_the_figure() -> None:
    import matplotlib.pyplot as plt

    from mnist_vae.evaluation.figures import scatter_figure

    points = np.random.default_rng(0).normal(size=(50, 2))
    title = (
        "posterior means of 5,000 test digits, 32-D latent space projected on 2 principal "
        "components (17% of the variance)"
    )
    figure = scatter_figure(points, np.arange(50) % 10, title)
    try:
        figure.canvas.draw()
        shown = figure.axes[0].title
        box, frame = shown.get_window_extent(), figure.bbox
        assert frame.x0 <= box.x0 and box.x1 <= frame.x1 and box.y1 <= frame.y1
        assert shown.get_text().replace("\n", " ") == title
    finally:
        plt.close(figure)
