"""Commands that run a model on images: ``reconstruct`` your own pictures, ``sample`` new digits,
``score`` many images in bulk."""

import math
from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console

from mnist_vae.cli.common import ParamsOption, busy, default_model, fail, load_model
from mnist_vae.config import load_params

ModelOption = Annotated[
    str | None,
    typer.Option(
        "--model",
        help="Model reference: models:/NAME@ALIAS, models:/NAME/VERSION, runs:/RUN_ID/model or a "
        "weights file such as models/model.pt. Default: the alias champion of the registered model "
        "that mlflow.registered_model in params.yaml names.",
        show_default=False,
    ),
]


def reconstruct(
    images: Annotated[
        list[Path],
        typer.Argument(
            help="PNG or JPEG pictures of single digits, any size.", metavar="IMAGE", show_default=False
        ),
    ],
    model: ModelOption = None,
    out: Annotated[Path, typer.Option("--out", "-o", help="The PNG to write.")] = Path("reconstructions.png"),
    params: ParamsOption = Path("params.yaml"),
) -> None:
    """Reconstruct your own digit pictures: prepared inputs on the top row, reconstructions below.

    Each picture is prepared as MNIST's digits were made:

    - converted to grey, transparent pixels counting as white paper;
    - inverted when its border is light, since MNIST is a white digit on black;
    - cropped to the bounding box of the ink, faint background noise dropped;
    - scaled so that its longer side is 20 pixels, aspect ratio kept;
    - placed in a 28x28 field with its centre of mass at the centre.

    Example: mnist-vae reconstruct my_seven.png my_three.jpg -o mine.png
    """
    import numpy as np

    from mnist_vae.evaluate import reconstruct as decode_means
    from mnist_vae.images import image_grid, write_png
    from mnist_vae.preprocess import load_digit

    # Read the pictures first: a bad file fails before the slow model download.
    prepared = np.stack([load_digit(path) for path in images])
    vae = load_model(default_model(load_params(params), model))
    recon = decode_means(vae, prepared)
    columns = len(prepared)
    written = write_png(
        out, image_grid(prepared / 255.0, columns=columns), image_grid(recon, columns=columns)
    )
    Console().print(f"wrote {written}")


def sample(
    number: Annotated[int, typer.Option("--number", "-n", help="How many digits to draw.")] = 64,
    out: Annotated[Path, typer.Option("--out", "-o", help="The PNG to write.")] = Path("samples.png"),
    model: ModelOption = None,
    seed: Annotated[int, typer.Option("--seed", help="Seed of the prior draws.")] = 0,
    params: ParamsOption = Path("params.yaml"),
) -> None:
    """Decode draws from the prior N(0, I) into a grid of new digits.

    Example: mnist-vae sample -n 64 -o grid.png --seed 1
    """
    from mnist_vae.evaluate import sample as draw
    from mnist_vae.images import image_grid, write_png

    if number < 1:
        fail(f"--number: expected at least 1 image, got {number}")
    vae = load_model(default_model(load_params(params), model))
    images = draw(vae, number, seed=seed)
    written = write_png(out, image_grid(images, columns=math.ceil(math.sqrt(number))))
    Console().print(f"wrote {written}")


def score(
    source: Annotated[
        Path,
        typer.Argument(
            help="An .npz (its test images by default, see --key), an .npy of uint8 (N,28,28)/(N,784) "
            "or float [0,1] images, or a folder of PNG/JPEG digits."
        ),
    ] = Path("data/mnist.npz"),
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
    from mnist_vae.score import check_output, score_file

    check_output(out)  # a bad suffix fails before the model loads
    vae = load_model(model or default_model(load_params(params), None))
    with busy(f"scoring {source}"):
        result = score_file(vae, source, out, key=key, seed=seed, latents=latents, batch_size=batch_size)
    Console().print(
        f"scored {result.images} images in {result.seconds:.2f} s "
        f"({result.images_per_sec:,.0f} images/s): wrote {result.path}",
        highlight=False,
        soft_wrap=True,
    )
