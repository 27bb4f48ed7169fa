"""Tests for :mod:`mnist_vae.cli` that need no trained model: help, every failure a user can fix
ending in one line, a bug keeping its traceback, and the commands that read a local weights file
(an untrained tiny model). Commands run on a registered, trained model are in tests/e2e/test_cli.py.
"""

from __future__ import annotations

import json
import traceback
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from click.testing import Result
from PIL import Image
from typer.testing import CliRunner

from mnist_vae.cli import app
from mnist_vae.config import ModelConfig
from mnist_vae.models.families import build_model
from mnist_vae.models.weights import save_model

REFUSED = "http://127.0.0.1:9"  # the discard port: nothing listens, so connecting is refused


def invoke(*args: str, env: dict[str, str] | None = None) -> Result:
    return CliRunner().invoke(app, list(args), env=env)


def ok(*args: str) -> Result:
    result = invoke(*args)
    assert result.exit_code == 0, f"{args}: exit {result.exit_code}\n{result.output}"
    return result


def assert_one_line_error(result: Result, expected: str, allow_log_lines: bool = False) -> None:
    """Exit code 1 through ``typer.Exit``, and one line ``error: ...`` holding ``expected``."""
    lines = [line for line in result.output.splitlines() if line.strip()]
    if allow_log_lines:
        lines = [
            line for line in lines if not line.startswith(("WARNING", "INFO")) and " INFO mlflow." not in line
        ]
    assert result.exit_code == 1, result.output
    # Anything but SystemExit would be an exception escaping the command: a traceback for the user.
    assert isinstance(result.exception, SystemExit), repr(result.exception)
    assert len(lines) == 1 and lines[0].startswith("error: "), result.output
    assert expected in lines[0]


@pytest.fixture
def project(
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    write_dataset: Callable[..., Path],
    write_params: Callable[..., Path],
    mlflow_store: str,
) -> Iterator[Path]:
    """A project folder, the working directory: tiny params and data, an untrained tiny model in
    models/model.pt, a text file and a picture of a 7; an embedded MLflow store of its own."""
    write_dataset(tmp_path / "data" / "mnist.npz", 300, n_test=40)
    write_params(
        tmp_path / "params.yaml",
        {
            "model": {"preset": "mlp", "hidden": [16], "latent": 2},
            "train": {"device": "cpu", "epochs": 1, "batch_size": 50, "threads": 1, "validation": 100},
            "evaluate": {"iw_samples": 2, "n_images": 4},
        },
    )
    save_model(
        build_model(ModelConfig(preset="mlp", hidden=(16,), latent=2), seed=0),
        tmp_path / "models" / "model.pt",
    )
    (tmp_path / "notes.txt").write_text("not a picture\n")
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("COLUMNS", "200")  # rich tables at full width, cells unwrapped
    yield tmp_path


# --- help ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("command", [[]] + [[c.name or c.callback.__name__] for c in app.registered_commands])
def test_help_has_an_example(command: list[str]) -> None:
    result = invoke(*command, "--help")
    assert result.exit_code == 0, result.output
    assert "Example" in result.output


def test_no_arguments_shows_help() -> None:
    result = invoke()
    assert "Usage" in result.output
    assert "reconstruct" in result.output


# --- commands on a local weights file -----------------------------------------------------------


def test_evaluate_a_weights_file_writes_metrics_and_rgb_figures(project: Path) -> None:
    out = project / "eval-38"
    result = ok("evaluate", "models/model.pt", "--digits", "3,8", "--iw-samples", "1", "--out", str(out))
    assert "neg_elbo" in result.output and "hardest" in result.output
    metrics = json.loads((out / "metrics.json").read_text())
    assert set(metrics["per_digit_mse"]) <= {"3", "8"} and metrics["hardest_digit"] in (3, 8)
    assert 0 < metrics["n_images"] < 40
    for figure in ("reconstructions.png", "samples.png", "traversal.png"):
        with Image.open(out / figure) as picture:
            assert (picture.format, picture.mode) == ("PNG", "RGB")


def test_evaluate_says_which_precision_the_estimate_ran_in(project: Path) -> None:
    """An untrained two-stage conv model: bf16 asked, bf16 run (a CPU without native bf16 emulates
    it); fp32 the same draws exactly. The two estimates are close, not equal."""
    save_model(
        build_model(ModelConfig(preset="conv", channels=(4, 8), dense=16, latent=3), seed=0),
        project / "models" / "conv.pt",
    )
    estimates = {}
    for precision in ("fp32", "bf16"):
        out = project / f"eval-{precision}"
        args = ("models/conv.pt", "--limit", "10", "--iw-samples", "8", "--precision", precision)
        result = ok("evaluate", *args, "--out", str(out))
        assert f"(nll_iw: k = 8, {precision})" in result.output
        estimates[precision] = json.loads((out / "metrics.json").read_text())["nll_iw"]
    assert 0 < abs(estimates["bf16"] - estimates["fp32"]) < 0.05


def test_reconstruct_and_sample_with_a_weights_file(
    project: Path, stroke_picture: Callable[..., Path]
) -> None:
    png, jpeg = stroke_picture(project / "seven.png"), stroke_picture(project / "seven.jpg")
    ok("reconstruct", str(png), str(jpeg), "--model", "models/model.pt", "-o", "side_by_side.png")
    with Image.open(project / "side_by_side.png") as picture:
        assert picture.format == "PNG"
        assert picture.height > picture.width / 2, "two rows: inputs above reconstructions"
    ok("sample", "-n", "16", "-o", "grid.png", "--seed", "3", "--model", "models/model.pt")
    with Image.open(project / "grid.png") as picture:
        assert picture.format == "PNG" and picture.width == picture.height  # 4 x 4 digits


