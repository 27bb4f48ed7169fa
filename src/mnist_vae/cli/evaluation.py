"""Commands that measure models on the test set of ``data.dataset`` (``evaluate``, ``compare``) and the
tables that show their metrics."""

import json
import math
from pathlib import Path
from typing import TYPE_CHECKING, Annotated

import typer
from rich.console import Console, JustifyMethod
from rich.table import Table

from mnist_vae.cli.common import DataOption, ParamsOption, busy, dataset_path, fail, load_model
from mnist_vae.config import EvaluateConfig, load_params

if TYPE_CHECKING:
    import numpy as np

    from mnist_vae.data.dataset import DatasetInfo
    from mnist_vae.evaluation.metrics import Evaluation

# (unit, whether lower is better) of the metrics that evaluate_model reports.
_METRICS: dict[str, tuple[str, bool]] = {
    "neg_elbo": ("nats/image", True),
    "recon_bce": ("nats/image", True),
    "kl": ("nats/image", True),
    "recon_mse": ("per pixel", True),
    "psnr": ("dB", False),
    "nll_iw": ("nats/image", True),
    "nll_iw_se": ("nats/image", True),
    "loss_tutorial": ("per pixel", True),
}

LimitOption = Annotated[
    int | None,
    typer.Option(
        "--limit",
        help="Evaluate on the first N selected test images (0: all). Default: evaluate.limit.",
        show_default=False,
    ),
]
DigitsOption = Annotated[
    str | None,
    typer.Option(
        "--digits",
        help="Only these labels 0-9 (digits of MNIST), comma-separated, e.g. 3,8.",
        show_default=False,
    ),
]
IwOption = Annotated[
    int | None,
    typer.Option(
        "--iw-samples",
        help="Importance samples K of the log-likelihood estimate nll_iw. Default: evaluate.iw_samples.",
        show_default=False,
    ),
]

PrecisionOption = Annotated[
    str | None,
    typer.Option(
        "--precision",
        help="The decoder's precision in the nll_iw estimate: fp32, bf16, or auto (bf16 on a CPU with "
        "native bf16 dot products: about 1.6x faster than fp32, the estimate 0.0025 nats away on the "
        "binarized-conv model; else fp32). Default: evaluate.precision.",
        show_default=False,
    ),
]


def _parse_digits(text: str | None) -> list[int] | None:
    if text is None:
        return None
    parts = [p.strip() for p in text.split(",") if p.strip()]
    if not parts or not all(p.isdigit() and int(p) <= 9 for p in parts):
        fail(f"--digits: expected comma-separated digits 0-9 such as 3,8, got {text!r}")
    return sorted({int(p) for p in parts})


def _test_set(
    params: Path,
    data: Path | None,
    limit: int | None,
    digits: str | None,
    iw_samples: int | None,
    precision: str | None = None,
) -> "tuple[EvaluateConfig, np.ndarray, np.ndarray, DatasetInfo]":
    """``evaluate`` of the params file with the command-line values (validated like the file), the
    test images and labels it selects, and what the dataset is called."""
    from mnist_vae.data.dataset import DATASETS, load_dataset
    from mnist_vae.evaluation.metrics import select

    resolved = load_params(params)
    chosen = _parse_digits(digits)
    changes = {"limit": limit, "iw_samples": iw_samples, "precision": precision}
    cfg = resolved.evaluate.replace(**{k: v for k, v in changes.items() if v is not None})
    test = load_dataset(dataset_path(resolved, data))
    images, labels = select(test.x_test, test.y_test, cfg.limit, chosen)
    return cfg, images, labels, DATASETS[resolved.data.dataset]


def _counts(labels: "np.ndarray") -> dict[int, int]:
    import numpy as np

    return {d: int(c) for d, c in enumerate(np.bincount(labels, minlength=10)) if c}


def _fmt(value: float) -> str:
    return f"{value:.4f}" if abs(value) < 1000 else f"{value:.1f}"


def _signed(value: float, lower_is_better: bool) -> str:
    if value == 0 or not math.isfinite(value):
        return _fmt(value)
    better = (value < 0) == lower_is_better
    return f"[{'green' if better else 'red'}]{value:+.4f}[/]"


def metrics_table(evaluation: "Evaluation") -> Table:
    """The test metrics with their units."""
    table = Table()
    table.add_column("metric")
    table.add_column("value", justify="right")
    table.add_column("unit")
    for name, value in evaluation.metrics.items():
        table.add_row(name, _fmt(value), _METRICS.get(name, ("", True))[0])
    return table


def _digits_table(evaluation: "Evaluation", counts: dict[int, int]) -> Table:
    hardest = evaluation.hardest_digits[:1]
    table = Table(title="reconstruction MSE per digit (posterior mean)")
    table.add_column("digit", justify="right")
    table.add_column("images", justify="right")
    table.add_column("MSE", justify="right")
    for digit, mse in sorted(evaluation.per_digit_mse.items()):
        mark = " (hardest)" if digit in hardest else ""
        table.add_row(str(digit), str(counts.get(digit, 0)), f"{mse:.5f}{mark}")
    return table


