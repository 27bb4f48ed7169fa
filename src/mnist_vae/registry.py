"""The model registry: logging the pyfunc model, versions, aliases and the promotion gate."""

from __future__ import annotations

import logging
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path

import mlflow
import numpy as np
from mlflow import MlflowClient
from mlflow.exceptions import MlflowException

import mnist_vae
from mnist_vae import serving, tracking
from mnist_vae.config import EvaluateConfig, Params
from mnist_vae.errors import UserError
from mnist_vae.evaluate import Evaluation, evaluate_model
from mnist_vae.model import VAE, load_model

log = logging.getLogger(__name__)

CANDIDATE = "candidate"
CHAMPION = "champion"
GATE_METRIC = "neg_elbo"


class ModelNotFoundError(UserError, LookupError):
    """A model reference (name, version, alias, run or file) does not resolve."""


@dataclass(frozen=True)
class GateDecision:
    promoted: bool
    reason: str
    candidate_neg_elbo: float
    champion_neg_elbo: float | None


@dataclass(frozen=True, eq=False)
class GateData:
    """The images the promotion gate compares models on, and what they are (for its reason)."""

    images: np.ndarray
    labels: np.ndarray
    what: str


def log_and_register(
    model: VAE, params: Params, evaluation: Evaluation, test_data: tuple[np.ndarray, np.ndarray],
    gate_data: GateData, paths, root: Path,
) -> str:
    """Logs the model as an MLflow pyfunc in the active run and registers a new version.

    The version gets its test metrics, git commit, data hash and run link as tags, the alias
    ``candidate``, and ``champion`` when it passes :func:`promotion_gate` on ``gate_data`` (the
    validation split: the test set is reported, never used to choose). Returns the version.
    """
    run = mlflow.active_run()
    assert run is not None, "log_and_register needs an active MLflow run"
    name = params.mlflow.registered_model
    # MLflow logs a folder as the model's data: one holding just the weights.
    weights_dir = Path(tempfile.mkdtemp(prefix="mnist-vae-"))
    shutil.copy2(paths.model, weights_dir / serving.WEIGHTS_FILE)
    example = test_data[0][:2].reshape(2, -1).astype(np.float32) / 255.0
    info = mlflow.pyfunc.log_model(
        name="model",
        loader_module="mnist_vae.serving",
        data_path=str(weights_dir),
        code_paths=[str(Path(mnist_vae.__file__).parent)],
        signature=serving.signature(),
        input_example=example,
        pip_requirements=_requirements(),
        registered_model_name=name,
    )
    shutil.rmtree(weights_dir, ignore_errors=True)
    # The test metrics go to the run and to the logged model, measured on the logged test split.
    test_md5 = tracking.file_md5(paths.data)
    test_set = tracking.log_dataset(*test_data, "mnist-test", paths.data, test_md5,
                                    context="testing")
    mlflow.log_metrics(evaluation.mlflow_metrics(), model_id=info.model_id, dataset=test_set)
    version = str(info.registered_model_version)
    client = MlflowClient()
    tags = {f"test_{k}": f"{v:.6g}" for k, v in evaluation.metrics.items()}
    tags.update({
        "git_commit": tracking.git_commit(root),
        "dvc_data_md5": test_md5,
        "run_id": run.info.run_id,
        "run_link": f"runs:/{run.info.run_id}/model",
        "test_images": str(evaluation.n_images),
        "preset": params.model.preset,
    })
    for key, value in tags.items():
        client.set_model_version_tag(name, version, key, value)
    client.update_model_version(name, version, description=(
        f"{params.model.preset} preset, test negative ELBO "
        f"{evaluation.metrics['neg_elbo']:.2f} nats/image on {evaluation.n_images} test images; "
        f"run {run.info.run_id}, commit {tags['git_commit']}"))
    client.set_registered_model_alias(name, CANDIDATE, version)
    with tracking.store_lock():  # two pipelines finishing at once: one gate decision at a time
        decision = promotion_gate(client, name, version, model, gate_data, params.evaluate)
    mlflow.set_tags({"registry.version": version, "registry.promoted": str(decision.promoted),
                     "registry.gate_reason": decision.reason})
    print(f"promotion gate: {decision.reason}")
    return version


def promotion_gate(
    client: MlflowClient, name: str, version: str, model: VAE,
    data: GateData, cfg: EvaluateConfig,
) -> GateDecision:
    """Moves ``champion`` to ``version`` if it beats the current champion on ``data``.

    Both models are measured here, with the same images and the same random draws, so a champion
    registered under other evaluation settings is still compared fairly.
    """
    quick = cfg.replace(iw_samples=1, limit=0)
    images, labels = data.images, data.labels
    mine = evaluate_model(model, images, labels, quick).metrics[GATE_METRIC]
    try:
        current = client.get_model_version_by_alias(name, CHAMPION)
    except MlflowException:
        current = None
    if current is None:
        client.set_registered_model_alias(name, CHAMPION, version)
        return GateDecision(True, f"version {version} is the first champion "
                            f"(neg. ELBO {mine:.2f} on {data.what})", mine, None)
    theirs = evaluate_model(load_vae(f"models:/{name}/{current.version}"), images, labels, quick) \
        .metrics[GATE_METRIC]
    if mine < theirs:
        client.set_registered_model_alias(name, CHAMPION, version)
        return GateDecision(True, f"version {version} promoted to champion: neg. ELBO {mine:.2f} < "
                            f"{theirs:.2f} of version {current.version} on {data.what}", mine, theirs)
    return GateDecision(False, f"version {version} stays candidate: neg. ELBO {mine:.2f} is not "
                        f"better than {theirs:.2f} of champion version {current.version} on "
                        f"{data.what}", mine, theirs)


def load_vae(reference: str) -> VAE:
    """Loads a VAE from ``models:/name/3``, ``models:/name@alias``, ``runs:/id/model`` or a file.

    Raises:
        ModelNotFoundError: The reference does not resolve to a model of this project.
        ModelFileError: A weights file is missing or not one of this project's.
    """
    if "://" not in reference and not reference.startswith(("models:/", "runs:/")):
        return load_model(Path(reference))
    try:
        local = Path(mlflow.artifacts.download_artifacts(artifact_uri=reference))
    except (MlflowException, OSError) as exc:
        raise ModelNotFoundError(f"model {reference!r} not found: {_first_line(exc)}") from None
    found = sorted(local.rglob(serving.WEIGHTS_FILE)) if local.is_dir() else [local]
    if not found:
        raise ModelNotFoundError(f"model {reference!r} holds no {serving.WEIGHTS_FILE}; "
                                 "is it an mnist-vae model?")
    return load_model(found[0])


def _requirements() -> list[str]:
    import importlib.metadata as md

    return [f"{pkg}=={md.version(pkg)}" for pkg in ("torch", "numpy", "pandas", "mlflow")]


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__
