"""The download stage as ``python pipeline/download.py`` runs it (:func:`mnist_vae.stages.download.main`)."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import pytest

from mnist_vae.data.dataset import load_dataset
from mnist_vae.data.fetch import MIRRORS_ENV
from mnist_vae.stages.download import main


def test_stage_writes_data_npz_with_env_mirror(
    tiny_idx: dict[str, bytes],
    tiny_splits: dict[str, int],
    make_mirror: Callable[..., Path],
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    make_mirror(tmp_path / "mirror", tiny_idx)
    (tmp_path / "params.yaml").write_text("data:\n  mirrors: {mnist: ['https://unused.example/']}\n")
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv(MIRRORS_ENV["mnist"], "mirror")  # relative: resolved against the working directory
    main([])
    assert load_dataset(tmp_path / "data" / "mnist.npz").y_test.tolist() == [7, 1]


def test_stage_reports_failure_in_one_line(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    (tmp_path / "p.yaml").write_text("data:\n  timeout: 1\n")
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv(MIRRORS_ENV["mnist"], str(tmp_path / "nowhere"))
    with pytest.raises(SystemExit) as info:
        main(["--params", "p.yaml"])
    assert info.value.code == 1
    err = capsys.readouterr().err
    # The DownloadError's one line per mirror are joined into one.
    assert err.count("\n") == 1 and err.startswith("error: download: train-images-idx3-ubyte"), err
    assert f"{tmp_path / 'nowhere'}: directory {tmp_path / 'nowhere'} not found" in err
    assert not (tmp_path / "data" / "mnist.npz").exists()
