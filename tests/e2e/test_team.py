"""The team's stack for real: the pipeline and the CLI through an authenticated MLflow server on
PostgreSQL with S3 artifacts (moto's server), who may do what, an S3 DVC remote, and faults."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import requests

pytestmark = pytest.mark.slow

TINY = {
    "model": {"preset": "mlp", "hidden": [64], "latent": 4},
    "train": {"epochs": 2, "limit": 1500, "validation": 500, "batch_size": 64, "threads": 1},
    "evaluate": {"limit": 300, "iw_samples": 2, "n_images": 4},
}
# A client gives up on a dead server quickly: the faults below take seconds, not minutes.
FAST_FAILING = {
    "MLFLOW_HTTP_REQUEST_MAX_RETRIES": "1",
    "MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR": "1",
    "MLFLOW_HTTP_REQUEST_TIMEOUT": "20",
}


class Team:
    """The project, its users and everything the commands printed (to search for passwords)."""

    def __init__(self, root: Path, base_env: dict[str, str], stack) -> None:
        self.root, self.base_env, self.stack = root, base_env, stack
        self.passwords: dict[str, str] = {"admin": stack.admin_password}
        self.printed: list[str] = []

    def env(self, user: str | None, password: str | None = None) -> dict[str, str]:
        env = {**self.base_env, **self.stack.env(), **FAST_FAILING}
        env.pop("MLFLOW_TRACKING_USERNAME")
        env.pop("MLFLOW_TRACKING_PASSWORD")
        if user is not None:
            env["MLFLOW_TRACKING_USERNAME"] = user
            env["MLFLOW_TRACKING_PASSWORD"] = password or self.passwords[user]
        return env

    def run(
        self,
        args: list[str],
        user: str | None,
        *,
        ok: bool = True,
        password: str | None = None,
        cwd: Path | None = None,
        timeout: float = 600,
    ) -> subprocess.CompletedProcess:
        result = subprocess.run(
            args,
            cwd=cwd or self.root,
            env=self.env(user, password),
            capture_output=True,
            text=True,
            timeout=timeout,
        )
        self.printed += [result.stdout, result.stderr]
        if ok:
            assert result.returncode == 0, f"{args} as {user}:\n{result.stdout}\n{result.stderr}"
        return result

    def client(self, user: str = "admin"):
        import mlflow

        os.environ.update(
            {"MLFLOW_TRACKING_USERNAME": user, "MLFLOW_TRACKING_PASSWORD": self.passwords[user]}
        )
        return mlflow.MlflowClient(self.stack.tracking_uri, self.stack.tracking_uri)


@pytest.fixture(scope="module")
def team(team_stack, tmp_path_factory: pytest.TempPathFactory, copy_repo, shared_mnist: Path, venv_bin: Path):
    """A git + DVC copy of the repo with tiny params, reproduced by alice through the stack."""
    root = tmp_path_factory.mktemp("team") / "project"
    copy_repo(root, TINY)
    base = {k: v for k, v in os.environ.items() if not k.startswith(("MLFLOW_", "AWS_", "DVC_"))}
    base.update({"MNIST_MIRRORS": str(shared_mnist), "PATH": f"{venv_bin}{os.pathsep}{os.environ['PATH']}"})
    team = Team(root, base, team_stack)
    team.passwords["alice"] = team_stack.create_user("alice")
    git = ["git", "-c", "user.name=t", "-c", "user.email=t@t"]
    team.run(["git", "init", "-q"], None)
    team.run(["dvc", "repro"], "alice")
    team.run(["git", "add", "-A"], None)
    team.run([*git, "commit", "-qm", "reproduced through the team's stack"], None)
    saved = {k: os.environ.get(k) for k in ("MLFLOW_TRACKING_USERNAME", "MLFLOW_TRACKING_PASSWORD")}
    yield team
    for key, value in saved.items():
        os.environ.pop(key, None) if value is None else os.environ.__setitem__(key, value)


def _one_error_line(result: subprocess.CompletedProcess, *expected: str) -> str:
    assert result.returncode == 1, result.stdout + result.stderr
    errors = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1, result.stderr
    assert "Traceback" not in result.stderr, result.stderr
    for text in expected:
        assert text in errors[0], errors[0]
    return errors[0]


def test_pipeline_logs_and_registers_through_the_stack(team) -> None:
    client = team.client()
    experiment = client.get_experiment_by_name("mnist-vae")
    (run,) = client.search_runs([experiment.experiment_id])
    assert run.data.params["train.epochs"] == "2"
    assert [m.step for m in client.get_metric_history(run.info.run_id, "train_loss")] == [1, 2]
    assert len(client.get_metric_history(run.info.run_id, "val_neg_elbo")) == 2
    figures = {f.path for f in client.list_artifacts(run.info.run_id, "figures")}
    assert figures == {
        f"figures/{name}.png" for name in ("reconstructions", "samples", "traversal", "latent")
    }
    version = client.get_model_version_by_alias("mnist-vae", "champion")
    assert str(version.version) == "1"
    # The artifacts are objects in the bucket itself, not files on the server's disk.
    keys = [
        o["Key"]
        for page in team.stack.s3_client().get_paginator("list_objects_v2").paginate(Bucket=team.stack.bucket)
        for o in page.get("Contents", [])
    ]
    assert any(k.endswith("figures/reconstructions.png") for k in keys), keys
    assert any(k.endswith("/model.pt") for k in keys), keys
    assert any(k.endswith("/MLmodel") for k in keys), keys
    assert (
        json.loads((team.root / "models" / "run.json").read_text())["tracking_uri"] == team.stack.tracking_uri
    )


def test_cli_models_evaluate_promote_rollback_through_the_stack(team) -> None:
    # A second version, so that there is something to promote and roll back: another evaluation
    # (the same one again registers nothing, see tests/e2e/test_pipeline.py).
    team.run([sys.executable, "pipeline/evaluate.py", "--set", "evaluate.seed=1"], "alice")
    listed = team.run(["mnist-vae", "models"], "alice").stdout
    assert re.search(r"\b1\b.*champion", listed) and re.search(r"\b2\b.*candidate", listed), listed
    out = team.run(["mnist-vae", "evaluate", "models:/mnist-vae@champion", "--limit", "100"], "alice").stdout
    assert "neg_elbo" in out
    client = team.client()
    before = str(client.get_model_version_by_alias("mnist-vae", "champion").version)
    other = "2" if before == "1" else "1"
    team.run(["mnist-vae", "promote", other], "alice")
    assert str(client.get_model_version_by_alias("mnist-vae", "champion").version) == other
    team.run(["mnist-vae", "rollback"], "alice")
    assert str(client.get_model_version_by_alias("mnist-vae", "champion").version) == before


def test_served_champion_loads_from_the_stack(team, http_server, venv_bin: Path, tmp_path: Path) -> None:
    with http_server(
        [
            str(venv_bin / "mlflow"),
            "models",
            "serve",
            "-m",
            "models:/mnist-vae@champion",
            "--env-manager",
            "local",
        ],
        tmp_path / "serve.log",
        env=team.env("alice"),
        cwd=team.root,
    ) as url:
        pixels = np.load(team.root / "data" / "mnist.npz")["x_test"][:2].reshape(2, -1) / 255.0
        answer = requests.post(f"{url}/invocations", json={"inputs": pixels.tolist()}, timeout=60)
    assert answer.status_code == 200, answer.text
    predictions = np.asarray(answer.json()["predictions"])
    assert predictions.shape == (2, 784) and 0 <= predictions.min() <= predictions.max() <= 1


@pytest.fixture(scope="module")
def reader(team) -> str:
    """bob: READ on the experiment and on the registered model, through the server's own API."""
    team.passwords["bob"] = team.stack.create_user("bob")
    experiment = team.client().get_experiment_by_name("mnist-vae").experiment_id
    team.stack.grant("bob", "experiment", experiment, "READ")
    team.stack.grant("bob", "registered_model", "mnist-vae", "READ")
    return "bob"


