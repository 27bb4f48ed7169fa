"""``mnist-vae score --engine spark``: the scores of :mod:`.scores`, computed by Apache Spark through
``mlflow.pyfunc.spark_udf``.

- **Sources.** A Parquet dataset in a layout of :mod:`.tables`, read by Spark itself (so on a cluster
  also an ``s3a://`` or ``hdfs://`` URI), or what the in-process engine reads (an ``.npz``, an
  ``.npy``, a folder of pictures), read here and handed to Spark as an Arrow table. Integer grey
  levels reach the model as floats 0..255 with its parameter ``pixel_range=0-255``, and the model
  divides them by 255 as the in-process engine does (a per-value division in Spark SQL would be a
  lambda per pixel, slower than the scoring).
- **The model.** The weights are wrapped as a pyfunc model folder with this checkout's code (as
  ``mnist-vae serve-bench`` wraps a weights file), whatever code logged them, so both engines run the
  same scoring code and agree to the last bits; ``spark_udf`` ships the folder to the executors.
  ``env_manager="local"``: the executors' Python must hold torch, mlflow and pandas (on this
  machine it is the project's venv, ``PYSPARK_PYTHON``).
- **The work.** Each Python worker scores Arrow batches of
  ``spark.sql.execution.arrow.maxRecordsPerBatch`` images (``--batch-size``) with one torch thread;
  Spark runs one worker per core of the master (``local[2]``: two). The scores come back as a
  struct named after the columns, and Spark writes them as a Parquet folder, one file per partition.
- **Bad input** is found before any scoring, by one pass over the image column (lengths, nulls,
  range), and reported in one line naming the row, as the in-process engine does.

Over 300 lines because each way Spark can fail before it runs (no pyspark, no Java or an old one,
a master that does not answer) and each layout of a Parquet source gets its own check and message.
"""

from __future__ import annotations

import contextlib
import logging
import os
import re
import secrets
import shutil
import socket
import subprocess
import sys
import tempfile
import time
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import pandas as pd

from mnist_vae.errors import UserError
from mnist_vae.models.networks import N_PIXELS
from mnist_vae.models.vae import VAE
from mnist_vae.models.weights import save_model
from mnist_vae.serving import tables
from mnist_vae.serving.pyfunc import save_pyfunc
from mnist_vae.serving.scores import score_columns
from mnist_vae.serving.scoring import ScoreInputError, ScoreResult, read_images
from mnist_vae.serving.worker import THREADS_ENV

if TYPE_CHECKING:
    from pyspark.sql import DataFrame, SparkSession

DEFAULT_MASTER = "local[2]"
JAVA_VERSIONS = (17, 21)  # what Spark 4 runs on
INSTALL_JAVA = "install Java 17 or 21 (Debian: apt-get install openjdk-17-jre-headless) or set JAVA_HOME"
INSTALL_SPARK = "pip install 'mnist-vae[spark]' (`make install` includes it)"
_MASTER_FORMS = "local, local[N], local[*], spark://HOST:PORT, k8s://https://HOST:PORT or yarn"
_LOCAL = re.compile(r"^local(\[(\d+|\*)(,\d+)?\])?$")
_SCHEME = re.compile(r"^[A-Za-z][A-Za-z0-9+.-]*://")


class SparkSetupError(UserError):
    """Spark cannot start here: pyspark or Java missing, an unknown or unreachable master."""


# --- before Spark starts: pyspark, Java, the master ---------------------------------------------


def check_setup(master: str | None, environ: dict[str, str] | None = None) -> Path:
    """Checks what Spark needs before it starts (seconds before a JVM would fail); returns Java.

    Raises:
        SparkSetupError: pyspark is not installed, Java is missing or older than 17, or ``master``
            is of an unknown form or does not answer.
    """
    try:
        import pyspark  # noqa: F401
    except ImportError:
        raise SparkSetupError(f"--engine spark needs pyspark: {INSTALL_SPARK}") from None
    java = find_java(os.environ if environ is None else environ)
    major = java_major(java)
    if major < JAVA_VERSIONS[0]:
        raise SparkSetupError(f"Spark 4 needs Java 17 or 21, {java} is Java {major}: {INSTALL_JAVA}")
    if master is not None:
        check_master(master)
    return java


