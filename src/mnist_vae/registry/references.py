"""What a model reference names, and fetching it: ``models:/name/3``, ``models:/name@alias``,
``runs:/id/model``, another MLflow artifact URI, a weights file or an MLflow model folder."""

from __future__ import annotations

import tempfile
from pathlib import Path

from mnist_vae.errors import UserError, first_line
from mnist_vae.models.vae import VAE
from mnist_vae.models.weights import load_model
from mnist_vae.serving.pyfunc import WEIGHTS_FILE, save_pyfunc


class ModelNotFoundError(UserError, LookupError):
    """A model reference (name, version, alias, run or file) does not resolve."""


def in_mlflow(reference: str) -> bool:
    """Whether ``reference`` names something in MLflow (a registry or artifact URI), not a local path."""
    return "://" in reference or reference.startswith(("models:/", "runs:/"))


def load_vae(reference: str) -> VAE:
    """Loads the VAE that ``reference`` names.

    Raises:
        ModelNotFoundError: The reference does not resolve to a model of this project.
        ModelFileError: A weights file is missing or not one of this project's.
    """
    if not in_mlflow(reference):
        return load_model(Path(reference))
    # Downloaded into a folder of our own that goes when the weights are loaded: MLflow's default
    # destination is a temporary folder it never removes (one model's copy per gate run).
    with tempfile.TemporaryDirectory(prefix="mnist-vae-model-") as scratch:
        local = _download(reference, Path(scratch))
        found = sorted(local.rglob(WEIGHTS_FILE)) if local.is_dir() else [local]
        if not found:
            raise ModelNotFoundError(
                f"model {reference!r} holds no {WEIGHTS_FILE}; is it an mnist-vae model?"
            )
        return load_model(found[0])


def model_folder(reference: str, workdir: Path) -> Path:
    """A local MLflow model folder for ``reference``, what ``mlflow models serve`` takes: a folder
    as it is, a weights file saved as one under ``workdir``, an MLflow URI downloaded there.

    Raises:
        ModelNotFoundError: ``reference`` resolves to nothing, or to no MLflow model.
        ModelFileError: A weights file is missing or not one of this project's.
    """
    path = Path(reference)
    if not in_mlflow(reference):
        if path.is_dir():
            if not (path / "MLmodel").is_file():
                raise ModelNotFoundError(f"{path}: expected an MLflow model folder (with MLmodel)")
            return path
        return save_pyfunc(path, workdir / "model")
    from mnist_vae import tracking

    tracking.configure()
    found = sorted(_download(reference, workdir / "download").rglob("MLmodel"))
    if not found:
        raise ModelNotFoundError(f"model {reference!r} holds no MLmodel; is it an MLflow model?")
    return found[0].parent


def _download(reference: str, into: Path) -> Path:
    import mlflow
    from mlflow.exceptions import MlflowException

    try:
        return Path(mlflow.artifacts.download_artifacts(artifact_uri=reference, dst_path=str(into)))
    except (MlflowException, OSError) as exc:
        raise ModelNotFoundError(f"model {reference!r} not found: {first_line(exc)}") from None
