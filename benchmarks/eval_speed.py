"""The k-sample importance-weighted estimate of log p(x), another commit's code against this one's,
side by side in one run on the same images and the same draws.

    python benchmarks/eval_speed.py --old-src /tmp/old-eval/src [--model models/model.pt]
        [--data data/mnist.npz] [--images 1000] [--k 5000] [--batch 100] [--rounds 1] [--threads 2]
        [--precision fp32 auto]

Each side runs in its own process with its own ``PYTHONPATH`` (``--old-src``, then this checkout's
``src`` once per ``--precision``), one after the other, ``--rounds`` times: each binarises the
first ``--images`` test images once from torch seed 0, seeds torch with 0 again and estimates in
batches of ``--batch`` images (100: the binarised profiles' ``evaluate.batch_size``), as
``mnist-vae evaluate --binarize`` does, each with its own chunk of drawn rows (the same 4096 by
default, so the same draws). Prints seconds, decoded rows/s and GFLOP/s (FLOPs of one decoder
row counted by torch's FlopCounterMode), the speed-up and both mean estimates with their
difference.

With ``--score``, the sides time ``mnist-vae score``'s work instead (``score_pixels``: one draw per
image, from the image's own bytes) on the first ``--images`` training images, in FP32, after a
warm-up on 1000 of them; the mean is the mean score.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def worker(args: argparse.Namespace) -> None:
    """One side: times the estimate (or with ``--score`` the scores) with whatever ``mnist_vae``
    its PYTHONPATH gives."""
    import numpy as np
    import torch

    from mnist_vae.models.objectives import iw_log_likelihood
    from mnist_vae.models.weights import load_model

    torch.set_num_threads(args.threads)
    model = load_model(Path(args.model)).eval()
    if args.score:
        from mnist_vae.serving.scoring import score_pixels

        with np.load(args.data) as data:
            pixels = data["x_train"][: args.images].reshape(-1, 784)
        score_pixels(model, pixels[:1000])  # warm-up: oneDNN makes its kernels on the first call
        start = time.perf_counter()
        scores = score_pixels(model, pixels)["neg_elbo"]
        seconds = time.perf_counter() - start
        print(json.dumps({"seconds": seconds, "mean": float(np.mean(scores, dtype=np.float64))}))
        return
    if args.precision != ["-"]:  # this checkout: the decoder's precision (older code has FP32 only)
        from mnist_vae.models.estimate import for_estimate

        model = for_estimate(model, args.precision[0])
    with np.load(args.data) as data:
        images = data["x_test"][: args.images].reshape(-1, 784)
    torch.manual_seed(0)
    x_all = torch.bernoulli(torch.from_numpy(images).float().div_(255.0))
    torch.manual_seed(0)
    estimates = []
    start = time.perf_counter()
    for x in x_all.split(args.batch):
        estimates.append(iw_log_likelihood(model, x, args.k, chunk_rows=args.chunk_rows).double())
    seconds = time.perf_counter() - start
    print(json.dumps({"seconds": seconds, "mean": torch.cat(estimates).mean().item()}))


def flops_per_row(model_path: str) -> float:
    """FLOPs of decoding one draw and its likelihood, as torch's FlopCounterMode counts them."""
    import torch
    from torch.utils.flop_counter import FlopCounterMode

    from mnist_vae.models.weights import load_model

    model = load_model(Path(model_path)).eval()
    rows = 64
    with torch.inference_mode(), FlopCounterMode(display=False) as counter:
        model.decoder(torch.randn(rows, model.arch.latent if model.arch.kind == "conv" else model.noise_dim))
    return counter.get_total_flops() / rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--old-src", required=True, help="the src folder of the code to compare with")
    parser.add_argument("--model", default="models/model.pt")
    parser.add_argument("--data", default="data/mnist.npz")
    parser.add_argument("--images", type=int, default=1000)
    parser.add_argument("--batch", type=int, default=100, help="images estimated at once")
    parser.add_argument("--k", type=int, default=5000)
    parser.add_argument("--rounds", type=int, default=1)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--old-chunk-rows", type=int, default=4096)
    parser.add_argument("--chunk-rows", type=int, default=0, help="0: this checkout's IW_CHUNK_ROWS")
    parser.add_argument(
        "--precision",
        nargs="+",
        default=["fp32", "auto"],
        help="this checkout's sides, one per precision: fp32, bf16 or auto (bf16 where the CPU has it "
        "natively)",
    )
    parser.add_argument(
        "--score",
        action="store_true",
        help="time `mnist-vae score`'s scoring of the first --images training images instead (one "
        "draw per image; --k, --batch and --precision do not apply)",
    )
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        worker(args)
        return

    from mnist_vae.evaluation.metrics import IW_CHUNK_ROWS

    flops = flops_per_row(args.model)
    rows = args.images * (1 if args.score else args.k)
    from mnist_vae.models.estimate import resolve

    sides = {"old": (args.old_src, args.old_chunk_rows, "-")}
    for precision in ["fp32"] if args.score else args.precision:
        name = f"new {resolve(precision)}"
        sides[name] = (str(ROOT / "src"), args.chunk_rows or IW_CHUNK_ROWS, precision)
    print(
        f"{'scores' if args.score else f'k = {args.k}'}, {args.images} images, {args.threads} threads, "
        f"{flops / 1e6:.3f} MFLOP per decoder row"
    )
    results: dict[str, list[dict[str, float]]] = {name: [] for name in sides}
    measure = "mean score" if args.score else "mean log p(x)"
    for _ in range(args.rounds):
        for name, (src, chunk, precision) in sides.items():
            command = [sys.executable, __file__, "--worker", "--old-src", "-", "--model", args.model]
            command += ["--data", args.data, "--images", str(args.images), "--k", str(args.k)]
            command += ["--batch", str(args.batch)] + (["--score"] if args.score else [])
            command += ["--threads", str(args.threads), "--chunk-rows", str(chunk), "--precision", precision]
            env = {**os.environ, "PYTHONPATH": src}
            done = subprocess.run(command, env=env, check=True, capture_output=True, text=True)
            result = json.loads(done.stdout.strip().splitlines()[-1])
            results[name].append(result)
            seconds = result["seconds"]
            print(
                f"{name}: {seconds:.1f} s, {rows / seconds:,.0f} rows/s, "
                f"{rows * flops / seconds / 1e9:.1f} GFLOP/s, {measure} {result['mean']:.4f} "
                f"(chunk {chunk} rows, {src})",
                flush=True,
            )
    old = [r["seconds"] for r in results["old"]]
    for name in list(sides)[1:]:
        new = [r["seconds"] for r in results[name]]
        # Each round's sides ran one after the other: their ratio is the least disturbed by a VM
        # whose speed drifts over minutes.
        ratios = sorted(a / b for a, b in zip(old, new, strict=True))
        difference = results[name][-1]["mean"] - results["old"][-1]["mean"]
        print(
            f"{name}: speed-up best of {args.rounds} {min(old) / min(new):.2f}x, median of the rounds' "
            f"ratios {statistics.median(ratios):.2f}x (from {ratios[0]:.2f}x to {ratios[-1]:.2f}x); "
            f"estimate {name} - old: {difference:+.5f} nats"
        )


if __name__ == "__main__":
    main()