def _difference_table(a: "Evaluation", b: "Evaluation") -> Table:
    """Each metric of A and B, and B - A in green where B is better."""
    table = Table()
    columns: tuple[tuple[str, JustifyMethod], ...] = (
        ("metric", "left"),
        ("A", "right"),
        ("B", "right"),
        ("B - A", "right"),
        ("unit", "left"),
    )
    for name, justify in columns:
        table.add_column(name, justify=justify)
    for name, value_a in a.metrics.items():
        unit, lower_is_better = _METRICS.get(name, ("", True))
        value_b = b.metrics[name]
        table.add_row(name, _fmt(value_a), _fmt(value_b), _signed(value_b - value_a, lower_is_better), unit)
    return table


def _digits_difference_table(a: "Evaluation", b: "Evaluation", counts: dict[int, int]) -> Table:
    table = Table(title="reconstruction MSE per digit")
    for name in ("digit", "images", "A", "B", "B - A"):
        table.add_column(name, justify="right")
    for digit, mse_a in sorted(a.per_digit_mse.items()):
        mse_b = b.per_digit_mse[digit]
        table.add_row(
            str(digit),
            str(counts.get(digit, 0)),
            f"{mse_a:.5f}",
            f"{mse_b:.5f}",
            _signed(mse_b - mse_a, lower_is_better=True),
        )
    return table


def evaluate(
    model: Annotated[
        str,
        typer.Argument(
            help="models:/NAME@ALIAS, models:/NAME/VERSION, runs:/RUN_ID/model or a weights file.",
            show_default=False,
        ),
    ],
    params: ParamsOption = Path("params.yaml"),
    data: DataOption = None,
    limit: LimitOption = None,
    digits: DigitsOption = None,
    iw_samples: IwOption = None,
    precision: PrecisionOption = None,
    out: Annotated[
        Path | None,
        typer.Option(
            "--out",
            "-o",
            help="Also write metrics.json and the figures (PNG) into this folder.",
            show_default=False,
        ),
    ] = None,
) -> None:
    """Measure a model on the test set of data.dataset: negative ELBO, IW log-likelihood, MSE, per label.

    Example: mnist-vae evaluate models:/mnist-vae@champion --digits 3,8 --out reports/champion
    """
    from mnist_vae.atomic import atomic_write
    from mnist_vae.evaluation.figures import write_figures
    from mnist_vae.evaluation.metrics import evaluate_model

    cfg, images, labels, dataset = _test_set(params, data, limit, digits, iw_samples, precision)
    vae = load_model(model)
    evaluation = evaluate_model(vae, images, labels, cfg, progress=None)
    console = Console()
    estimator = f"nll_iw: k = {cfg.iw_samples}, {evaluation.precision}"
    console.print(f"{model} on {evaluation.n_images} test images ({estimator}):", highlight=False)
    console.print(metrics_table(evaluation))
    console.print(_digits_table(evaluation, _counts(labels)))
    if out is not None:
        out.mkdir(parents=True, exist_ok=True)
        atomic_write(out / "metrics.json", json.dumps(evaluation.to_json(), indent=2) + "\n")
        with busy("drawing figures"):
            figures = write_figures(
                vae, images, out, n=cfg.n_images, seed=cfg.seed, labels=labels, dataset=dataset
            )
        console.print(f"wrote {out / 'metrics.json'}, " + ", ".join(str(f) for f in figures))


def compare(
    model_a: Annotated[str, typer.Argument(help="The baseline model reference.", show_default=False)],
    model_b: Annotated[str, typer.Argument(help="The model compared with it.", show_default=False)],
    params: ParamsOption = Path("params.yaml"),
    data: DataOption = None,
    limit: LimitOption = None,
    digits: DigitsOption = None,
    iw_samples: IwOption = None,
    precision: PrecisionOption = None,
) -> None:
    """Evaluate two models on the same images with the same random draws; show B - A.

    Green differences are improvements of B over A.

    Example: mnist-vae compare models:/mnist-vae/1 models:/mnist-vae@champion
    """
    from mnist_vae.evaluation.metrics import evaluate_model

    cfg, images, labels, _ = _test_set(params, data, limit, digits, iw_samples, precision)
    results = []
    for reference in (model_a, model_b):
        vae = load_model(reference)
        # evaluate_model reseeds torch from cfg.seed, so both models see the same draws.
        results.append(evaluate_model(vae, images, labels, cfg, progress=None))
    a, b = results
    console = Console()
    console.print(f"A = {model_a}\nB = {model_b}\non the same {a.n_images} test images:", highlight=False)
    console.print(_difference_table(a, b))
    console.print(_digits_difference_table(a, b, _counts(labels)))
