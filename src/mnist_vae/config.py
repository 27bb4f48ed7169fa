"""Typed view of ``params.yaml``.

Every knob of the pipeline lives in ``params.yaml``, one section per stage. This module turns that
file into frozen dataclasses that validate on construction: an unknown key, a value of the wrong type
or one out of range raises :class:`ConfigError` naming the dotted key and what was expected.
"""

from __future__ import annotations

import dataclasses
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import yaml

Preset = Literal["default", "seed"]
Activation = Literal["relu", "silu", "gelu", "elu", "tanh"]
Device = Literal["auto", "cpu", "cuda"]
Schedule = Literal["constant", "cosine", "burda"]
Objective = Literal["elbo", "iwae"]
Precision = Literal["fp32", "tf32", "bf16"]


class ConfigError(ValueError):
    """A parameter is missing, unknown, of the wrong type or out of range."""


@dataclass(frozen=True)
class DataConfig:
    """Where the ``download`` stage fetches MNIST from."""

    mirrors: tuple[str, ...] = (
        "https://ossci-datasets.s3.amazonaws.com/mnist/",
        "http://yann.lecun.com/exdb/mnist/",
    )
    timeout: float = 30.0

    def __post_init__(self) -> None:
        _check(len(self.mirrors) > 0, "data.mirrors", "at least one mirror", self.mirrors)
        _check(self.timeout > 0, "data.timeout", "a positive number of seconds", self.timeout)


@dataclass(frozen=True)
class ModelConfig:
    """The VAE's architecture.

    ``preset: seed`` is the tutorial's model (linear layers 784-256-64-20 and 10-64-256-784, a raw
    sigma head, MSE likelihood); ``hidden``, ``latent`` and ``activation`` then do not apply.
    ``preset: default`` builds a nonlinear MLP VAE with a log-variance head and a Bernoulli
    likelihood on logits from ``hidden`` (encoder widths; the decoder mirrors them), ``latent`` and
    ``activation``.
    """

    preset: Preset = "default"
    hidden: tuple[int, ...] = (512, 256)
    latent: int = 32
    activation: Activation = "silu"

    def __post_init__(self) -> None:
        _check(len(self.hidden) > 0, "model.hidden", "at least one hidden layer", self.hidden)
        for width in self.hidden:
            _check(width > 0, "model.hidden", "positive layer widths", self.hidden)
        _check(self.latent > 0, "model.latent", "a positive integer", self.latent)


@dataclass(frozen=True)
class TrainConfig:
    """How the ``train`` stage optimises the model."""

    device: Device = "auto"
    epochs: int = 10
    batch_size: int = 128
    lr: float = 1e-3
    adam_eps: float = 1e-8
    schedule: Schedule = "cosine"
    warmup_epochs: float = 0.0
    seed: int = 0
    limit: int = 0
    threads: int = 0
    objective: Objective = "elbo"
    iw_samples: int = 1
    binarize: bool = False
    nproc: int = 1
    compile: bool = False
    precision: Precision = "fp32"

    def __post_init__(self) -> None:
        _check(self.epochs >= 1, "train.epochs", "an integer >= 1", self.epochs)
        _check(self.nproc >= 1, "train.nproc", "an integer >= 1 (processes under torchrun)",
               self.nproc)
        _check(self.batch_size % self.nproc == 0, "train.batch_size",
               f"a multiple of train.nproc ({self.nproc}): each process takes an equal shard",
               self.batch_size)
        _check(self.iw_samples >= 1, "train.iw_samples", "an integer >= 1", self.iw_samples)
        _check(self.batch_size >= 1, "train.batch_size", "an integer >= 1", self.batch_size)
        _check(0 < self.lr < 1, "train.lr", "a learning rate in (0, 1)", self.lr)
        _check(0 < self.adam_eps < 1, "train.adam_eps", "Adam's epsilon in (0, 1)", self.adam_eps)
        _check(
            0 <= self.warmup_epochs <= self.epochs,
            "train.warmup_epochs",
            "a number of epochs between 0 and train.epochs",
            self.warmup_epochs,
        )
        _check(self.seed >= 0, "train.seed", "an integer >= 0", self.seed)
        _check(self.limit >= 0, "train.limit", "0 (all 60000 images) or a positive count", self.limit)
        _check(self.threads >= 0, "train.threads", "0 (torch's default) or a thread count", self.threads)


@dataclass(frozen=True)
class EvaluateConfig:
    """What the ``evaluate`` stage measures on the test set."""

    batch_size: int = 1000
    iw_samples: int = 64
    limit: int = 0
    seed: int = 0
    n_images: int = 8
    binarize: bool = False

    def __post_init__(self) -> None:
        _check(self.batch_size >= 1, "evaluate.batch_size", "an integer >= 1", self.batch_size)
        _check(self.iw_samples >= 1, "evaluate.iw_samples", "an integer >= 1", self.iw_samples)
        _check(self.limit >= 0, "evaluate.limit", "0 (all 10000 images) or a positive count", self.limit)
        _check(self.seed >= 0, "evaluate.seed", "an integer >= 0", self.seed)
        _check(1 <= self.n_images <= 32, "evaluate.n_images", "an integer in 1..32", self.n_images)


@dataclass(frozen=True)
class MlflowConfig:
    """Where runs and models are recorded. The tracking URI itself comes from the environment."""

    experiment: str = "mnist-vae"
    registered_model: str = "mnist-vae"

    def __post_init__(self) -> None:
        _check(bool(self.experiment.strip()), "mlflow.experiment", "a non-empty name", self.experiment)
        _check(
            bool(self.registered_model.strip()),
            "mlflow.registered_model",
            "a non-empty name",
            self.registered_model,
        )


