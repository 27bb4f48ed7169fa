"""Tests for :mod:`mnist_vae.cli`, with :mod:`mnist_vae.preprocess` and :mod:`mnist_vae.aliases`.

One tiny model is trained and registered for the whole module, through ``mnist-vae run`` itself, on
a fake dataset of simple shapes in a temporary project whose MLflow store is a SQLite file there.
No test touches the network; the unreachable server is a refused local port.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import mlflow
import numpy as np
import pytest
import yaml
from mlflow import MlflowClient
from PIL import Image, ImageDraw
from typer.testing import CliRunner

from mnist_vae.cli import app
from mnist_vae.preprocess import ImageError, load_digit

REPO = Path(__file__).resolve().parents[1]
NAME = "mnist-vae"
REFUSED = "http://127.0.0.1:9"  # the discard port: nothing listens, so connecting is refused


def invoke(*args: str, env: dict[str, str] | None = None):
    return CliRunner().invoke(app, list(args), env=env)


def ok(*args: str):
    result = invoke(*args)
    assert result.exit_code == 0, f"{args}: exit {result.exit_code}\n{result.output}"
    return result


def fake_mnist(n: int, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """Rings whose radius grows with the label, odd labels crossed by a bar, jittered in place."""
    labels = rng.permutation(np.arange(n) % 10).astype(np.uint8)
    yy, xx = np.mgrid[:28, :28]
    images = np.zeros((n, 28, 28), dtype=np.uint8)
    for i, digit in enumerate(labels):
        cy, cx = 14 + rng.integers(-2, 3, size=2)
        ring = np.abs(np.hypot(yy - cy, xx - cx) - (3 + 0.8 * digit)) < 1.3
        images[i][ring] = 255
        if digit % 2:
            images[i, 4:24, cx - 1 : cx + 1] = 200
    return images, labels


def stroke_picture(path: Path, ink: str = "black", paper: str = "white") -> Path:
    """A 100x60 picture of a 7-like stroke, as a user's photo or drawing might be."""
    picture = Image.new("RGB", (100, 60), paper)
    ImageDraw.Draw(picture).line([(35, 12), (62, 12), (44, 50)], fill=ink, width=6)
    picture.save(path)
    return path


def is_png(path: Path) -> bool:
    with Image.open(path) as img:
        img.verify()
        return img.format == "PNG"


def center_of_mass(image: np.ndarray) -> tuple[float, float]:
    ys, xs = np.indices(image.shape)
    mass = image.astype(np.float64).sum()
    return (ys * image).sum() / mass, (xs * image).sum() / mass


@pytest.fixture(scope="module")
def project(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    """A project folder holding the fake dataset, small params and version 1, the champion."""
    root = tmp_path_factory.mktemp("project")
    rng = np.random.default_rng(0)
    x_train, y_train = fake_mnist(512, rng)
    x_test, y_test = fake_mnist(200, rng)
    (root / "data").mkdir()
    np.savez_compressed(root / "data" / "mnist.npz", x_train=x_train, y_train=y_train,
                        x_test=x_test, y_test=y_test)
    params = yaml.safe_load((REPO / "params.yaml").read_text())
    params["model"].update(hidden=[32], latent=4)
    params["train"].update(device="cpu", epochs=3, batch_size=64, limit=256, threads=1)
    params["evaluate"].update(batch_size=100, iw_samples=2, limit=100, n_images=4)
    (root / "params.yaml").write_text(yaml.safe_dump(params))

    with pytest.MonkeyPatch.context() as mp:
        mp.chdir(root)
        mp.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{root}/mlflow.db")
        mp.delenv("MLFLOW_REGISTRY_URI", raising=False)  # tracking.configure sets it
        mp.delenv("MNIST_MIRRORS", raising=False)
        mp.setenv("COLUMNS", "200")  # rich tables at full width, cells unwrapped
        ok("run", "--set", "train.epochs=1")  # also the test of --set: the file says 3
        yield root
        # configure() set process-wide MLflow URIs; leave later tests the defaults.
        mlflow.set_tracking_uri(None)
        mlflow.set_registry_uri(None)


@pytest.fixture
def client(project: Path) -> MlflowClient:
    return MlflowClient(tracking_uri=f"sqlite:///{project}/mlflow.db",
                        registry_uri=f"sqlite:///{project}/mlflow.db")


# --- help ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("command", [[]] + [[c.name or c.callback.__name__]
                                             for c in app.registered_commands])
def test_help_has_an_example(command: list[str]) -> None:
    result = invoke(*command, "--help")
    assert result.exit_code == 0, result.output
    assert "Example" in result.output


def test_no_arguments_shows_help() -> None:
    result = invoke()
    assert "Usage" in result.output
    assert "reconstruct" in result.output


# --- run, evaluate, compare ---------------------------------------------------------------------


def test_run_trained_with_the_override_and_registered_a_champion(project: Path,
                                                                  client: MlflowClient) -> None:
    history = (project / "reports" / "train_history.csv").read_text().splitlines()
    assert len(history) == 2, "--set train.epochs=1 must beat the file's 3 epochs"
    assert (project / "models" / "model.pt").is_file()
    assert str(client.get_model_version_by_alias(NAME, "champion").version) == "1"


