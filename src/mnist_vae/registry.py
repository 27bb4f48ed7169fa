"""The model registry: logging the pyfunc model, versions, aliases and the promotion gate."""

from __future__ import annotations

import hashlib
import json
import logging
import shutil
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import mlflow
import numpy as np
import requests
from mlflow import MlflowClient
from mlflow.exceptions import MlflowException

import mnist_vae
from mnist_vae import provenance, serving, tracking
from mnist_vae.config import EvaluateConfig, Params
from mnist_vae.errors import UserError, first_line
from mnist_vae.evaluate import Evaluation, evaluate_model
from mnist_vae.model import VAE, load_model

if TYPE_CHECKING:
    from mnist_vae.paths import Paths

log = logging.getLogger(__name__)

CANDIDATE = "candidate"
CHAMPION = "champion"
GATE_METRIC = "neg_elbo"
# A version is created with this tag "pending" and set "complete" once it is `candidate`; a pending
# version (its registration failed part way and could not be deleted) is left out of
# `mnist-vae models`, `promote` and the gate.
REGISTRATION_TAG = "registration"
PENDING, COMPLETE = "pending", "complete"
# After moving `champion` on a tracking server the gate waits this long and reads the alias again:
# another pipeline that read the same champion and wrote just after is then seen and compared.
SETTLE_SECONDS = 2.0
MAX_ROUNDS = 8
# Registered-model tags that every move of `champion` writes, by the gate or by a person: the
# version it replaced (what `mnist-vae rollback` returns to) and who moved it, when.
PREVIOUS_TAG = "previous_champion"
MOVED_BY_TAG, MOVED_AT_TAG = "champion_moved_by", "champion_moved_at"
GATE = "promotion gate"
_ALREADY_EXISTS = {"RESOURCE_ALREADY_EXISTS", "ALREADY_EXISTS"}


class ModelNotFoundError(UserError, LookupError):
    """A model reference (name, version, alias, run or file) does not resolve."""


class RegistrationError(UserError):
    """The tracking server failed while a new version was being registered; the version was
    withdrawn, so nothing half-registered remains."""


@dataclass(frozen=True)
class GateDecision:
    promoted: bool
    reason: str
    candidate_neg_elbo: float | None
    champion_neg_elbo: float | None
    error: str | None = None  # set when the gate could not decide: `champion` was left alone

    @property
    def outcome(self) -> str:
        """``promoted``, ``candidate`` (measured, not better) or ``error`` (could not decide)."""
        if self.error is not None:
            return "error"
        return "promoted" if self.promoted else "candidate"


@dataclass(frozen=True)
class Protocol:
    """How a model was trained and measured: the data (its MD5), grey or binarised images, and
    the validation split held out of training (the last ``validation`` training images). Two
    versions are compared by the gate only under one protocol."""

    data_md5: str
    binarized: bool
    validation: int

    @classmethod
    def of(cls, params: Params, data_md5: str) -> Protocol:
        return cls(data_md5, params.train.binarize, params.train.validation)

    @classmethod
    def from_tags(cls, tags: dict[str, str]) -> Protocol | None:
        """The protocol a version's tags record; None for a version registered before they did."""
        try:
            return cls(tags[_P_DATA], tags[_P_BINARIZED] == "true", int(tags[_P_VALIDATION]))
        except (KeyError, ValueError):
            return None

    @classmethod
    def from_run(cls, params: dict[str, str], tags: dict[str, str]) -> Protocol:
        """The protocol of a training run, read from its params and data tag (older versions)."""
        return cls(
            tags.get("dvc.data.md5", ""),
            params.get("train.binarize", "False").lower() == "true",
            int(params.get("train.validation", "0")),
        )

    def tags(self) -> dict[str, str]:
        return {
            "protocol": str(self),
            _P_DATA: self.data_md5,
            _P_BINARIZED: str(self.binarized).lower(),
            _P_VALIDATION: str(self.validation),
        }

    def __str__(self) -> str:
        images = "binarised" if self.binarized else "grey"
        return f"{images}, validation {self.validation}, data {self.data_md5[:8]}"


_P_DATA, _P_BINARIZED, _P_VALIDATION = "protocol.data_md5", "protocol.binarized", "protocol.validation"


@dataclass(frozen=True, eq=False)
class GateData:
    """The images the promotion gate compares models on, and what they are (for its reason)."""

    images: np.ndarray
    labels: np.ndarray
    what: str