@dataclass(frozen=True)
class Params:
    """The whole of ``params.yaml``."""

    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    evaluate: EvaluateConfig = field(default_factory=EvaluateConfig)
    mlflow: MlflowConfig = field(default_factory=MlflowConfig)

    def __post_init__(self) -> None:
        _check(self.train.objective == "elbo" or self.model.preset == "default", "train.objective",
               "elbo with model.preset seed (the IWAE bound needs a Bernoulli likelihood)",
               self.train.objective)

    def to_dict(self) -> dict[str, Any]:
        """The resolved parameters as plain YAML-able data (tuples become lists)."""
        return _plain(dataclasses.asdict(self))

    def flat(self) -> dict[str, Any]:
        """The resolved parameters as ``{"section.key": value}``, as MLflow logs them."""
        out: dict[str, Any] = {}
        for section, values in self.to_dict().items():
            for key, value in values.items():
                out[f"{section}.{key}"] = value
        return out


def load_params(path: Path | str = "params.yaml", overrides: dict[str, Any] | None = None) -> Params:
    """Reads and validates a params file.

    Args:
        path: The YAML file, sectioned by stage.
        overrides: Dotted keys to replace after reading, e.g. ``{"train.epochs": 3}``.

    Raises:
        ConfigError: The file is missing or malformed, or a value is invalid.
    """
    path = Path(path)
    try:
        raw = yaml.safe_load(path.read_text())
    except FileNotFoundError:
        raise ConfigError(f"{path}: params file not found") from None
    except yaml.YAMLError as exc:
        raise ConfigError(f"{path}: not valid YAML ({exc})") from None
    if raw is None:
        raw = {}
    if not isinstance(raw, dict):
        raise ConfigError(f"{path}: expected a mapping of sections, got {type(raw).__name__}")
    for dotted, value in (overrides or {}).items():
        section, _, key = dotted.partition(".")
        if not key:
            raise ConfigError(f"override {dotted!r}: expected 'section.key=value'")
        raw.setdefault(section, {})
        if not isinstance(raw[section], dict):
            raise ConfigError(f"{section}: expected a mapping")
        raw[section][key] = value
    return params_from_dict(raw)


def params_from_dict(raw: dict[str, Any]) -> Params:
    """Builds :class:`Params` from nested plain data, validating every key."""
    sections = {f.name: f for f in dataclasses.fields(Params)}
    unknown = sorted(set(raw) - set(sections))
    if unknown:
        raise ConfigError(f"unknown section {unknown[0]!r}: expected one of {sorted(sections)}")
    built = {}
    for name, fld in sections.items():
        cls = fld.default_factory  # type: ignore[misc]
        built[name] = _build(cls, raw.get(name) or {}, name)
    return Params(**built)


def parse_override(text: str) -> tuple[str, Any]:
    """Parses ``section.key=value`` (the value as YAML, so ``3`` is an int and ``[1, 2]`` a list)."""
    key, sep, value = text.partition("=")
    if not sep or "." not in key:
        raise ConfigError(f"override {text!r}: expected 'section.key=value'")
    return key.strip(), yaml.safe_load(value)


def _build(cls: type, values: Any, section: str) -> Any:
    if not isinstance(values, dict):
        raise ConfigError(f"{section}: expected a mapping of keys, got {values!r}")
    fields = {f.name: f for f in dataclasses.fields(cls)}
    unknown = sorted(set(values) - set(fields))
    if unknown:
        raise ConfigError(
            f"{section}.{unknown[0]}: unknown key; expected one of {', '.join(sorted(fields))}"
        )
    hints = typing.get_type_hints(cls)
    kwargs = {name: _coerce(values[name], hints[name], f"{section}.{name}") for name in values}
    return cls(**kwargs)


def _coerce(value: Any, hint: Any, key: str) -> Any:
    """Checks ``value`` against a type hint, converting lists to tuples and ints to floats."""
    origin = typing.get_origin(hint)
    if origin is Literal:
        choices = typing.get_args(hint)
        if value not in choices:
            raise ConfigError(f"{key}: expected one of {', '.join(map(str, choices))}, got {value!r}")
        return value
    if origin is tuple:
        item = typing.get_args(hint)[0]
        if isinstance(value, str | bytes) or not isinstance(value, list | tuple):
            raise ConfigError(f"{key}: expected a list of {item.__name__}, got {value!r}")
        return tuple(_coerce(v, item, key) for v in value)
    if origin in (typing.Union, types.UnionType):
        raise AssertionError(f"{key}: unions are not supported in params")
    if hint is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"{key}: expected true or false, got {value!r}")
        return value
    if hint is float:
        if isinstance(value, bool) or not isinstance(value, int | float):
            raise ConfigError(f"{key}: expected a number, got {value!r}")
        return float(value)
    if hint is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"{key}: expected an integer, got {value!r}")
        return value
    if hint is str:
        if not isinstance(value, str):
            raise ConfigError(f"{key}: expected a string, got {value!r}")
        return value
    raise AssertionError(f"{key}: no coercion for type {hint!r}")


def _check(ok: bool, key: str, expected: str, value: Any) -> None:
    if not ok:
        raise ConfigError(f"{key}: expected {expected}, got {value!r}")


def _plain(value: Any) -> Any:
    if isinstance(value, dict):
        return {k: _plain(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_plain(v) for v in value]
    return value
