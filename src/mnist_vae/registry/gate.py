"""The promotion gate: moves ``champion`` to a new version only when it beats the champion on images
neither trained on, under the same protocol (dataset, data, grey or binarised images, validation
split)."""

from __future__ import annotations

import time
from dataclasses import dataclass

import numpy as np
import requests
from mlflow import MlflowClient
from mlflow.exceptions import MlflowException

from mnist_vae import tracking
from mnist_vae.config import EvaluateConfig, Params
from mnist_vae.errors import UserError, first_line
from mnist_vae.evaluation.metrics import evaluate_model
from mnist_vae.models.vae import VAE
from mnist_vae.registry.aliases import champion, move_champion
from mnist_vae.registry.references import load_vae

GATE_METRIC = "neg_elbo"
# After moving `champion` on a tracking server the gate waits this long and reads the alias again:
# another pipeline that read the same champion and wrote just after is then seen and compared.
SETTLE_SECONDS = 2.0
MAX_ROUNDS = 8
GATE = "promotion gate"


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
    """How a model was trained and measured: the dataset (``data.dataset``) and its file (its
    MD5), grey or binarised images, and the validation split held out of training (the last
    ``validation`` training images). Two versions are compared by the gate only under one
    protocol: a Fashion-MNIST model never competes with an MNIST champion, whatever its name."""

    data_md5: str
    binarized: bool
    validation: int
    dataset: str = "mnist"

    @classmethod
    def of(cls, params: Params, data_md5: str) -> Protocol:
        return cls(data_md5, params.train.binarize, params.train.validation, params.data.dataset)

    @classmethod
    def from_tags(cls, tags: dict[str, str]) -> Protocol | None:
        """The protocol a version's tags record; None for a version registered before they did.
        Versions registered before the dataset was recorded were all trained on MNIST."""
        try:
            return cls(
                tags[_P_DATA],
                tags[_P_BINARIZED] == "true",
                int(tags[_P_VALIDATION]),
                tags.get(_P_DATASET, "mnist"),
            )
        except (KeyError, ValueError):
            return None

    @classmethod
    def from_run(cls, params: dict[str, str], tags: dict[str, str]) -> Protocol:
        """The protocol of a training run, read from its params and data tag (older versions)."""
        return cls(
            tags.get("dvc.data.md5", ""),
            params.get("train.binarize", "False").lower() == "true",
            int(params.get("train.validation", "0")),
            params.get("data.dataset", "mnist"),
        )

    def tags(self) -> dict[str, str]:
        return {
            "protocol": str(self),
            _P_DATASET: self.dataset,
            _P_DATA: self.data_md5,
            _P_BINARIZED: str(self.binarized).lower(),
            _P_VALIDATION: str(self.validation),
        }

    def __str__(self) -> str:
        images = "binarised" if self.binarized else "grey"
        return f"{self.dataset}, {images}, validation {self.validation}, data {self.data_md5[:8]}"


_P_DATA, _P_BINARIZED, _P_VALIDATION = "protocol.data_md5", "protocol.binarized", "protocol.validation"
_P_DATASET = "protocol.dataset"


@dataclass(frozen=True, eq=False)
class GateData:
    """The images the promotion gate compares models on, and what they are (for its reason)."""

    images: np.ndarray
    labels: np.ndarray
    what: str


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

    Only like with like: a champion trained and measured under another ``protocol`` (another
    dataset or data file, binarised against grey images, another validation split) is never
    compared with, and the
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
            current = champion(client, name)
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
            "(register another protocol under its own name: mlflow.registered_model, whose default "
            "auto names the model after data.dataset)"
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
