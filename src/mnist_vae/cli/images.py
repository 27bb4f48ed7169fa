"""Commands that draw with a model: ``reconstruct`` your own pictures, ``sample`` new digits."""

import math
from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console

from mnist_vae.cli.common import ModelOption, ParamsOption, default_model, fail, load_model
from mnist_vae.config import load_params


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

    from mnist_vae.data.pictures import load_digit
    from mnist_vae.evaluation.figures import image_grid, write_png
    from mnist_vae.evaluation.figures import reconstruct as decode_means

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
    from mnist_vae.evaluation.figures import image_grid, write_png
    from mnist_vae.evaluation.figures import sample as draw

    if number < 1:
        fail(f"--number: expected at least 1 image, got {number}")
    vae = load_model(default_model(load_params(params), model))
    images = draw(vae, number, seed=seed)
    written = write_png(out, image_grid(images, columns=math.ceil(math.sqrt(number))))
    Console().print(f"wrote {written}")