@pytest.mark.parametrize("reference", ["models:/mnist-vae/1", "models:/mnist-vae@champion",
                                       "runs:/{run_id}/model", "models/model.pt"])
def test_evaluate_accepts_every_kind_of_reference(project: Path, reference: str) -> None:
    run_id = json.loads((project / "models" / "run.json").read_text())["run_id"]
    result = ok("evaluate", reference.format(run_id=run_id))
    for metric in ("neg_elbo", "nll_iw", "psnr", "hardest"):
        assert metric in result.output
    text = " ".join(result.output.split())  # rich wraps the table's title
    assert "on 100 test images" in text  # evaluate.limit from params.yaml


def test_evaluate_digits_and_out_write_metrics_and_figures(project: Path) -> None:
    out = project / "eval-38"
    ok("evaluate", "models/model.pt", "--digits", "3,8", "--iw-samples", "1", "--out", str(out))
    metrics = json.loads((out / "metrics.json").read_text())
    assert set(metrics["per_digit_mse"]) == {"3", "8"}
    assert metrics["n_images"] <= 100 and metrics["hardest_digit"] in (3, 8)
    for figure in ("reconstructions.png", "samples.png", "traversal.png"):
        assert is_png(out / figure)


def test_compare_same_weights_differ_by_zero(project: Path) -> None:
    result = ok("compare", "models:/mnist-vae/1", "models/model.pt", "--limit", "50")
    assert "B - A" in result.output
    neg_elbo = next(line for line in result.output.splitlines() if "neg_elbo" in line)
    # Same weights, same images, same seed: identical numbers, so the draws really are shared.
    assert "0.0000" in neg_elbo and "+" not in neg_elbo
    assert "per digit" in result.output


# --- reconstruct, sample ------------------------------------------------------------------------


def test_reconstruct_png_and_jpeg_with_the_champion(project: Path, tmp_path: Path) -> None:
    png = stroke_picture(tmp_path / "seven.png")
    jpeg = stroke_picture(tmp_path / "seven.jpg")
    out = tmp_path / "side_by_side.png"
    ok("reconstruct", str(png), str(jpeg), "-o", str(out))
    assert is_png(out)
    with Image.open(out) as picture:
        assert picture.height > picture.width / 2, "two rows: inputs above reconstructions"


def test_sample_writes_a_grid(project: Path, tmp_path: Path) -> None:
    out = tmp_path / "grid.png"
    ok("sample", "-n", "16", "-o", str(out), "--seed", "3", "--model", "models:/mnist-vae/1")
    assert is_png(out)


def test_load_digit_inverts_dark_ink_on_light_paper(tmp_path: Path) -> None:
    digit = load_digit(stroke_picture(tmp_path / "seven.png"))
    assert digit.shape == (28, 28) and digit.dtype == np.uint8
    assert digit.max() == 255
    assert digit[0].max() == digit[-1].max() == digit[:, 0].max() == digit[:, -1].max() == 0


def test_load_digit_keeps_light_ink_on_dark_paper(tmp_path: Path) -> None:
    dark = load_digit(stroke_picture(tmp_path / "dark.png", ink="white", paper="black"))
    light = load_digit(stroke_picture(tmp_path / "light.png"))
    np.testing.assert_array_equal(dark, light)


def test_load_digit_fits_20_pixels_centred_by_mass(tmp_path: Path) -> None:
    digit = load_digit(stroke_picture(tmp_path / "seven.jpg"))
    rows, cols = np.flatnonzero(digit.any(axis=1)), np.flatnonzero(digit.any(axis=0))
    assert max(rows[-1] - rows[0] + 1, cols[-1] - cols[0] + 1) == 20
    cy, cx = center_of_mass(digit)
    assert abs(cy - 14) <= 1.0 and abs(cx - 14) <= 1.0, (cy, cx)


def test_load_digit_composites_transparency_on_white(tmp_path: Path) -> None:
    path = tmp_path / "transparent.png"
    picture = Image.new("RGBA", (40, 80), (0, 0, 0, 0))
    ImageDraw.Draw(picture).ellipse([10, 10, 30, 70], outline=(0, 0, 0, 255), width=4)
    picture.save(path)
    digit = load_digit(path)
    assert digit.max() == 255 and digit[0, 0] == 0


@pytest.mark.parametrize("content", [b"not an image at all\n", b""])
def test_load_digit_rejects_non_images(tmp_path: Path, content: bytes) -> None:
    path = tmp_path / "notes.png"
    path.write_bytes(content)
    with pytest.raises(ImageError, match="notes.png"):
        load_digit(path)


def test_load_digit_rejects_blank_and_missing_files(tmp_path: Path) -> None:
    Image.new("L", (30, 30), 255).save(tmp_path / "blank.png")
    with pytest.raises(ImageError, match="no digit"):
        load_digit(tmp_path / "blank.png")
    with pytest.raises(ImageError, match="no such file"):
        load_digit(tmp_path / "missing.png")


# --- models, promote, rollback ------------------------------------------------------------------


