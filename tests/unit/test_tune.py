"""The search space file of `mnist-vae tune`: every key a param, every range possible, checked
before any run starts."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import pytest
import yaml
from typer.testing import CliRunner

from mnist_vae.cli import app
from mnist_vae.tuning.space import SearchSpaceError, load_space


@pytest.fixture
def space_file(tmp_path: Path):
    def write(content: dict) -> Path:
        path = tmp_path / "space.yaml"
        path.write_text(yaml.safe_dump(content))
        return path

    return write


def test_the_repos_search_space_is_valid(repo_root: Path) -> None:
    space = load_space(repo_root / "search_space.yaml", repo_root / "params.yaml")
    assert {"train.lr", "model.latent", "model.channels", "model.dense", "model.blocks"} <= set(space.params)


class _Trial:
    """Answers each suggestion with its lowest value or first choice, as Optuna's trial would."""

    def suggest_float(self, name, low, high, log=False):
        return low

    def suggest_int(self, name, low, high, log=False):
        return low

    def suggest_categorical(self, name, choices):
        assert all(isinstance(c, str | int | float | bool) for c in choices), choices
        return choices[-1]


def test_list_choices_travel_as_text_and_come_back_as_lists(space_file, repo_root: Path) -> None:
    path = space_file(
        {
            "fixed": {"train.epochs": 2},
            "params": {
                "model.hidden": {"categorical": [[64], [128, 64]]},
                "train.lr": {"float": {"low": 1e-4, "high": 1e-2, "log": True}},
            },
        }
    )
    space = load_space(path, repo_root / "params.yaml", ["train.limit=100"])
    values = space.suggest(_Trial())
    assert values == {"model.hidden": [128, 64], "train.lr": 1e-4}
    assert space.overrides(values) == [
        "train.epochs=2",
        "train.limit=100",
        "model.hidden=[128, 64]",
        "train.lr=0.0001",
    ]


@pytest.mark.parametrize(
    ("content", "message"),
    [
        (
            {"params": {"train.learning_rate": {"float": {"low": 0.001, "high": 0.01}}}},
            "params.train.learning_rate: train.learning_rate: unknown key",
        ),
        (
            {"params": {"train.lr": {"float": {"low": 0.01, "high": 0.001}}}},
            "params.train.lr.float: expected low < high, got low 0.01, high 0.001",
        ),
        (
            {"params": {"train.lr": {"float": {"low": 0, "high": 0.1, "log": True}}}},
            "expected low > 0 on a log scale",
        ),
        (
            {"params": {"train.lr": {"float": {"low": 0.001, "high": 2.0}}}},
            "params.train.lr: train.lr: expected a learning rate in (0, 1), got 2.0",
        ),
        (
            {"params": {"model.activation": {"categorical": ["relu", "swish"]}}},
            "params.model.activation: model.activation: expected one of",
        ),
        ({"params": {"train.lr": {"uniform": [0.1, 0.2]}}}, "params.train.lr.uniform: Extra inputs"),
        ({"params": {}}, "params: expected at least one param to search"),
        (
            {"fixed": {"train.epochs": 0}, "params": {"train.lr": {"categorical": [0.001]}}},
            "train.epochs: expected an integer >= 1, got 0",
        ),
    ],
)
def test_bad_search_space_is_one_line_naming_it(
    space_file, repo_root: Path, content: dict, message: str
) -> None:
    with pytest.raises(SearchSpaceError) as info:
        load_space(space_file(content), repo_root / "params.yaml")
    assert message in str(info.value)
    assert "\n" not in str(info.value)


