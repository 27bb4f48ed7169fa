"""The demo page: a Gradio Blocks layout on a :class:`~mnist_vae.demo.page.Page`, its event
handlers, and its launch with everything that would reach beyond this machine turned off.

Each handler is a thin wrapper around a function of :mod:`.page`; a
:class:`~mnist_vae.errors.UserError` it raises (a file that is not a picture, a blank one, a test
digit that does not exist) becomes one line on the page (``gr.Error``), with no traceback in the log.
The endpoints that a ``gradio_client`` may call are named: ``/drawing``, ``/upload``, ``/explore``,
``/interpolate`` and ``/samples``.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable
from typing import Any, ParamSpec, TypeVar

import gradio as gr
import numpy as np

from mnist_vae.demo import page as work
from mnist_vae.demo.page import Page
from mnist_vae.errors import UserError, one_line

P = ParamSpec("P")
R = TypeVar("R")

TITLE = "mnist-vae demo"
TEST_DIGITS, DRAWINGS = "two test digits", "two drawings"
_CANVAS = (280, 280)
_BRUSH_SIZE = 16  # a radius: strokes about a seventh of a digit's height wide, as MNIST's are


def _on_page(handler: Callable[P, R]) -> Callable[P, R]:
    """Shows a handler's user-fixable failure as one line on the page; a bug keeps its traceback."""

    @functools.wraps(handler)
    def wrapper(*args: P.args, **kwargs: P.kwargs) -> R:
        try:
            return handler(*args, **kwargs)
        except UserError as exc:
            raise gr.Error(one_line(str(exc)), print_exception=False) from None

    return wrapper


def build(page: Page, card: str) -> gr.Blocks:
    """The page: a digit and its reconstruction, score and latent sliders; an interpolation; samples
    from the prior; the model card (``card``, Markdown)."""
    layers = page.model.layers
    with gr.Blocks(analytics_enabled=False, title=TITLE, delete_cache=(3600, 3600)) as blocks:
        gr.Markdown(
            f"# {TITLE}\nDraw a digit or upload a picture of one: the model encodes it, decodes it "
            "back and says how unusual it finds it. The sliders move the digit through the latent space."
        )
        code = gr.State(None)  # the posterior means of the digit shown, one list per layer
        with gr.Tab("Your digit"):
            with gr.Row():
                with gr.Column():
                    sketch = _sketchpad("Draw a digit", "sketch")
                    upload = gr.Image(
                        label="... or upload a picture of one digit",
                        type="filepath",
                        sources=["upload", "clipboard"],
                        height=240,
                        elem_id="upload",
                    )
                with gr.Column():
                    with gr.Row():
                        prepared = _shown_image("Prepared 28x28 input", "prepared")
                        reconstruction = _shown_image("Reconstruction", "reconstruction")
                    score = gr.Markdown(
                        "Draw or upload a digit to see its score.", label="Score", elem_id="score"
                    )
            gr.Markdown(
                "## Latent space\nEach slider is a latent unit the model uses most (largest mean KL over "
                "the test digits); they start at the digit's posterior mean, and the picture is decoded "
                "from them as they move."
            )
            with gr.Row():
                with gr.Column(scale=2):
                    sliders: list[gr.Slider] = []
                    for index, layer in enumerate(layers):
                        dims = [d for d in page.dims if d.layer == index]
                        gr.Markdown(
                            f"**Layer {layer.name}**: {len(dims)} of its {layer.size} units",
                            elem_classes=["layer"],
                        )
                        sliders.extend(
                            gr.Slider(
                                -work.SLIDER_SPAN,
                                work.SLIDER_SPAN,
                                value=0.0,
                                step=0.01,
                                label=f"{layer.name}[{d.unit}], mean KL {d.kl:.2f} nats",
                            )
                            for d in dims
                        )
                explored = _shown_image("Decoded from the sliders", "explored", scale=1)
        with gr.Tab("Interpolation"):
            has_test = page.test is not None
            source = gr.Radio(
                [TEST_DIGITS, DRAWINGS], value=TEST_DIGITS if has_test else DRAWINGS, label="Between"
            )
            last = len(page.test.images) - 1 if page.test is not None else 0
            with gr.Row():
                first_index = gr.Number(0, precision=0, label=f"First test digit (0-{last})", minimum=0)
                last_index = gr.Number(
                    min(1, last), precision=0, label=f"Last test digit (0-{last})", minimum=0
                )
            with gr.Row():
                first_sketch = _sketchpad("First drawing", "first-sketch")
                last_sketch = _sketchpad("Last drawing", "last-sketch")
            steps = gr.Slider(2, work.MAX_STEPS, value=9, step=1, label="Steps")
            interpolate = gr.Button("Interpolate", variant="primary")
            strip = _shown_image("From the first digit to the last", "strip", height=None)
        with gr.Tab("Samples"):
            with gr.Row():
                number = gr.Slider(1, work.MAX_SAMPLES, value=16, step=1, label="Samples")
                seed = gr.Number(0, precision=0, label="Seed", minimum=0)
            draw = gr.Button("Draw from the prior", variant="primary")
            grid = _shown_image("Decoded draws z ~ N(0, I)", "samples", height=None)
        with gr.Tab("Model"):
            gr.Markdown(card, elem_id="card")
            gr.Markdown(_test_note(page))

        digit_outputs = [prepared, reconstruction, score, code, explored, *sliders]
        # `input`, not `change`: in Gradio 6.31 a first stroke's `change` carries no picture (seen in
        # headless Chromium), while `input` carries it once the canvas has a background (_sketchpad).
        sketch.input(
            _on_page(functools.partial(_drawn, page)),
            sketch,
            digit_outputs,
            api_name="drawing",
            preprocess=False,
            trigger_mode="always_last",
            show_progress="hidden",
        )
        upload.upload(
            _on_page(functools.partial(_uploaded, page)),
            upload,
            digit_outputs,
            api_name="upload",
            preprocess=False,
        )
        if sliders:
            gr.on(
                [s.input for s in sliders],
                _on_page(functools.partial(_explored, page)),
                [code, *sliders],
                explored,
                api_name="explore",
                trigger_mode="always_last",
                show_progress="hidden",
            )
        interpolate.click(
            _on_page(functools.partial(_interpolated, page)),
            [source, first_index, last_index, first_sketch, last_sketch, steps],
            strip,
            api_name="interpolate",
            preprocess=False,
        )
        draw.click(_on_page(functools.partial(_sampled, page)), [number, seed], grid, api_name="samples")
        blocks.load(
            _on_page(functools.partial(_opened, page)),
            [number, seed],
            [explored, grid],
            api_visibility="private",
            show_progress="hidden",
        )
    return blocks