def test_a_reader_reads_but_may_not_train_register_or_promote(team, reader) -> None:
    assert "champion" in team.run(["mnist-vae", "models"], reader).stdout
    team.run(["mnist-vae", "evaluate", "models:/mnist-vae@champion", "--limit", "50"], reader)
    runs_before = len(
        team.client().search_runs([team.client().get_experiment_by_name("mnist-vae").experiment_id])
    )

    refused = team.run([sys.executable, "pipeline/train.py"], reader, ok=False)
    _one_error_line(refused, "error: train: user bob may not log runs in experiment 'mnist-vae'")
    assert "training on" not in refused.stderr  # refused before any training
    metrics = (team.root / "metrics.json").read_bytes()
    refused = team.run([sys.executable, "pipeline/evaluate.py"], reader, ok=False)
    _one_error_line(refused, "error: evaluate: user bob may not")
    assert (team.root / "metrics.json").read_bytes() == metrics
    champion = str(team.client().get_model_version_by_alias("mnist-vae", "champion").version)
    other = "2" if champion == "1" else "1"
    _one_error_line(
        team.run(["mnist-vae", "promote", other], reader, ok=False),
        "user bob may not move aliases of model 'mnist-vae'",
    )
    assert (
        len(team.client().search_runs([team.client().get_experiment_by_name("mnist-vae").experiment_id]))
        == runs_before
    )