def test_tune_with_a_bad_space_exits_1_before_any_run(
    space_file, tmp_path: Path, repo_root: Path, monkeypatch
) -> None:
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path / 'mlflow.db'}")
    path = space_file({"params": {"model.depth": {"int": {"low": 1, "high": 3}}}})
    result = CliRunner().invoke(
        app, ["tune", "--space", str(path), "--params", str(repo_root / "params.yaml"), "--trials", "2"]
    )
    assert result.exit_code == 1
    lines = [line for line in result.output.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: ") and "model.depth" in lines[0]
    assert not (tmp_path / "mlflow.db").exists() and not (tmp_path / ".tune").exists()


def test_storage_comes_from_the_option_then_the_environment_then_the_journal(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    from dataclasses import replace

    from mnist_vae.tuning.search import STORAGE_ENV, TuneSettings

    settings = TuneSettings(
        space_file=Path("space.yaml"),
        params_file=Path("params.yaml"),
        data=Path("data/mnist.npz"),
        trials=4,
        study="s",
    )
    monkeypatch.delenv(STORAGE_ENV, raising=False)
    assert settings.storage_url() == "journal:.tune/s.journal"
    monkeypatch.setenv(STORAGE_ENV, "postgresql+psycopg://optuna@db/optuna")
    assert settings.storage_url() == "postgresql+psycopg://optuna@db/optuna"
    assert replace(settings, storage="sqlite:///x.db").storage_url() == "sqlite:///x.db"


def _at_once(target: Callable[..., None], *args: object) -> None:
    """Runs ``target(*args, start)`` in two forked processes that pass the barrier ``start``
    together, and checks that both succeed."""
    import multiprocessing

    fork = multiprocessing.get_context("fork")
    start = fork.Barrier(2)
    processes = [fork.Process(target=target, args=(*args, start)) for _ in range(2)]
    for process in processes:
        process.start()
    for process in processes:
        process.join(timeout=120)
    assert [process.exitcode for process in processes] == [0, 0]


def _write_best(uri: str, run_id: str, start) -> None:
    import mlflow

    from mnist_vae.tuning.search import record_best

    mlflow.set_tracking_uri(uri)
    start.wait()
    record_best(run_id, {f"best.key{i}": str(i) for i in range(8)}, 91.5)


def test_processes_finishing_a_shared_study_at_once_both_write_the_summary(mlflow_store: str) -> None:
    # Tag by tag, two writers both found best.trial missing and both inserted it (a UNIQUE error
    # that failed one `mnist-vae tune` of a shared study about one time in two).
    import mlflow

    uri = mlflow_store
    client = mlflow.MlflowClient(uri)
    experiment = client.create_experiment("race")
    for _ in range(3):
        run_id = client.create_run(experiment).info.run_id
        _at_once(_write_best, uri, run_id)
        run = client.get_run(run_id)
        assert run.data.tags["best.key7"] == "7"
        assert run.data.metrics["best_val_neg_elbo"] == 91.5


def _join_study(tmp_path: Path, ids, start) -> None:
    import mlflow
    import optuna

    from mnist_vae.tuning.search import TuneSettings, _parent_run, _storage

    mlflow.set_tracking_uri(f"sqlite:///{tmp_path / 'mlflow.db'}")
    settings = TuneSettings(
        space_file=tmp_path / "space.yaml",
        params_file=tmp_path / "params.yaml",
        data=tmp_path / "mnist.npz",
        trials=4,
        storage=f"journal:{tmp_path / 'study.journal'}",
        study="s",
    )
    storage = _storage(settings.storage_url())
    study = optuna.create_study(study_name="s", storage=storage, load_if_exists=True)
    start.wait()
    ids.put(_parent_run(study, storage, settings, "tune", tmp_path))


def test_processes_starting_a_new_study_at_once_share_one_parent_run(
    tmp_path: Path, mlflow_store: str
) -> None:
    import multiprocessing

    import mlflow

    (tmp_path / "space.yaml").write_text("train.lr: {kind: float, low: 0.001, high: 0.01}\n")
    assert mlflow_store == f"sqlite:///{tmp_path / 'mlflow.db'}"  # the tables, made once per session
    ids = multiprocessing.get_context("fork").Queue()
    _at_once(_join_study, tmp_path, ids)
    first, second = ids.get(timeout=1), ids.get(timeout=1)
    assert first == second
    client = mlflow.MlflowClient(f"sqlite:///{tmp_path / 'mlflow.db'}")
    runs = client.search_runs([client.get_experiment_by_name("tune").experiment_id])
    assert [run.info.run_id for run in runs] == [first]


# --- trials that fail ---------------------------------------------------------------------------


@pytest.fixture
def failing_study(
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    mlflow_store: str,
    write_dataset: Callable[..., Path],
    write_params: Callable[..., Path],
):
    """A tiny project and a journal study whose first trials are queued: one whose learning rate
    makes training diverge, one whose validation split the data cannot hold, one that works."""
    import optuna
    from optuna.storages.journal import JournalFileBackend, JournalStorage

    from mnist_vae.tuning.search import TuneSettings

    monkeypatch.chdir(tmp_path)
    data = write_dataset(tmp_path / "data" / "mnist.npz", 300)
    changes = {
        "model": {"preset": "mlp", "hidden": [16], "latent": 2},
        "train": {"device": "cpu", "epochs": 2, "batch_size": 32, "threads": 1, "schedule": "constant"},
    }
    params = write_params(tmp_path / "params.yaml", changes)
    space = tmp_path / "space.yaml"
    space.write_text(
        yaml.safe_dump(
            {
                "params": {
                    "train.lr": {"categorical": [0.003, 0.99]},
                    "train.validation": {"categorical": [60, 50_000]},
                }
            }
        )
    )
    journal = tmp_path / "study.journal"
    study = optuna.create_study(
        study_name="s", storage=JournalStorage(JournalFileBackend(str(journal))), direction="minimize"
    )
    # Categorical choices travel as their YAML text (see search_space).
    for lr, validation in (("0.99", "60"), ("0.003", "50000"), ("0.003", "60")):
        study.enqueue_trial({"train.lr": lr, "train.validation": validation})
    settings = TuneSettings(
        space_file=space, params_file=params, data=data, trials=3, storage=f"journal:{journal}", study="s"
    )
    return settings, study


def test_failing_trials_are_told_fail_with_their_reason_and_the_search_goes_on(failing_study) -> None:
    import mlflow
    import optuna

    from mnist_vae.tuning.search import tune

    settings, study = failing_study
    result = tune(settings)
    assert (result.trials, result.failed, result.pruned) == (3, 2, 0)
    trials = study.get_trials()
    states = optuna.trial.TrialState
    assert [t.state for t in trials] == [states.FAIL, states.FAIL, states.COMPLETE]
    assert "loss became NaN or infinite" in trials[0].user_attrs["fail_reason"]
    assert "train.validation" in trials[1].user_attrs["fail_reason"]
    assert result.best_params == {"train.lr": 0.003, "train.validation": 60}
    children = {
        run.data.tags["tune.trial"]: run
        for run in mlflow.search_runs(search_all_experiments=True, output_format="list")
        if "tune.trial" in run.data.tags
    }
    for number in ("0", "1"):
        assert children[number].info.status == "FAILED"
        assert children[number].data.tags["tune.state"] == "FAIL"
        assert children[number].data.tags["tune.fail_reason"] == trials[int(number)].user_attrs["fail_reason"]
    assert children["2"].data.tags["tune.state"] == "COMPLETE"


def test_a_bug_stops_the_search_with_its_traceback_after_telling_the_trial(
    failing_study, monkeypatch: pytest.MonkeyPatch
) -> None:
    import optuna

    from mnist_vae.tuning import search as tune_module

    settings, study = failing_study

    def bug(*args, **kwargs):
        raise KeyError("a bug in the project's code")

    monkeypatch.setattr(tune_module, "_train_trial", bug)
    with pytest.raises(KeyError, match="a bug in the project's code"):
        tune_module.tune(settings)
    trial, *queued = study.get_trials()
    assert trial.state == optuna.trial.TrialState.FAIL, "the trial was left RUNNING"
    assert [t.state for t in queued] == [optuna.trial.TrialState.WAITING] * 2  # the search stopped
    assert "a bug in the project's code" in trial.user_attrs["fail_reason"]