def _shown_image(label: str, elem_id: str, height: int | None = 200, scale: int | None = None) -> gr.Image:
    """An output picture: a PNG (lossless, unlike Gradio's default WebP), downloadable."""
    return gr.Image(
        label=label,
        elem_id=elem_id,
        format="png",
        interactive=False,
        height=height,
        scale=scale,
        buttons=["download"],
    )


def _sketchpad(label: str, elem_id: str) -> gr.Sketchpad:
    """A square white canvas with a black brush, as a person draws on paper. The white background
    makes the editor send its picture from the first stroke on (without one it sends none until a
    second stroke); the preparation treats white paper and a transparent canvas alike."""
    paper = np.full((_CANVAS[1], _CANVAS[0], 3), 255, dtype=np.uint8)
    return gr.Sketchpad(
        value=paper,  # the background, and the picture until the first stroke
        label=label,
        canvas_size=_CANVAS,
        brush=gr.Brush(default_size=_BRUSH_SIZE, colors=["#000000"], color_mode="fixed"),
        layers=False,
        height=_CANVAS[1] + 80,
        elem_id=elem_id,
    )


def _test_note(page: Page) -> str:
    if page.test is None:
        return f"**No test digits**: the scores are not ranked. {page.missing}"
    return (
        f"Scores are ranked among the {len(page.test.scores):,} test digits of `{page.test.path}`, each "
        f"scored once at start-up with one posterior draw from seed {work.SEED}, as `mnist-vae score` does."
    )


def _shown(page: Page, pixels: np.ndarray) -> tuple[Any, ...]:
    """The outputs of a new digit: pictures, score, code, decoded sliders, slider positions."""
    digit = work.analyse(page, pixels)
    values = work.slider_values(page, digit.code)
    explored = work.explore(page, digit.code, values)
    return (
        work.picture(digit.pixels),
        work.picture(digit.reconstruction),
        work.score_text(page, digit.neg_elbo),
        [layer.tolist() for layer in digit.code],
        work.picture(explored),
        *values,
    )


def _drawn(page: Page, value: object) -> tuple[Any, ...]:
    """A new drawing. A cleared canvas empties the pictures and says so, without an error."""
    try:
        pixels = work.drawing(value)
    except work.EmptyCanvasError as exc:
        return (None, None, str(exc), *(gr.skip() for _ in range(2 + len(page.dims))))
    return _shown(page, pixels)


def _uploaded(page: Page, value: object) -> tuple[Any, ...]:
    return _shown(page, work.upload(value))


def _explored(page: Page, code: list[list[float]] | None, *values: float) -> np.ndarray:
    return work.picture(work.explore(page, code, values))


def _interpolated(
    page: Page,
    source: str,
    first: object,
    last: object,
    first_sketch: object,
    last_sketch: object,
    steps: object,
) -> np.ndarray:
    if source == DRAWINGS:
        ends = work.drawing(first_sketch, "the first canvas"), work.drawing(last_sketch, "the last canvas")
    else:
        ends = work.pick_test_digit(page, first), work.pick_test_digit(page, last)
    return work.picture(work.interpolate(page, *ends, steps))


def _sampled(page: Page, number: float, seed: float) -> np.ndarray:
    images = work.samples(page, number, seed)
    return work.picture(images, columns=math.ceil(math.sqrt(len(images))), scale=3)


def _opened(page: Page, number: float, seed: float) -> tuple[np.ndarray, np.ndarray]:
    """What a new visitor sees before drawing: the prior's mean decoded, and a first set of samples."""
    return _explored(page, None, *(0.0 for _ in page.dims)), _sampled(page, number, seed)


def launch(blocks: gr.Blocks, host: str, port: int, login: tuple[str, str] | None) -> str:
    """Starts serving ``blocks`` on ``host``:``port`` in a background thread; returns its URL.

    Private by default: no analytics or version check (``analytics_enabled=False`` on the Blocks),
    no share tunnel, no server-side rendering by Node, no MCP server, the theme's fonts served by
    the app itself (never a Google font), no footer link to gradio.app. ``login`` turns on Gradio's
    login page with that one user.
    """
    blocks.launch(
        server_name=host,
        server_port=port,
        auth=login,
        auth_message="Log in to the mnist-vae demo." if login else None,
        share=False,
        inbrowser=False,
        prevent_thread_lock=True,
        quiet=True,
        show_error=False,
        ssr_mode=False,
        mcp_server=False,
        pwa=False,
        enable_monitoring=False,
        footer_links=["api", "settings"],
        run_history=False,
        max_file_size="20mb",
        theme=gr.themes.Default(),
    )
    return str(blocks.local_url)
