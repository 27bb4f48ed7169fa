"""The serving benchmark's report in this process: its tables, JSON and MLflow run, from a result
as :func:`mnist_vae.bench.serving.run_serve_bench` returns it. The real servers are measured in
tests/e2e/test_serve_bench.py."""

from __future__ import annotations

import io
import json
from pathlib import Path

import pytest
from rich.console import Console

from mnist_vae.bench.serving import ServeBenchResult, log_to_mlflow, print_table, write_json


def _result() -> ServeBenchResult:
    machine = {
        "device": "cpu",
        "torch": "2.9.0",
        "cpu": "Test CPU",
        "cpu_count": "2",
        "threads": "2",
        "gpu": "",
        "python": "3.11.9",
    }
    timing = {"requests_per_s": 20.0, "images_per_s": 1280.0, "p50_ms": 3.21, "p99_ms": 9.87}
    cells = [
        {"workers": 1, "batch": 64, "clients": 2, "requests": 0, "errors": 3, "seconds": 1.0},
        {
            "workers": 2,
            "batch": 64,
            "clients": 2,
            "requests": 20,
            "errors": 0,
            "seconds": 1.0,
            **timing,
            "server_cpu": 1.5,
            "client_cpu": 0.25,
            "other_cpu": 0.01,
            "server_cpu_ms_per_request": 75.0,
        },
    ]
    in_process = [{"layer": "forward", "what": "model", "batch": 64, "calls": 40, **timing}]
    return {
        "machine": machine,
        "model": "models:/mnist-vae@champion",
        "settings": {"clients": 2, "seconds": 1.0},
        "load_average_1min": {"start": 0.5, "end": 1.25},
        "servers": [{"workers": 2, "pid": 1, "port": 2, "start_seconds": 3.0}],
        "cells": cells,
        "in_process": in_process,
        "scaling": {"batch_64_workers_2_over_1": 1.7},
    }


def _cells(line: str) -> list[str]:
    return [cell.strip() for cell in line.split("│")[1:-1]]


def test_the_tables_show_each_cell_each_layer_and_the_scaling() -> None:
    out = io.StringIO()
    console = Console(file=out, width=80)  # widened: the cells' table needs 130 columns
    print_table(_result(), console)
    lines = out.getvalue().splitlines()
    assert (
        "mlflow models serve, 2 clients, 1 s per cell (Test CPU, 2 cores, load average 0.5 before"
        in out.getvalue().replace("\n", " ")
    )
    rows = [_cells(line) for line in lines if line.startswith("│")]
    assert rows[0] == ["1", "64", "0", "", "", "", "3", "", "", "", ""]  # no request answered
    assert rows[1] == ["2", "64", "20.0", "1,280", "3.2", "9.9", "0", "1.50", "75.00", "0.25", "0.01"]
    assert rows[2] == ["forward", "64", "20", "1,280", "3.210", "9.870"]
    assert lines[-1] == "batch_64_workers_2_over_1: 1.70x"


def test_the_result_is_written_as_json_and_logged_as_one_run(
    tmp_path: Path, mlflow_store: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    import mlflow

    monkeypatch.chdir(tmp_path)  # the embedded store keeps artifacts beside the project
    result = _result()
    path = write_json(result, tmp_path / "serve_bench.json")
    assert json.loads(path.read_text()) == result
    run = mlflow.get_run(log_to_mlflow(result, path))
    assert run.info.run_name.startswith("serve-bench-")
    metrics = run.data.metrics
    assert metrics["w1_b64_errors"] == 3.0 and "w1_b64_p50_ms" not in metrics
    assert metrics["w2_b64_server_cpu_ms_per_request"] == 75.0
    assert metrics["inproc_forward_b64_p99_ms"] == 9.87
    assert metrics["batch_64_workers_2_over_1"] == 1.7
    assert len(metrics) == 1 + 9 + 4 + 1  # the idle cell: errors only
    assert run.data.params == {"serve_bench.clients": "2", "serve_bench.seconds": "1.0"}
    tags = run.data.tags
    assert tags["bench"] == "serving" and tags["model"] == "models:/mnist-vae@champion"
    assert tags["machine.cpu"] == "Test CPU"
    assert [a.path for a in mlflow.MlflowClient().list_artifacts(run.info.run_id)] == ["serve_bench.json"]
