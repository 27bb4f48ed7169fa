"""Registering a trained model: its pyfunc logged to the run, a version created with its metrics and
provenance as tags, ``candidate`` pointed at it, then the promotion gate (:mod:`.gate`)."""

from __future__ import annotations

import hashlib
import json
import logging
import sys
from pathlib import Path
from typing import TYPE_CHECKING

import mlflow
import numpy as np
import requests
from mlflow import MlflowClient
from mlflow.exceptions import MlflowException

from mnist_vae import tracking
from mnist_vae.config import Params
from mnist_vae.errors import UserError, first_line
from mnist_vae.evaluation.metrics import Evaluation
from mnist_vae.models.vae import VAE
from mnist_vae.registry import provenance
from mnist_vae.registry.aliases import CANDIDATE, COMPLETE, PENDING, REGISTRATION_TAG
from mnist_vae.registry.gate import SETTLE_SECONDS, GateData, Protocol, promotion_gate
from mnist_vae.serving.pyfunc import log_pyfunc

if TYPE_CHECKING:
    from mnist_vae.paths import Paths

log = logging.getLogger(__name__)

_ALREADY_EXISTS = {"RESOURCE_ALREADY_EXISTS", "ALREADY_EXISTS"}


class RegistrationError(UserError):
    """The tracking server failed while a new version was being registered; the version was
    withdrawn, so nothing half-registered remains."""


def log_and_register(
    model: VAE,
    params: Params,
    evaluation: Evaluation,
    test_data: tuple[np.ndarray, np.ndarray],
    gate_data: GateData,
    paths: Paths,
    root: Path,
    name: str,
) -> str:
    """Logs the model as an MLflow pyfunc in the active run and registers a new version of ``name``
    (:func:`mnist_vae.config.registered_model`).

    The version is created in one call with its test metrics, git commit, data hash and run link
    as tags, after the logged model holds its metrics; it then gets the alias ``candidate``, and
    ``champion`` when it passes :func:`promotion_gate` on ``gate_data`` (the validation split, or the
    last 10000 training images when ``train.validation`` is 0: the test set is reported, never used to
    choose). Returns the version.

    A gate that cannot decide (the server refuses or fails a read) leaves ``champion`` alone, keeps
    the version ``candidate``, tags the run ``registry.gate_decision=error`` with the reason in
    ``registry.gate_error``, prints one warning line to stderr and returns normally: the version is
    registered and the stage's outputs are valid; `mnist-vae promote` can finish the job.

    A rerun on the weights of a version of this run, evaluated the same way by the same code
    (``dvc repro -f evaluate``), registers nothing and returns that version.

    Raises:
        RegistrationError: The server failed after the version was created (it is withdrawn).
    """
    run = mlflow.active_run()
    if run is None:
        raise RuntimeError("log_and_register needs an active MLflow run")
    dataset = params.data.dataset
    client = MlflowClient()
    weights_md5 = tracking.file_md5(paths.model)
    commit = provenance.git_commit(root)
    evaluation_key = _evaluation_key(params, commit)
    again = _registered_already(client, name, run.info.run_id, weights_md5, evaluation_key)
    if again is not None:
        # `dvc repro -f evaluate`, or a rerun after a later step failed: the same weights of the same
        # run, measured the same way by the same code, are this version already; a second one
        # would be a duplicate.
        mlflow.set_tags({"registry.version": again})
        print(
            f"promotion gate: version {again} of {name} already holds these weights of run "
            f"{run.info.run_id}, evaluated the same way; not registered again"
        )
        return again
    example = test_data[0][:2].reshape(2, -1).astype(np.float32) / 255.0
    info = log_pyfunc(paths.model, example)
    # The test metrics go to the run and to the logged model, measured on the logged test split,
    # before any version exists: a version's page shows them from its first moment.
    test_md5 = tracking.file_md5(paths.data)
    test_set = provenance.log_dataset(*test_data, f"{dataset}-test", paths.data, test_md5, context="testing")
    mlflow.log_metrics(evaluation.mlflow_metrics(), model_id=info.model_id, dataset=test_set)
    tags = {f"test_{k}": f"{v:.6g}" for k, v in evaluation.metrics.items()}
    tags.update({WEIGHTS_TAG: weights_md5, EVALUATION_TAG: evaluation_key})
    tags.update(
        {
            "git_commit": commit,
            "dvc_data_md5": test_md5,
            "run_id": run.info.run_id,
            "run_link": f"runs:/{run.info.run_id}/model",
            "test_images": str(evaluation.n_images),
            "preset": params.model.preset,
            "dataset": dataset,
        }
    )
    protocol = Protocol.of(params, test_md5)
    tags.update(protocol.tags())
    description = (
        f"{params.model.preset} preset on {dataset}, test negative ELBO "
        f"{evaluation.metrics['neg_elbo']:.2f} nats/image on {evaluation.n_images} test images; "
        f"run {run.info.run_id}, commit {tags['git_commit']}"
    )
    version = register(client, name, info.model_uri, info.model_id, run.info.run_id, tags, description)
    # On a server nothing serialises two pipelines: the gate re-reads and retries (see there).
    settle = 0.0 if mlflow.get_tracking_uri().startswith("sqlite:") else SETTLE_SECONDS
    with tracking.store_lock():  # two pipelines on one SQLite store: one gate decision at a time
        decision = promotion_gate(
            client, name, version, model, gate_data, params.evaluate, settle=settle, protocol=protocol
        )
    gate_tags = {
        "registry.version": version,
        "registry.promoted": str(decision.promoted),
        "registry.gate_reason": decision.reason,
        "registry.gate_decision": decision.outcome,
    }
    if decision.error is not None:
        gate_tags["registry.gate_error"] = decision.error
    mlflow.set_tags(gate_tags)
    if decision.error is not None:
        print(f"warning: promotion gate: {decision.reason}", file=sys.stderr)
    else:
        print(f"promotion gate: {decision.reason}")
    return version


