"""Tests for :mod:`mnist_vae.stages.runner`: the command line of the stage scripts. A user error ends in one
line and exit code 1, Ctrl-C in exit code 130, and anything else, a bug, keeps its traceback."""

from __future__ import annotations

import traceback
from pathlib import Path

import pytest

from mnist_vae.config import ConfigError
from mnist_vae.errors import UserError
from mnist_vae.stages import download, runner


def test_a_user_error_is_one_line_and_exit_code_1(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as info, runner.reporting("train"):
        raise ConfigError("train.epochs: expected an integer >= 1, got 0")
    assert info.value.code == 1
    assert capsys.readouterr().err == "error: train: train.epochs: expected an integer >= 1, got 0\n"


def test_a_multi_line_user_error_is_joined_into_one_line(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit), runner.reporting("download"):
        raise UserError("f: no mirror delivered it; tried, in order:\n  a: not found\n  b: refused\n")
    assert capsys.readouterr().err == (
        "error: download: f: no mirror delivered it; tried, in order: a: not found; b: refused\n"
    )


def test_ctrl_c_is_exit_code_130_and_says_the_checkpoint_is_kept(
    capsys: pytest.CaptureFixture[str],
) -> None:
    with pytest.raises(SystemExit) as info, runner.reporting("train"):
        raise KeyboardInterrupt
    assert info.value.code == 130
    assert capsys.readouterr().err.startswith(
        "error: train: interrupted; the last finished epoch's checkpoint is kept"
    )


@pytest.mark.parametrize(
    "bug",
    [
        ZeroDivisionError("division by zero"),
        ValueError("a bug"),
        RuntimeError("a bug"),
        FileNotFoundError("a bug"),
    ],
)
def test_other_exceptions_pass_through_untouched(bug: Exception, capsys: pytest.CaptureFixture[str]) -> None:
    """Built-in errors are bugs, not user errors: no one-line message may hide their traceback."""
    with pytest.raises(type(bug)) as info, runner.reporting("train"):
        raise bug
    assert info.value is bug
    assert capsys.readouterr().err == ""


def test_a_bug_inside_a_stage_keeps_its_traceback(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """A genuine bug deep inside a stage's run reaches the interpreter as it was raised, so Python
    prints its whole traceback, down to the line that failed."""

    def buggy_download(out: Path, mirrors: list[str], timeout: float, dataset: str) -> Path:
        return Path(out) / str(1 / 0)

    (tmp_path / "params.yaml").write_text("data:\n  mirrors: {mnist: [nowhere]}\n")
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(download, "download_dataset", buggy_download)
    with pytest.raises(ZeroDivisionError) as info:
        download.main([])
    frames = [frame.name for frame in traceback.extract_tb(info.value.__traceback__)]
    assert frames[-2:] == ["run", "buggy_download"], frames
    assert "main" in frames
    assert "error:" not in capsys.readouterr().err


def test_parse_args_reads_params_and_each_set_in_order(tmp_path: Path) -> None:
    (tmp_path / "p.yaml").write_text("train:\n  epochs: 2\n")
    params = runner.parse_args(
        "train",
        [
            "--params",
            str(tmp_path / "p.yaml"),
            "--set",
            "train.epochs=3",
            "--set",
            "train.epochs=4",
            "--set",
            "model.hidden=[8]",
        ],
        None,
    )
    assert params.train.epochs == 4 and params.model.hidden == (8,)


def test_parse_args_reads_params_yaml_of_the_working_directory(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(tmp_path)
    with pytest.raises(ConfigError, match="params.yaml: params file not found"):
        runner.parse_args("train", [], None)
