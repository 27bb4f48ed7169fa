"""Stage ``download``: fetches ``data.dataset`` (MNIST or Fashion-MNIST) from its ``data.mirrors``,
verifies it and writes ``data/<data.dataset>.npz``."""

from __future__ import annotations

from pathlib import Path

from mnist_vae.config import Params
from mnist_vae.data.fetch import download_dataset, resolve_mirrors
from mnist_vae.paths import Paths, project_root
from mnist_vae.stages import runner


def run(params: Params, paths: Paths | None = None) -> Path:
    """Fetches and verifies the dataset into one ``.npz``; returns its path."""
    dataset = params.data.dataset
    paths = paths or Paths.of(dataset)
    mirrors = resolve_mirrors(params.data.mirrors[dataset], base=project_root(), dataset=dataset)
    return download_dataset(paths.data, mirrors, timeout=params.data.timeout, dataset=dataset)


def main(argv: list[str] | None = None) -> None:
    with runner.reporting("download"):
        run(runner.parse_args("download", argv, __doc__))
