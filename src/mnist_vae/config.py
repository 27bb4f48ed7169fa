"""Typed view of ``params.yaml``.

Every knob of the pipeline lives in ``params.yaml``, one section per stage. This module turns that
file into frozen pydantic models that validate on construction: an unknown key, a value of the wrong
type or one out of range raises :class:`ConfigError` naming the dotted key and what was expected.

Over 300 lines because every section of params.yaml is declared here with its checks and its
messages: one file answers "what can I set, and what does it take".
"""

from __future__ import annotations

import re
import types
import typing
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Annotated, Any, Literal, Self, TypeVar

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator
from pydantic_core import ErrorDetails

from mnist_vae.errors import UserError

Dataset = Literal["mnist", "fashion-mnist"]
Preset = Literal["conv", "mlp", "seed", "hvae"]
Activation = Literal["relu", "silu", "gelu", "elu", "tanh"]
Device = Literal["auto", "cpu", "cuda"]
Schedule = Literal["constant", "cosine", "burda"]
EstimatePrecision = Literal["auto", "fp32", "bf16"]
Objective = Literal["elbo", "iwae"]
Precision = Literal["fp32", "tf32", "bf16"]


class ConfigError(UserError, ValueError):
    """A parameter is missing, unknown, of the wrong type or out of range."""


class _Frozen(BaseModel):
    # strict: ints reject floats and bools, bools accept only true/false (floats still take ints).
    model_config = ConfigDict(extra="forbid", frozen=True, strict=True)

    def replace(self, **changes: Any) -> Self:
        """A copy with ``changes``, validated like the file (``model_copy(update=...)`` is not)."""
        section = [name for name, f in Params.model_fields.items() if f.annotation is type(self)]
        return _validate(type(self), {**self.model_dump(), **changes}, tuple(section))

    def to_dict(self) -> dict[str, Any]:
        """The values as plain YAML-able data (tuples become lists)."""
        return self.model_dump(mode="json")


# Official hosts of each dataset's four IDX files; params.yaml adds the offline copies.
DEFAULT_MIRRORS: dict[Dataset, tuple[str, ...]] = {
    "mnist": ("https://ossci-datasets.s3.amazonaws.com/mnist/", "http://yann.lecun.com/exdb/mnist/"),
    "fashion-mnist": ("http://fashion-mnist.s3-website.eu-central-1.amazonaws.com/",),
}


class DataConfig(_Frozen):
    """Which dataset the pipeline runs on, and where the ``download`` stage fetches it from."""

    dataset: Dataset = "mnist"
    # Lax (strict=False) only to take YAML lists for the tuples; the items stay strict.
    mirrors: dict[Dataset, Annotated[tuple[str, ...], Field(strict=False)]] = Field(
        default_factory=lambda: dict(DEFAULT_MIRRORS),
        strict=False,
        description="a mapping of dataset names to lists of mirrors",
    )
    timeout: float = Field(30.0, gt=0, description="a positive number of seconds")

    @model_validator(mode="after")
    def _mirrors_of_the_dataset(self) -> Self:
        _check(
            len(self.mirrors.get(self.dataset, ())) > 0,
            f"data.mirrors.{self.dataset}",
            f"at least one mirror of {self.dataset} (data.dataset)",
            list(self.mirrors.get(self.dataset, ())),
        )
        return self


