"""Tests for :mod:`mnist_vae.serving.scoring` (bulk scoring to CSV/Parquet) on an untrained tiny model and
arrays: each input kind, each output kind, the bad-input messages, and agreement with the served
model's ``score`` output."""

from __future__ import annotations

import sys
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from PIL import Image
from typer.testing import CliRunner

from mnist_vae.cli import app
from mnist_vae.config import ModelConfig
from mnist_vae.data.pictures import ImageError
from mnist_vae.errors import UserError
from mnist_vae.models.families import build_model
from mnist_vae.models.vae import VAE
from mnist_vae.models.weights import save_model
from mnist_vae.serving.pyfunc import ServedVAE
from mnist_vae.serving.scoring import ScoreInputError, read_images, score_file, score_pixels

LATENT = 3


@pytest.fixture(params=["mlp", "conv"])
def vae(request: pytest.FixtureRequest) -> VAE:
    if request.param == "conv":
        return build_model(ModelConfig(channels=(4, 8), blocks=1, dense=16, latent=LATENT), seed=0)
    return build_model(ModelConfig(preset="mlp", hidden=(16,), latent=LATENT), seed=0)


@pytest.fixture
def images(tiny_images: Callable[..., tuple[np.ndarray, np.ndarray]]) -> np.ndarray:
    """Five uint8 (28, 28) images."""
    return tiny_images(5, seed=3)[0]


def _served_scores(vae: VAE, images: np.ndarray, seed: int = 0) -> np.ndarray:
    x = images.reshape(len(images), 784).astype(np.float32) / 255.0
    return ServedVAE(vae).predict(x, {"output": "score", "seed": seed})["neg_elbo"].to_numpy()


def test_scores_equal_the_served_score_output_for_the_same_seed(vae: VAE, images: np.ndarray) -> None:
    for seed in (0, 7):
        expected = _served_scores(vae, images, seed)
        np.testing.assert_array_equal(score_pixels(vae, images.reshape(5, 784), seed)["neg_elbo"], expected)
        # Batches smaller than the input take the same draws.
        chunked = score_pixels(vae, images.reshape(5, 784), seed, batch_size=2)["neg_elbo"]
        np.testing.assert_allclose(chunked, expected, rtol=1e-5)
    assert not np.allclose(_served_scores(vae, images, 0), _served_scores(vae, images, 7))


def test_float_input_scores_as_its_uint8_twin(vae: VAE, images: np.ndarray) -> None:
    as_float = images.reshape(5, 784).astype(np.float32) / 255.0
    np.testing.assert_array_equal(
        score_pixels(vae, as_float)["neg_elbo"], score_pixels(vae, images.reshape(5, 784))["neg_elbo"]
    )


def test_npz_scores_x_test_by_default_and_any_key(
    vae: VAE, tmp_path: Path, write_dataset: Callable[..., Path]
) -> None:
    npz = write_dataset(tmp_path / "mnist.npz", 6, n_test=4)
    out = score_file(vae, npz, tmp_path / "scores.csv")
    table = pd.read_csv(out.path)
    assert out.images == 4 and out.images_per_sec > 0
    assert list(table.columns) == ["image", "neg_elbo"] and table["image"].tolist() == [0, 1, 2, 3]
    with np.load(npz) as data:
        np.testing.assert_allclose(table["neg_elbo"], _served_scores(vae, data["x_test"]), rtol=1e-6)
    assert len(pd.read_csv(score_file(vae, npz, tmp_path / "train.csv", key="x_train").path)) == 6


@pytest.mark.parametrize("shape", [(5, 28, 28), (5, 784)])
def test_npy_of_uint8_or_float(vae: VAE, images: np.ndarray, tmp_path: Path, shape: tuple) -> None:
    np.save(tmp_path / "u8.npy", images.reshape(shape))
    np.save(tmp_path / "f.npy", images.reshape(shape).astype(np.float64) / 255.0)
    expected = _served_scores(vae, images)
    for name in ("u8", "f"):
        table = pd.read_csv(score_file(vae, tmp_path / f"{name}.npy", tmp_path / f"{name}.csv").path)
        np.testing.assert_allclose(table["neg_elbo"], expected, rtol=1e-5)


def test_folder_of_pictures_names_each_row_by_file(
    vae: VAE, tmp_path: Path, stroke_picture: Callable[..., Path]
) -> None:
    folder = tmp_path / "digits"
    folder.mkdir()
    stroke_picture(folder / "b.png")
    stroke_picture(folder / "a.JPG", ink="white", paper="black")
    (folder / "notes.txt").write_text("skipped\n")
    table = pd.read_csv(score_file(vae, folder, tmp_path / "scores.csv").path)
    assert table["image"].tolist() == ["a.JPG", "b.png"]
    assert np.isfinite(table["neg_elbo"]).all() and (table["neg_elbo"] > 0).all()


