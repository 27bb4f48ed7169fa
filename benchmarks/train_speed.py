"""Training speed against the tutorial's loop: `python benchmarks/train_speed.py [--out F]`.

Prints a table (rows a-d of issue 4, each with its ratio to the tutorial's loop), writes JSON and logs
the result to MLflow as a run of the experiment `mnist-vae-bench`.
"""

from __future__ import annotations

import argparse
import logging
from dataclasses import replace
from pathlib import Path

from mnist_vae.bench import BenchSettings, run_benchmark, write_json
from mnist_vae.data import load_mnist


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", type=Path, default=Path("data/mnist.npz"))
    parser.add_argument("--out", type=Path, default=Path("reports/bench.json"))
    parser.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    parser.add_argument("--chunk", type=int, default=BenchSettings.chunk,
                        help="samples per timed window (3 windows per row)")
    parser.add_argument("--no-mlflow", action="store_true", help="do not log the result")
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING)
    settings = replace(BenchSettings(), device=args.device, chunk=args.chunk)
    result = run_benchmark(load_mnist(args.data), settings)
    print_table(result)
    write_json(result, args.out)
    print(f"wrote {args.out}")
    if not args.no_mlflow:
        log_to_mlflow(result, args.out)


def print_table(result: dict) -> None:
    from rich.console import Console
    from rich.table import Table

    m = result["machine"]
    table = Table(title=f"training speed on {m['device']} ({m['gpu'] or m['cpu']}, "
                  f"{m['threads']} threads, torch {m['torch']})")
    for column in ("row", "what", "batch", "samples/s", "s/epoch", "x (a)", "loss after budget",
                   "s to target"):
        table.add_column(column, justify="left" if column == "what" else "right")
    for r in result["rows"]:
        table.add_row(r["name"], r["description"], str(r["batch_size"]),
                      f"{r['samples_per_sec']:,.0f}", f"{r['seconds_per_epoch']:.1f}",
                      f"{r['ratio']:.2f}",
                      "" if r["loss_after_budget"] is None else f"{r['loss_after_budget']:.4f}",
                      "" if r["seconds_to_target"] is None else f"{r['seconds_to_target']:.1f}")
    Console().print(table)


def log_to_mlflow(result: dict, json_path: Path) -> None:
    import mlflow

    from mnist_vae import tracking

    tracking.configure()
    with mlflow.start_run(experiment_id=tracking.experiment_id("mnist-vae-bench")):
        mlflow.set_tags({f"machine.{k}": v for k, v in result["machine"].items()})
        mlflow.log_params({f"bench.{k}": v for k, v in result["settings"].items()})
        for r in result["rows"]:
            mlflow.log_metric(f"{r['name']}_samples_per_sec", r["samples_per_sec"])
            mlflow.log_metric(f"{r['name']}_ratio", r["ratio"])
            if r["loss_after_budget"] is not None:
                mlflow.log_metric(f"{r['name']}_loss_after_budget", r["loss_after_budget"])
            if r["seconds_to_target"] is not None:
                mlflow.log_metric(f"{r['name']}_seconds_to_target", r["seconds_to_target"])
        mlflow.log_artifact(str(json_path))


if __name__ == "__main__":
    main()
