"""`mnist-vae serve-bench` as a real process: it starts `mlflow models serve` with 1 and 2 workers
on a saved model folder, measures them, writes its JSON and leaves no server running."""

from __future__ import annotations

import contextlib
import ctypes
import http.client
import json
import os
import re
import socket
import subprocess
from collections.abc import Callable
from pathlib import Path

import pytest

from mnist_vae import procs
from mnist_vae.config import ModelConfig
from mnist_vae.models.families import build_model
from mnist_vae.models.weights import save_model
from mnist_vae.serving.pyfunc import save_pyfunc
from mnist_vae.serving.server import serve

pytestmark = pytest.mark.slow


def test_serve_bench_measures_every_cell_and_stops_its_servers(
    tmp_path: Path, venv_bin: Path, write_dataset: Callable[..., Path]
) -> None:
    save_model(build_model(ModelConfig(preset="mlp", hidden=(16,), latent=2), seed=0), tmp_path / "model.pt")
    folder = save_pyfunc(tmp_path / "model.pt", tmp_path / "served")
    data = write_dataset(tmp_path / "mnist.npz", 8, n_test=64)
    out = tmp_path / "serve_bench.json"
    env = {**os.environ, "PATH": f"{venv_bin}{os.pathsep}{os.environ['PATH']}"}
    run = subprocess.run(
        [
            str(venv_bin / "mnist-vae"),
            "serve-bench",
            "--model",
            str(folder),
            "--data",
            str(data),
            "--out",
            str(out),
            "--no-mlflow",
            "--clients",
            "2",
            "--seconds",
            "1",
        ],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
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
    assert layers == {
        (name, b) for name in ("forward", "served_predict", "pyfunc_predict", "invocations") for b in (1, 64)
    }
    assert all(r["requests_per_s"] > 0 and r["p50_ms"] > 0 for r in result["in_process"])
    assert set(result["scaling"]) == {"batch_1_workers_2_over_1", "batch_64_workers_2_over_1"}

    # Every server was stopped with its workers: no process group left, no uvicorn on its port.
    assert [s["workers"] for s in result["servers"]] == [1, 2]
    for server in result["servers"]:
        assert not procs.group_alive(server["pid"]), f"server {server} still running"
    listening = subprocess.run(["ps", "-eo", "args"], capture_output=True, text=True).stdout
    for server in result["servers"]:
        assert f"--port {server['port']}" not in listening, listening


def test_two_worker_server_takes_a_share_of_the_cores_and_no_delay(tmp_path: Path) -> None:
    """Each of 2 workers runs cores // 2 torch threads (its log line, read back from torch), and the
    connection a worker accepted has TCP_NODELAY, read from the server's own socket."""
    save_model(build_model(ModelConfig(preset="mlp", hidden=(16,), latent=2), seed=0), tmp_path / "model.pt")
    folder = save_pyfunc(tmp_path / "model.pt", tmp_path / "served")
    log = tmp_path / "server.log"
    cores = len(os.sched_getaffinity(0))
    with serve(folder, workers=2, log=log) as server:
        connection = http.client.HTTPConnection("127.0.0.1", server.port, timeout=60)
        connection.request(
            "POST",
            "/invocations",
            body=json.dumps({"inputs": [[0.5] * 784]}),
            headers={"Content-Type": "application/json"},
        )
        response = connection.getresponse()
        assert response.status == 200, response.read()
        response.read()
        client_port = connection.sock.getsockname()[1]
        accepted = _server_side_socket(server.pid, server.port, client_port)
        assert accepted.getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY) != 0
        accepted.close()
        connection.close()
    lines = re.findall(r"mnist-vae serving worker (\d+): (\d+) torch threads", log.read_text())
    assert len({pid for pid, _ in lines}) == 2, log.read_text()[-3000:]
    assert {int(threads) for _, threads in lines} == {max(1, cores // 2)}, lines


def _server_side_socket(group: int, port: int, client_port: int) -> socket.socket:
    """A duplicate (``pidfd_getfd``) of the server's end of the connection from ``client_port``."""
    wanted = f"0100007F:{port:04X} 0100007F:{client_port:04X}"
    inode = next(
        line.split()[9]
        for line in Path("/proc/net/tcp").read_text().splitlines()[1:]
        if " ".join(line.split()[1:3]) == wanted
    )
    libc = ctypes.CDLL(None, use_errno=True)
    for pid in procs.group_members(group):
        for fd in Path(f"/proc/{pid}/fd").iterdir():
            with contextlib.suppress(OSError):
                if os.readlink(fd) == f"socket:[{inode}]":
                    pidfd = os.pidfd_open(pid)
                    try:
                        copy = libc.syscall(438, pidfd, int(fd.name), 0)  # SYS_pidfd_getfd
                    finally:
                        os.close(pidfd)
                    assert copy >= 0, os.strerror(ctypes.get_errno())
                    return socket.socket(fileno=copy)
    raise AssertionError(f"no process of group {group} holds the connection from port {client_port}")
