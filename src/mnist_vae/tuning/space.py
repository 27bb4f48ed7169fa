"""The hyperparameter search space: ``search_space.yaml`` read, checked against params.yaml, and each
trial's values drawn from it.

The file has two sections: ``fixed`` (params.yaml keys and the value every trial uses) and ``params``
(params.yaml keys, each with exactly one kind: a ``float`` or ``int`` range, optionally on a log
scale, or a ``categorical`` list of choices).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import yaml
from pydantic import BaseModel, ConfigDict, ValidationError, model_validator

from mnist_vae.config import ConfigError, load_params
from mnist_vae.errors import UserError

if TYPE_CHECKING:
    from optuna.trial import Trial


class SearchSpaceError(UserError):
    """The search space file is missing, malformed, names an unknown param or an impossible range."""


class _Range(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)
    low: float
    high: float
    log: bool = False

    @model_validator(mode="after")
    def _possible(self) -> _Range:
        if not self.low < self.high:
            raise ValueError(f"expected low < high, got low {self.low:g}, high {self.high:g}")
        if self.log and self.low <= 0:
            raise ValueError(f"expected low > 0 on a log scale, got {self.low:g}")
        return self


class _Dimension(BaseModel):
    """One searched param: exactly one of ``float``, ``int`` or ``categorical``."""

    model_config = ConfigDict(extra="forbid", strict=True)
    float: _Range | None = None
    int: _Range | None = None
    categorical: list[Any] | None = None

    @model_validator(mode="after")
    def _one_kind(self) -> _Dimension:
        kinds = [k for k in ("float", "int", "categorical") if getattr(self, k) is not None]
        if len(kinds) != 1:
            raise ValueError(f"expected exactly one of float, int, categorical, got {kinds or 'none'}")
        if self.categorical is not None and not self.categorical:
            raise ValueError("expected at least one choice")
        return self

    def extremes(self) -> list[Any]:
        """The values a trial may take that are most likely to be invalid: both ends of a range,
        every choice."""
        if self.float is not None:
            return [self.float.low, self.float.high]
        if self.int is not None:
            return [round(self.int.low), round(self.int.high)]
        assert self.categorical is not None, "a dimension has one kind (checked by _one_kind)"
        return self.categorical

    def suggest(self, trial: Trial, key: str) -> Any:
        """The trial's value of ``key``, as params.yaml holds it (a list choice comes back a list)."""
        if self.float is not None:
            return trial.suggest_float(key, self.float.low, self.float.high, log=self.float.log)
        if self.int is not None:
            return trial.suggest_int(key, round(self.int.low), round(self.int.high), log=self.int.log)
        assert self.categorical is not None, "a dimension has one kind (checked by _one_kind)"
        # Optuna's choices are scalars: lists travel as their YAML text.
        return yaml.safe_load(trial.suggest_categorical(key, [yaml_text(c) for c in self.categorical]))


@dataclass(frozen=True)
class SearchSpace:
    fixed: dict[str, Any]
    params: dict[str, _Dimension]
    sets: tuple[str, ...] = ()  # the command line's --set, between ``fixed`` and a trial's values

    def suggest(self, trial: Trial) -> dict[str, Any]:
        """The trial's values, as params.yaml values (a categorical list choice comes back a list)."""
        return {key: dim.suggest(trial, key) for key, dim in self.params.items()}

    def overrides(self, values: dict[str, Any]) -> list[str]:
        """``section.key=value`` strings over params.yaml: the fixed ones, --set, the trial's."""
        items = [
            *(f"{k}={yaml_text(v)}" for k, v in self.fixed.items()),
            *self.sets,
            *(f"{k}={yaml_text(v)}" for k, v in values.items()),
        ]
        last = {item.partition("=")[0].strip(): item for item in items}  # a later key wins
        return list(last.values())


def load_space(path: Path, params_file: Path, base_overrides: Sequence[str] = ()) -> SearchSpace:
    """Reads and checks a search space: every key a params.yaml key, every value possible.

    Each range end and each choice is validated as that param would be, so a search never starts a
    trial that would fail on its params.

    Raises:
        SearchSpaceError: The file is missing or malformed, or a key or range is impossible.
    """
    try:
        raw = yaml.safe_load(Path(path).read_text()) or {}
    except FileNotFoundError:
        raise SearchSpaceError(f"{path}: search space file not found") from None
    except yaml.YAMLError as exc:
        raise SearchSpaceError(f"{path}: not valid YAML ({exc})") from None
    unknown = sorted(set(raw) - {"fixed", "params"}) if isinstance(raw, dict) else ["(not a mapping)"]
    if unknown:
        raise SearchSpaceError(f"{path}: unknown section {unknown[0]!r}; expected fixed and params")
    if not raw.get("params"):
        raise SearchSpaceError(f"{path}: params: expected at least one param to search")
    fixed = raw.get("fixed") or {}
    params = {}
    for key, spec in raw["params"].items():
        try:
            params[key] = _Dimension.model_validate(spec)
        except ValidationError as exc:
            error = exc.errors()[0]
            where = ".".join(str(p) for p in error["loc"])
            message = error["msg"].removeprefix("Value error, ")
            raise SearchSpaceError(f"{path}: params.{key}{'.' + where if where else ''}: {message}") from None
    space = SearchSpace(fixed=fixed, params=params, sets=tuple(base_overrides))
    for key, dim in params.items():
        for value in dim.extremes():
            try:
                load_params(params_file, space.overrides({key: value}))
            except ConfigError as exc:
                raise SearchSpaceError(f"{path}: params.{key}: {exc}") from None
    try:
        load_params(params_file, space.overrides({}))
    except ConfigError as exc:
        raise SearchSpaceError(f"{path}: fixed: {exc}") from None
    return space


def yaml_text(value: Any) -> str:
    """A value as params.yaml / ``-S`` would write it (lists in flow style: ``[512, 256]``)."""
    if isinstance(value, str):
        return value
    return yaml.safe_dump(value, default_flow_style=True).strip().removesuffix("...").strip()