class ModelConfig(_Frozen):
    """The VAE's architecture.

    ``preset: conv`` (the default) is a convolutional VAE: ``channels`` gives the stride-2
    convolution stages of the encoder (28x28 to 14x14, then 7x7; the decoder mirrors them with
    transposed and sub-pixel convolutions), ``blocks`` residual blocks follow each stage, and a dense layer of
    ``dense`` units sits between the convolutions and the latent code on both sides.
    ``preset: mlp`` is an MLP VAE with ``hidden`` widths (the decoder mirrors them). Both have a
    log-variance head and a Bernoulli likelihood on logits, and use ``latent`` and ``activation``.
    ``preset: hvae`` is a two-layer hierarchical VAE (:mod:`mnist_vae.models.hvae`): the conv
    networks on the image side, ``latent`` units in its lower layer z1 and ``latent2`` in its top
    layer z2, ``hidden2`` units in the layers between.
    ``preset: seed`` is the tutorial's model (linear layers 784-256-64-20 and 10-64-256-784, a raw
    sigma head, MSE likelihood); none of the other keys apply to it.
    """

    preset: Preset = "conv"
    hidden: tuple[int, ...] = Field(
        (512, 256), strict=False, min_length=1, description="at least one hidden layer"
    )
    channels: tuple[int, ...] = Field(
        (16, 32), strict=False, min_length=1, max_length=2, description="one or two convolution stages"
    )
    blocks: int = Field(0, ge=0, le=8, description="an integer in 0..8 (residual blocks per stage)")
    dense: int = Field(512, ge=0, description="0 (no dense layer) or a positive width")
    latent: int = Field(32, gt=0, description="a positive integer")
    latent2: int = Field(16, gt=0, description="a positive integer (hvae: units of the top layer z2)")
    hidden2: int = Field(256, gt=0, description="a positive integer (hvae: width between z2 and the rest)")
    activation: Activation = "silu"

    @field_validator("hidden", "channels")
    @classmethod
    def _positive_widths(cls, widths: tuple[int, ...], info: Any) -> tuple[int, ...]:
        _check(
            all(width > 0 for width in widths), f"model.{info.field_name}", "positive layer widths", widths
        )
        return widths


class TrainConfig(_Frozen):
    """How the ``train`` stage optimises the model."""

    device: Device = "auto"
    epochs: int = Field(10, ge=1, description="an integer >= 1")
    batch_size: int = Field(128, ge=1, description="an integer >= 1")
    lr: float = Field(1e-3, gt=0, lt=1, description="a learning rate in (0, 1)")
    adam_eps: float = Field(1e-8, gt=0, lt=1, description="Adam's epsilon in (0, 1)")
    schedule: Schedule = "cosine"
    warmup_epochs: float = Field(0.0, ge=0, description="a number of epochs between 0 and train.epochs")
    seed: int = Field(0, ge=0, description="an integer >= 0")
    limit: int = Field(0, ge=0, description="0 (all 60000 images) or a positive count")
    validation: int = Field(
        10_000,
        ge=0,
        le=50_000,
        description=("a number of images in 0..50000 (the last ones of the 60000 held out; 0: none)"),
    )
    threads: Literal["auto"] | int = Field(
        "auto",
        union_mode="left_to_right",
        description=(
            "auto (share the cores with concurrent trainings), 0 (torch's default) or a thread count"
        ),
    )
    objective: Objective = "elbo"
    iw_samples: int = Field(1, ge=1, description="an integer >= 1")
    binarize: bool = False
    nproc: int = Field(1, ge=1, description="an integer >= 1 (processes under torchrun)")
    compile: bool = False
    precision: Precision = "fp32"
    kl_warmup: float = Field(
        0.0, ge=0, description="a number of epochs >= 0 (the KL term's weight rises from 0 to 1 over them)"
    )
    ema: float = Field(0.0, ge=0, lt=1, description="0 (off) or an averaging decay in (0, 1), e.g. 0.999")

    @model_validator(mode="after")
    def _cross_checks(self) -> Self:
        _check(
            self.batch_size % self.nproc == 0,
            "train.batch_size",
            f"a multiple of train.nproc ({self.nproc}): each process takes an equal shard",
            self.batch_size,
        )
        _check(
            self.threads == "auto" or self.threads >= 0,
            "train.threads",
            "auto (share the cores with concurrent trainings), 0 (torch's default) or a thread count",
            self.threads,
        )
        _check(
            self.warmup_epochs <= self.epochs,
            "train.warmup_epochs",
            "a number of epochs between 0 and train.epochs",
            self.warmup_epochs,
        )
        return self