def test_parquet_with_latents(vae: VAE, images: np.ndarray, tmp_path: Path) -> None:
    np.save(tmp_path / "x.npy", images)
    table = pd.read_parquet(score_file(vae, tmp_path / "x.npy", tmp_path / "s.parquet", latents=True).path)
    assert list(table.columns) == ["image", "neg_elbo", "mu_0", "mu_1", "mu_2"]
    mu = vae.encode(torch.from_numpy(images.reshape(5, 784).astype(np.float32) / 255))[0]
    np.testing.assert_allclose(table[["mu_0", "mu_1", "mu_2"]].to_numpy(), mu.detach().numpy(), atol=1e-6)
    assert table.equals(pd.read_parquet(tmp_path / "s.parquet"))
    csv = pd.read_csv(score_file(vae, tmp_path / "x.npy", tmp_path / "s.csv", latents=True).path)
    np.testing.assert_allclose(csv.to_numpy(), table.to_numpy(), rtol=1e-6)


def _bad_inputs(tmp: Path) -> dict[str, tuple[Path, str | None, str]]:
    """name: (source, key, expected message part); the files are made here."""
    np.save(tmp / "shape.npy", np.zeros((3, 10), dtype=np.uint8))
    np.save(tmp / "range.npy", np.full((2, 784), 2.0, dtype=np.float32))
    np.save(tmp / "nan.npy", np.full((2, 784), np.nan, dtype=np.float32))
    np.save(tmp / "ints.npy", np.zeros((2, 784), dtype=np.int64))
    np.save(tmp / "empty.npy", np.zeros((0, 784), dtype=np.uint8))
    np.savez(tmp / "keys.npz", x_test=np.zeros((2, 784), dtype=np.uint8))
    (tmp / "notes.txt").write_text("hello\n")
    (tmp / "corrupt.npy").write_bytes(b"not numpy")
    (tmp / "empty_dir").mkdir()
    return {
        "missing": (
            tmp / "nope.npz",
            None,
            "nope.npz: no such file or folder; expected a Parquet dataset, an .npz",
        ),
        "suffix": (
            tmp / "notes.txt",
            None,
            "unknown kind '.txt'; expected a Parquet dataset, an .npz, an .npy or a folder of PNG/JPEG "
            "images",
        ),
        "shape": (
            tmp / "shape.npy",
            None,
            "expected uint8 0-255 or float grey levels in [0, 1], of "
            "shape (N, 28, 28) or (N, 784), got shape (3, 10)",
        ),
        "range": (
            tmp / "range.npy",
            None,
            "expected grey levels in [0, 1] (or uint8 0-255), got values in [2, 2]",
        ),
        "nan": (tmp / "nan.npy", None, "expected finite grey levels in [0, 1], got NaN or infinity"),
        "dtype": (tmp / "ints.npy", None, "got dtype int64"),
        "no-images": (tmp / "empty.npy", None, "expected at least one image, got none"),
        "key": (tmp / "keys.npz", "x_val", "keys.npz: no array 'x_val'; expected one of its arrays: x_test"),
        "key-of-npy": (tmp / "shape.npy", "x_test", "only an .npz has keys"),
        "corrupt": (tmp / "corrupt.npy", None, "expected an .npy array, could not read it"),
        "empty-folder": (tmp / "empty_dir", None, "no PNG or JPEG files (expected *.png, *.jpg or *.jpeg)"),
    }


@pytest.mark.parametrize(
    "case",
    [
        "missing",
        "suffix",
        "shape",
        "range",
        "nan",
        "dtype",
        "no-images",
        "key",
        "key-of-npy",
        "corrupt",
        "empty-folder",
    ],
)
def test_bad_input_is_a_one_line_user_error(tmp_path: Path, case: str) -> None:
    source, key, expected = _bad_inputs(tmp_path)[case]
    with pytest.raises(ScoreInputError) as info:
        read_images(source, key)
    message = str(info.value)
    assert isinstance(info.value, UserError) and "\n" not in message
    assert expected in message, message


def test_unreadable_picture_is_an_image_error(tmp_path: Path) -> None:
    (tmp_path / "bad.png").write_text("not a png")
    with pytest.raises(ImageError, match="bad.png: not an image Pillow can read"):
        read_images(tmp_path)


