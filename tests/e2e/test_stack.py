"""The team's stack with real processes and real HTTP: auth, permissions, artifacts in S3, faults."""

from __future__ import annotations

import os
import pwd
import shutil
import signal
import subprocess
import sys
import sysconfig
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import mlflow
import pytest
import requests

import mnist_vae
from mnist_vae import procs
from mnist_vae.stack import Stack

pytestmark = pytest.mark.slow

API = "/api/2.0/mlflow"
ARTIFACTS = "/api/2.0/mlflow-artifacts/artifacts"


def _admin(stack: Stack) -> tuple[str, str]:
    return stack.admin_username, stack.admin_password


def _get(stack: Stack, path: str, auth: tuple[str, str] | None, **params: str) -> requests.Response:
    return requests.get(stack.tracking_uri + path, params=params, auth=auth, timeout=30)


def _post(stack: Stack, path: str, auth: tuple[str, str] | None, body: dict) -> requests.Response:
    return requests.post(stack.tracking_uri + path, json=body, auth=auth, timeout=30)


def _until_ok(call: Callable[[], requests.Response], attempts: int = 10) -> tuple[requests.Response, int]:
    """The first 200 answer of ``call`` and how many tries it took: after a database restart the
    server's connection pool still holds dead connections, which fail one request each at most."""
    for attempt in range(1, attempts + 1):
        try:
            response = call()
        except requests.ConnectionError:
            response = None
        if response is not None and response.status_code == 200:
            return response, attempt
        time.sleep(0.5)
    raise AssertionError(
        f"no 200 after {attempts} tries; last answer: "
        f"{response.status_code if response is not None else 'no connection'} "
        f"{response.text[:300] if response is not None else ''}"
    )


@pytest.fixture(scope="module")
def logged_run(team_stack: Stack, tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, str]]:
    """An experiment and a finished run with a metric and an artifact, logged by the admin with
    MLflow's own client over HTTP."""
    notes = tmp_path_factory.mktemp("artifact") / "notes.txt"
    notes.write_text("logged through the tracking server\n")
    with pytest.MonkeyPatch.context() as env:
        for name, value in team_stack.env().items():
            env.setenv(name, value)
        client = mlflow.MlflowClient(team_stack.tracking_uri)
        experiment_id = client.create_experiment("team-stack-e2e")
        run = client.create_run(experiment_id)
        run_id = run.info.run_id
        client.log_metric(run_id, "neg_elbo", 97.5, step=1)
        client.log_artifact(run_id, str(notes))
        client.set_terminated(run_id)
    yield {"experiment_id": experiment_id, "run_id": run_id, "artifact": "notes.txt"}


def test_health_answers_without_credentials(team_stack: Stack) -> None:
    response = _get(team_stack, "/health", None)
    assert response.status_code == 200, response.text


@pytest.mark.parametrize(
    "auth",
    [None, ("admin", "wrong-password"), ("no-such-user", "x")],
    ids=["anonymous", "wrong-password", "unknown-user"],
)
def test_api_refuses_requests_without_valid_credentials(
    team_stack: Stack, auth: tuple[str, str] | None
) -> None:
    response = _get(team_stack, f"{API}/experiments/search", auth, max_results="10")
    assert response.status_code == 401, response.text
    assert (
        _get(team_stack, f"{API}/experiments/search", _admin(team_stack), max_results="10").status_code == 200
    )


def test_admin_run_metric_and_artifact_land_in_postgres_and_s3(
    team_stack: Stack, logged_run: dict[str, str]
) -> None:
    run = _get(team_stack, f"{API}/runs/get", _admin(team_stack), run_id=logged_run["run_id"]).json()["run"]
    assert run["info"]["status"] == "FINISHED"
    assert {(m["key"], m["value"]) for m in run["data"]["metrics"]} == {("neg_elbo", 97.5)}
    s3 = team_stack.s3_client()
    keys = [o["Key"] for o in s3.list_objects_v2(Bucket=team_stack.bucket).get("Contents", [])]
    key = f"{logged_run['experiment_id']}/{logged_run['run_id']}/artifacts/notes.txt"
    assert key in keys, keys
    body = s3.get_object(Bucket=team_stack.bucket, Key=key)["Body"].read()
    assert body == b"logged through the tracking server\n"


