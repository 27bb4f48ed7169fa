"""`mnist-vae serve-bench` as a real process: it starts `mlflow models serve` with 1 and 2 workers
on a saved model folder, measures them, writes its JSON and leaves no server running."""

from __future__ import annotations

import json
import os
import subprocess
from collections.abc import Callable
from pathlib import Path

import pytest

from mnist_vae.config import ModelConfig
from mnist_vae.model import build_model, save_model
from mnist_vae.serve_bench import group_alive, wrap_weights

pytestmark = pytest.mark.slow


def test_serve_bench_measures_every_cell_and_stops_its_servers(
        tmp_path: Path, venv_bin: Path, write_dataset: Callable[..., Path]) -> None:
    save_model(build_model(ModelConfig(hidden=(16,), latent=2), seed=0), tmp_path / "model.pt")
    folder = wrap_weights(tmp_path / "model.pt", tmp_path / "served")
    data = write_dataset(tmp_path / "mnist.npz", 8, n_test=64)
    out = tmp_path / "serve_bench.json"
    env = {**os.environ, "PATH": f"{venv_bin}{os.pathsep}{os.environ['PATH']}"}
    run = subprocess.run(
        [str(venv_bin / "mnist-vae"), "serve-bench", "--model", str(folder), "--data", str(data),
         "--out", str(out), "--no-mlflow", "--clients", "2", "--seconds", "1"],
        cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stdout + run.stderr
    result = json.loads(out.read_text())

    cells = {(c["workers"], c["batch"]): c for c in result["cells"]}
    assert set(cells) == {(1, 1), (1, 64), (2, 1), (2, 64)}
    for cell in cells.values():
        assert cell["errors"] == 0 and cell["requests"] > 0, cell
        for key in ("requests_per_s", "images_per_s", "p50_ms", "p99_ms", "server_cpu"):
            assert cell[key] > 0, (key, cell)
        assert cell["images_per_s"] == pytest.approx(cell["requests_per_s"] * cell["batch"])
    layers = {(r["layer"], r["batch"]) for r in result["in_process"]}
    assert layers == {(name, b) for name in ("forward", "served_predict", "pyfunc_predict",
                                             "invocations") for b in (1, 64)}
    assert all(r["requests_per_s"] > 0 and r["p50_ms"] > 0 for r in result["in_process"])
    assert set(result["scaling"]) == {"batch_1_workers_2_over_1", "batch_64_workers_2_over_1"}

    # Every server was stopped with its workers: no process group left, no uvicorn on its port.
    assert [s["workers"] for s in result["servers"]] == [1, 2]
    for server in result["servers"]:
        assert not group_alive(server["pid"]), f"server {server} still running"
    listening = subprocess.run(["ps", "-eo", "args"], capture_output=True, text=True).stdout
    for server in result["servers"]:
        assert f"--port {server['port']}" not in listening, listening
