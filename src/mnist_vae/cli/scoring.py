"""``score``: many images scored in bulk by a model, without a server or JSON."""

from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console

from mnist_vae.cli.common import ModelOption, ParamsOption, busy, dataset_path, default_model, load_model
from mnist_vae.config import load_params


def score(
    source: Annotated[
        Path | None,
        typer.Argument(
            help="An .npz (its test images by default, see --key), an .npy of uint8 (N,28,28)/(N,784) "
            "or float [0,1] images, or a folder of PNG/JPEG digits. Default: data/<data.dataset>.npz.",
            show_default=False,
        ),
    ] = None,
    model: ModelOption = None,
    out: Annotated[
        Path, typer.Option("--out", "-o", help="The table to write: .csv or .parquet (by the suffix).")
    ] = Path("reports/scores.csv"),
    key: Annotated[
        str | None,
        typer.Option("--key", help="The array of an .npz to score. Default: x_test.", show_default=False),
    ] = None,
    latents: Annotated[
        bool, typer.Option("--latents", help="Also write the posterior means mu_0, mu_1, ... of each image.")
    ] = False,
    seed: Annotated[
        int,
        typer.Option(
            "--seed",
            min=0,
            max=2**31 - 1,
            help="Seed of the posterior draws, as the served model's `seed` parameter.",
        ),
    ] = 0,
    batch_size: Annotated[int, typer.Option("--batch-size", min=1, help="Images per forward pass.")] = 4096,
    params: ParamsOption = Path("params.yaml"),
) -> None:
    """Score many images in bulk, without a server or JSON: per-image negative ELBO (nats).

    The same numbers as the served model's `score` output for the same seed; higher is more
    unusual. Writes one row per image: `image` (index, or file name in a folder), `neg_elbo`, and
    with --latents `mu_0`, `mu_1`, ...

    Example: mnist-vae score data/mnist.npz --model models/model.pt --out reports/scores.parquet
    """
    from mnist_vae.serving.scoring import check_output, score_file

    check_output(out)  # a bad suffix fails before the model loads
    if source is None or model is None:  # params.yaml names the default dataset and model
        resolved = load_params(params)
        source = dataset_path(resolved, source)
        model = default_model(resolved, model)
    vae = load_model(model)
    with busy(f"scoring {source}"):
        result = score_file(vae, source, out, key=key, seed=seed, latents=latents, batch_size=batch_size)
    Console().print(
        f"scored {result.images} images in {result.seconds:.2f} s "
        f"({result.images_per_sec:,.0f} images/s): wrote {result.path}",
        highlight=False,
        soft_wrap=True,
    )
