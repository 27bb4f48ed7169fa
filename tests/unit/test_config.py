"""Tests for :mod:`mnist_vae.config`: params.yaml is validated on load, every error names its key."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from mnist_vae.config import ConfigError, Params, load_params, params_from_dict, parse_override
from mnist_vae.errors import UserError
from mnist_vae.stages.profiles import PROFILES


def test_project_params_file_is_valid(repo_root: Path) -> None:
    params = load_params(repo_root / "params.yaml")
    assert params.model.preset == "hvae"
    assert params.flat()["train.epochs"] == params.train.epochs


@pytest.mark.parametrize(
    ("raw", "message"),
    [
        ({"train": {"epoch": 3}}, "train.epoch: unknown key"),
        ({"trian": {}}, "unknown section 'trian'"),
        ({"train": {"epochs": "ten"}}, "train.epochs: expected an integer, got 'ten'"),
        ({"train": {"epochs": 0}}, "train.epochs: expected an integer >= 1, got 0"),
        ({"train": {"epochs": True}}, "train.epochs: expected an integer"),
        ({"train": {"lr": 5}}, "train.lr: expected a learning rate in (0, 1)"),
        ({"train": {"device": "tpu"}}, "train.device: expected one of auto, cpu, cuda"),
        ({"model": {"preset": "big"}}, "model.preset: expected one of conv, mlp, seed"),
        ({"model": {"preset": "mlp", "hidden": 256}}, "model.hidden: expected a list of int"),
        ({"model": {"preset": "mlp", "hidden": [256, -1]}}, "model.hidden: expected positive layer widths"),
        ({"evaluate": {"iw_samples": 0}}, "evaluate.iw_samples: expected an integer >= 1"),
        ({"data": {"mirrors": {"mnist": []}}}, "data.mirrors.mnist: expected at least one mirror of mnist"),
        ({"data": {"mirrors": ["https://a.example/"]}}, "data.mirrors: expected a mapping of dataset names"),
        ({"data": {"mirrors": {"kmnist": ["a"]}}}, "data.mirrors: expected one of mnist, fashion-mnist"),
        ({"data": {"dataset": "kmnist"}}, "data.dataset: expected one of mnist, fashion-mnist, got 'kmnist'"),
        (
            {"data": {"dataset": "fashion-mnist", "mirrors": {"mnist": ["a"]}}},
            "data.mirrors.fashion-mnist: expected at least one mirror of fashion-mnist (data.dataset)",
        ),
        ({"mlflow": {"experiment": " "}}, "mlflow.experiment: expected a non-empty name"),
        ({"mlflow": {"experiment": 3}}, "mlflow.experiment: expected a string, got 3"),
        ({"train": {"binarize": "yes"}}, "train.binarize: expected true or false, got 'yes'"),
        ({"train": {"epochs": 3.0}}, "train.epochs: expected an integer, got 3.0"),
        ({"train": {"lr": True}}, "train.lr: expected a number, got True"),
        ({"train": [1, 2]}, "train: expected a mapping of keys, got [1, 2]"),
        ({"model": {"preset": "mlp", "hidden": [256, 1.5]}}, "model.hidden: expected an integer, got 1.5"),
        ({"model": {"preset": "mlp", "hidden": []}}, "model.hidden: expected at least one hidden layer"),
        ({"evaluate": {"n_images": 33}}, "evaluate.n_images: expected an integer in 1..32, got 33"),
        (
            {"train": {"batch_size": 10, "nproc": 3}},
            "train.batch_size: expected a multiple of train.nproc (3): each process takes an equal shard, "
            "got 10",
        ),
        (
            {"train": {"epochs": 2, "warmup_epochs": 3}},
            "train.warmup_epochs: expected a number of epochs between 0 and train.epochs, got 3.0",
        ),
        (
            {"train": {"objective": "iwae"}, "model": {"preset": "seed"}},
            "train.objective: expected elbo with model.preset seed",
        ),
    ],
)
def test_invalid_values_name_the_key_and_expectation(raw: dict, message: str) -> None:
    with pytest.raises(ConfigError) as info:
        params_from_dict(raw)
    assert message in str(info.value)
    assert "\n" not in str(info.value) and info.value.__suppress_context__  # one line, no chain


def test_config_error_is_a_user_error_and_a_value_error() -> None:
    assert issubclass(ConfigError, UserError) and issubclass(ConfigError, ValueError)


def test_ints_are_accepted_where_floats_are_expected() -> None:
    params = params_from_dict({"train": {"warmup_epochs": 1}, "data": {"timeout": 5}})
    assert params.data.timeout == 5.0 and isinstance(params.data.timeout, float)


def test_overrides_replace_values(tmp_path: Path) -> None:
    path = tmp_path / "params.yaml"
    path.write_text(yaml.safe_dump({"train": {"epochs": 2}}))
    params = load_params(path, ["train.epochs=7", "model.hidden=[8, 4]"])
    assert params.train.epochs == 7
    assert params.model.hidden == (8, 4)
    assert load_params(path, {"train.epochs": 5}).train.epochs == 5  # the dict form tests still use


def test_override_values_are_read_as_yaml() -> None:
    assert parse_override("train.epochs=3") == ("train.epochs", 3)
    assert parse_override(" model.hidden = [8, 4]") == ("model.hidden", [8, 4])
    assert parse_override("train.binarize=true") == ("train.binarize", True)
    assert parse_override("mlflow.experiment=a=b") == ("mlflow.experiment", "a=b")
    with pytest.raises(ConfigError, match="override 'train.lr=\\[1': the value is not valid YAML"):
        parse_override("train.lr=[1")


def test_a_bad_override_value_is_reported_like_the_file(tmp_path: Path) -> None:
    path = tmp_path / "params.yaml"
    path.write_text("")
    with pytest.raises(ConfigError, match=r"^train.epochs: expected an integer, got 'x'$"):
        load_params(path, ["train.epochs=x"])
    with pytest.raises(ConfigError, match="train.epoch: unknown key; expected one of adam_eps, "):
        load_params(path, ["train.epoch=3"])


def test_profile_overrides_go_first_and_set_wins(tmp_path: Path) -> None:
    path = tmp_path / "params.yaml"
    path.write_text(yaml.safe_dump({"train": {"epochs": 2, "iw_samples": 1}}))
    assert "train.iw_samples=50" in PROFILES["burda2015-iwae"]
    params = load_params(path, [*PROFILES["burda2015-iwae"], "train.iw_samples=7"])
    assert params.train.iw_samples == 7  # --set beats the profile
    assert params.train.epochs == 3280 and params.model.latent == 50  # the profile beats the file
    assert params.train.objective == "iwae"
    assert load_params(path).train.epochs == 2


def test_replace_validates_and_leaves_the_original_alone() -> None:
    params = Params()
    changed = params.train.replace(epochs=3, limit=64)
    assert (changed.epochs, changed.limit, params.train.epochs) == (3, 64, 10)
    with pytest.raises(ConfigError, match=r"^train.epochs: expected an integer >= 1, got 0$"):
        params.train.replace(epochs=0)
    with pytest.raises(ConfigError, match="evaluate.iw_sample: unknown key"):
        params.evaluate.replace(iw_sample=3)
    with pytest.raises(ConfigError, match="model.hidden: expected positive layer widths"):
        params.model.replace(hidden=(8, 0))
    with pytest.raises(ValueError, match="frozen"):
        params.train.epochs = 3  # type: ignore[misc]


def test_bad_override_and_missing_file_are_clear(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="expected 'section.key=value'"):
        parse_override("epochs")
    with pytest.raises(ConfigError, match="params file not found"):
        load_params(tmp_path / "nope.yaml")
    (tmp_path / "bad.yaml").write_text("train: [1, 2\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_params(tmp_path / "bad.yaml")


def test_defaults_round_trip_through_plain_data() -> None:
    params = Params()
    plain = params.to_dict()
    assert plain["model"]["hidden"] == [512, 256] and isinstance(plain["data"]["mirrors"]["mnist"], list)
    assert yaml.safe_load(yaml.safe_dump(plain)) == plain
    assert params_from_dict(plain) == params
    assert params.flat()["model.hidden"] == [512, 256] and params.flat()["train.lr"] == 1e-3


def test_mlproject_defaults_agree_with_params_yaml(repo_root: Path) -> None:
    """MLproject repeats params.yaml's defaults (MLflow needs them); they must not drift."""
    mlproject = yaml.safe_load((repo_root / "MLproject").read_text())
    params = load_params(repo_root / "params.yaml").flat()
    keys = {
        "dataset": "data.dataset",
        "preset": "model.preset",
        "epochs": "train.epochs",
        "batch_size": "train.batch_size",
        "lr": "train.lr",
        "seed": "train.seed",
        "iw_samples": "evaluate.iw_samples",
    }
    checked = 0
    for entry in mlproject["entry_points"].values():
        for name, spec in entry.get("parameters", {}).items():
            dotted = keys.get(name) or (
                "train.limit"
                if name == "limit" and "train.py" in entry["command"] and "evaluate" not in entry["command"]
                else None
            )
            if dotted is None:
                continue
            expected = params[dotted]
            assert spec["default"] == expected, f"MLproject {name}: {spec['default']} != {dotted}"
            checked += 1
    assert checked >= 10


def test_exponents_without_a_dot_are_numbers_as_dvc_writes_them(tmp_path: Path) -> None:
    # `dvc exp run -S train.adam_eps=1.0e-8` rewrites params.yaml with ruamel (YAML 1.2): 1e-08.
    path = tmp_path / "params.yaml"
    path.write_text("train:\n  adam_eps: 1e-08\n  lr: 2E-3\n")
    params = load_params(path, ["train.warmup_epochs=5e-1"])
    assert (params.train.adam_eps, params.train.lr, params.train.warmup_epochs) == (1e-8, 2e-3, 0.5)
    assert parse_override("mlflow.experiment=1e5x") == ("mlflow.experiment", "1e5x")
