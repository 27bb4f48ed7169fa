from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from mnist_vae.config import ConfigError, Params, load_params, params_from_dict, parse_override

ROOT = Path(__file__).resolve().parents[1]


def test_project_params_file_is_valid() -> None:
    params = load_params(ROOT / "params.yaml")
    assert params.model.preset == "default"
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
        ({"model": {"preset": "big"}}, "model.preset: expected one of default, seed"),
        ({"model": {"hidden": 256}}, "model.hidden: expected a list of int"),
        ({"model": {"hidden": [256, -1]}}, "model.hidden: expected positive layer widths"),
        ({"evaluate": {"iw_samples": 0}}, "evaluate.iw_samples: expected an integer >= 1"),
        ({"data": {"mirrors": []}}, "data.mirrors: expected at least one mirror"),
        ({"mlflow": {"experiment": " "}}, "mlflow.experiment: expected a non-empty name"),
    ],
)
def test_invalid_values_name_the_key_and_expectation(raw: dict, message: str) -> None:
    with pytest.raises(ConfigError) as info:
        params_from_dict(raw)
    assert message in str(info.value)


def test_ints_are_accepted_where_floats_are_expected() -> None:
    params = params_from_dict({"train": {"warmup_epochs": 1}, "data": {"timeout": 5}})
    assert params.data.timeout == 5.0 and isinstance(params.data.timeout, float)


def test_overrides_replace_values(tmp_path: Path) -> None:
    path = tmp_path / "params.yaml"
    path.write_text(yaml.safe_dump({"train": {"epochs": 2}}))
    params = load_params(path, dict([parse_override("train.epochs=7"),
                                     parse_override("model.hidden=[8, 4]")]))
    assert params.train.epochs == 7
    assert params.model.hidden == (8, 4)


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
    assert params_from_dict(params.to_dict()) == params


def test_mlproject_defaults_agree_with_params_yaml() -> None:
    """MLproject repeats params.yaml's defaults (MLflow needs them); they must not drift."""
    mlproject = yaml.safe_load((ROOT / "MLproject").read_text())
    params = load_params(ROOT / "params.yaml").flat()
    keys = {"preset": "model.preset", "epochs": "train.epochs", "batch_size": "train.batch_size",
            "lr": "train.lr", "seed": "train.seed", "iw_samples": "evaluate.iw_samples"}
    checked = 0
    for entry in mlproject["entry_points"].values():
        for name, spec in entry.get("parameters", {}).items():
            dotted = keys.get(name) or ("train.limit" if name == "limit" and "train.py" in
                                        entry["command"] and "evaluate" not in entry["command"]
                                        else None)
            if dotted is None:
                continue
            expected = params[dotted]
            assert spec["default"] == expected, f"MLproject {name}: {spec['default']} != {dotted}"
            checked += 1
    assert checked >= 10
