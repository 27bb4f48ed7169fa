"""The evaluate stage's input from the train stage: ``models/run.json``."""

from __future__ import annotations

from pathlib import Path

import pytest

from mnist_vae.errors import UserError
from mnist_vae.stages.evaluate import RunRecordError, main, read_run_id


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
    assert err == ["error: evaluate: models/run.json: missing; run the train stage first (dvc repro train)"]
    assert not (tmp_path / "metrics.json").exists()