class EvaluateConfig(_Frozen):
    """What the ``evaluate`` stage measures on the test set."""

    batch_size: int = Field(1000, ge=1, description="an integer >= 1")
    iw_samples: int = Field(64, ge=1, description="an integer >= 1")
    limit: int = Field(0, ge=0, description="0 (all 10000 images) or a positive count")
    seed: int = Field(0, ge=0, description="an integer >= 0")
    n_images: int = Field(8, ge=1, le=32, description="an integer in 1..32")
    binarize: bool = False
    # The decoder's precision in the importance-weighted estimate (mnist_vae.models.precision):
    # auto is bf16 on a CPU with native bf16 dot products, else fp32.
    precision: EstimatePrecision = "auto"


AUTO_MODEL_NAME = "auto"


class MlflowConfig(_Frozen):
    """Where runs and models are recorded. The tracking URI itself comes from the environment.

    ``registered_model: auto`` names the model after the dataset (see :func:`registered_model`).
    """

    experiment: str = Field("mnist-vae", pattern=r"\S", description="a non-empty name")
    registered_model: str = Field(
        AUTO_MODEL_NAME, pattern=r"\S", description="a non-empty name, or auto (<data.dataset>-vae)"
    )


def registered_model(params: Params) -> str:
    """The registered model that versions go to: ``mlflow.registered_model``, or with ``auto`` the
    dataset's own, ``<data.dataset>-vae`` (``mnist-vae``, ``fashion-mnist-vae``), so that models of
    two datasets never share a champion."""
    name = params.mlflow.registered_model
    return f"{params.data.dataset}-vae" if name == AUTO_MODEL_NAME else name


class Params(_Frozen):
    """The whole of ``params.yaml``."""

    data: DataConfig = Field(default_factory=DataConfig)
    model: ModelConfig = Field(default_factory=ModelConfig)
    train: TrainConfig = Field(default_factory=TrainConfig)
    evaluate: EvaluateConfig = Field(default_factory=EvaluateConfig)
    mlflow: MlflowConfig = Field(default_factory=MlflowConfig)

    @model_validator(mode="after")
    def _iwae_needs_bernoulli(self) -> Self:
        _check(
            self.train.objective == "elbo" or self.model.preset != "seed",
            "train.objective",
            "elbo with model.preset seed (the IWAE bound needs a Bernoulli likelihood)",
            self.train.objective,
        )
        return self

    def flat(self) -> dict[str, Any]:
        """The resolved parameters as ``{"section.key": value}``, as MLflow logs them."""
        return {
            f"{section}.{key}": value
            for section, values in self.to_dict().items()
            for key, value in values.items()
        }


class _Loader(yaml.SafeLoader):
    """PyYAML's safe loader, reading ``1e-08`` and ``1E5`` as numbers, as YAML 1.2 does.

    PyYAML follows YAML 1.1, where a float needs a dot (``1.0e-8``); DVC writes ``-S`` values
    with ruamel (YAML 1.2), e.g. ``1e-08``, which PyYAML alone would read as a string.
    """


_Loader.add_implicit_resolver(
    "tag:yaml.org,2002:float",
    re.compile(r"^[-+]?(?:[0-9][0-9_]*)(?:\.[0-9_]*)?[eE][-+]?[0-9]+$"),
    list("-+0123456789"),
)


def load_params(
    path: Path | str = "params.yaml", overrides: Sequence[str] | Mapping[str, Any] = ()
) -> Params:
    """Reads and validates a params file.

    Args:
        path: The YAML file, sectioned by stage.
        overrides: ``section.key=value`` strings (the value read as YAML), in order, later ones
            winning: a profile's (:mod:`mnist_vae.stages.profiles`) then ``--set``'s. A mapping
            ``{"section.key": value}`` is also taken (tests build them).

    Raises:
        ConfigError: The file is missing or malformed, or a value is invalid.
    """
    path = Path(path)
    try:
        raw = yaml.load(path.read_text(), Loader=_Loader)
    except FileNotFoundError:
        raise ConfigError(f"{path}: params file not found") from None
    except yaml.YAMLError as exc:
        raise ConfigError(f"{path}: not valid YAML ({exc})") from None
    if raw is None:
        raw = {}
    if not isinstance(raw, dict):
        raise ConfigError(f"{path}: expected a mapping of sections, got {type(raw).__name__}")
    pairs = overrides.items() if isinstance(overrides, Mapping) else map(parse_override, overrides)
    for dotted, value in pairs:
        section, _, key = dotted.partition(".")
        if not key:
            raise ConfigError(f"override {dotted!r}: expected 'section.key=value'")
        if raw.get(section) is None:  # an empty section in the file
            raw[section] = {}
        if not isinstance(raw[section], dict):
            raise ConfigError(f"{section}: expected a mapping")
        raw[section][key] = value
    return params_from_dict(raw)


