"""The demo's model card: which model the page shows, where it came from and how it measured.

For a registry reference (``models:/NAME@ALIAS``, ``models:/NAME/VERSION``) the card reads the
version from MLflow: its aliases, the test metrics the evaluate stage tagged it with, its preset and
the run that trained it. For ``runs:/RUN_ID/...`` it reads that run and any version registered from
it. A weights file has no registry entry: the card says so and shows what the file itself holds.
"""

from __future__ import annotations

import dataclasses
import re
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from mnist_vae.errors import first_line
from mnist_vae.models.vae import VAE
from mnist_vae.registry.references import in_mlflow

if TYPE_CHECKING:
    from mlflow import MlflowClient
    from mlflow.entities.model_registry import ModelVersion

_BY_ALIAS = re.compile(r"^models:/(?P<name>[^/@]+)@(?P<alias>[^/@]+)/?$")
_BY_VERSION = re.compile(r"^models:/(?P<name>[^/@]+)/(?P<version>\d+)/?$")
_BY_RUN = re.compile(r"^runs:/(?P<run>[^/]+)/")
_TEST_PREFIX = "test_"
# The test metrics a card shows, in this order, with their units (the evaluate stage logs more).
_SHOWN = {"neg_elbo": "nats", "nll_iw": "nats", "recon_bce": "nats", "kl": "nats", "psnr": "dB"}


@dataclass(frozen=True)
class ModelCard:
    """What the page says about its model; registry fields stay empty for a weights file."""

    reference: str
    family: str
    preset: str
    parameters: int
    registered: str = ""  # "mnist-vae version 3"
    aliases: tuple[str, ...] = ()
    metrics: dict[str, str] = field(default_factory=dict)  # test metrics, nats per image
    run_id: str = ""
    run_name: str = ""
    experiment: str = ""
    note: str = ""


def preset_of(model: VAE) -> str:
    """The params preset a VAE was built from, read off its architecture."""
    return "seed" if model.arch.sigma_head else model.arch.kind


def model_card(reference: str, model: VAE, family: str, client: MlflowClient | None = None) -> ModelCard:
    """The card of ``model``, loaded from ``reference``; ``family`` describes its latent layers.

    ``client`` reads the registry for an MLflow reference (default: a client of the store that
    MLflow is pointed at). A failed look-up leaves a note on the card rather than stopping the page.
    """
    card = ModelCard(
        reference=reference,
        family=family,
        preset=preset_of(model),
        parameters=sum(p.numel() for p in model.parameters()),
    )
    if not in_mlflow(reference):
        return _with(card, note="a weights file: no registry entry, no MLflow run recorded with it")
    from mlflow import MlflowClient
    from mlflow.exceptions import MlflowException

    client = client or MlflowClient()
    try:
        if match := _BY_ALIAS.match(reference):
            version = client.get_model_version_by_alias(match["name"], match["alias"])
            return _from_version(client, card, version)
        if match := _BY_VERSION.match(reference):
            version = client.get_model_version(match["name"], match["version"])
            return _from_version(client, card, version)
        if match := _BY_RUN.match(reference):
            return _from_run(client, card, match["run"])
    except MlflowException as exc:
        return _with(card, note=f"the registry could not be read: {first_line(exc, limit=200)}")
    return _with(card, note="an MLflow artifact: not a registry version or a run, nothing more to show")


def _with(card: ModelCard, **changes: Any) -> ModelCard:
    return dataclasses.replace(card, **changes)


def _from_version(client: MlflowClient, card: ModelCard, version: ModelVersion) -> ModelCard:
    tags = dict(version.tags or {})
    card = _with(
        card,
        registered=f"{version.name} version {version.version}",
        aliases=_aliases(client, version),
        metrics=_test_metrics(tags),
        preset=tags.get("preset", card.preset),
    )
    return _with_run(client, card, version.run_id) if version.run_id else card


def _aliases(client: MlflowClient, version: ModelVersion) -> tuple[str, ...]:
    """The version's aliases, read off its registered model: a version fetched by alias does not
    always carry its own aliases."""
    aliases = client.get_registered_model(version.name).aliases or {}
    return tuple(sorted(alias for alias, number in aliases.items() if str(number) == str(version.version)))


def _from_run(client: MlflowClient, card: ModelCard, run_id: str) -> ModelCard:
    versions = sorted(
        client.search_model_versions(f"run_id='{run_id}'"), key=lambda v: int(v.version), reverse=True
    )
    if versions:
        return _from_version(client, card, versions[0])
    run = client.get_run(run_id)
    metrics = {k: f"{v:.6g}" for k, v in run.data.metrics.items()}
    return _with_run(client, _with(card, metrics=_test_metrics(metrics)), run_id)


def _with_run(client: MlflowClient, card: ModelCard, run_id: str) -> ModelCard:
    run = client.get_run(run_id)
    experiment = client.get_experiment(run.info.experiment_id)
    return _with(card, run_id=run_id, run_name=run.info.run_name or "", experiment=experiment.name)


def _test_metrics(values: dict[str, str]) -> dict[str, str]:
    """The test metrics of :data:`_SHOWN` found in ``values`` (keys ``test_<name>``), by name."""
    return {name: values[_TEST_PREFIX + name] for name in _SHOWN if _TEST_PREFIX + name in values}


def card_markdown(card: ModelCard) -> str:
    """The card as a Markdown table."""
    rows = [("Reference", f"`{card.reference}`")]
    if card.registered:
        aliases = f", aliases: {', '.join(card.aliases)}" if card.aliases else ", no alias"
        rows.append(("Registered", f"{card.registered}{aliases}"))
    rows.append(("Family", card.family))
    rows.append(("Preset", f"{card.preset}, {card.parameters:,} parameters"))
    if card.metrics:
        metrics = ", ".join(
            f"{key} {value} {_SHOWN.get(key, '')}".strip() for key, value in card.metrics.items()
        )
        rows.append(("Test metrics", f"{metrics} (per image)"))
    if card.run_id:
        name = f" ({card.run_name})" if card.run_name else ""
        rows.append(("MLflow run", f"`{card.run_id}`{name} in experiment {card.experiment}"))
    if card.note:
        rows.append(("Note", card.note))
    body = "\n".join(f"| {key} | {value.replace('|', '&#124;')} |" for key, value in rows)
    return f"| | |\n| --- | --- |\n{body}"