@pytest.mark.parametrize("who", ["anonymous", "wrong password"])
def test_failed_authentication_is_one_line_naming_the_variables(team, who: str) -> None:
    user, password = (None, None) if who == "anonymous" else ("alice", "not-her-password")
    for args in (["mnist-vae", "models"], [sys.executable, "pipeline/train.py"]):
        refused = team.run(args, user, password=password, ok=False)
        line = _one_error_line(
            refused, "authentication failed at", "MLFLOW_TRACKING_USERNAME", "MLFLOW_TRACKING_PASSWORD"
        )
        assert ("anonymous" in line) == (who == "anonymous")
        assert "not-her-password" not in line


def test_dvc_remote_on_the_same_s3_endpoint(team, tmp_path: Path) -> None:
    env_dvc = ["dvc", "remote", "modify", "--local", "team"]
    team.run(["dvc", "remote", "add", "-d", "team", f"s3://{team.stack.bucket}/dvc"], None)
    team.run([*env_dvc, "endpointurl", team.stack.s3_endpoint_url], None)
    team.run(["git", "add", ".dvc/config"], None)
    team.run(["git", "-c", "user.name=t", "-c", "user.email=t@t", "commit", "-qm", "remote"], None)
    assert team.stack.s3_endpoint_url not in (team.root / ".dvc" / "config").read_text()
    team.run(["dvc", "push"], None)

    clone = tmp_path / "clone"
    team.run(["git", "clone", "-q", str(team.root), str(clone)], None)
    shutil.copy2(team.root / ".dvc" / "config.local", clone / ".dvc" / "config.local")
    team.run(["dvc", "pull"], None, cwd=clone)
    status = team.run(["dvc", "status"], None, cwd=clone).stdout
    assert "up to date" in status, status
    out = tmp_path / "again"
    team.run(["mnist-vae", "evaluate", "models/model.pt", "--out", str(out)], None, cwd=clone)
    again = json.loads((out / "metrics.json").read_text())
    committed = json.loads((clone / "metrics.json").read_text())
    assert again["neg_elbo"] == pytest.approx(committed["neg_elbo"], abs=1e-5)


