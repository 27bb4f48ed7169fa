"""The evaluate stage's input from the train stage: the run that trained the model, ``models/run.json``."""

from __future__ import annotations

from pathlib import Path

import pytest

from mnist_vae import tracking
from mnist_vae.errors import UserError
from mnist_vae.paths import Paths
from mnist_vae.stages.evaluate import RunRecordError, main, read_run_id, training_run


def test_read_run_id(tmp_path: Path) -> None:
    (tmp_path / "run.json").write_text('{"run_id": "abc123", "experiment_id": "1"}\n')
    assert read_run_id(tmp_path / "run.json") == "abc123"


@pytest.mark.parametrize(
    ("content", "expected"),
    [
        (None, "run.json: missing; run the train stage first (dvc repro train)"),
        ("{not json", "run.json: expected JSON with a 'run_id', as the train stage writes"),
        ('{"experiment_id": "1"}', "run.json: expected JSON with a 'run_id'"),
        ('["abc123"]', "run.json: expected JSON with a 'run_id'"),
    ],
)
def test_a_missing_or_malformed_run_record_is_a_user_error(
    tmp_path: Path, content: str | None, expected: str
) -> None:
    path = tmp_path / "run.json"
    if content is not None:
        path.write_text(content)
    with pytest.raises(RunRecordError) as info:
        read_run_id(path)
    assert str(info.value).startswith(f"{tmp_path}/{expected}"), str(info.value)
    assert isinstance(info.value, UserError) and info.value.__suppress_context__


def test_evaluating_before_training_is_one_line(
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    mlflow_store: str,
    capsys: pytest.CaptureFixture[str],
) -> None:
    (tmp_path / "params.yaml").write_text("")
    monkeypatch.chdir(tmp_path)
    with pytest.raises(SystemExit) as info:
        main([])
    assert info.value.code == 1
    err = [line for line in capsys.readouterr().err.splitlines() if " INFO mlflow." not in line]
    assert err == ["error: evaluate: models/model.pt: missing; run the train stage first (dvc repro train)"]
    assert not (tmp_path / "metrics.json").exists()


def test_the_run_that_trained_the_weights_is_found_by_their_md5(tmp_path: Path, mlflow_store: str) -> None:
    """run.json when it names the run of these weights; else the newest run tagged with their MD5
    (a run-cache hit or `dvc pull` brought the weights without the run.json of their run)."""
    import mlflow

    paths = Paths(model=tmp_path / "model.pt", run=tmp_path / "run.json")
    paths.model.write_bytes(b"weights")
    md5 = tracking.file_md5(paths.model)
    client = mlflow.MlflowClient()
    experiment = client.create_experiment("elsewhere")
    older, other, newer = (client.create_run(experiment) for _ in range(3))
    client.set_tag(older.info.run_id, tracking.MODEL_MD5_TAG, md5)
    client.set_tag(other.info.run_id, tracking.MODEL_MD5_TAG, "0" * 32)
    client.set_tag(newer.info.run_id, tracking.MODEL_MD5_TAG, md5)
    assert training_run(paths) == newer.info.run_id  # no run.json
    paths.run.write_text(f'{{"run_id": "{other.info.run_id}"}}')
    assert training_run(paths) == newer.info.run_id  # run.json of other weights
    paths.run.write_text('{"run_id": "0123456789abcdef0123456789abcdef"}')
    assert training_run(paths) == newer.info.run_id  # run.json of another store
    paths.run.write_text(f'{{"run_id": "{older.info.run_id}"}}')
    assert training_run(paths) == older.info.run_id  # run.json of these weights
    paths.model.write_bytes(b"other weights")
    with pytest.raises(
        RunRecordError, match=r"no MLflow run in sqlite:.* trained .*model\.pt \(MD5 [0-9a-f]{32}\)"
    ):
        training_run(paths)
