"""Stage ``download``: fetches MNIST from ``data.mirrors``, verifies it and writes ``data/mnist.npz``."""

from __future__ import annotations

from pathlib import Path

from mnist_vae.config import Params
from mnist_vae.data.fetch import download_mnist, resolve_mirrors
from mnist_vae.paths import DEFAULT_PATHS, Paths, project_root
from mnist_vae.stages import runner


def run(params: Params, paths: Paths = DEFAULT_PATHS) -> Path:
    """Fetches and verifies MNIST into one ``.npz``; returns its path."""
    mirrors = resolve_mirrors(params.data.mirrors, base=project_root())
    return download_mnist(paths.data, mirrors, timeout=params.data.timeout)


def main(argv: list[str] | None = None) -> None:
    with runner.reporting("download"):
        run(runner.parse_args("download", argv, __doc__))