def find_java(environ: dict[str, str] | os._Environ[str]) -> Path:
    """``$JAVA_HOME/bin/java``, else ``java`` on PATH: where Spark's launcher looks.

    Raises:
        SparkSetupError: Neither is there.
    """
    home = environ.get("JAVA_HOME", "").strip()
    if home:
        java = Path(home) / "bin" / "java"
        if not java.is_file():
            raise SparkSetupError(
                f"Spark needs Java: $JAVA_HOME is {home}, which has no bin/java; {INSTALL_JAVA}"
            )
        return java
    found = shutil.which("java", path=environ.get("PATH", ""))
    if found is None:
        raise SparkSetupError(f"Spark needs Java: no $JAVA_HOME and no java on PATH; {INSTALL_JAVA}")
    return Path(found)


def java_major(java: Path) -> int:
    """The major version that ``java -version`` reports (8 for ``1.8.0``, 17 for ``17.0.15``).

    Raises:
        SparkSetupError: It does not run or says no version.
    """
    try:
        said = subprocess.run([str(java), "-version"], capture_output=True, text=True, timeout=60)
    except OSError as exc:
        raise SparkSetupError(f"{java} -version failed ({exc}); {INSTALL_JAVA}") from None
    match = re.search(r'version "(\d+)(?:\.(\d+))?', said.stderr + said.stdout)
    if said.returncode != 0 or match is None:
        raise SparkSetupError(
            f"{java} -version said no version ({(said.stderr or said.stdout).strip()[:200]})"
        )
    major = int(match.group(1))
    return int(match.group(2) or 0) if major == 1 else major


def check_master(master: str, timeout: float = 5.0) -> None:
    """Checks the form of ``--master`` and, for a standalone or Kubernetes master, that its
    host answers on its port.

    Raises:
        SparkSetupError: Another form, or nothing answers.
    """
    if _LOCAL.match(master) or master == "yarn":
        return
    if master.startswith("spark://"):
        addresses = master.removeprefix("spark://").split(",")
    elif master.startswith("k8s://"):
        rest = master.removeprefix("k8s://")
        addresses = [_SCHEME.sub("", rest).split("/")[0]]
        if ":" not in addresses[0]:
            addresses[0] += ":443" if not rest.startswith("http://") else ":80"
    else:
        raise SparkSetupError(f"--master {master!r}: expected {_MASTER_FORMS}")
    for address in addresses:
        host, _, port = address.rpartition(":")
        if not host or not port.isdigit():
            raise SparkSetupError(f"--master {master!r}: expected HOST:PORT, got {address!r}")
        try:
            socket.create_connection((host.strip("[]"), int(port)), timeout=timeout).close()
        except OSError as exc:
            reason = exc.strerror or type(exc).__name__
            raise SparkSetupError(
                f"--master {master}: nothing answers at {host}:{port} ({reason}); is the master running?"
            ) from None


@contextlib.contextmanager
def session(master: str | None, batch_size: int) -> Iterator[SparkSession]:
    """A Spark session on ``master`` (None: what ``spark-submit`` or spark-defaults set, else
    ``local[2]``), stopped at the end.

    Python workers start the interpreter running this (``$PYSPARK_PYTHON`` when set), so they
    find the project's packages; each takes Arrow batches of ``batch_size`` images.
    """
    from pyspark.sql import SparkSession

    os.environ.setdefault("PYSPARK_PYTHON", sys.executable)  # read when the context starts
    builder = SparkSession.builder.appName("mnist-vae score")
    if master is None and "PYSPARK_GATEWAY_PORT" not in os.environ:  # not under spark-submit
        master = DEFAULT_MASTER
    if master is not None:
        builder = builder.master(master)
    local = master is not None and _LOCAL.match(master) is not None
    settings = {
        "spark.sql.execution.arrow.pyspark.enabled": "true",
        "spark.sql.execution.arrow.maxRecordsPerBatch": str(batch_size),
        "spark.ui.showConsoleProgress": "false",
        # pyspark 4.2 warns in every Python worker that it does not fully support pandas >= 3;
        # the layouts used here are tested end to end with it (tests/e2e/test_spark.py).
        "spark.executorEnv.PYTHONWARNINGS": "ignore::FutureWarning",
    }
    if local:  # the executors live in the driver's JVM
        settings.update({"spark.ui.enabled": "false", "spark.driver.memory": "2g"})
    for key, value in settings.items():
        builder = builder.config(key, value)
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="PySpark does not yet fully support pandas")
        spark = builder.getOrCreate()
        spark.sparkContext.setLogLevel("ERROR")
        try:
            yield spark
        finally:
            spark.stop()