def test_read_grant_reads_but_cannot_log(team_stack: Stack, logged_run: dict[str, str]) -> None:
    reader = ("reader", team_stack.create_user("reader"))
    run_id, experiment_id = logged_run["run_id"], logged_run["experiment_id"]
    # Nothing granted yet, and the stack's default is NO_PERMISSIONS: experiments are private.
    assert _get(team_stack, f"{API}/runs/get", reader, run_id=run_id).status_code == 403

    team_stack.grant("reader", "experiment", experiment_id, "READ")
    run = _get(team_stack, f"{API}/runs/get", reader, run_id=run_id)
    assert run.status_code == 200, run.text
    assert run.json()["run"]["data"]["metrics"][0]["key"] == "neg_elbo"
    artifact = _get(team_stack, f"{ARTIFACTS}/{experiment_id}/{run_id}/artifacts/notes.txt", reader)
    assert artifact.status_code == 200 and artifact.content == b"logged through the tracking server\n"

    created = _post(team_stack, f"{API}/runs/create", reader, {"experiment_id": experiment_id})
    assert created.status_code == 403, created.text
    logged = _post(
        team_stack,
        f"{API}/runs/log-metric",
        reader,
        {"run_id": run_id, "key": "x", "value": 1.0, "timestamp": 0, "step": 0},
    )
    assert logged.status_code == 403, logged.text


def test_edit_grant_can_log(team_stack: Stack, logged_run: dict[str, str]) -> None:
    editor = ("editor", team_stack.create_user("editor"))
    team_stack.grant("editor", "experiment", logged_run["experiment_id"], "EDIT")
    created = _post(
        team_stack,
        f"{API}/runs/create",
        editor,
        {"experiment_id": logged_run["experiment_id"], "run_name": "by-editor"},
    )
    assert created.status_code == 200, created.text
    run_id = created.json()["run"]["info"]["run_id"]
    logged = _post(
        team_stack,
        f"{API}/runs/log-metric",
        editor,
        {"run_id": run_id, "key": "loss", "value": 0.5, "timestamp": 0, "step": 1},
    )
    assert logged.status_code == 200, logged.text
    # Anyone may create an experiment, and its creator manages it.
    own = _post(team_stack, f"{API}/experiments/create", editor, {"name": "editor-own"})
    assert own.status_code == 200, own.text
    created = _post(team_stack, f"{API}/runs/create", editor, {"experiment_id": own.json()["experiment_id"]})
    assert created.status_code == 200, created.text


@pytest.mark.parametrize("fault", ["restart", "kill"])
def test_api_recovers_after_postgres_goes_down(
    team_stack: Stack, logged_run: dict[str, str], fault: str
) -> None:
    before = team_stack.pids["postgres"]
    if fault == "restart":
        team_stack.part("postgres").restart()  # as `pg_ctl restart -m fast`
    else:
        team_stack.part("postgres").kill()  # SIGKILL to the postmaster and every backend
        team_stack.part("postgres").start()  # crash recovery from the write-ahead log
    assert team_stack.pids["postgres"] != before
    run, tries = _until_ok(
        lambda: _get(team_stack, f"{API}/runs/get", _admin(team_stack), run_id=logged_run["run_id"])
    )
    assert run.json()["run"]["info"]["run_id"] == logged_run["run_id"]
    assert tries <= 5, f"{tries} tries before the server used the new database connections"
    logged, _ = _until_ok(
        lambda: _post(
            team_stack,
            f"{API}/runs/log-metric",
            _admin(team_stack),
            {
                "run_id": logged_run["run_id"],
                "key": f"after_{fault}",
                "value": 1.0,
                "timestamp": 0,
                "step": 0,
            },
        )
    )
    assert logged.json() == {}


def test_tracking_server_killed_and_started_again_keeps_runs_and_users(
    team_stack: Stack, logged_run: dict[str, str]
) -> None:
    team_stack.part("mlflow").kill()
    with pytest.raises(requests.ConnectionError):
        _get(team_stack, "/health", None)
    team_stack.part("mlflow").start()
    run = _get(team_stack, f"{API}/runs/get", _admin(team_stack), run_id=logged_run["run_id"])
    assert run.status_code == 200, run.text
    password = team_stack.create_user("after-restart")
    me = _get(team_stack, f"{API}/users/current", ("after-restart", password))
    assert me.status_code == 200, me.text