def test_bad_output_fails_before_scoring(
    vae: VAE, images: np.ndarray, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    np.save(tmp_path / "x.npy", images)
    with pytest.raises(
        ScoreInputError,
        match=r"s\.json: unknown output kind '\.json'; expected a "
        r"\.csv or \.parquet file",
    ):
        score_file(vae, tmp_path / "x.npy", tmp_path / "s.json")
    monkeypatch.setitem(sys.modules, "pyarrow", None)  # as if it were not installed
    with pytest.raises(ScoreInputError, match="writing Parquet needs pyarrow"):
        score_file(vae, tmp_path / "x.npy", tmp_path / "s.parquet")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["x.npy"]  # nothing written


def test_cli_scores_a_folder_and_reports_bad_input_in_one_line(
    vae: VAE, images: np.ndarray, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    save_model(vae, tmp_path / "model.pt")
    for i, image in enumerate(images[:2]):
        Image.fromarray(image).save(tmp_path / f"{i}.png")
    monkeypatch.chdir(tmp_path)
    runner = CliRunner()
    result = runner.invoke(app, ["score", ".", "--model", "model.pt", "--out", "s.csv"])
    assert result.exit_code == 0, result.output
    assert "scored 2 images" in result.output and len(pd.read_csv(tmp_path / "s.csv")) == 2
    result = runner.invoke(app, ["score", "nope.npy", "--model", "model.pt"])
    assert result.exit_code == 1 and isinstance(result.exception, SystemExit), result.output
    assert (
        result.output.strip() == "error: nope.npy: no such file or folder; expected a Parquet dataset, "
        "an .npz, an .npy or a folder of PNG/JPEG images"
    )


def _png_bytes(image: np.ndarray) -> bytes:
    import io

    buffer = io.BytesIO()
    Image.fromarray(image.reshape(28, 28)).save(buffer, format="PNG")
    return buffer.getvalue()


def test_parquet_layouts_score_as_the_array(vae: VAE, images: np.ndarray, tmp_path: Path) -> None:
    """784 integers over two files (a Spark-like folder), 784 doubles, PNG bytes in a binary column
    or a Hugging Face struct: each scores as the uint8 array, rows numbered in file order."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    flat = images.reshape(5, 784)
    expected = score_pixels(vae, flat)["neg_elbo"]
    folder = tmp_path / "ints"
    folder.mkdir()
    pq.write_table(pa.table({"px": pa.array(flat[:2].astype(np.int32).tolist())}), folder / "part-0.parquet")
    pq.write_table(pa.table({"px": pa.array(flat[2:].astype(np.int32).tolist())}), folder / "part-1.parquet")
    (folder / "_SUCCESS").write_text("")
    pq.write_table(
        pa.table({"grey": pa.array((flat / 255.0).tolist()), "n": range(5)}), tmp_path / "d.parquet"
    )
    blobs = [_png_bytes(image) for image in flat]
    pq.write_table(pa.table({"png": pa.array(blobs, pa.binary())}), tmp_path / "png.parquet")
    struct = pa.StructArray.from_arrays(
        [pa.array(blobs, pa.binary()), pa.array(["a"] * 5)], ["bytes", "path"]
    )
    pq.write_table(pa.table({"image": struct, "label": range(5)}), tmp_path / "hf.parquet")
    for source in (folder, tmp_path / "d.parquet", tmp_path / "png.parquet", tmp_path / "hf.parquet"):
        table = pd.read_csv(score_file(vae, source, tmp_path / "s.csv").path)
        assert table["image"].tolist() == [0, 1, 2, 3, 4], source
        np.testing.assert_allclose(table["neg_elbo"], expected, rtol=1e-5, err_msg=str(source))


def test_parquet_with_several_image_columns_asks_for_one(
    vae: VAE, images: np.ndarray, tmp_path: Path
) -> None:
    import pyarrow as pa
    import pyarrow.parquet as pq

    rows = pa.array(images.reshape(5, 784).astype(np.int32).tolist())
    pq.write_table(pa.table({"a": rows, "b": rows}), tmp_path / "two.parquet")
    with pytest.raises(
        ScoreInputError, match=r"several columns could hold images \(a, b\); choose one with --column"
    ):
        read_images(tmp_path / "two.parquet")
    assert len(read_images(tmp_path / "two.parquet", column="b").pixels) == 5
    (tmp_path / "pictures").mkdir()
    with pytest.raises(ScoreInputError, match="only a Parquet dataset has columns"):
        read_images(tmp_path / "pictures", column="b")  # a folder without Parquet files