def params_from_dict(raw: dict[str, Any]) -> Params:
    """Builds :class:`Params` from nested plain data, validating every key."""
    return _validate(Params, {section: values or {} for section, values in raw.items()}, ())


def parse_override(text: str) -> tuple[str, Any]:
    """Parses ``section.key=value`` (the value as YAML, so ``3`` is an int and ``[1, 2]`` a list)."""
    key, sep, value = text.partition("=")
    if not sep or "." not in key:
        raise ConfigError(f"override {text!r}: expected 'section.key=value'")
    try:
        return key.strip(), yaml.load(value, Loader=_Loader)
    except yaml.YAMLError as exc:
        raise ConfigError(f"override {text!r}: the value is not valid YAML ({exc})") from None


_M = TypeVar("_M", bound=BaseModel)
_TYPE_WORDS = {
    "int_type": "an integer",
    "float_type": "a number",
    "bool_type": "true or false",
    "string_type": "a string",
    "model_type": "a mapping of keys",
}


def _validate(cls: type[_M], raw: dict[str, Any], section: tuple[str, ...]) -> _M:
    """``cls.model_validate`` with pydantic's first error reworded as our one-line ConfigError."""
    try:
        return cls.model_validate(raw)
    except ValidationError as exc:
        raise _config_error(exc.errors()[0], section) from None


def _config_error(error: ErrorDetails, section: tuple[str, ...]) -> ConfigError:
    own = error.get("ctx", {}).get("error")
    if isinstance(own, ConfigError):  # raised by a validator below, already worded
        return own
    # The location down to the field: list indices and union members' tags after it are dropped.
    loc: list[str] = []
    owner: Any = Params
    for part in (*section, *error["loc"]):
        fields = getattr(owner, "model_fields", {})
        if not isinstance(part, str) or (part not in fields and error["type"] != "extra_forbidden"):
            break
        loc.append(part)
        if part not in fields:
            break
        if (
            len(loc) < len(section) + len(error["loc"])
            and isinstance(fields[part].annotation, type)
            and issubclass(fields[part].annotation, BaseModel)
        ):
            owner = fields[part].annotation
    key = ".".join(loc)
    if error["type"] == "extra_forbidden" and len(loc) == 1:
        return ConfigError(f"unknown section {key!r}: expected one of {sorted(Params.model_fields)}")
    if error["type"] == "extra_forbidden":
        return ConfigError(f"{key}: unknown key; expected one of {', '.join(sorted(owner.model_fields))}")
    field = owner.model_fields[loc[-1]]
    if typing.get_origin(field.annotation) in (typing.Union, types.UnionType):
        expected = field.description
    elif error["type"] == "literal_error":
        literal = field.annotation
        if typing.get_origin(literal) is dict:  # a key of a mapping such as data.mirrors
            literal = typing.get_args(literal)[0]
        expected = f"one of {', '.join(typing.get_args(literal))}"
    elif error["type"] == "tuple_type" and typing.get_origin(field.annotation) is tuple:
        expected = f"a list of {typing.get_args(field.annotation)[0].__name__}"
    else:
        expected = _TYPE_WORDS.get(error["type"]) or field.description or error["msg"]
    return ConfigError(f"{key}: expected {expected}, got {error['input']!r}")


def _check(ok: bool, key: str, expected: str, value: Any) -> None:
    if not ok:
        raise ConfigError(f"{key}: expected {expected}, got {value!r}")
