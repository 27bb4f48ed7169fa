"""The demo's latency: a drawn digit to all its outputs, through the page's own API.

    python benchmarks/demo_latency.py [--model REF] [--data data/mnist.npz] [--calls 300]

Starts `mnist-vae demo` on a free port of 127.0.0.1 with Gradio's server-side traces on
(GRADIO_PROFILING=1) and calls its `/drawing` endpoint with gradio_client, one drawing after the
other, as the page's sketchpad sends them: a 280x280 canvas, uploaded, then the event. Each drawing
is a different random stroke. Two times per call, each as median and 95th percentile:

- server: what the server spends on the drawing, from Gradio's own traces: the upload of the canvas
  plus the event from its arrival in the queue to its last output (the preparation, the model, the
  percentile, and the three pictures written as PNG); each part on its own too;
- round trip: what the client waits, from sending the upload to holding the outputs (HTTP, the
  queue's event stream and the client's own work, on the same two cores as the server). The output
  pictures are not downloaded: a browser fetches them afterwards.

The first calls warm the server up and are not counted.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import requests
from PIL import Image, ImageDraw

from mnist_vae import procs

WARM_UP = 10


def _canvases(folder: Path, count: int, seed: int = 0) -> list[Path]:
    """``count`` canvases as the sketchpad sends them, each with a different random 7-like stroke."""
    rng = np.random.default_rng(seed)
    paths = []
    for i in range(count):
        picture = Image.new("RGBA", (280, 280), "white")
        corners = [(60, 60), (210, 60), (120, 240)] + rng.integers(-25, 26, size=(3, 2))
        ImageDraw.Draw(picture).line([tuple(p) for p in corners.tolist()], fill=(0, 0, 0, 255), width=30)
        paths.append(folder / f"canvas-{i}.png")
        picture.save(paths[-1])
    return paths


def _percentiles(values: list[float]) -> dict[str, float]:
    ordered = sorted(values)
    return {
        "median_ms": round(statistics.median(ordered), 1),
        "p95_ms": round(float(np.percentile(ordered, 95)), 1),
        "max_ms": round(ordered[-1], 1),
    }


def _wait_ready(url: str, process: subprocess.Popen, log: Path, timeout: float = 300.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process.poll() is not None:
            sys.exit(f"the demo exited ({process.returncode}):\n{log.read_text()[-2000:]}")
        try:
            if requests.get(url, timeout=2).status_code == 200:
                return
        except (requests.ConnectionError, requests.Timeout):
            pass
        time.sleep(0.5)
    sys.exit(f"the demo did not answer within {timeout:.0f} s:\n{log.read_text()[-2000:]}")


def measure(model: str | None, data: Path, calls: int, threads: int | None) -> dict:
    """Runs the benchmark against a demo process of its own; returns the numbers."""
    from gradio_client import Client, handle_file

    with tempfile.TemporaryDirectory(prefix="demo-latency-") as scratch:
        folder = Path(scratch)
        canvases = _canvases(folder, 50)
        port = procs.free_port()
        command = ["mnist-vae", "demo", "--port", str(port), "--data", str(data)]
        command += ["--model", model] if model else []
        command += ["--threads", str(threads)] if threads else []
        env = {**os.environ, "GRADIO_PROFILING": "1", "GRADIO_TEMP_DIR": str(folder / "gradio")}
        log = folder / "demo.log"
        with procs.Watchdog() as watchdog, open(log, "w") as out:
            process = procs.start(command, log=out, env=env, watchdog=watchdog)
            try:
                url = f"http://127.0.0.1:{port}/"
                _wait_ready(url, process, log)
                client = Client(url, verbose=False, download_files=False)
                round_trips = []
                for i in range(WARM_UP + calls):
                    sketch = {
                        "background": None,
                        "layers": [],
                        "composite": handle_file(str(canvases[i % 50])),
                    }
                    start = time.perf_counter()
                    outputs = client.predict(sketch, api_name="/drawing")
                    round_trips.append(1000 * (time.perf_counter() - start))
                    assert "nats" in outputs[2], outputs[2]
                traces = requests.get(f"{url}gradio_api/profiling/traces", timeout=30).json()
                summary = requests.get(f"{url}gradio_api/profiling/summary", timeout=30).json()
            finally:
                procs.stop_group(process.pid, process)
                watchdog.forget(process.pid)
    events = [t["total_ms"] for t in traces if t["fn_name"] != "gradio_file_upload"][-calls:]
    assert len(events) == calls and summary["upload"]["count"] == WARM_UP + calls, summary
    event, upload = _percentiles(events), summary["upload"]
    return {
        "calls": calls,
        "model": model or "the champion of params.yaml's registered model",
        # Gradio's traces give each upload's time only in their summary, over all the calls (the
        # warm-up too): the sums below are the median of a call's two parts added, and an upper
        # bound on the 95th percentile of their sum.
        "server": {
            "median_ms": round(event["median_ms"] + upload["p50"], 1),
            "p95_ms_at_most": round(event["p95_ms"] + upload["p95"], 1),
        },
        "server_event": event,
        "server_upload": {"median_ms": round(upload["p50"], 1), "p95_ms": round(upload["p95"], 1)},
        # Where an event's time goes: the median of each phase in Gradio's traces (all calls).
        "server_event_phases_median_ms": {
            phase: round(summary["phases"][phase]["p50"], 1)
            for phase in ("queue_wait", "preprocess", "fn_call", "postprocess")
        },
        "round_trip": _percentiles(round_trips[WARM_UP:]),
        "cpu": _cpu(),
        "cores": len(os.sched_getaffinity(0)),
        "python": platform.python_version(),
    }


def _cpu() -> str:
    for line in Path("/proc/cpuinfo").read_text().splitlines():
        if line.startswith("model name"):
            return line.split(":", 1)[1].strip()
    return platform.processor()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", help="Any model reference the CLI takes. Default: the champion.")
    parser.add_argument("--data", type=Path, default=Path("data/mnist.npz"), help="The test digits to rank.")
    parser.add_argument("--calls", type=int, default=300, help="Timed calls (after 10 to warm up).")
    parser.add_argument("--threads", type=int, help="The demo's torch threads. Default: one per core.")
    parser.add_argument("--out", type=Path, help="Also write the numbers to this JSON file.")
    args = parser.parse_args()
    result = measure(args.model, args.data, args.calls, args.threads)
    text = json.dumps(result, indent=2)
    print(text)
    if args.out:
        args.out.write_text(text + "\n")


if __name__ == "__main__":
    main()