def test_models_lists_version_1_as_champion(project: Path) -> None:
    result = ok("models")
    row = next(line for line in result.output.splitlines() if "champion" in line)
    assert row.split()[1] == "1", row  # the first cell after the table border
    assert "default" in row  # the preset tag


def test_promote_then_rollback(project: Path, client: MlflowClient) -> None:
    ok("run")  # version 2; the gate may or may not have made it champion
    assert {str(mv.version) for mv in client.search_model_versions(f"name='{NAME}'")} == {"1", "2"}
    ok("promote", "1")
    assert "was version 1" in ok("promote", "2").output
    assert str(client.get_model_version_by_alias(NAME, "champion").version) == "2"
    assert "already champion" in ok("promote", "2").output  # and the record of 1 survives

    ok("rollback")
    assert str(client.get_model_version_by_alias(NAME, "champion").version) == "1"
    result = invoke("rollback")
    assert result.exit_code == 1 and "nothing to roll back to" in result.output


# --- errors -------------------------------------------------------------------------------------


@pytest.mark.parametrize(("args", "expected"), [
    (["evaluate", "models:/mnist-vae/99"], "not found"),
    (["evaluate", "models:/mnist-vae@nope"], "not found"),
    (["sample", "--model", "models/nothing.pt"], "no such model file"),
    (["promote", "99"], "no version 99"),
    (["reconstruct", "notes.txt"], "not an image"),
    (["reconstruct", "nowhere.png"], "no such file"),
    (["evaluate", "models/model.pt", "--data", "missing.npz"], "mnist-vae download"),
    (["evaluate", "models/model.pt", "--digits", "11"], "--digits"),
    (["evaluate", "models/model.pt", "--iw-samples", "0"], "evaluate.iw_samples"),
    (["train", "--set", "train.epochs=0"], "train.epochs"),
    (["train", "--set", "epochs"], "section.key=value"),
    (["run", "--params", "missing.yaml"], "params file not found"),
])
def test_user_errors_are_one_line(project: Path, args: list[str], expected: str) -> None:
    (project / "notes.txt").write_text("not a picture\n")
    result = invoke(*args)
    assert_one_line_error(result, expected)


@pytest.mark.parametrize("args", [["evaluate", "models:/mnist-vae/1"], ["models"], ["train"]])
def test_unreachable_tracking_server_is_one_line(project: Path, args: list[str]) -> None:
    result = invoke(*args, env={"MLFLOW_TRACKING_URI": REFUSED})
    assert_one_line_error(result, "cannot be reached")


def test_download_failure_ends_in_one_error_line(project: Path) -> None:
    result = invoke("download", "--data", "fresh.npz", "--set", "data.mirrors=[nowhere]")
    # The library logs a warning per failed mirror before the error sums them up.
    assert_one_line_error(result, "nowhere", allow_log_lines=True)
    assert not (project / "fresh.npz").exists()


def assert_one_line_error(result, expected: str, allow_log_lines: bool = False) -> None:
    lines = [line for line in result.output.splitlines() if line.strip()]
    if allow_log_lines:
        lines = [line for line in lines if not line.startswith(("WARNING", "INFO"))]
    assert result.exit_code == 1, result.output
    assert "Traceback" not in result.output
    assert len(lines) == 1 and lines[0].startswith("error: "), result.output
    assert expected in lines[0]


# --- bench and profile --------------------------------------------------------------------------

def test_bench_prints_rows_a_to_d_writes_json_and_logs_a_run(project: Path) -> None:
    result = ok("bench", "--device", "cpu", "--chunk", "128", "--max-epochs", "2", "--target", "1000",
                "--out", "reports/bench.json")
    rows = json.loads((project / "reports" / "bench.json").read_text())["rows"]
    assert [r["name"] for r in rows] == ["a", "b", "b2", "c", "d"]
    assert rows[0]["ratio"] == 1.0
    for r in rows:
        assert r["samples_per_sec"] > 0 and r["ratio"] == pytest.approx(
            r["samples_per_sec"] / rows[0]["samples_per_sec"])
    assert all(np.isfinite(r["loss_after_budget"]) for r in rows[:4])
    assert rows[4]["seconds_to_target"] is not None  # any model beats 1000 nats after one epoch
    assert "tutorial loop" in result.output and "x (a)" in result.output
    runs = mlflow.search_runs(experiment_names=["mnist-vae-bench"], output_format="list")
    assert len(runs) == 1 and runs[0].data.metrics["a_ratio"] == 1.0


def test_bench_rejects_a_window_smaller_than_a_batch(project: Path) -> None:
    assert_one_line_error(invoke("bench", "--chunk", "8"), "--chunk: expected at least one batch")


def test_profile_lists_and_prints_dvc_arguments(project: Path) -> None:
    listing = ok("profile").output
    assert "burda2015-vae:" in listing and "burda2015-iwae:" in listing
    assert ok("profile", "burda2015-iwae").output.split()[:2] == ["-S", "model.preset=default"]
    assert_one_line_error(invoke("profile", "burda2016"), "unknown profile 'burda2016'")
    assert_one_line_error(invoke("train", "--profile", "nope"), "--profile: unknown profile 'nope'")
