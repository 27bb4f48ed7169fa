"""The aliases of a registered model and every move of ``champion``: listing versions, promoting one,
rolling back.

The promotion gate (:mod:`.gate`) moves ``champion`` automatically; :func:`promote` and
:func:`rollback` are the manual overrides an operator needs when its choice is wrong. Every move,
by the gate or by hand, goes through :func:`move_champion`, which remembers the champion it replaced
in the registered-model tag ``previous_champion`` and who moved it when: one :func:`rollback` undoes
the last move, whoever made it.
"""

from __future__ import annotations

import getpass
import os
import time
from dataclasses import dataclass, field

from mlflow import MlflowClient
from mlflow.exceptions import MlflowException

from mnist_vae.errors import UserError
from mnist_vae.registry.references import ModelNotFoundError

CANDIDATE = "candidate"
CHAMPION = "champion"
# A version is created with this tag "pending" and set "complete" once it is `candidate`; a pending
# version (its registration failed part way and could not be deleted) is left out of
# `mnist-vae models`, `promote` and the gate.
REGISTRATION_TAG = "registration"
PENDING, COMPLETE = "pending", "complete"
# Registered-model tags that every move of `champion` writes, by the gate or by a person: the
# version it replaced (what `mnist-vae rollback` returns to) and who moved it, when.
PREVIOUS_TAG = "previous_champion"
MOVED_BY_TAG, MOVED_AT_TAG = "champion_moved_by", "champion_moved_at"
_NOT_FOUND = "RESOURCE_DOES_NOT_EXIST"


def champion(client: MlflowClient, name: str) -> str | None:
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


class NothingToRollBackError(UserError, LookupError):
    """No earlier champion was recorded, so there is no version to roll back to."""


@dataclass(frozen=True)
class VersionInfo:
    """One registered version, as ``mnist-vae models`` lists it."""

    version: str
    aliases: tuple[str, ...]
    created_ms: int
    run_id: str
    tags: dict[str, str] = field(default_factory=dict)


def list_versions(client: MlflowClient, name: str) -> list[VersionInfo]:
    """All versions of the registered model ``name``, newest first, each with its aliases.

    A version whose registration failed part way (tagged ``registration=pending``) is left out.

    Raises:
        ModelNotFoundError: No model of that name is registered.
    """
    aliases = _registered(client, name).aliases or {}
    by_version: dict[str, list[str]] = {}
    for alias, version in aliases.items():
        by_version.setdefault(str(version), []).append(alias)
    versions = client.search_model_versions(f"name='{name}'")
    rows = [
        VersionInfo(
            version=str(mv.version),
            aliases=tuple(sorted(by_version.get(str(mv.version), []))),
            created_ms=int(mv.creation_timestamp or 0),
            run_id=mv.run_id or "",
            tags=dict(mv.tags or {}),
        )
        for mv in versions
        if (mv.tags or {}).get(REGISTRATION_TAG) != PENDING
    ]
    return sorted(rows, key=lambda row: int(row.version), reverse=True)


def promote(client: MlflowClient, name: str, version: str) -> str | None:
    """Points ``champion`` at ``version`` and remembers the champion it replaces.

    Promoting the current champion again changes nothing, so a repeated command cannot overwrite the
    remembered predecessor with the champion itself.

    Returns:
        The version that was champion before (equal to ``version`` when nothing changed), or None
        when there was no champion.

    Raises:
        ModelNotFoundError: ``name`` is not registered or has no such version.
    """
    version = str(version)
    _check_version(client, name, version)
    previous = champion(client, name)
    if previous == version:
        return previous
    move_champion(client, name, version, previous, _person())
    return previous


def rollback(client: MlflowClient, name: str) -> str:
    """Moves ``champion`` back to the version it pointed at before the last :func:`promote`.

    The record is consumed: a second rollback in a row fails rather than flip-flopping.

    Returns:
        The version that is champion now.

    Raises:
        NothingToRollBackError: No previous champion is recorded.
        ModelNotFoundError: ``name`` is not registered, or the recorded version was deleted since.
    """
    tags = _registered(client, name).tags or {}
    previous = tags.get(PREVIOUS_TAG)
    if not previous:
        raise NothingToRollBackError(
            f"registered model {name!r} has no previous champion recorded; nothing to roll back to "
            f"(champion was never moved from one version to another, by the gate or by hand)"
        )
    _check_version(client, name, previous)
    move_champion(client, name, previous, None, f"rollback by {_person()}")
    return previous


@dataclass(frozen=True)
class ChampionMove:
    """The last move of ``champion``: by whom (the gate, a person, a rollback), when, from where."""

    version: str
    by: str
    at: str
    previous: str | None


def last_move(client: MlflowClient, name: str) -> ChampionMove | None:
    """How ``champion`` got where it is, or None when there is no champion (or no record of its
    move: versions promoted before moves were recorded)."""
    version = champion(client, name)
    tags = _registered(client, name).tags or {}
    if version is None or MOVED_BY_TAG not in tags:
        return None
    return ChampionMove(version, tags[MOVED_BY_TAG], tags.get(MOVED_AT_TAG, ""), tags.get(PREVIOUS_TAG))


def _person() -> str:
    """Who moves the alias by hand: the tracking server's user, else the account."""
    return os.environ.get("MLFLOW_TRACKING_USERNAME") or getpass.getuser()


def _registered(client: MlflowClient, name: str):
    try:
        return client.get_registered_model(name)
    except MlflowException as exc:
        if exc.error_code != _NOT_FOUND:
            raise
    raise ModelNotFoundError(f"no registered model {name!r}; train and register one with `mnist-vae run`")


def _check_version(client: MlflowClient, name: str, version: str) -> None:
    if not version.isdigit():
        raise ModelNotFoundError(f"model version {version!r}: expected a positive integer")
    _registered(client, name)
    try:
        found = client.get_model_version(name, version)
    except MlflowException as exc:
        if exc.error_code != _NOT_FOUND:
            raise
        raise ModelNotFoundError(f"registered model {name!r} has no version {version}") from None
    if (found.tags or {}).get(REGISTRATION_TAG) == PENDING:
        raise ModelNotFoundError(
            f"version {version} of {name!r} is an incomplete registration "
            f"({REGISTRATION_TAG}={PENDING}); delete it, and register a new one"
        )