# --- the images as a Spark DataFrame: image (the row's name), pixels (array<float>) -------------


def _is_uri(source: str) -> bool:
    return bool(_SCHEME.match(source)) and not source.startswith("file://")


def image_frame(
    spark: SparkSession, source: str, key: str | None = None, column: str | None = None
) -> tuple[DataFrame, int, str]:
    """The images of ``source`` as columns ``image`` and ``pixels`` (array<float>), checked; their
    number; and the range of the grey levels (``0-1``, or ``0-255`` for 8-bit sources), as the
    model's parameter ``pixel_range`` names it.

    Raises:
        ScoreInputError: The source is missing or unreadable, has no image column, or an image of
            the wrong length, with null values or with values out of range.
    """
    local = Path(source.removeprefix("file://"))
    if _is_uri(source) or tables.is_dataset(local):
        if key is not None:
            raise ScoreInputError(f"--key {key!r}: only an .npz has keys, {source} is a Parquet dataset")
        return _parquet_frame(spark, source, column)
    images = read_images(local, key, column)  # every check of the in-process engine
    import pyarrow as pa
    from pyspark.sql import functions as F

    byte = images.pixels.dtype == np.uint8
    # 8-bit images cross to the JVM as int16 (Arrow's uint8 has no Spark type), half the bytes of
    # float32, and become floats 0..255 in Spark.
    values = images.pixels.astype(np.int16 if byte else np.float32)
    table = pa.table(
        {
            "image": pa.array(images.names),
            "pixels": pa.FixedSizeListArray.from_arrays(pa.array(values.reshape(-1)), N_PIXELS),
        }
    )
    frame = spark.createDataFrame(table).select("image", F.col("pixels").cast("array<float>"))
    return frame, len(values), "0-255" if byte else "0-1"


def _layout(kind: Any) -> tables.Layout | None:
    from pyspark.sql import types as T

    if isinstance(kind, T.ArrayType):
        if isinstance(kind.elementType, T.IntegralType):
            return "int"
        return "float" if isinstance(kind.elementType, T.FloatType | T.DoubleType) else None
    if isinstance(kind, T.BinaryType):
        return "picture"
    if isinstance(kind, T.StructType) and "bytes" in kind.fieldNames():
        return "picture" if isinstance(kind["bytes"].dataType, T.BinaryType) else None
    return None