def log_and_register(
    model: VAE,
    params: Params,
    evaluation: Evaluation,
    test_data: tuple[np.ndarray, np.ndarray],
    gate_data: GateData,
    paths: Paths,
    root: Path,
) -> str:
    """Logs the model as an MLflow pyfunc in the active run and registers a new version.

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
    name = params.mlflow.registered_model
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
    # MLflow logs a folder as the model's data: one holding just the weights, removed also when
    # logging fails.
    with tempfile.TemporaryDirectory(prefix="mnist-vae-weights-") as weights_dir:
        shutil.copy2(paths.model, Path(weights_dir) / serving.WEIGHTS_FILE)
        info = mlflow.pyfunc.log_model(
            name="model",
            loader_module="mnist_vae.serving",
            data_path=weights_dir,
            code_paths=[str(Path(mnist_vae.__file__).parent)],
            signature=serving.signature(),
            input_example=example,
            pip_requirements=serving.pip_requirements(),
        )
    # The test metrics go to the run and to the logged model, measured on the logged test split,
    # before any version exists: a version's page shows them from its first moment.
    test_md5 = tracking.file_md5(paths.data)
    test_set = tracking.log_dataset(*test_data, "mnist-test", paths.data, test_md5, context="testing")
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
        }
    )
    protocol = Protocol.of(params, test_md5)
    tags.update(protocol.tags())
    description = (
        f"{params.model.preset} preset, test negative ELBO "
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
    settings = json.dumps({"evaluate": params.to_dict()["evaluate"], "commit": commit}, sort_keys=True)
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


def champion_version(client: MlflowClient, name: str) -> str | None:
    """The version ``champion`` points at, or None when there is no such alias.

    Only "this alias (or model) does not exist" means no champion: MLflow's SQL and file stores
    answer a missing alias with INVALID_PARAMETER_VALUE "Registered model alias champion not
    found", other registries with RESOURCE_DOES_NOT_EXIST. Any other failure raises.
    """
    try:
        return str(client.get_model_version_by_alias(name, CHAMPION).version)
    except MlflowException as exc:
        if exc.error_code == "RESOURCE_DOES_NOT_EXIST" or (
            exc.error_code == "INVALID_PARAMETER_VALUE" and f"alias {CHAMPION} not found" in str(exc)
        ):
            return None
        raise


def move_champion(client: MlflowClient, name: str, version: str, previous: str | None, by: str) -> None:
    """Points ``champion`` at ``version`` and records the move: the version it replaced (``None``:
    there was none), who moved it (``by``: the gate or a person) and when, as tags of the
    registered model. The record is written first, so a failure never leaves a moved alias that
    `mnist-vae rollback` knows nothing about."""
    if previous is None:
        # A record left from before the alias vanished would send a later rollback somewhere stale.
        if PREVIOUS_TAG in (client.get_registered_model(name).tags or {}):
            client.delete_registered_model_tag(name, PREVIOUS_TAG)
    else:
        client.set_registered_model_tag(name, PREVIOUS_TAG, previous)
    client.set_registered_model_tag(name, MOVED_BY_TAG, by)
    client.set_registered_model_tag(name, MOVED_AT_TAG, time.strftime("%Y-%m-%dT%H:%M:%S%z"))
    client.set_registered_model_alias(name, CHAMPION, version)


def promotion_gate(
    client: MlflowClient,
    name: str,
    version: str,
    model: VAE,
    data: GateData,
    cfg: EvaluateConfig,
    settle: float = SETTLE_SECONDS,
    protocol: Protocol | None = None,
) -> GateDecision:
    """Moves ``champion`` to ``version`` if it beats the current champion on ``data``.

    Only like with like: a champion trained and measured under another ``protocol`` (other data,
    binarised against grey images, another validation split) is never compared with, and the
    version stays candidate with a reason naming both protocols. Without a validation split
    (``protocol.validation`` 0) there are no images that neither model trained on: the first
    version becomes champion, later ones stay candidate (`mnist-vae promote` decides by hand).

    Both models are measured by this function, with the same images and the same random draws, so a champion
    registered under other evaluation settings is still compared fairly.

    The gate fails closed: when the champion cannot be read (only a missing alias means there is
    none), measured or moved, ``champion`` is left alone and the decision carries the error.

    Two pipelines may finish at once against one server, and MLflow has no compare-and-set on
    aliases. So the gate reads the champion again after measuring it, and measures again if it
    moved; after moving the alias it waits ``settle`` seconds and reads it once more: a pipeline
    that wrote over it meanwhile is then compared with, and the better version written back.
    """
    quick = cfg.replace(iw_samples=1, limit=0)
    mine = _measure(model, data, quick)
    measured: dict[str, float] = {}
    replaced: str | None = None  # the champion that this gate's last write replaced
    wrote = False
    displaced_by: str | None = None
    try:
        for _ in range(MAX_ROUNDS):
            current = champion_version(client, name)
            if current == version:
                if replaced is None:
                    return GateDecision(
                        True,
                        f"version {version} is the first champion (neg. ELBO {mine:.2f} on {data.what})",
                        mine,
                        None,
                    )
                return GateDecision(
                    True,
                    f"version {version} promoted to champion: neg. ELBO "
                    f"{mine:.2f} < {measured[replaced]:.2f} of version {replaced} "
                    f"on {data.what}",
                    mine,
                    measured[replaced],
                )
            if wrote:
                displaced_by = current  # another pipeline moved it after this gate did
            refusal = _other_protocol(client, name, version, current, protocol)
            if refusal is not None:
                return GateDecision(False, refusal, mine, None)
            if current is not None and current not in measured:
                measured[current] = _measure(load_vae(f"models:/{name}/{current}"), data, quick)
                continue  # measuring took a while: read the champion again before deciding
            if current is not None and mine >= measured[current]:
                note = (
                    (f"; it was champion briefly, until version {current} was promoted at the same time")
                    if displaced_by == current
                    else ""
                )
                return GateDecision(
                    False,
                    f"version {version} stays candidate: neg. ELBO "
                    f"{mine:.2f} is not better than {measured[current]:.2f} of "
                    f"champion version {current} on {data.what}{note}",
                    mine,
                    measured[current],
                )
            move_champion(client, name, version, current, GATE)
            wrote, replaced = True, current
            if settle:
                time.sleep(settle)
        raise _GateRoundsExceeded(f"champion kept moving for {MAX_ROUNDS} rounds")
    except (MlflowException, requests.RequestException, UserError, _GateRoundsExceeded) as exc:
        error = tracking.redacted(first_line(exc))
        where = (
            f"champion may point at version {version} (written before the error)"
            if wrote
            else "champion is left where it was"
        )
        return GateDecision(
            False,
            f"could not decide for version {version} ({error}); {where}, "
            f"version {version} stays candidate (`mnist-vae promote {version}` "
            "moves champion by hand)",
            mine,
            None,
            error=error,
        )


def _other_protocol(
    client: MlflowClient, name: str, version: str, champion: str | None, mine: Protocol | None
) -> str | None:
    """Why ``version`` cannot be compared with the ``champion`` version, or None when it can."""
    if champion is None or mine is None:
        return None
    found = client.get_model_version(name, champion)
    theirs = Protocol.from_tags(dict(found.tags or {}))
    if theirs is None and found.run_id:  # registered before versions recorded their protocol
        run = client.get_run(found.run_id)
        theirs = Protocol.from_run(dict(run.data.params), dict(run.data.tags))
    if theirs is not None and theirs != mine:
        return (
            f"version {version} stays candidate: it was trained and measured as {mine}, champion "
            f"version {champion} as {theirs}; the gate compares models of one protocol only "
            "(register another protocol under its own name: mlflow.registered_model)"
        )
    if mine.validation == 0:
        return (
            f"version {version} stays candidate: without a validation split (train.validation is 0) "
            f"no images are unseen by both it and champion version {champion}, so the gate cannot "
            f"compare them (`mnist-vae promote {version}` moves champion by hand)"
        )
    return None


class _GateRoundsExceeded(Exception):
    """Pipelines kept moving ``champion`` while this gate compared (it then fails closed)."""


def _measure(model: VAE, data: GateData, cfg: EvaluateConfig) -> float:
    return evaluate_model(model, data.images, data.labels, cfg).metrics[GATE_METRIC]


def load_vae(reference: str) -> VAE:
    """Loads a VAE from ``models:/name/3``, ``models:/name@alias``, ``runs:/id/model`` or a file.

    Raises:
        ModelNotFoundError: The reference does not resolve to a model of this project.
        ModelFileError: A weights file is missing or not one of this project's.
    """
    if "://" not in reference and not reference.startswith(("models:/", "runs:/")):
        return load_model(Path(reference))
    # Downloaded into a folder of our own that goes when the weights are loaded: MLflow's default
    # destination is a temporary folder it never removes (one model's copy per gate run).
    with tempfile.TemporaryDirectory(prefix="mnist-vae-model-") as scratch:
        try:
            local = Path(mlflow.artifacts.download_artifacts(artifact_uri=reference, dst_path=scratch))
        except (MlflowException, OSError) as exc:
            raise ModelNotFoundError(f"model {reference!r} not found: {first_line(exc)}") from None
        found = sorted(local.rglob(serving.WEIGHTS_FILE)) if local.is_dir() else [local]
        if not found:
            raise ModelNotFoundError(
                f"model {reference!r} holds no {serving.WEIGHTS_FILE}; is it an mnist-vae model?"
            )
        return load_model(found[0])
