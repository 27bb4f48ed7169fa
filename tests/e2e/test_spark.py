"""`mnist-vae score --engine spark` on real pyspark, local[2]: the same columns and numbers as the
in-process engine on each kind of source, bad input said in one line, and the command itself.

One Spark session serves the module (starting one costs 10-20 s on two cores); the model is a tiny
untrained conv VAE, which scores like a trained one for what is compared here.
"""

from __future__ import annotations

import io
import os
import shutil
import subprocess
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image
from typer.testing import CliRunner

from mnist_vae.cli import app
from mnist_vae.config import ModelConfig
from mnist_vae.models.families import build_model
from mnist_vae.models.vae import VAE
from mnist_vae.models.weights import save_model
from mnist_vae.serving.scoring import ScoreInputError, score_file

pytestmark = pytest.mark.slow

pytest.importorskip("pyspark")
N_IMAGES = 3000  # real MNIST test images compared in each source layout
TOLERANCE = 1e-5


@pytest.fixture(scope="module")
def spark() -> Iterator[object]:
    from mnist_vae.serving import spark as engine

    try:
        engine.check_setup("local[2]")
    except engine.SparkSetupError as exc:
        pytest.skip(str(exc))
    with engine.session("local[2]", batch_size=1000) as session:
        yield session


@pytest.fixture(scope="module")
def vae() -> VAE:
    return build_model(ModelConfig(channels=(4, 8), dense=16, latent=3), seed=0)


@pytest.fixture(scope="module")
def images(real_mnist: Path) -> np.ndarray:
    with np.load(real_mnist) as data:
        return data["x_test"][:N_IMAGES].reshape(N_IMAGES, 784)


def _lists(values: np.ndarray) -> pa.Array:
    offsets = pa.array(np.arange(0, values.size + 1, 784, dtype=np.int32))
    return pa.ListArray.from_arrays(offsets, pa.array(values.reshape(-1)))