def _parquet_frame(spark: SparkSession, source: str, column: str | None) -> tuple[DataFrame, int, str]:
    from pyspark.errors import AnalysisException
    from pyspark.sql import functions as F

    try:
        raw = spark.read.parquet(source)
    except AnalysisException as exc:
        raise ScoreInputError(
            f"{source}: expected a Parquet dataset, Spark could not read it ({exc.getMessage()})"
        ) from None
    layouts = {f.name: (f.dataType.simpleString(), _layout(f.dataType)) for f in raw.schema.fields}
    try:
        name = tables.choose_column(layouts, column, source)
    except LookupError as exc:
        raise ScoreInputError(str(exc)) from None
    layout = layouts[name][1]
    assert layout is not None
    where = f"{source}[{name}]"
    rows = raw.select(
        F.col("_metadata.file_path").alias("file"),
        F.col("_metadata.row_index").alias("row"),
        F.spark_partition_id().alias("part"),
        F.col(name).alias("raw"),
    )
    if layout == "picture":
        blobs = F.col("raw.bytes") if layouts[name][0].startswith("struct") else F.col("raw")
        decoded = rows.select("file", "row", "part", _decoder()(blobs).alias("d"))
        # Decoded once: the check below and the scoring read the same pictures.
        rows = decoded.select("file", "row", "part", "d.pixels", "d.error").persist()
        problem = F.col("error").isNotNull()
        checks = [F.min_by("error", F.when(problem, F.col("row"))).alias("error")]
        pixels = F.col("pixels")
    else:
        wrong = F.col("raw").isNull() | (F.size("raw") != N_PIXELS)
        # A null value: arrays_overlap with [-1] is null exactly when the array holds a null and
        # no -1 (a -1 fails the range check anyway). Native, five times faster here than a lambda
        # per value (exists) or array_compact.
        item = raw.schema[name].dataType.elementType  # type: ignore[attr-defined]
        nulls = F.arrays_overlap("raw", F.array(F.lit(-1).cast(item))).isNull()
        problem = wrong | nulls
        checks = [
            F.min_by(F.size("raw"), F.when(wrong, F.col("row"))).alias("size"),
            F.min_by(wrong, F.when(problem, F.col("row"))).alias("wrong"),
            F.min(F.array_min("raw")).alias("low"),
            F.max(F.array_max("raw")).alias("high"),
        ]
        pixels = F.col("raw").cast("array<float>")
    # One pass: the rows of each file (numbered as the in-process engine numbers them: files in
    # path order, rows in file order), each file's first bad row, and the range of the values.
    found = (
        rows.groupBy("file", "part")
        .agg(F.count("*").alias("n"), F.min(F.when(problem, F.col("row"))).alias("bad"), *checks)
        .collect()
    )
    sizes: dict[str, int] = {}
    for group in found:
        sizes[group["file"]] = sizes.get(group["file"], 0) + group["n"]
    offsets: dict[str, int] = {}
    count = 0
    for file in sorted(sizes):
        offsets[file], count = count, count + sizes[file]
    if count == 0:
        raise ScoreInputError(f"{where}: expected at least one image, got none")
    bad = [group for group in found if group["bad"] is not None]
    if bad:
        first = min(bad, key=lambda group: offsets[group["file"]] + group["bad"])
        index = offsets[first["file"]] + first["bad"]
        if layout == "picture":
            raise ScoreInputError(tables.bad_picture(where, index, first["error"]))
        if first["wrong"]:
            size = first["size"]
            raise ScoreInputError(
                tables.wrong_length(where, index, None if size is None or size < 0 else size)
            )
        raise ScoreInputError(tables.null_values(where, index))
    if layout != "picture":
        low = min(float(group["low"]) for group in found if group["low"] is not None)
        high = max(float(group["high"]) for group in found if group["high"] is not None)
        if not tables.in_range(layout, low, high):
            raise ScoreInputError(tables.out_of_range(where, layout, low, high))
    starts = spark.createDataFrame(list(offsets.items()), "file string, offset long")
    frame = rows.join(F.broadcast(starts), "file").select(
        (F.col("offset") + F.col("row")).alias("image"), pixels.alias("pixels")
    )
    # A small file is one row group, read by one task: spread it over every core.
    cores = spark.sparkContext.defaultParallelism
    if len({group["part"] for group in found}) < cores:
        frame = frame.repartition(cores)
    return frame, count, "0-1" if layout == "float" else "0-255"


def _decoder() -> Any:
    """A pandas UDF decoding picture bytes to grey levels 0..255 (it needs this package and Pillow on
    the executors); a picture that does not decode gets its reason in ``error``."""
    from pyspark.sql.functions import pandas_udf

    @pandas_udf("pixels array<float>, error string")  # type: ignore[call-overload]
    def decode(batch: pd.Series) -> pd.DataFrame:
        pixels: list[np.ndarray | None] = []
        errors: list[str | None] = []
        for blob in batch:
            try:
                pixels.append(tables.decode_picture(blob).astype(np.float32))
                errors.append(None)
            except tables.PictureError as exc:
                pixels.append(None)
                errors.append(str(exc))
        return pd.DataFrame({"pixels": pixels, "error": errors})

    return decode