# A version's weights (MD5 of model.pt) and how it was evaluated (a digest of evaluate.* and the
# commit of the code that measured it): with the run id they tell a rerun of `evaluate` from a new
# registration.
WEIGHTS_TAG, EVALUATION_TAG = "weights_md5", "evaluation"


def _evaluation_key(params: Params, commit: str) -> str:
    settings = json.dumps({"evaluate": params.evaluate.to_dict(), "commit": commit}, sort_keys=True)
    return hashlib.sha256(settings.encode()).hexdigest()[:16]


def _registered_already(
    client: MlflowClient, name: str, run_id: str, weights_md5: str, evaluation_key: str
) -> str | None:
    """The complete version of ``name`` that holds these weights of this run, evaluated the same
    way, or None."""
    try:
        versions = client.search_model_versions(f"name='{name}' and run_id='{run_id}'")
    except MlflowException as exc:
        if exc.error_code == "RESOURCE_DOES_NOT_EXIST":
            return None
        raise
    for version in versions:
        tags = version.tags or {}
        if (
            tags.get(WEIGHTS_TAG) == weights_md5
            and tags.get(EVALUATION_TAG) == evaluation_key
            and tags.get(REGISTRATION_TAG) == COMPLETE
        ):
            return str(version.version)
    return None


def register(
    client: MlflowClient,
    name: str,
    model_uri: str,
    model_id: str | None,
    run_id: str,
    tags: dict[str, str],
    description: str,
) -> str:
    """Creates version N of ``name`` with all its tags at once and points ``candidate`` at it.

    The version is created marked ``registration=pending`` and marked ``complete`` as the last
    step. A failure in between deletes it; should the delete fail too, the pending mark keeps it out
    of `mnist-vae models`, `promote` and the gate.

    Raises:
        RegistrationError: The server failed a step after the version was created.
    """
    try:
        client.create_registered_model(name)
    except MlflowException as exc:
        if exc.error_code not in _ALREADY_EXISTS:
            raise
    created = client.create_model_version(
        name,
        source=model_uri,
        run_id=run_id,
        tags={**tags, REGISTRATION_TAG: PENDING},
        description=description,
        model_id=model_id,
    )
    version = str(created.version)
    try:
        client.set_registered_model_alias(name, CANDIDATE, version)
        client.set_model_version_tag(name, version, REGISTRATION_TAG, COMPLETE)
    except BaseException as exc:
        withdrawn = _withdraw(client, name, version)
        if isinstance(exc, MlflowException) and tracking.auth_error(exc, "") is None:
            raise RegistrationError(
                f"registering version {version} of model {name!r} failed part way "
                f"({tracking.redacted(first_line(exc))}); {withdrawn}; run again when the server is back"
            ) from None
        raise
    return version


def _withdraw(client: MlflowClient, name: str, version: str) -> str:
    """Deletes a version whose registration failed; says what became of it."""
    try:
        client.delete_model_version(name, version)
    except (MlflowException, requests.RequestException) as exc:
        log.warning(
            "could not delete the incomplete version %s of %r (%s); it stays marked %s=%s",
            version,
            name,
            tracking.redacted(first_line(exc)),
            REGISTRATION_TAG,
            PENDING,
        )
        return (
            f"version {version} could not be deleted and stays marked "
            f"{REGISTRATION_TAG}={PENDING}, left out of `mnist-vae models` and the gate"
        )
    return f"version {version} was deleted, nothing is registered"
