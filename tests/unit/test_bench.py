"""Row (d) of the benchmark: the training seconds until a preset reaches a test negative ELBO; the
result's table, JSON and MLflow run."""

from __future__ import annotations

import io
import json
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
from rich.console import Console

from mnist_vae.bench.training import (
    ROW_D,
    ROW_THREADS,
    BenchResult,
    BenchRow,
    BenchSettings,
    _cells,
    log_to_mlflow,
    print_table,
    time_to_target,
    trainer_row,
    write_json,
)
from mnist_vae.config import ModelConfig, TrainConfig
from mnist_vae.data.dataset import ImageData


@pytest.fixture(scope="module")
def data(tiny_images: Callable[..., tuple[np.ndarray, np.ndarray]]) -> ImageData:
    x_train, y_train = tiny_images(640, seed=1)
    x_test, y_test = tiny_images(100, seed=2)
    return ImageData(x_train=x_train, y_train=y_train, x_test=x_test, y_test=y_test)


def test_row_d_stops_at_the_first_epoch_that_reaches_the_target(data: ImageData) -> None:
    unreachable = BenchSettings(device="cpu", max_epochs_d=3, target_neg_elbo=-1.0)
    never = time_to_target(data, unreachable, "mlp", test_images=100)
    assert never.name == "d-mlp"
    assert never.seconds_to_target is None and never.epochs_to_target is None
    history = never.neg_elbo_per_epoch
    assert history is not None and len(history) == 3 and history[2] < history[1] < history[0]
    # A target first met after epoch 2: the same (seeded) training stops there, and counts the
    # training seconds of those two epochs only.
    target = history[1] + 0.25 * (history[0] - history[1])
    reached = time_to_target(data, replace(unreachable, target_neg_elbo=target), "mlp", test_images=100)
    assert reached.epochs_to_target == 2
    assert reached.neg_elbo_per_epoch == pytest.approx(history[:2], rel=1e-4)
    assert reached.seconds_to_target is not None and reached.seconds_to_target > 0
    # Its speed is over those epochs: 2 x 640 images (5 full batches of 128) in that time.
    assert reached.seconds_to_target * reached.samples_per_sec == pytest.approx(2 * 640)


def test_rows_measured_side_by_side_keep_torchs_threads(data: ImageData) -> None:
    """Rows (b), (b2) and (c) hold their trainers open at once in one process; each window still
    runs on all of torch's threads, as row (a) does, not on a share as if they were trainings."""
    import torch

    default = torch.get_num_threads()
    settings = BenchSettings(device="cpu", chunk=128, windows=1)
    cfg = TrainConfig(device="cpu", batch_size=32, schedule="constant", threads=ROW_THREADS)
    rows = [trainer_row(data, name, name, cfg, settings) for name in ("b", "b2", "c")]
    try:
        for row in rows:
            next(row.windows)
            assert torch.get_num_threads() == default
    finally:
        torch.set_num_threads(default)


def test_row_d_trains_the_default_preset_as_params_yaml_does(repo_root) -> None:
    import yaml

    params = yaml.safe_load((repo_root / "params.yaml").read_text())
    hvae, settings = ROW_D["hvae"]
    assert hvae == ModelConfig(
        **{k: tuple(v) if isinstance(v, list) else v for k, v in params["model"].items()}
    )
    assert settings == {"batch_size": params["train"]["batch_size"], "lr": params["train"]["lr"]}
    assert ROW_D["conv"][0].preset == "conv" and ROW_D["conv"][1] == settings
    assert ROW_D["mlp"][0].preset == "mlp"


def _result() -> BenchResult:
    machine = {
        "device": "cpu",
        "torch": "2.9.0",
        "cpu": "Test CPU",
        "cpu_count": "2",
        "threads": "2",
        "gpu": "",
        "python": "3.11.9",
    }
    row = {
        "loss_after_budget": None,
        "seconds_to_target": None,
        "epochs_to_target": None,
        "neg_elbo_per_epoch": None,
    }
    rows = [
        {
            **row,
            "name": "a",
            "description": "tutorial loop",
            "batch_size": 32,
            "samples_per_sec": 1234.4,
            "seconds_per_epoch": 48.6,
            "ratio": 1.0,
            "loss_after_budget": 0.12344,
        },
        {
            **row,
            "name": "d-mlp",
            "description": "mlp preset to test neg. ELBO <= 100",
            "batch_size": 128,
            "samples_per_sec": 5000.0,
            "seconds_per_epoch": 12.0,
            "ratio": 4.05,
            "seconds_to_target": 36.04,
            "epochs_to_target": 3,
            "neg_elbo_per_epoch": [120.0, 104.0, 99.5],
        },
    ]
    return {"machine": machine, "settings": {"chunk": 32, "device": "cpu"}, "rows": rows}


