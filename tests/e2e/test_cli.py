"""The ``mnist-vae`` commands on a trained, registered model (help, pre-flight errors and local
weights files are in tests/unit/test_cli.py).

One tiny model is trained and registered for the whole module, through ``mnist-vae run`` itself, on
a fake dataset of simple shapes in a temporary project whose MLflow store is a SQLite file there.
No test touches the network.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterator
from pathlib import Path

import mlflow
import numpy as np
import pytest
from click.testing import Result
from mlflow import MlflowClient
from PIL import Image
from typer.testing import CliRunner

from mnist_vae.cli import app

pytestmark = pytest.mark.slow

NAME = "mnist-vae"


def invoke(*args: str) -> Result:
    return CliRunner().invoke(app, list(args))


def ok(*args: str) -> Result:
    result = invoke(*args)
    assert result.exit_code == 0, f"{args}: exit {result.exit_code}\n{result.output}"
    return result


def assert_one_line_error(result: Result, expected: str) -> None:
    lines = [line for line in result.output.splitlines() if line.strip()]
    assert result.exit_code == 1, result.output
    assert isinstance(result.exception, SystemExit), repr(result.exception)  # not a traceback
    assert len(lines) == 1 and lines[0].startswith("error: "), result.output
    assert expected in lines[0]


def is_png(path: Path) -> bool:
    with Image.open(path) as img:
        img.verify()
        return img.format == "PNG"


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


@pytest.fixture(scope="module")
def project(tmp_path_factory: pytest.TempPathFactory, write_params: Callable[..., Path]) -> Iterator[Path]:
    """A project folder holding the fake dataset, small params and version 1, the champion."""
    root = tmp_path_factory.mktemp("project")
    rng = np.random.default_rng(0)
    x_train, y_train = fake_mnist(512, rng)
    x_test, y_test = fake_mnist(200, rng)
    (root / "data").mkdir()
    np.savez_compressed(
        root / "data" / "mnist.npz", x_train=x_train, y_train=y_train, x_test=x_test, y_test=y_test
    )
    # 412 images to train on (the first 256 used), the last 100 held out for the promotion gate.
    write_params(
        root / "params.yaml",
        {
            "model": {"preset": "mlp", "hidden": [32], "latent": 4},
            "train": {
                "device": "cpu",
                "epochs": 3,
                "batch_size": 64,
                "limit": 256,
                "threads": 1,
                "validation": 100,
            },
            "evaluate": {"batch_size": 100, "iw_samples": 2, "limit": 100, "n_images": 4},
        },
    )

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
    return MlflowClient(
        tracking_uri=f"sqlite:///{project}/mlflow.db", registry_uri=f"sqlite:///{project}/mlflow.db"
    )


# --- run, evaluate, compare ---------------------------------------------------------------------


def test_run_trained_with_the_override_and_registered_a_champion(project: Path, client: MlflowClient) -> None:
    history = (project / "reports" / "train_history.csv").read_text().splitlines()
    assert len(history) == 2, "--set train.epochs=1 must beat the file's 3 epochs"
    assert "val_neg_elbo" in history[0].split(",") and history[1].split(",")[-1] != ""
    assert (project / "models" / "model.pt").is_file()
    assert str(client.get_model_version_by_alias(NAME, "champion").version) == "1"


@pytest.mark.parametrize(
    "reference",
    ["models:/mnist-vae/1", "models:/mnist-vae@champion", "runs:/{run_id}/model", "models/model.pt"],
)
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
    # 20 threes and 20 eights among the 200 test rings (labels cycle 0-9): all fit under the limit.
    assert metrics["n_images"] == 40 and metrics["hardest_digit"] in (3, 8)
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


def test_reconstruct_png_and_jpeg_with_the_champion(
    project: Path, tmp_path: Path, stroke_picture: Callable[..., Path]
) -> None:
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


# --- models, promote, rollback ------------------------------------------------------------------


def test_models_lists_version_1_as_champion(project: Path) -> None:
    result = ok("models")
    row = next(line for line in result.output.splitlines() if "champion" in line)
    assert row.split()[1] == "1", row  # the first cell after the table border
    assert "mlp" in row  # the preset tag
    moved = next(line for line in result.output.splitlines() if line.startswith("champion: "))
    assert moved.startswith("champion: version 1, moved by promotion gate at "), moved


def test_promote_then_rollback(project: Path, client: MlflowClient) -> None:
    ok("run")  # version 2; the gate may or may not have made it champion
    assert {str(mv.version) for mv in client.search_model_versions(f"name='{NAME}'")} == {"1", "2"}
    ok("promote", "1")
    assert "was version 1" in ok("promote", "2").output
    assert str(client.get_model_version_by_alias(NAME, "champion").version) == "2"
    assert "already champion" in ok("promote", "2").output  # and the record of 1 survives

    moved = next(line for line in ok("models").output.splitlines() if line.startswith("champion: "))
    assert "version 2, moved by " in moved and "from version 1" in moved, moved

    ok("rollback")
    assert str(client.get_model_version_by_alias(NAME, "champion").version) == "1"
    assert_one_line_error(invoke("rollback"), "nothing to roll back to")


# --- errors that need the registry --------------------------------------------------------------


@pytest.mark.parametrize(
    ("args", "expected"),
    [
        (["evaluate", "models:/mnist-vae/99"], "model 'models:/mnist-vae/99' not found"),
        (["evaluate", "models:/mnist-vae@nope"], "model 'models:/mnist-vae@nope' not found"),
        (["sample", "--model", "models:/other-model/1"], "not found"),
        (["promote", "99"], "no version 99"),
        (["promote", "x"], "model version 'x': expected a positive integer"),
    ],
)
def test_unknown_models_are_one_line(project: Path, args: list[str], expected: str) -> None:
    assert_one_line_error(invoke(*args), expected)


# --- bench --------------------------------------------------------------------------------------


def test_bench_prints_rows_a_to_d_writes_json_and_logs_a_run(project: Path) -> None:
    """The smallest benchmark: one batch per window, one epoch of row (d); compiles rows b2 and c."""
    result = ok(
        "bench",
        "--device",
        "cpu",
        "--chunk",
        "32",
        "--max-epochs",
        "1",
        "--target",
        "1000",
        "--out",
        "reports/bench.json",
    )
    rows = json.loads((project / "reports" / "bench.json").read_text())["rows"]
    # Rows (a)-(d), then any further rows the benchmark grows (e.g. concurrent trainings). Row
    # (d)'s stopping rule has a unit test (tests/unit/test_bench.py); here it runs for both presets.
    assert [r["name"] for r in rows][:6] == ["a", "b", "b2", "c", "d-mlp", "d-conv"]
    assert all(len(r["neg_elbo_per_epoch"]) == 1 for r in rows[4:6])
    assert rows[0]["ratio"] == 1.0
    for r in rows:
        assert r["samples_per_sec"] > 0 and r["ratio"] == pytest.approx(
            r["samples_per_sec"] / rows[0]["samples_per_sec"]
        )
    assert all(np.isfinite(r["loss_after_budget"]) for r in rows[:4])
    assert all(r["seconds_to_target"] is not None for r in rows[4:6])  # 1000 nats: one epoch
    assert "tutorial loop" in result.output and "x (a)" in result.output
    runs = mlflow.search_runs(experiment_names=["mnist-vae-bench"], output_format="list")
    assert len(runs) == 1 and runs[0].data.metrics["a_ratio"] == 1.0


# --- protocols: the binarised profiles never compete with the grey default -----------------------

SMALL_BINARIZED = (
    "--profile",
    "binarized-conv",
    "--set",
    "train.epochs=1",
    "--set",
    "model.channels=[4,8]",
    "--set",
    "model.dense=32",
    "--set",
    "model.latent=4",
    "--set",
    "evaluate.iw_samples=2",
    "--set",
    "evaluate.limit=100",
)


def test_a_binarised_profile_run_leaves_the_grey_champion_and_what_it_serves(
    project: Path, client: MlflowClient
) -> None:
    champion = str(client.get_model_version_by_alias(NAME, "champion").version)
    grey = np.load(project / "data" / "mnist.npz")["x_test"][:4].reshape(4, -1).astype(np.float32) / 255.0
    served = mlflow.pyfunc.load_model(f"models:/{NAME}@champion").predict(grey)

    ok("run", *SMALL_BINARIZED)  # registers under the profile's own name
    assert str(client.get_model_version_by_alias(NAME, "champion").version) == champion
    binarized = client.get_model_version_by_alias("mnist-vae-binarized", "champion")
    assert binarized.tags["protocol.binarized"] == "true" and binarized.tags["protocol.validation"] == "0"
    again = mlflow.pyfunc.load_model(f"models:/{NAME}@champion").predict(grey)
    np.testing.assert_array_equal(again, served)  # the same grey digits, answered the same

    # Forced under the grey model's name, the gate refuses to compare the two protocols.
    result = ok("run", *SMALL_BINARIZED, "--set", f"mlflow.registered_model={NAME}")
    assert str(client.get_model_version_by_alias(NAME, "champion").version) == champion
    assert "stays candidate: it was trained and measured as mnist, binarised, validation 0" in result.output
    assert f"champion version {champion} as mnist, grey, validation 100" in result.output
    listed = ok("models").output
    assert "binarised, validation 0" in listed and "grey, validation 100" in listed