# --- scoring and writing ------------------------------------------------------------------------


def check_output(out: str) -> None:
    """Fails before any work when ``out`` cannot take Spark's Parquet folder.

    Raises:
        ScoreInputError: It is not named ``*.parquet``, or it is a folder Spark did not write.
    """
    if not out.rstrip("/").lower().endswith(tables.SUFFIX):
        raise ScoreInputError(f"{out}: --engine spark writes a Parquet folder; name --out *.parquet")
    path = Path(out.removeprefix("file://"))
    if not _is_uri(out) and path.is_dir() and not (path / "_SUCCESS").is_file():
        raise ScoreInputError(f"{out}: a folder that Spark did not write (no _SUCCESS); not replacing it")


@contextlib.contextmanager
def _quiet_mlflow() -> Iterator[None]:
    """No progress bar per model file, no notes on saving the model folder, and no warning that
    env_manager="local" keeps this environment: that is the point here."""
    previous = os.environ.get("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR")
    os.environ["MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR"] = "false"
    loggers = [logging.getLogger(name) for name in ("mlflow.pyfunc", "mlflow.models")]
    levels = [logger.level for logger in loggers]
    for logger in loggers:
        logger.setLevel(logging.ERROR)
    try:
        yield
    finally:
        for logger, level in zip(loggers, levels, strict=True):
            logger.setLevel(level)
        if previous is None:
            os.environ.pop("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", None)
        else:
            os.environ["MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR"] = previous


def score_spark(
    spark: SparkSession,
    model: VAE,
    source: str,
    out: str,
    key: str | None = None,
    column: str | None = None,
    seed: int = 0,
    latents: bool = False,
    complexity: bool = False,
) -> ScoreResult:
    """Scores every image of ``source`` on ``spark`` and writes ``image``, ``neg_elbo`` (and
    ``png_bits``, ``corrected_bits``, ``mu_i``) as a Parquet folder ``out``: the columns and
    numbers of :func:`mnist_vae.serving.scoring.score_file`.

    A local ``out`` is written beside it and then put in its place; a URI (``s3a://...``) is
    overwritten by Spark.

    Raises:
        ScoreInputError: Bad input or output (see :func:`image_frame` and :func:`check_output`).
    """
    import mlflow

    start = time.perf_counter()
    check_output(out)
    frame, count, pixel_range = image_frame(spark, source, key, column)
    names = score_columns(model.latent_dim, latents, complexity)
    result_type = "struct<" + ", ".join(f"{name}: float" for name in names) + ">"
    with tempfile.TemporaryDirectory(prefix="mnist-vae-spark-") as scratch:
        save_model(model, Path(scratch) / "model.pt")
        with _quiet_mlflow():
            folder = save_pyfunc(Path(scratch) / "model.pt", Path(scratch) / "model")
            udf = mlflow.pyfunc.spark_udf(
                spark,
                str(folder),
                result_type=result_type,
                env_manager="local",
                params={
                    "output": "score",
                    "seed": seed,
                    "latents": latents,
                    "complexity": complexity,
                    "pixel_range": pixel_range,
                },
                extra_env={THREADS_ENV: "1"},
            )
        scored = frame.select("image", udf("pixels").alias("score")).select("image", "score.*")
        path = _write(scored, out)
    return ScoreResult(path, count, time.perf_counter() - start)


def _write(frame: DataFrame, out: str) -> Path:
    if _is_uri(out):
        frame.write.mode("overwrite").parquet(out)
        return Path(out)
    target = Path(out.removeprefix("file://"))
    staging = target.with_name(f".{target.name}.{secrets.token_hex(4)}")
    frame.write.parquet(str(staging))
    try:
        if target.is_dir():
            shutil.rmtree(target)
        elif target.exists():
            target.unlink()
        os.replace(staging, target)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return target