def test_the_table_shows_each_row_against_row_a_and_the_machine() -> None:
    out = io.StringIO()
    console = Console(file=out, width=200)
    print_table(_result(), console)
    lines = out.getvalue().splitlines()
    assert "training speed on cpu (Test CPU, 2 threads, torch 2.9.0)" in lines[0]
    a = next(line for line in lines if "tutorial loop" in line).split("│")
    assert [cell.strip() for cell in a[1:-1]] == [
        "a",
        "tutorial loop",
        "32",
        "1,234",
        "48.6",
        "1.00",
        "0.1234",
        "",
    ]
    d = next(line for line in lines if "mlp preset" in line).split("│")
    assert [cell.strip() for cell in d[1:-1]][-3:] == ["4.05", "", "36.0"]


def test_the_result_is_written_as_json_and_logged_as_one_run(
    tmp_path: Path, mlflow_store: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    import mlflow

    monkeypatch.chdir(tmp_path)  # the embedded store keeps artifacts beside the project
    result = _result()
    path = write_json(result, tmp_path / "reports" / "bench.json")
    assert json.loads(path.read_text()) == result
    run = mlflow.get_run(log_to_mlflow(result, path))
    assert run.data.metrics == {
        "a_samples_per_sec": 1234.4,
        "a_seconds_per_epoch": 48.6,
        "a_ratio": 1.0,
        "a_loss_after_budget": 0.12344,
        "d-mlp_samples_per_sec": 5000.0,
        "d-mlp_seconds_per_epoch": 12.0,
        "d-mlp_ratio": 4.05,
        "d-mlp_seconds_to_target": 36.04,
    }
    assert run.data.params == {"bench.chunk": "32", "bench.device": "cpu"}
    assert run.data.tags["machine.cpu"] == "Test CPU" and run.data.tags["machine.threads"] == "2"
    assert mlflow.get_experiment(run.info.experiment_id).name == "mnist-vae-bench"
    assert [a.path for a in mlflow.MlflowClient().list_artifacts(run.info.run_id)] == ["bench.json"]


def test_settings_refuse_a_device_train_does_not_know() -> None:
    with pytest.raises(ValueError, match="device: expected auto, cpu or cuda, got 'gpu'"):
        BenchSettings(device="gpu")
    assert BenchSettings(device="cpu").train_device == "cpu"


def _long_result() -> dict:
    """The result with descriptions as long as the real rows' (the e rows name their setting)."""
    result = _result()
    result["rows"][0]["description"] = "default preset, two at once with torch's default threads, together"
    return result


def _columns(text: str, separator: str) -> list[str]:
    """Each column's text, top to bottom, from the table lines drawn with ``separator`` between
    cells, whitespace removed: a cell folded over several lines reads back whole."""
    rows = [line.split(separator)[1:-1] for line in text.splitlines() if line.count(separator) > 2]
    return ["".join("".join(row[i].split()) for row in rows) for i in range(len(rows[0]))]


COLUMNS = ["row", "what", "batch", "samples/s", "s/epoch", "x (a)", "loss at budget", "s to target"]


@pytest.mark.parametrize("terminal", [True, False], ids=["80-column terminal", "piped"])
def test_the_table_keeps_every_column_and_cell_in_80_columns(terminal: bool) -> None:
    out = io.StringIO()
    console = Console(file=out, width=80, force_terminal=terminal, color_system=None)
    result = _long_result()
    print_table(result, console)
    text = out.getvalue()
    assert "…" not in text
    expected = [_cells(BenchRow(**row)) for row in result["rows"]]
    assert _columns(text, "┃") == ["".join(c.split()) for c in COLUMNS]
    assert _columns(text, "│") == ["".join("".join(row[i].split()) for row in expected) for i in range(8)]
    title = "training speed on cpu (Test CPU, 2 threads, torch 2.9.0)"
    if terminal:
        assert max(len(line) for line in text.splitlines()) <= 80
    else:
        # Off a terminal, one line per row and the title on one line, however wide.
        assert any(title in line for line in text.splitlines())
        row = next(line for line in text.splitlines() if "torch's default threads" in line).split("│")
        assert [cell.strip() for cell in row[1:4]] == [
            "a",
            "default preset, two at once with torch's default threads, together",
            "32",
        ]