# --- errors -------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("args", "expected"),
    [
        (["sample", "--model", "models/nothing.pt"], "models/nothing.pt: no such model file"),
        (["sample", "-n", "0", "--model", "models/model.pt"], "--number: expected at least 1 image"),
        (["reconstruct", "notes.txt"], "notes.txt: not an image Pillow can read"),
        (["reconstruct", "nowhere.png"], "nowhere.png: no such file"),
        (["evaluate", "models/model.pt", "--data", "missing.npz"], "mnist-vae download"),
        (["evaluate", "models/model.pt", "--digits", "11"], "--digits"),
        (["evaluate", "models/model.pt", "--iw-samples", "0"], "evaluate.iw_samples"),
        (
            ["evaluate", "models/model.pt", "--precision", "fp16"],
            "evaluate.precision: expected one of auto, fp32, bf16, got 'fp16'",
        ),
        (["evaluate", "notes.txt"], "notes.txt is not a mnist-vae model: it is not a torch zip archive"),
        (["train", "--set", "train.epochs=0"], "train.epochs"),
        (["train", "--set", "epochs"], "section.key=value"),
        (
            ["train", "--set", "train.validation=10000"],
            "train.validation: expected fewer images than the 300 of the training split, got 10000",
        ),
        (["run", "--params", "missing.yaml"], "params file not found"),
        (["bench", "--chunk", "8"], "--chunk: expected at least one batch"),
        (["bench", "--device", "tpu"], "--device: expected auto, cpu or cuda, got 'tpu'"),
        (["profile", "burda2016"], "unknown profile 'burda2016'"),
        (["train", "--profile", "nope"], "--profile: unknown profile 'nope'"),
    ],
)
def test_user_errors_are_one_line(project: Path, args: list[str], expected: str) -> None:
    assert_one_line_error(invoke(*args), expected, allow_log_lines=True)


@pytest.mark.parametrize(
    "args", [["evaluate", "models:/mnist-vae/1"], ["models"], ["train"], ["promote", "1"]]
)
def test_unreachable_tracking_server_is_one_line(project: Path, args: list[str]) -> None:
    result = invoke(*args, env={"MLFLOW_TRACKING_URI": REFUSED})
    assert_one_line_error(result, f"MLflow tracking server {REFUSED} cannot be reached")


def test_download_failure_ends_in_one_error_line(project: Path) -> None:
    result = invoke("download", "--data", "fresh.npz", "--set", "data.mirrors={mnist: [nowhere]}")
    # The library logs a warning per failed mirror before the error sums them up.
    assert_one_line_error(result, "nowhere", allow_log_lines=True)
    assert not (project / "fresh.npz").exists()


def test_a_bug_is_not_turned_into_one_line(project: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Only user errors become ``error: ...``: a bug inside a command keeps its exception and
    traceback (typer prints it), down to the line that failed."""
    from mnist_vae.stages import download

    def buggy_download(out: Path, mirrors: list[str], timeout: float, dataset: str) -> Path:
        return Path(out) / str(1 / 0)

    monkeypatch.setattr(download, "download_dataset", buggy_download)
    result = invoke("download", "--data", "fresh.npz")
    assert isinstance(result.exception, ZeroDivisionError), result.output
    assert "error:" not in result.output
    frames = [frame.name for frame in traceback.extract_tb(result.exc_info[2])]
    assert frames[-2:] == ["run", "buggy_download"], frames
    assert "download" in frames  # through the CLI's command


def test_profile_lists_and_prints_dvc_arguments() -> None:
    listing = ok("profile").output
    assert "burda2015-vae:" in listing and "burda2015-iwae:" in listing
    assert ok("profile", "burda2015-iwae").output.split()[:2] == ["-S", "model.preset=mlp"]


# --- help and tables that survive a log -----------------------------------------------------------


def _description(output: str) -> list[list[str]]:
    """The paragraphs of a command's help, between its usage line and its first panel."""
    lines = output.splitlines()
    start = next(i for i, line in enumerate(lines) if "Usage:" in line) + 1
    end = next(i for i, line in enumerate(lines) if line.lstrip().startswith("╭"))
    paragraphs: list[list[str]] = [[]]
    for line in lines[start:end]:
        if line.strip():
            paragraphs[-1].append(line.strip())
        elif paragraphs[-1]:
            paragraphs.append([])
    return [p for p in paragraphs if p]


@pytest.mark.parametrize("command", ["score", "bench", "evaluate", "tune"])
def test_help_piped_at_80_columns_keeps_every_sentence_and_wraps_once(command: str) -> None:
    import typer.main

    result = invoke(command, "--help", env={"COLUMNS": "80", "TERMINAL_WIDTH": "80"})
    assert result.exit_code == 0, result.output
    assert "…" not in result.output
    assert max(len(line) for line in result.output.splitlines()) <= 80
    width = 80 - 2  # rich pads the help text by one column on each side
    for paragraph in _description(result.output):
        for line, following in zip(paragraph, paragraph[1:], strict=False):
            # Wrapped once, to the width: the next line's first word would not have fit on this one.
            assert len(line) + 1 + len(following.split()[0]) > width, f"ragged help line: {line!r}"
    # Every word of every option's help is printed: none cut by a narrow column.
    click_command = typer.main.get_command(app).commands[command]  # type: ignore[attr-defined]
    printed = set(result.output.replace("│", " ").split())
    for param in click_command.params:
        for word in (param.help or "").split():
            assert word in printed, f"{param.name}: {word!r} missing from --help"
