"""Measuring a served model: concurrent HTTP clients against a running ``mlflow models serve``, with
the latencies they see and the cores the server, the clients and the rest of the machine used; and the
same batches timed through each layer of a request in this process.
"""

from __future__ import annotations

import http.client
import json
import os
import sys
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any

import numpy as np

from mnist_vae.serving.server import Server


@dataclass(frozen=True)
class Timing:
    """Latencies of one measured stretch; calls/s counts all ``calls`` over ``seconds``."""

    calls: int
    seconds: float
    latencies: list[float]

    def summary(self, batch: int) -> dict[str, float]:
        lat_ms = np.asarray(self.latencies) * 1000.0
        rate = self.calls / self.seconds
        return {
            "requests_per_s": rate,
            "images_per_s": rate * batch,
            "p50_ms": float(np.percentile(lat_ms, 50)),
            "p99_ms": float(np.percentile(lat_ms, 99)),
        }


def request_bodies(x: np.ndarray, batch: int, variants: int = 4) -> list[bytes]:
    """A few JSON ``inputs`` bodies of ``batch`` test images each, as a client would send them."""
    starts = [(i * batch) % max(1, len(x) - batch + 1) for i in range(variants)]
    return [json.dumps({"inputs": x[s : s + batch].tolist()}).encode() for s in starts]


def load(
    server: Server, bodies: list[bytes], batch: int, clients: int, seconds: float, warmup: float
) -> dict[str, Any]:
    """``clients`` threads POST ``bodies`` in turn, each on one keep-alive connection.

    The clients start one after another during the warm-up, as clients of a service arrive: a burst
    of connections would be accepted by whichever worker wakes first, all of them sometimes, and
    leave the other worker idle. Requests that complete within the next ``seconds`` count.
    ``server_cpu`` and ``client_cpu`` are the cores the server (all its processes) and this process
    used meanwhile: on a machine with few cores the clients' share bounds the server's.
    """
    latencies: list[list[float]] = [[] for _ in range(clients)]
    errors = [0] * clients
    begin = time.perf_counter() + warmup
    end = begin + seconds
    stagger = warmup / (2 * clients)
    threads = [
        threading.Thread(
            target=_client, args=(server.port, bodies, i, begin, end, latencies[i], errors), daemon=True
        )
        for i in range(clients)
    ]
    for t in threads:
        t.start()
        time.sleep(stagger)
    time.sleep(max(0.0, begin - time.perf_counter()))
    server_cpu, client_cpu, busy = group_cpu_seconds(server.pid), time.process_time(), busy_cpu_seconds()
    time.sleep(max(0.0, end - time.perf_counter()))
    server_cpu = (group_cpu_seconds(server.pid) - server_cpu) / seconds
    client_cpu = (time.process_time() - client_cpu) / seconds
    other_cpu = max(0.0, (busy_cpu_seconds() - busy) / seconds - server_cpu - client_cpu)
    for t in threads:
        t.join()
    done = [lat for per in latencies for lat in per]
    if not done:
        return {"requests": 0, "errors": sum(errors), "seconds": seconds}
    return {
        "requests": len(done),
        "errors": sum(errors),
        "seconds": seconds,
        **Timing(len(done), seconds, done).summary(batch),
        "server_cpu": server_cpu,
        "client_cpu": client_cpu,
        "other_cpu": other_cpu,
        "server_cpu_ms_per_request": 1000.0 * server_cpu * seconds / len(done),
    }


def _client(
    port: int,
    bodies: list[bytes],
    i: int,
    begin: float,
    end: float,
    latencies: list[float],
    errors: list[int],
) -> None:
    """One client until ``end``; keeps the latency of each request answered in [begin, end]."""
    # http.client rather than requests: a keep-alive connection at a fraction of the CPU per
    # request, which on 2 cores is taken from the server being measured.
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=60)
    headers = {"Content-Type": "application/json"}
    k = i
    try:
        while (t0 := time.perf_counter()) < end:
            try:
                conn.request("POST", "/invocations", body=bodies[k % len(bodies)], headers=headers)
                response = conn.getresponse()
                response.read()
                ok = response.status == 200
            except (OSError, http.client.HTTPException):
                conn.close()  # reconnects on the next request
                ok = False
            t1 = time.perf_counter()
            if not ok:
                errors[i] += 1
            elif begin <= t1 <= end:
                latencies.append(t1 - t0)
            k += 1
    finally:
        conn.close()


