"""`mnist-vae score` in this process against `--engine spark`, side by side on the same images.

    python benchmarks/score_engines.py --model models/model.pt [--data data/mnist.npz] [--key x_train]
        [--master local[2]] [--rounds 2] [--batch-size 4096]

Each round runs, one after the other: the in-process engine on the .npz (read, score, write
Parquet), Spark on the same .npz (an Arrow table handed to Spark), Spark on a Parquet copy of the
images (784 uint8 per row, as Spark would read a dataset), and two runs that name Spark's overhead:
an empty pandas UDF over the same rows (moving the pixels through Arrow to the Python workers
and back, no model) and the in-process engine with one torch thread (what one Spark worker has).
Spark's start-up is timed once. Prints seconds and images/s per run, best of the rounds.
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
import time
from pathlib import Path

import numpy as np
import pandas as pd  # at the top: pandas_udf reads the type hints below through the module's names


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", required=True, help="a weights file or model reference")
    parser.add_argument("--data", default="data/mnist.npz")
    parser.add_argument("--key", default="x_train")
    parser.add_argument("--master", default="local[2]")
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--batch-size", type=int, default=4096)
    parser.add_argument("--out", default="reports/score_engines.json")
    args = parser.parse_args()

    import pyarrow as pa
    import pyarrow.parquet as pq
    import torch
    from pyspark.sql import functions as F
    from pyspark.sql.functions import pandas_udf

    from mnist_vae.registry.references import load_vae
    from mnist_vae.serving import spark as engine
    from mnist_vae.serving.scoring import score_file

    vae = load_vae(args.model)
    with np.load(args.data) as data:
        images = data[args.key].reshape(-1, 784)
    n = len(images)
    threads = torch.get_num_threads()
    best: dict[str, float] = {}

    def timed(name: str, run: object) -> None:
        start = time.perf_counter()
        run()  # type: ignore[operator]
        seconds = time.perf_counter() - start
        best[name] = min(best.get(name, float("inf")), seconds)
        print(f"{name}: {seconds:.2f} s ({n / seconds:,.0f} images/s)", flush=True)

    with tempfile.TemporaryDirectory(prefix="score-engines-") as scratch:
        root = Path(scratch)
        np.savez(root / "images.npz", x=images)
        parquet = root / "images.parquet"
        parquet.mkdir()
        offsets = pa.array(np.arange(0, images.size + 1, 784, dtype=np.int32))
        for i, part in enumerate(np.array_split(np.arange(n), 2)):  # two files, as two writers leave
            rows = images[part]
            lists = pa.ListArray.from_arrays(offsets[: len(rows) + 1], pa.array(rows.reshape(-1)))
            pq.write_table(pa.table({"pixels": lists}), parquet / f"part-{i}.parquet")
        start = time.perf_counter()
        with engine.session(args.master, args.batch_size) as spark:
            startup = time.perf_counter() - start
            print(f"Spark session on {args.master}: {startup:.2f} s", flush=True)

            @pandas_udf("float")  # type: ignore[call-overload]
            def nothing(batch: pd.Series) -> pd.Series:
                return pd.Series(np.zeros(len(batch), dtype=np.float32))

            def empty_udf() -> None:
                frame, _, _ = engine.image_frame(spark, str(root / "images.npz"), key="x")
                frame.select(nothing("pixels").alias("z")).agg(F.sum("z")).collect()

            for _ in range(args.rounds):
                torch.set_num_threads(threads)
                timed(
                    f"in process, {threads} torch threads",
                    lambda: score_file(
                        vae, root / "images.npz", root / "p.parquet", key="x", batch_size=args.batch_size
                    ),
                )
                timed(
                    f"Spark {args.master}, from the .npz",
                    lambda: engine.score_spark(
                        spark, vae, str(root / "images.npz"), str(root / "s.parquet"), key="x"
                    ),
                )
                timed(
                    f"Spark {args.master}, from Parquet",
                    lambda: engine.score_spark(spark, vae, str(parquet), str(root / "q.parquet")),
                )
                timed(f"Spark {args.master}, empty UDF (no model)", empty_udf)
                torch.set_num_threads(1)
                timed(
                    "in process, 1 torch thread",
                    lambda: score_file(
                        vae, root / "images.npz", root / "p1.parquet", key="x", batch_size=args.batch_size
                    ),
                )
            torch.set_num_threads(threads)
        local = pd.read_parquet(root / "p.parquet")
        differences = {}
        for name in ("s.parquet", "q.parquet"):
            other = pd.read_parquet(root / name).sort_values("image").reset_index(drop=True)
            assert other["image"].tolist() == local["image"].tolist(), name
            gap = np.abs(other["neg_elbo"].to_numpy(np.float64) - local["neg_elbo"].to_numpy(np.float64))
            differences[name] = {
                "max_abs": float(gap.max()),
                "max_rel": float((gap / local["neg_elbo"].abs()).max()),
            }
        print(f"Spark against in process, neg_elbo: {differences}", flush=True)
        from mnist_vae.serving.scores import image_noise

        grey = torch.from_numpy(images).float().div_(255.0)
        start = time.perf_counter()
        image_noise(grey, 0, vae.latent_dim)
        noise = time.perf_counter() - start
        print(f"the per-image draws alone (hashing {n} images): {noise:.2f} s", flush=True)
    result = {
        "images": n,
        "master": args.master,
        "cpu": _cpu(),
        "spark_startup_s": round(startup, 2),
        "best_s": {k: round(v, 2) for k, v in best.items()},
        "draws_s": round(noise, 2),
        "spark_vs_in_process": differences,
        "images_per_s": {k: round(n / v) for k, v in best.items()},
    }
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result, indent=2))


def _cpu() -> str:
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return "unknown"
    names = [line.split(":", 1)[1].strip() for line in text.splitlines() if line.startswith("model name")]
    return f"{names[0] if names else 'unknown'}, {len(os.sched_getaffinity(0))} cores"


if __name__ == "__main__":
    main()