def _png(image: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(image.reshape(28, 28)).save(buffer, format="PNG")
    return buffer.getvalue()


@pytest.fixture(scope="module")
def sources(tmp_path_factory: pytest.TempPathFactory, images: np.ndarray) -> dict[str, Path]:
    """The test images as each kind of source both engines read."""
    root = tmp_path_factory.mktemp("spark-sources")
    np.savez(root / "test.npz", x_test=images)
    # uint8 lists over three files, one of them a row group of 500: the rows keep their order.
    folder = root / "uint8"
    folder.mkdir()
    for i, part in enumerate(np.array_split(images, 3)):
        pq.write_table(
            pa.table({"label": np.arange(len(part)), "pixels": _lists(part)}),
            folder / f"part-{i}.parquet",
            row_group_size=500,
        )
    (folder / "_SUCCESS").write_text("")
    grey = images[:1000].astype(np.float64) / 255.0  # doubles: cast to float32 by both engines
    pq.write_table(pa.table({"grey": _lists(grey)}), root / "doubles.parquet")
    pictures = pa.StructArray.from_arrays(
        [
            pa.array([_png(image) for image in images[:300]], pa.binary()),
            pa.array([f"{i}.png" for i in range(300)]),
        ],
        names=["bytes", "path"],
    )
    pq.write_table(pa.table({"image": pictures, "label": np.zeros(300, np.int64)}), root / "pictures.parquet")
    return {
        "npz": root / "test.npz",
        "uint8": folder,
        "doubles": root / "doubles.parquet",
        "pictures": root / "pictures.parquet",
    }


def _compare(spark_out: Path, local_out: Path) -> float:
    """The largest relative difference between the two engines' tables, which must have the same
    columns and rows."""
    a = pd.read_parquet(spark_out).sort_values("image").reset_index(drop=True)
    b = pd.read_parquet(local_out)
    assert list(a.columns) == list(b.columns)
    assert a["image"].tolist() == b["image"].tolist()
    worst = 0.0
    for name in b.columns[1:]:
        np.testing.assert_allclose(a[name], b[name], rtol=TOLERANCE, atol=TOLERANCE, err_msg=name)
        worst = max(worst, float((np.abs(a[name] - b[name]) / np.maximum(np.abs(b[name]), 1.0)).max()))
    return worst


@pytest.mark.parametrize(
    ("kind", "extra"),
    [
        ("npz", {"latents": True, "complexity": True}),
        ("uint8", {}),
        ("doubles", {"seed": 7}),
        ("pictures", {}),
    ],
)
def test_spark_scores_as_the_in_process_engine(
    spark, vae: VAE, sources, tmp_path: Path, kind: str, extra: dict
) -> None:
    from mnist_vae.serving.spark import score_spark

    source = sources[kind]
    local = score_file(vae, source, tmp_path / "local.parquet", **extra)
    result = score_spark(spark, vae, str(source), str(tmp_path / "spark.parquet"), **extra)
    assert (
        result.images
        == local.images
        == {"npz": N_IMAGES, "uint8": N_IMAGES, "doubles": 1000, "pictures": 300}[kind]
    )
    assert (tmp_path / "spark.parquet" / "_SUCCESS").is_file()
    assert len(list((tmp_path / "spark.parquet").glob("part-*.parquet"))) >= 2  # both workers wrote
    assert _compare(tmp_path / "spark.parquet", tmp_path / "local.parquet") < TOLERANCE
    if extra.get("latents"):
        columns = pq.read_schema(next((tmp_path / "spark.parquet").glob("part-*.parquet"))).names
        assert columns == ["image", "neg_elbo", "png_bits", "corrected_bits", "mu_0", "mu_1", "mu_2"]
    if kind == "pictures":  # written again over its own output: replaced, not refused
        score_spark(spark, vae, str(source), str(tmp_path / "spark.parquet"), **extra)


def _bad(root: Path) -> dict[str, tuple[str, dict, str]]:
    """case: (source, options, the message's end), the files made here."""
    grey = np.full((4, 784), 0.5)
    grey[2, 7] = 1.5
    pq.write_table(pa.table({"grey": _lists(grey)}), root / "range.parquet")
    ints = np.zeros((3, 784), np.int64)
    ints[1, 0] = 300
    pq.write_table(pa.table({"pixels": _lists(ints)}), root / "ints.parquet")
    short = pa.array([[0.0] * 784, [0.0] * 783], pa.list_(pa.float32()))
    pq.write_table(pa.table({"pixels": short}), root / "short.parquet")
    holes = pa.array([[0.0] * 784, [0.0] * 783 + [None]], pa.list_(pa.float32()))
    pq.write_table(pa.table({"pixels": holes}), root / "holes.parquet")
    pq.write_table(pa.table({"a": [1, 2], "b": ["x", "y"]}), root / "none.parquet")
    pq.write_table(
        pa.table({"png": pa.array([_png(np.zeros(784, np.uint8)), b"not a picture"])}), root / "png.parquet"
    )
    return {
        "range": (
            str(root / "range.parquet"),
            {},
            "[grey]: expected grey levels in [0, 1] (divide 0-255 pixels by 255), got values in [0.5, 1.5]",
        ),
        "ints": (
            str(root / "ints.parquet"),
            {},
            "[pixels]: expected integer grey levels in 0..255, got values in [0, 300]",
        ),
        "short": (
            str(root / "short.parquet"),
            {},
            "[pixels]: expected 784 values per image (28x28 flattened), row 1 has 783",
        ),
        "holes": (
            str(root / "holes.parquet"),
            {},
            "[pixels]: expected 784 grey levels per image, row 1 holds null values",
        ),
        "no column": (str(root / "none.parquet"), {}, "no image column; expected a column of 784 numbers"),
        "missing column": (
            str(root / "range.parquet"),
            {"column": "pixels"},
            "no column 'pixels'; its columns: grey (",
        ),
        "picture": (str(root / "png.parquet"), {}, "[png]: row 1: not a picture Pillow reads"),
    }


def test_bad_input_is_one_line_and_the_same_from_both_engines(spark, vae: VAE, tmp_path: Path) -> None:
    from mnist_vae.serving.spark import score_spark

    for case, (source, options, expected) in _bad(tmp_path).items():
        messages = []
        for engine in ("spark", "process"):
            with pytest.raises(ScoreInputError) as info:
                if engine == "spark":
                    score_spark(spark, vae, source, str(tmp_path / "s.parquet"), **options)
                else:
                    score_file(vae, Path(source), tmp_path / "s.parquet", **options)
            messages.append(str(info.value))
            assert "\n" not in messages[-1] and expected in messages[-1], (case, engine, messages[-1])
        if case not in ("no column", "missing column"):  # those list the column types in each one's words
            assert messages[0] == messages[1], case
    assert not (tmp_path / "s.parquet").exists()
    (tmp_path / "mine.parquet").mkdir()
    with pytest.raises(ScoreInputError, match="a folder that Spark did not write"):
        score_spark(spark, vae, str(tmp_path / "range.parquet"), str(tmp_path / "mine.parquet"))
    with pytest.raises(ScoreInputError, match="name --out \\*.parquet"):
        score_spark(spark, vae, str(tmp_path / "range.parquet"), str(tmp_path / "s.csv"))


def _invoke(*args: str) -> object:
    return CliRunner().invoke(app, ["score", *args])


def test_setup_faults_are_one_line_before_spark_starts(
    tmp_path: Path, vae: VAE, monkeypatch: pytest.MonkeyPatch
) -> None:
    from mnist_vae import procs

    save_model(vae, tmp_path / "m.pt")
    np.save(tmp_path / "x.npy", np.zeros((2, 784), np.uint8))
    common = [str(tmp_path / "x.npy"), "--model", str(tmp_path / "m.pt"), "--engine", "spark"]
    port = procs.free_port()  # nothing listens there
    result = _invoke(*common, "--master", f"spark://127.0.0.1:{port}", "--out", str(tmp_path / "s.parquet"))
    assert result.exit_code == 1 and isinstance(result.exception, SystemExit)
    assert result.output.strip() == (
        f"error: --master spark://127.0.0.1:{port}: nothing answers at 127.0.0.1:{port} "
        "(Connection refused); is the master running?"
    )
    result = _invoke(*common, "--master", "mesos://x:5050")
    assert (
        result.exit_code == 1
        and "error: --master 'mesos://x:5050': expected local, local[N]" in result.output
    )
    monkeypatch.delenv("JAVA_HOME", raising=False)
    monkeypatch.setenv("PATH", str(tmp_path))  # no java here
    result = _invoke(*common)
    assert result.exit_code == 1
    assert result.output.strip() == (
        "error: Spark needs Java: no $JAVA_HOME and no java on PATH; install Java 17 or 21 "
        "(Debian: apt-get install openjdk-17-jre-headless) or set JAVA_HOME"
    )
    assert not list(tmp_path.glob("*.parquet"))


def test_the_command_scores_the_test_set_on_local_2_as_in_process(
    tmp_path: Path, vae: VAE, sources, venv_bin: Path
) -> None:
    """What the README's `mnist-vae score --engine spark` runs: a real process, its own Spark."""
    save_model(vae, tmp_path / "m.pt")
    shutil.copy(sources["npz"], tmp_path / "test.npz")
    env = {**os.environ, "PATH": f"{venv_bin}{os.pathsep}{os.environ['PATH']}"}
    env.pop("PYSPARK_PYTHON", None)  # the command finds the venv's interpreter itself
    runs = {}
    for engine in ("spark", "process"):
        args = [
            "mnist-vae",
            "score",
            "test.npz",
            "--model",
            "m.pt",
            "--engine",
            engine,
            "--out",
            f"{engine}.parquet",
        ]
        if engine == "spark":
            args += ["--master", "local[2]"]
        runs[engine] = subprocess.run(
            args, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600
        )
        assert runs[engine].returncode == 0, runs[engine].stderr[-3000:]
        assert f"scored {N_IMAGES} images" in runs[engine].stdout
    assert "FutureWarning" not in runs["spark"].stderr
    assert _compare(tmp_path / "spark.parquet", tmp_path / "process.parquet") < TOLERANCE