def test_paused_s3_stalls_uploads_and_keeps_its_objects(
    team_stack: Stack, logged_run: dict[str, str]
) -> None:
    path = f"{ARTIFACTS}/{logged_run['experiment_id']}/{logged_run['run_id']}/artifacts/paused.txt"
    team_stack.pause("s3")
    try:
        with pytest.raises(requests.Timeout):
            requests.put(team_stack.tracking_uri + path, data=b"x", auth=_admin(team_stack), timeout=3)
    finally:
        team_stack.resume("s3")
    up = requests.put(team_stack.tracking_uri + path, data=b"y", auth=_admin(team_stack), timeout=60)
    assert up.status_code == 200, up.text
    keys = [o["Key"] for o in team_stack.s3_client().list_objects_v2(Bucket=team_stack.bucket)["Contents"]]
    assert any(key.endswith("/notes.txt") for key in keys), keys


def test_artifact_upload_fails_while_s3_is_down_and_works_after(
    team_stack: Stack, logged_run: dict[str, str]
) -> None:
    path = f"{ARTIFACTS}/{logged_run['experiment_id']}/{logged_run['run_id']}/artifacts/during.txt"
    team_stack.part("s3").kill()
    try:
        down = requests.put(team_stack.tracking_uri + path, data=b"x", auth=_admin(team_stack), timeout=120)
        assert down.status_code >= 500, down.text
    finally:
        team_stack.part("s3").start()  # moto keeps objects in memory: the bucket comes back empty
    up = requests.put(team_stack.tracking_uri + path, data=b"x", auth=_admin(team_stack), timeout=60)
    assert up.status_code == 200, up.text
    keys = [o["Key"] for o in team_stack.s3_client().list_objects_v2(Bucket=team_stack.bucket)["Contents"]]
    assert any(key.endswith("/during.txt") for key in keys), keys


def test_no_password_in_any_log(team_stack: Stack) -> None:
    secrets = [team_stack.admin_password, team_stack.database_password]
    for part, path in team_stack.logs.items():
        text = path.read_text(errors="replace")
        assert text, f"{part} wrote no log"
        assert not any(secret in text for secret in secrets), f"a password is in {path}"
    assert team_stack.admin_password not in (team_stack.workdir / "basic_auth.ini").read_text()


class _Boom(Exception):
    pass


def test_a_stack_leaves_nothing_when_its_block_raises(tmp_path: Path) -> None:
    with pytest.raises(_Boom), Stack(tmp_path / "stack") as stack:
        groups, private = stack.process_groups, stack.private_dir
        assert len(groups) == 3 and private is not None and private.is_dir()
        raise _Boom
    assert not [group for group in groups if _alive(group)]
    assert not private.exists()
    assert stack.logs["mlflow"].exists(), "the logs stay in the work folder"


