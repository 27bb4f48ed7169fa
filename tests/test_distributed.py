"""DDP under torchrun: 2 CPU processes (gloo) follow the curve of 1 process on the same global batch."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from .test_crash import _losses, _project, _runs

pytestmark = pytest.mark.slow

# Losses agree up to the posterior noise, which each process draws for itself.
RELATIVE_TOLERANCE = 0.03


def _train(root: Path, env: dict[str, str], *overrides: str) -> subprocess.CompletedProcess:
    args = [sys.executable, "pipeline/train.py", "--set", "train.epochs=3"]
    for override in overrides:
        args += ["--set", override]
    result = subprocess.run(args, cwd=root, env=env, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stdout + result.stderr
    return result


def test_two_gloo_processes_match_one(tmp_path: Path) -> None:
    single, double = tmp_path / "single", tmp_path / "double"
    _train(single, _project(single, n_train=1024))
    _train(double, _project(double, n_train=1024), "train.nproc=2")

    one, two = _losses(single), _losses(double)
    assert len(one) == len(two) == 3
    for a, b in zip(one, two, strict=True):
        assert abs(a - b) / a < RELATIVE_TOLERANCE, (one, two)
    assert two[-1] < two[0]

    runs, _ = _runs(double)
    assert len(runs) == 1
    assert runs[0].data.tags["train.processes"] == "2"
    assert runs[0].info.status == "FINISHED"
    outputs = sorted(p.name for p in (double / "models").iterdir())
    assert outputs == ["model.pt", "run.json"]
