"""Bad input at every boundary (the table in docs/pipeline.md): the message, the exit code, and
nothing lost.

A finished tiny project (data, a trained and registered model, metrics, figures, an MLflow store) is
made once; each case feeds one kind of bad input to the command a user would run and checks the
one-line error, the exit code, and that every file the project already had is byte for byte intact.
The served model's bad HTTP bodies are in test_serving.py (400 and the server keeps answering).
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable, Iterator
from pathlib import Path

import mlflow
import pytest
from typer.testing import CliRunner

from mnist_vae.cli import app
from mnist_vae.stages import download, evaluate, train

pytestmark = pytest.mark.slow

STAGES = {"download": download.main, "train": train.main, "evaluate": evaluate.main}


@pytest.fixture(scope="module")
def project(
    tmp_path_factory: pytest.TempPathFactory,
    write_dataset: Callable[..., Path],
    write_params: Callable[..., Path],
) -> Iterator[Path]:
    root = tmp_path_factory.mktemp("finished")
    write_dataset(root / "data" / "mnist.npz", 256 + 64)
    write_params(
        root / "params.yaml",
        {
            "model": {"preset": "mlp", "hidden": [32], "latent": 4},
            "train": {"device": "cpu", "epochs": 1, "batch_size": 64, "threads": 1, "validation": 64},
            "evaluate": {"iw_samples": 2, "n_images": 4},
        },
    )
    (root / "notes.txt").write_text("not a picture\n")
    with pytest.MonkeyPatch.context() as mp:
        mp.chdir(root)
        mp.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{root}/mlflow.db")
        mp.delenv("MLFLOW_REGISTRY_URI", raising=False)
        mp.delenv("MNIST_MIRRORS", raising=False)
        train.main([])
        evaluate.main([])
        yield root
        mlflow.set_tracking_uri(None)
        mlflow.set_registry_uri(None)


def snapshot(root: Path) -> dict[str, str]:
    return {
        str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(root.rglob("*"))
        if p.is_file() and p.name != "mlflow.db.lock"
    }


def truncated_mirror(folder: Path, shared_mnist: Path) -> Path:
    """The real MNIST files with the training images cut short, as an interrupted copy leaves them."""
    folder.mkdir(exist_ok=True)
    for source in shared_mnist.glob("*-ubyte.gz"):
        data = source.read_bytes()
        (folder / source.name).write_bytes(data[: len(data) // 3] if "train-images" in source.name else data)
    return folder


CASES = {
    # name: (how to run it, what the one line says)
    "params typo": (
        ("stage", "train", "--set", "train.epoch=3"),
        "error: train: train.epoch: unknown key; expected one of",
    ),
    "params out of range": (
        ("stage", "evaluate", "--set", "evaluate.iw_samples=0"),
        "error: evaluate: evaluate.iw_samples: expected an integer >= 1, got 0",
    ),
    "truncated download": (
        ("stage", "download"),
        "error: download: train-images-idx3-ubyte of mnist: no mirror delivered a file with "
        "the expected SHA-256; tried, in order:",
    ),
    "truncated dataset file": (("cli", "train", "--data", "broken.npz"), "broken.npz"),
    "unknown model version": (
        ("cli", "evaluate", "models:/mnist-vae/99"),
        "error: model 'models:/mnist-vae/99' not found",
    ),
    "unknown alias": (("cli", "sample", "--model", "models:/mnist-vae@best"), "not found"),
    "not an image": (
        ("cli", "reconstruct", "notes.txt"),
        "notes.txt: not an image Pillow can read (expected PNG, JPEG, ...)",
    ),
    "tracking server down": (
        ("stage", "train"),
        "MLflow tracking server http://127.0.0.1:9 cannot be reached",
    ),
}


@pytest.mark.parametrize("case", list(CASES))
def test_bad_input_is_one_clear_line_and_loses_nothing(
    case: str,
    project: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
    shared_mnist: Path,
) -> None:
    (kind, *argv), expected = CASES[case]
    before = snapshot(project)
    if case == "truncated download":
        mirror = truncated_mirror(project.parent / "mirror", shared_mnist)
        monkeypatch.setenv("MNIST_MIRRORS", str(mirror))
        (project / "data" / "mnist.npz").rename(project / "data" / "kept.npz")  # force a download
    if case == "truncated dataset file":
        data = (project / "data" / "mnist.npz").read_bytes()
        (project / "broken.npz").write_bytes(data[: len(data) // 2])
    if case == "tracking server down":
        monkeypatch.setenv("MLFLOW_TRACKING_URI", "http://127.0.0.1:9")
    try:
        if kind == "stage":
            with pytest.raises(SystemExit) as info:
                STAGES[argv[0]](argv[1:])
            code, message = info.value.code, capsys.readouterr().err
        else:
            result = CliRunner().invoke(app, argv)
            code, message = result.exit_code, result.output
            assert isinstance(result.exception, SystemExit), repr(result.exception)  # no traceback
    finally:
        if case == "truncated download":
            assert not (project / "data" / "mnist.npz").exists(), "a bad download left a dataset"
            (project / "data" / "kept.npz").rename(project / "data" / "mnist.npz")
        (project / "broken.npz").unlink(missing_ok=True)
    # Log lines (MLflow's, the downloader's warnings) aside, one line: even the download's list of
    # mirrors tried is joined into it.
    lines = [
        line
        for line in message.splitlines()
        if line.strip()
        and not line.startswith(("WARNING", "INFO"))
        and " WARNING " not in line
        and " INFO " not in line
    ]
    assert code == 1, message
    assert len(lines) == 1 and lines[0].startswith("error: "), message
    assert expected in lines[0]
    if case == "truncated download":
        assert f"{mirror}/train-images-idx3-ubyte.gz: corrupt or truncated gzip" in lines[0]
    assert snapshot(project) == before