def test_serve_forever_prints_exports_and_stops_everything_on_sigterm(tmp_path: Path) -> None:
    process = subprocess.Popen(
        [
            sys.executable,
            "-c",
            "import sys; from pathlib import Path; "
            "from mnist_vae.stack import serve_forever; serve_forever(Path(sys.argv[1]))",
            str(tmp_path),
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        exports = {}
        while "AWS_DEFAULT_REGION" not in exports:
            line = process.stdout.readline()
            assert line, f"serve_forever ended early: {process.stderr.read()}"
            name, _, value = line.removeprefix("export ").strip().partition("=")
            exports[name] = value
        uri = exports["MLFLOW_TRACKING_URI"]
        auth = (exports["MLFLOW_TRACKING_USERNAME"], exports["MLFLOW_TRACKING_PASSWORD"])
        assert (
            requests.get(
                f"{uri}{API}/experiments/search", params={"max_results": "1"}, auth=auth, timeout=30
            ).status_code
            == 200
        )
        children = _descendants(process.pid)
        assert len(children) >= 3, children  # postmaster (+ backends), moto, mlflow (+ uvicorn)
        process.send_signal(signal.SIGTERM)
        assert process.wait(timeout=60) == 0, process.stderr.read()
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()
    assert not [pid for pid in children if Path(f"/proc/{pid}").exists()]
    stderr = process.stderr.read()
    assert "stopping the team stack" in stderr
    assert auth[1] not in stderr


def test_stop_stops_every_part_when_one_fails(tmp_path: Path) -> None:
    stack = Stack(tmp_path / "stack")
    stack.start()
    groups, private = stack.process_groups, stack.private_dir
    # A fault while stopping: the log folder is gone, so stopping MLflow, the first part, fails
    # when it logs that it stopped.
    shutil.rmtree(stack.workdir)
    with pytest.raises(FileNotFoundError):
        stack.stop()
    assert not [group for group in groups if _alive(group)]
    assert not private.exists()
    stack.stop()  # a second stop has nothing left to do


def test_stack_runs_as_an_unprivileged_user(tmp_path: Path) -> None:
    """The path taken by anyone but root: PostgreSQL runs as the caller, nothing needs root."""
    if os.geteuid() != 0:
        account, python, env = None, sys.executable, dict(os.environ)
    else:
        account = pwd.getpwnam("nobody")
        python, env = _python_for(account)
    private_before = set(Path(tempfile.gettempdir()).glob("mnist-vae-pg-*"))  # other stacks may run
    work = Path(tempfile.mkdtemp(prefix="mnist-vae-nonroot-"))  # tmp_path is private to root
    try:
        if account is not None:
            os.chown(work, account.pw_uid, account.pw_gid)
        script = (
            "import os, sys, requests; from pathlib import Path; "
            "from mnist_vae.stack import Stack\n"
            "with Stack(Path(sys.argv[1]) / 'stack') as stack:\n"
            "    r = requests.get(stack.tracking_uri + '/api/2.0/mlflow/experiments/search',"
            " params={'max_results': '1'}, auth=(stack.admin_username, stack.admin_password))\n"
            "    print(os.geteuid(), r.status_code, stack.pg_port > 0)\n"
        )
        result = subprocess.run(
            [python, "-c", script, str(work)],
            capture_output=True,
            text=True,
            timeout=300,
            env={**env, "HOME": str(work)},
            **({"user": account.pw_uid, "group": account.pw_gid, "extra_groups": []} if account else {}),
        )
        assert result.returncode == 0, result.stderr[-3000:]
        uid = os.geteuid() if account is None else account.pw_uid
        assert result.stdout.split() == [str(uid), "200", "True"], result.stdout
        left = set(Path(tempfile.gettempdir()).glob("mnist-vae-pg-*")) - private_before
        assert not left, "the stack's private folder was left behind"
    finally:
        shutil.rmtree(work, ignore_errors=True)


def _python_for(account: pwd.struct_passwd) -> tuple[str, dict[str, str]]:
    """An interpreter ``account`` may run with this environment's packages: this venv's if its
    files are readable by that account, else the same Python version found on PATH with this
    venv's site-packages and the project's sources on PYTHONPATH."""
    purelib, source = sysconfig.get_paths()["purelib"], str(Path(mnist_vae.__file__).parents[1])
    version = f"python{sys.version_info.major}.{sys.version_info.minor}"
    candidates = [(sys.executable, dict(os.environ))]
    for folder in os.environ.get("PATH", "").split(os.pathsep) + ["/usr/bin", "/usr/local/bin"]:
        found = Path(folder) / version
        if found.is_file() and found.resolve() != Path(sys.executable).resolve():
            candidates.append((str(found), {**os.environ, "PYTHONPATH": os.pathsep.join([source, purelib])}))
    for python, env in candidates:
        try:
            probe = subprocess.run(
                [python, "-c", "import mnist_vae.stack, mlflow, moto, psycopg"],
                capture_output=True,
                env={**env, "HOME": "/"},
                timeout=120,
                user=account.pw_uid,
                group=account.pw_gid,
                extra_groups=[],
            )
        except PermissionError:  # the interpreter (or a folder above it) is private to its owner
            continue
        if probe.returncode == 0:
            return python, env
    pytest.fail(
        f"no {version} that user {account.pw_name} may run with this venv's packages "
        f"(tried {[python for python, _ in candidates]}): make the venv and the project "
        "readable by that user"
    )


def _alive(group: int) -> bool:
    return procs.group_alive(group)


def _descendants(pid: int) -> list[int]:
    parents: dict[int, int] = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except (FileNotFoundError, ProcessLookupError):
            continue
        parents[int(stat.parent.name)] = int(fields[1])
    found, frontier = [], [pid]
    while frontier:
        parent = frontier.pop()
        children = [child for child, ppid in parents.items() if ppid == parent]
        found += children
        frontier += children
    return found
