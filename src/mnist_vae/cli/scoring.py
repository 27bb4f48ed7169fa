"""``score``: many images scored in bulk by a model, without a server or JSON: in this process, or on
Spark (``--engine spark``, :mod:`mnist_vae.serving.spark`, imported only then)."""

from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console

from mnist_vae.cli.common import ModelOption, ParamsOption, busy, dataset_path, default_model, load_model
from mnist_vae.config import load_params


def score(
    source: Annotated[
        str | None,
        typer.Argument(
            help="A Parquet dataset (a .parquet file or a folder of them, or with --engine spark any "
            "URI Spark reads) whose image column holds 784 numbers or 28x28 PNG bytes; an .npz (its "
            "test images by default, see --key); an .npy of uint8 (N,28,28)/(N,784) or float [0,1] "
            "images; or a folder of PNG/JPEG pictures. Default: data/<data.dataset>.npz.",
            show_default=False,
        ),
    ] = None,
    model: ModelOption = None,
    out: Annotated[
        str | None,
        typer.Option(
            "--out",
            "-o",
            help="The table to write: .csv or .parquet (by the suffix); with --engine spark a Parquet "
            "folder written by Spark. Default: reports/scores.csv, with Spark reports/scores.parquet.",
            show_default=False,
        ),
    ] = None,
    engine: Annotated[
        str,
        typer.Option(
            "--engine",
            help="process: in this process with torch; spark: on Spark through mlflow's spark_udf "
            "(the same numbers).",
        ),
    ] = "process",
    master: Annotated[
        str | None,
        typer.Option(
            "--master",
            help="With --engine spark: local[N], spark://HOST:PORT, k8s://..., yarn. Default: what "
            "spark-submit sets, else local[2].",
            show_default=False,
        ),
    ] = None,
    key: Annotated[
        str | None,
        typer.Option("--key", help="The array of an .npz to score. Default: x_test.", show_default=False),
    ] = None,
    column: Annotated[
        str | None,
        typer.Option(
            "--column",
            help="The image column of a Parquet dataset. Default: its only column of 784 numbers or "
            "picture bytes.",
            show_default=False,
        ),
    ] = None,
    latents: Annotated[
        bool, typer.Option("--latents", help="Also write the posterior means mu_0, mu_1, ... of each image.")
    ] = False,
    complexity: Annotated[
        bool,
        typer.Option(
            "--complexity",
            help="Also write png_bits (the image's PNG size) and corrected_bits (neg_elbo in bits minus "
            "png_bits): an anomaly score that corrects for simple images (Serra et al. 2020).",
        ),
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
    batch_size: Annotated[
        int,
        typer.Option(
            "--batch-size", min=1, help="Images per forward pass (with Spark: per Arrow batch of a worker)."
        ),
    ] = 4096,
    params: ParamsOption = Path("params.yaml"),
) -> None:
    """Score many images in bulk, without a server or JSON: per-image negative ELBO (nats).

    The same numbers as the served model's `score` output for the same seed, whatever the engine,
    batch or partition: each image's posterior draw depends on the seed and the image alone. Higher
    is more unusual. Writes one row per image: `image` (its index, or file name in a folder),
    `neg_elbo`, with --complexity `png_bits` and `corrected_bits`, with --latents `mu_0`, `mu_1`, ...

    Example: mnist-vae score data/mnist.npz --model models/model.pt --out reports/scores.parquet

    Example: mnist-vae score --engine spark --master local[2] --out reports/scores.parquet
    """
    from mnist_vae.serving.scoring import ScoreInputError, check_output, score_file

    if engine not in ("process", "spark"):
        raise ScoreInputError(f"--engine {engine!r}: expected process or spark")
    if master is not None and engine != "spark":
        raise ScoreInputError("--master: only with --engine spark")
    out = out or ("reports/scores.parquet" if engine == "spark" else "reports/scores.csv")
    if engine == "spark":
        from mnist_vae.serving import spark

        spark.check_output(out)
        spark.check_setup(master)  # pyspark, Java and the master, before the model loads
    else:
        check_output(Path(out))  # a bad suffix fails before the model loads
    if source is None or model is None:  # params.yaml names the default dataset and model
        resolved = load_params(params)
        source = source or str(dataset_path(resolved, None))
        model = default_model(resolved, model)
    vae = load_model(model)
    console = Console()
    if engine == "spark":
        with (
            busy(f"scoring {source} on Spark {master or ''}"),
            spark.session(master, batch_size) as s,
        ):
            result = spark.score_spark(
                s, vae, source, out, key, column, seed, latents=latents, complexity=complexity
            )
    else:
        with busy(f"scoring {source}"):
            result = score_file(
                vae,
                Path(source),
                Path(out),
                key=key,
                seed=seed,
                latents=latents,
                batch_size=batch_size,
                complexity=complexity,
                column=column,
            )
    console.print(
        f"scored {result.images} images in {result.seconds:.2f} s "
        f"({result.images_per_sec:,.0f} images/s): wrote {result.path}",
        highlight=False,
        soft_wrap=True,
    )