def test_tracking_server_killed_mid_training_loses_no_metric(team) -> None:
    epochs = 8
    command = [
        sys.executable,
        "pipeline/train.py",
        "--set",
        f"train.epochs={epochs}",
        "--set",
        "model.preset=mlp",
        "--set",
        "model.hidden=[512,256]",
        "--set",
        "train.limit=8000",
        "--set",
        "train.seed=1",
    ]
    process = subprocess.Popen(
        command,
        cwd=team.root,
        env=team.env("alice"),
        text=True,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    )
    seen = []
    for line in process.stderr:
        seen.append(line)
        if f"epoch 2/{epochs}" in line:
            team.stack.part("mlflow").kill()
            break
    time.sleep(2)
    team.stack.part("mlflow").start()
    rest, more = process.communicate(timeout=600)
    team.printed += [rest, "".join(seen), more]
    if process.returncode != 0:  # the server came back too late: one line, then resume
        assert process.returncode == 1, more
        assert "run the stage again" in more and "Traceback" not in more, more
        team.run(command, "alice")
    run_id = json.loads((team.root / "models" / "run.json").read_text())["run_id"]
    history = team.client().get_metric_history(run_id, "train_loss")
    assert sorted(m.step for m in history) == list(range(1, epochs + 1))
    assert team.client().get_run(run_id).info.status == "FINISHED"


def test_s3_down_when_the_model_is_logged(team) -> None:
    client = team.client()
    versions = len(client.search_model_versions("name='mnist-vae'"))
    kept = {
        p: p.read_bytes()
        for p in [team.root / "metrics.json", *sorted((team.root / "reports" / "figures").iterdir())]
    }
    # moto keeps objects in memory and comes back empty; a real S3 keeps them, so the bucket is
    # refilled from a copy after the restart (the registry's earlier versions live there).
    s3, bucket = team.stack.s3_client(), team.stack.bucket
    objects = {
        o["Key"]: s3.get_object(Bucket=bucket, Key=o["Key"])["Body"].read()
        for page in s3.get_paginator("list_objects_v2").paginate(Bucket=bucket)
        for o in page.get("Contents", [])
    }
    team.stack.part("s3").kill()
    another = [sys.executable, "pipeline/evaluate.py", "--set", "evaluate.seed=2"]  # a new version
    try:
        failed = team.run(another, "alice", ok=False)
    finally:
        team.stack.part("s3").start()
        s3 = team.stack.s3_client()
        for key, body in objects.items():
            s3.put_object(Bucket=bucket, Key=key, Body=body)
    _one_error_line(failed, "error: evaluate:", "previous outputs are kept")
    assert {p: p.read_bytes() for p in kept} == kept
    assert len(client.search_model_versions("name='mnist-vae'")) == versions
    team.run(another, "alice")
    assert len(client.search_model_versions("name='mnist-vae'")) == versions + 1


def test_no_password_anywhere(team) -> None:
    """Not in what the commands printed, the runs' params and tags, models/run.json, the model's
    files in the bucket, nor the stack's own logs."""
    client = team.client()
    experiment = client.get_experiment_by_name("mnist-vae").experiment_id
    places = {"printed": "\n".join(team.printed), "run.json": (team.root / "models" / "run.json").read_text()}
    for run in client.search_runs([experiment]):
        places[f"run {run.info.run_id}"] = json.dumps([run.data.params, run.data.tags])
    s3 = team.stack.s3_client()
    for page in s3.get_paginator("list_objects_v2").paginate(Bucket=team.stack.bucket):
        for obj in page.get("Contents", []):
            body = s3.get_object(Bucket=team.stack.bucket, Key=obj["Key"])["Body"].read()
            places[obj["Key"]] = body.decode("latin-1")
    for part, log in team.stack.logs.items():
        places[f"{part} log"] = log.read_text(errors="replace") if log.exists() else ""
    assert len(places) > 10
    for user, password in team.passwords.items():
        for where, text in places.items():
            assert password not in text, f"{user}'s password in {where}"