def measure_in_process(
    folder: Path, x: np.ndarray, batches: Sequence[int], seconds: float
) -> list[dict[str, Any]]:
    """The same batches through each layer of a request, in this process, ``seconds`` per layer and
    batch (see :mod:`mnist_vae.bench.serving`)."""
    import mlflow
    import torch
    from mlflow.pyfunc import scoring_server

    saved_path = list(sys.path)
    try:
        pyfunc = mlflow.pyfunc.load_model(str(folder))
    finally:
        sys.path[:] = saved_path  # MLflow prepends the model's code folder for good
    # The loader_module's object (our ServedVAE); MLflow offers no public accessor for it.
    served = pyfunc._model_impl
    vae = served.model
    schema = pyfunc.metadata.get_input_schema()
    rows: list[dict[str, Any]] = []
    for batch in batches:
        arr = x[:batch]
        tensor = torch.from_numpy(arr)
        body = request_bodies(x, batch, variants=1)[0]

        def forward(t: torch.Tensor = tensor) -> None:
            with torch.inference_mode():
                vae.pixel_means(vae.reconstruct(t))

        layers: list[tuple[str, str, Callable[[], object]]] = [
            ("forward", "model reconstruct (posterior means) + sigmoid, torch tensor in", forward),
            ("served_predict", "ServedVAE.predict (validation + forward)", partial(served.predict, arr)),
            (
                "pyfunc_predict",
                "MLflow PyFuncModel.predict (schema enforcement)",
                partial(pyfunc.predict, arr),
            ),
            (
                "invocations",
                "MLflow's /invocations handler: JSON body in, JSON out, no HTTP",
                partial(scoring_server.invocations, body, "application/json", pyfunc, schema),
            ),
        ]
        for name, what, call in layers:
            timing = _time_calls(call, seconds)
            rows.append(
                {"layer": name, "what": what, "batch": batch, "calls": timing.calls, **timing.summary(batch)}
            )
    return rows


def _time_calls(call: Callable[[], object], seconds: float, at_least: int = 20) -> Timing:
    for _ in range(3):  # warm-up: first calls allocate
        call()
    latencies: list[float] = []
    start = time.perf_counter()
    while len(latencies) < at_least or time.perf_counter() - start < seconds:
        t0 = time.perf_counter()
        call()
        latencies.append(time.perf_counter() - t0)
    return Timing(len(latencies), sum(latencies), latencies)


def busy_cpu_seconds() -> float:
    """CPU seconds the whole machine has been busy since boot, all cores (Linux; else 0)."""
    try:
        fields = [int(v) for v in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]]
    except (OSError, ValueError):
        return 0.0
    idle = fields[3] + fields[4]  # idle, iowait
    return (sum(fields[:8]) - idle) / os.sysconf("SC_CLK_TCK")  # guest time is counted in user


def group_cpu_seconds(pgid: int) -> float:
    """User + system CPU seconds of the live processes of a process group (Linux; else 0)."""
    ticks = os.sysconf("SC_CLK_TCK") if hasattr(os, "sysconf") else 100
    total = 0
    for entry in Path("/proc").glob("[0-9]*/stat"):
        try:
            # The command may hold spaces and parentheses: the fields start after the last ")".
            fields = entry.read_text().rpartition(")")[2].split()
        except OSError:  # the process ended meanwhile
            continue
        if int(fields[2]) == pgid:  # fields: state ppid pgrp ... utime(12) stime(13)
            total += int(fields[11]) + int(fields[12])
    return total / ticks
