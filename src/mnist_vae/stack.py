"""The team's stack, for real, on 127.0.0.1: PostgreSQL, an S3 endpoint and an authenticated MLflow server.

:class:`Stack` starts, each on a free port of 127.0.0.1 and each in a process group of its own:

- a private PostgreSQL 15 (data and unix socket in a temporary folder; password login for the role
  ``mlflow``, owner of the databases ``mlflow`` (runs, models) and ``mlflow_auth`` (users, grants));
- moto's S3 server with one bucket, the artifact store;
- ``mlflow server --app-name basic-auth``, which proxies artifacts to that bucket.

Each part can be stopped, killed and started again on its own, so a test can take one down while a
client runs; everything stops when the ``with`` block ends, however it ends, and the temporary
folders go with it. Should this process die without ending the block (SIGKILL, a closed terminal),
a watchdog (:class:`mnist_vae.procs.Watchdog`) stops every part and removes the temporary folders.
PostgreSQL is stopped with ``pg_ctl stop``, by this process and by the watchdog alike. Logs go to
``postgres.log``, ``s3.log``, ``mlflow.log`` and ``watchdog.log`` in the work folder; no password is
ever passed on a command line or written to a log. :func:`serve_forever` is the same stack for a
person: it prints the ``export`` lines a client needs and runs until Ctrl-C.
"""

from __future__ import annotations

import contextlib
import importlib.util
import logging
import os
import pwd
import secrets
import shlex
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType
from typing import IO, Literal

import requests

from mnist_vae import procs
from mnist_vae.errors import UserError

log = logging.getLogger(__name__)

HOST = "127.0.0.1"
PG_BIN = Path("/usr/lib/postgresql/15/bin")
PG_SUPERUSER = "postgres"
DB_ROLE = "mlflow"
TRACKING_DB = "mlflow"
AUTH_DB = "mlflow_auth"
# moto accepts any credentials; these are the values its documentation uses.
FAKE_AWS = {
    "AWS_ACCESS_KEY_ID": "testing",
    "AWS_SECRET_ACCESS_KEY": "testing",
    "AWS_DEFAULT_REGION": "us-east-1",
}
TEAM_EXTRA = "pip install -e '.[team]'"
LOG_TAIL_LINES = 15

Part = Literal["postgres", "s3", "mlflow"]
ResourceType = Literal["experiment", "registered_model", "prompt", "scorer"]
PermissionName = Literal["READ", "USE", "EDIT", "MANAGE", "DENY", "NO_PERMISSIONS"]


class StackError(UserError):
    """A part of the team stack is missing, did not come up, or refused a request."""


@dataclass
class _Process:
    """One running part: its leader process, which is also its process group (``start_new_session``)."""

    popen: subprocess.Popen[bytes]
    log_path: Path


class Stack:
    """PostgreSQL, S3 (moto) and an MLflow server with basic auth, for as long as the ``with`` block runs.

    Example::

        with Stack(tmp_path) as stack:
            env = stack.env()                # MLFLOW_TRACKING_URI, admin credentials, S3 endpoint...
            stack.kill_postgres()            # a fault...
            stack.start_postgres()           # ...and the recovery

    Args:
        workdir: Where the logs and the auth config go; kept after the stack stops. ``None``: a
            temporary folder, removed with the stack.
        bucket: The S3 bucket that holds the artifacts.
        admin_username: The MLflow admin, created on the first start with a generated password.
        default_permission: What a user may do on a resource nobody granted them. MLflow's own
            default is ``READ`` (everyone reads everything); a team stack keeps experiments private
            until shared, so only explicit grants count.
        pg_bin: The folder holding PostgreSQL 15's ``initdb`` and ``postgres``.
        pg_user: The unprivileged account PostgreSQL runs as when this process is root (it refuses
            to run as root).
        start_timeout: Seconds each part may take to answer after it is started.
    """

    def __init__(
        self,
        workdir: Path | None = None,
        *,
        bucket: str = "mlflow-artifacts",
        admin_username: str = "admin",
        default_permission: PermissionName = "NO_PERMISSIONS",
        pg_bin: Path = PG_BIN,
        pg_user: str = "nobody",
        start_timeout: float = 180.0,
    ) -> None:
        self._given_workdir = workdir
        self.bucket = bucket
        self.admin_username = admin_username
        self.default_permission = default_permission
        self.pg_bin = pg_bin
        self.pg_user = pg_user
        self.start_timeout = start_timeout
        # Generated once: a part started again (or the whole stack) keeps them, so clients,
        # stored password verifiers and signed cookies stay valid across restarts.
        self.admin_password = secrets.token_urlsafe(24)
        self._pg_password = secrets.token_urlsafe(24)
        self._flask_secret_key = secrets.token_hex(32)
        self.workdir: Path | None = None
        self._own_workdir = False
        self._private: Path | None = None
        self.pg_port = self.s3_port = self.mlflow_port = 0
        self._procs: dict[Part, _Process] = {}
        self._groups: set[int] = set()
        self._watchdog: procs.Watchdog | None = None

    # ----------------------------------------------------------------------------------------------
    # The whole stack

    def __enter__(self) -> Stack:
        self.start()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()

    def start(self) -> None:
        """Starts PostgreSQL, S3 and MLflow, in that order, and returns once ``/health`` answers.

        On any failure (Ctrl-C included) whatever was started is stopped again before the error
        propagates.

        Raises:
            StackError: A prerequisite is missing or a part did not come up.
        """
        assert not self._procs, "the stack is already running"
        self._check_prerequisites()
        try:
            if self._given_workdir is None:
                self.workdir = Path(tempfile.mkdtemp(prefix="mnist-vae-stack-"))
                self._own_workdir = True
            else:
                self.workdir = self._given_workdir.resolve()
                self.workdir.mkdir(parents=True, exist_ok=True)
            # Outside the work folder on purpose: PostgreSQL's account must be able to reach it
            # (pytest's tmp_path is private to root), and a unix socket path is limited to 107 bytes.
            self._private = Path(tempfile.mkdtemp(prefix="mnist-vae-pg-"))
            with (self.workdir / "watchdog.log").open("ab") as out:
                self._watchdog = procs.Watchdog(log=out)
            self.pg_port, self.s3_port, self.mlflow_port = procs.free_ports(3)
            self._init_postgres()
            self.start_postgres()
            self._create_databases()
            self.start_s3()
            self._write_auth_config()
            self.start_mlflow()
        except BaseException:
            try:
                self.stop()
            except Exception as exc:  # the failure that got us here is the one to report
                log.warning("stopping the stack after a failed start failed too: %s", exc)
            raise
        log.info("team stack up: MLflow %s, S3 %s, PostgreSQL port %d",
                 self.tracking_uri, self.s3_endpoint_url, self.pg_port)

    def stop(self) -> None:
        """Stops every part (MLflow first) and removes the temporary folders; safe to call twice.

        Every part is stopped even when stopping one fails; the first failure is raised at the end
        (the others are logged).
        """
        errors: list[Exception] = []
        for part in ("mlflow", "s3", "postgres"):
            try:
                self._stop_part(part, "graceful")
            except Exception as exc:  # collected: the other parts must stop all the same
                log.warning("stopping %s failed: %s", part, exc)
                errors.append(exc)
        if self._watchdog is not None:
            # Closing it makes the watchdog stop anything still registered (a part whose stop
            # failed), as it would had this process died.
            self._watchdog.close()
            self._watchdog = None
        for group in sorted(self._groups):
            if procs.group_alive(group):
                log.warning("process group %d is still alive after the stack stopped", group)
        if self._private is not None:
            shutil.rmtree(self._private, ignore_errors=True)
            self._private = None
        if self._own_workdir and self.workdir is not None:
            shutil.rmtree(self.workdir, ignore_errors=True)
            self._own_workdir = False
        if errors:
            raise errors[0]

    @property
    def running(self) -> bool:
        """Whether all three parts are running."""
        return all(self.is_running(part) for part in ("postgres", "s3", "mlflow"))

    def is_running(self, part: Part) -> bool:
        """Whether ``part``'s leader process is alive (not whether it answers yet)."""
        proc = self._procs.get(part)
        return proc is not None and proc.popen.poll() is None

    def check(self) -> None:
        """Raises :class:`StackError` naming the log of the first part that exited on its own."""
        for part, proc in self._procs.items():
            code = proc.popen.poll()
            if code is not None:
                raise StackError(f"{part} exited with code {code}; {self._log_tail(proc.log_path)}")

    def pause(self, part: Part) -> None:
        """Freezes every process of ``part`` (SIGSTOP): it accepts connections but never answers, as
        behind a network partition, and keeps its state (moto's objects survive, unlike a restart)."""
        proc = self._procs[part]
        procs.signal_group(proc.popen.pid, signal.SIGSTOP)

    def resume(self, part: Part) -> None:
        """Lets a paused part run again (SIGCONT)."""
        proc = self._procs[part]
        procs.signal_group(proc.popen.pid, signal.SIGCONT)

    @property
    def pids(self) -> dict[Part, int]:
        """The leader process id of each running part (also its process group id)."""
        return {part: proc.popen.pid for part, proc in self._procs.items()}

    @property
    def process_groups(self) -> frozenset[int]:
        """Every process group this stack ever started, for a check that none is left."""
        return frozenset(self._groups)

    @property
    def logs(self) -> dict[Part, Path]:
        """Each part's log file in the work folder."""
        assert self.workdir is not None, "the stack was never started"
        return {part: self.workdir / f"{part}.log" for part in ("postgres", "s3", "mlflow")}

    @property
    def private_dir(self) -> Path | None:
        """The temporary folder with PostgreSQL's data and socket, while the stack runs."""
        return self._private

    # ----------------------------------------------------------------------------------------------
    # What a client needs

    @property
    def tracking_uri(self) -> str:
        return f"http://{HOST}:{self.mlflow_port}"

    @property
    def s3_endpoint_url(self) -> str:
        return f"http://{HOST}:{self.s3_port}"

    @property
    def database_password(self) -> str:
        """The password of the PostgreSQL role ``mlflow`` (over TCP, port :attr:`pg_port`)."""
        return self._pg_password

    def create_database(self, name: str) -> str:
        """Creates a database owned by the role ``mlflow`` (e.g. for an Optuna study) and returns its
        SQLAlchemy URL, without the password: a client gives it in ``PGPASSWORD``
        (:attr:`database_password`), which libpq reads."""
        from psycopg import sql

        with self._connect_superuser() as conn:
            conn.execute(sql.SQL("CREATE DATABASE {} OWNER {}").format(sql.Identifier(name),
                                                                       sql.Identifier(DB_ROLE)))
        return self._database_uri(name)

    def env(self) -> dict[str, str]:
        """The environment variables an MLflow (or DVC, boto3) client needs, as the admin."""
        return {
            "MLFLOW_TRACKING_URI": self.tracking_uri,
            "MLFLOW_TRACKING_USERNAME": self.admin_username,
            "MLFLOW_TRACKING_PASSWORD": self.admin_password,
            "MLFLOW_S3_ENDPOINT_URL": self.s3_endpoint_url,
            **FAKE_AWS,
        }

    def s3_client(self):  # -> botocore S3 client; boto3 ships no static type for it
        """A boto3 S3 client for this stack's endpoint."""
        import boto3

        return boto3.client("s3", endpoint_url=self.s3_endpoint_url,
                            aws_access_key_id=FAKE_AWS["AWS_ACCESS_KEY_ID"],
                            aws_secret_access_key=FAKE_AWS["AWS_SECRET_ACCESS_KEY"],
                            region_name=FAKE_AWS["AWS_DEFAULT_REGION"])

    def create_user(self, username: str, password: str | None = None) -> str:
        """Creates an MLflow user through the server's REST API and returns its password.

        Args:
            username: The new user's name.
            password: Their password; ``None`` generates one.

        Raises:
            StackError: The server refused (the name is taken, for example).
        """
        password = password or secrets.token_urlsafe(16)
        self._admin_request("POST", "/api/2.0/mlflow/users/create",
                            {"username": username, "password": password})
        return password

    def grant(self, username: str, resource_type: ResourceType, resource_id: str,
              permission: PermissionName) -> None:
        """Grants ``username`` a permission on one resource, through the server's REST API.

        This MLflow (3.17) has one grant route for every kind of resource; the per-resource
        ``experiments/permissions/create`` routes of MLflow 2 are gone.

        Args:
            username: An existing user.
            resource_type: ``experiment`` (id), ``registered_model`` (name), ``prompt`` or ``scorer``.
            resource_id: The experiment id or the model's name; ``*`` for all of that type.
            permission: ``READ``, ``USE``, ``EDIT``, ``MANAGE``, ``DENY`` or ``NO_PERMISSIONS``.

        Raises:
            StackError: The server refused (an unknown user, resource type or permission).
        """
        self._admin_request("POST", "/api/3.0/mlflow/users/permissions/grant", {
            "username": username, "resource_type": resource_type,
            "resource_id": str(resource_id), "permission": permission,
        })

    def _admin_request(self, method: str, path: str, body: Mapping[str, str]) -> None:
        response = requests.request(method, self.tracking_uri + path, json=dict(body),
                                    auth=(self.admin_username, self.admin_password), timeout=30)
        if not response.ok:
            raise StackError(f"MLflow answered {response.status_code} to {method} {path}: "
                             f"{response.text.strip()[:300]}")

    # ----------------------------------------------------------------------------------------------
    # PostgreSQL

    def start_postgres(self) -> None:
        """Starts PostgreSQL on its port (after a kill, it recovers from its write-ahead log first).

        Raises:
            StackError: It exited or did not accept connections within ``start_timeout``.
        """
        assert self._private is not None, "start() creates the data folder first"
        postgres = self._spawn("postgres", [
            str(self.pg_bin / "postgres"), "-D", str(self._pg_data), "-p", str(self.pg_port),
            "-c", f"listen_addresses={HOST}",
            "-c", f"unix_socket_directories={self._pg_socket_dir}",
            # The data is thrown away with the stack: no need to survive a power cut.
            "-c", "fsync=off",
        ], self._pg_env(), run_as=self._pg_account())
        self._wait(postgres, self._postgres_answers, "accept connections")

    def stop_postgres(self, mode: Literal["fast", "immediate"] = "fast") -> None:
        """Stops PostgreSQL with ``pg_ctl stop -m MODE``: ``fast`` rolls back open transactions and
        closes sessions cleanly; ``immediate`` aborts, like a crash (recovery at the next start).

        Raises:
            StackError: ``pg_ctl`` failed; the postmaster's group was SIGKILLed all the same.
        """
        self._stop_part("postgres", mode)

    def kill_postgres(self) -> None:
        """SIGKILLs the postmaster and all its backends, as an out-of-memory killer would."""
        self._stop_part("postgres", "kill")

    def restart_postgres(self, mode: Literal["fast", "immediate"] = "fast") -> None:
        """``pg_ctl stop -m MODE``, then a new postmaster, this stack's child (``pg_ctl restart``
        would detach it, and its exit would go unnoticed)."""
        self.stop_postgres(mode)
        self.start_postgres()

    @property
    def _pg_data(self) -> Path:
        assert self._private is not None
        return self._private / "data"

    @property
    def _pg_socket_dir(self) -> Path:
        assert self._private is not None
        return self._private / "socket"

    def _pg_account(self) -> pwd.struct_passwd | None:
        """The account PostgreSQL runs as: ``pg_user`` when we are root, else ourselves (``None``)."""
        if os.geteuid() != 0:
            return None
        try:
            return pwd.getpwnam(self.pg_user)
        except KeyError:
            raise StackError(f"PostgreSQL refuses to run as root and the account {self.pg_user!r} "
                             "does not exist; pass pg_user= an unprivileged account") from None

    def _pg_env(self) -> dict[str, str]:
        assert self._private is not None
        return {"PATH": os.environ.get("PATH", "/usr/bin:/bin"), "LC_ALL": "C", "HOME": str(self._private),
                "TZ": "UTC"}

    def _init_postgres(self) -> None:
        assert self._private is not None
        account = self._pg_account()
        self._pg_socket_dir.mkdir()
        if account is not None:
            for path in (self._private, self._pg_socket_dir):
                os.chown(path, account.pw_uid, account.pw_gid)
        with self._log_file("postgres", "initdb") as out:
            # Local (socket) logins need no password: the socket sits in a folder only PostgreSQL's
            # account and root can enter. TCP logins need the role's password.
            result = subprocess.run([
                str(self.pg_bin / "initdb"), "-D", str(self._pg_data), "-U", PG_SUPERUSER,
                "--auth-local=trust", "--auth-host=scram-sha-256", "--encoding=UTF8", "--locale=C",
                "--no-sync", "--no-instructions",
            ], stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT, env=self._pg_env(),
                timeout=120, **_run_as_kwargs(account))
        if result.returncode != 0:
            raise StackError(f"initdb failed with code {result.returncode}; "
                             f"{self._log_tail(self.logs['postgres'])}")

    def _connect_superuser(self, timeout: float = 2.0):  # -> psycopg.Connection
        import psycopg

        return psycopg.connect(host=str(self._pg_socket_dir), port=self.pg_port, user=PG_SUPERUSER,
                               dbname="postgres", connect_timeout=max(1, round(timeout)),
                               autocommit=True)

    def _postgres_answers(self) -> bool:
        import psycopg

        try:
            with self._connect_superuser():
                return True
        except psycopg.OperationalError:
            return False

    def _create_databases(self) -> None:
        from psycopg import sql

        with self._connect_superuser() as conn:
            # The password goes in as a SCRAM verifier computed here, as psql's \password does, so
            # the server never sees it and cannot log it (e.g. in an error statement).
            verifier = conn.pgconn.encrypt_password(self._pg_password.encode(), DB_ROLE.encode(),
                                                    b"scram-sha-256").decode()
            conn.execute(sql.SQL("CREATE ROLE {} LOGIN PASSWORD {}").format(
                sql.Identifier(DB_ROLE), sql.Literal(verifier)))
            for database in (TRACKING_DB, AUTH_DB):
                conn.execute(sql.SQL("CREATE DATABASE {} OWNER {}").format(
                    sql.Identifier(database), sql.Identifier(DB_ROLE)))

    def _database_uri(self, database: str) -> str:
        # No password in the URI: libpq reads it from PGPASSWORD in the server's environment, so it
        # appears neither in `ps` nor in anything that prints the URI.
        return f"postgresql+psycopg://{DB_ROLE}@{HOST}:{self.pg_port}/{database}"

    # ----------------------------------------------------------------------------------------------
    # S3 (moto)

    def start_s3(self) -> None:
        """Starts moto's S3 server and creates the bucket.

        moto keeps its state in memory: after a stop or kill the bucket is created again, empty.

        Raises:
            StackError: It exited or did not answer within ``start_timeout``.
        """
        moto = self._spawn("s3", [sys.executable, "-m", "moto.server", "-H", HOST, "-p", str(self.s3_port)],
                           {**_child_env(), **FAKE_AWS})
        self._wait(moto, self._s3_answers, "answer HTTP")
        self.s3_client().create_bucket(Bucket=self.bucket)

    def stop_s3(self) -> None:
        """Stops the S3 server (SIGTERM); its objects are lost."""
        self._stop_part("s3", "graceful")

    def kill_s3(self) -> None:
        """SIGKILLs the S3 server; its objects are lost."""
        self._stop_part("s3", "kill")

    def restart_s3(self) -> None:
        self.stop_s3()
        self.start_s3()

    def _s3_answers(self) -> bool:
        try:
            requests.get(self.s3_endpoint_url, timeout=2)
        except (requests.ConnectionError, requests.Timeout):  # not up yet, or slow on a busy machine
            return False
        return True

    # ----------------------------------------------------------------------------------------------
    # MLflow

    def start_mlflow(self) -> None:
        """Starts ``mlflow server`` with basic auth and returns once ``/health`` answers.

        Raises:
            StackError: It exited or did not answer within ``start_timeout``.
        """
        assert self.workdir is not None
        env = {
            **_child_env(),
            **FAKE_AWS,
            "PGPASSWORD": self._pg_password,
            "MLFLOW_S3_ENDPOINT_URL": self.s3_endpoint_url,
            "MLFLOW_AUTH_CONFIG_PATH": str(self._auth_config_path),
            "MLFLOW_AUTH_ADMIN_USERNAME": self.admin_username,
            "MLFLOW_AUTH_ADMIN_PASSWORD": self.admin_password,
            # Fixed for the stack's life: sessions and CSRF tokens survive a server restart.
            "MLFLOW_FLASK_SERVER_SECRET_KEY": self._flask_secret_key,
            # The job runner (GenAI jobs) would add a huey consumer and a folder in /dev/shm.
            "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false",
            "MLFLOW_DISABLE_TELEMETRY": "true",
            "DO_NOT_TRACK": "true",
        }
        server = self._spawn("mlflow", [
            sys.executable, "-m", "mlflow", "server", "--host", HOST, "--port", str(self.mlflow_port),
            "--backend-store-uri", self._database_uri(TRACKING_DB),
            "--artifacts-destination", f"s3://{self.bucket}/", "--serve-artifacts",
            "--app-name", "basic-auth", "--workers", "1",
        ], env, cwd=self.workdir)
        self._wait(server, self._mlflow_answers, "answer /health")

    def stop_mlflow(self) -> None:
        """Stops the tracking server (SIGTERM to the CLI and its uvicorn worker)."""
        self._stop_part("mlflow", "graceful")

    def kill_mlflow(self) -> None:
        """SIGKILLs the tracking server and its worker, as a crash mid-request would."""
        self._stop_part("mlflow", "kill")

    def restart_mlflow(self) -> None:
        self.stop_mlflow()
        self.start_mlflow()

    @property
    def _auth_config_path(self) -> Path:
        assert self.workdir is not None
        return self.workdir / "basic_auth.ini"

    def _write_auth_config(self) -> None:
        # No secret in this file: the admin password comes from MLFLOW_AUTH_ADMIN_PASSWORD and the
        # database password from PGPASSWORD.
        self._auth_config_path.write_text(
            "[mlflow]\n"
            f"default_permission = {self.default_permission}\n"
            f"database_uri = {self._database_uri(AUTH_DB)}\n"
            f"admin_username = {self.admin_username}\n"
            "authorization_function = mlflow.server.auth:authenticate_request_basic_auth\n"
        )

    def _mlflow_answers(self) -> bool:
        try:
            return requests.get(self.tracking_uri + "/health", timeout=2).status_code == 200
        except (requests.ConnectionError, requests.Timeout):
            return False

    # ----------------------------------------------------------------------------------------------
    # Processes

    def _check_prerequisites(self) -> None:
        for tool in ("initdb", "postgres", "pg_ctl"):
            if not os.access(self.pg_bin / tool, os.X_OK):
                raise StackError(f"PostgreSQL 15 is not installed: {self.pg_bin / tool} is missing; "
                                 "install the Debian package postgresql-15 (apt-get install postgresql-15)")
        for module, requirement in (("psycopg", "psycopg[binary]"), ("moto", "moto[server]"),
                                    ("flask_cors", "moto[server]"), ("boto3", "boto3"),
                                    ("flask_wtf", "mlflow[auth]")):
            if importlib.util.find_spec(module) is None:
                raise StackError(f"{requirement} is not installed (module {module} is missing); "
                                 f"install the team extra: {TEAM_EXTRA}")
        try:
            import psycopg  # noqa: F401  (finds libpq: the binary wheel's or the system's)
        except ImportError as exc:
            raise StackError(f"psycopg cannot load libpq ({exc}); install the team extra, which brings "
                             f"psycopg[binary]: {TEAM_EXTRA}") from None

    @contextlib.contextmanager
    def _log_file(self, part: Part, what: str) -> Iterator[IO[bytes]]:
        with self.logs[part].open("ab") as out:
            out.write(f"--- {time.strftime('%Y-%m-%d %H:%M:%S')} mnist-vae stack: {what}\n".encode())
            out.flush()
            yield out

    def _spawn(self, part: Part, argv: list[str], env: dict[str, str], *,
               run_as: pwd.struct_passwd | None = None, cwd: Path | None = None) -> _Process:
        assert not self.is_running(part), f"{part} is already running"
        with self._log_file(part, f"starting {part}") as out:
            popen = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT,
                                     env=env, cwd=cwd, start_new_session=True, **_run_as_kwargs(run_as))
        proc = _Process(popen, self.logs[part])
        self._procs[part] = proc
        self._groups.add(popen.pid)
        assert self._watchdog is not None, "start() starts the watchdog first"
        remove = [self._private] + ([self.workdir] if self._own_workdir else [])
        if part == "postgres":
            uid, gid = (run_as.pw_uid, run_as.pw_gid) if run_as is not None else (None, None)
            self._watchdog.watch(popen.pid, self._pg_ctl_stop("fast"), uid=uid, gid=gid, remove=remove)
        else:
            self._watchdog.watch(popen.pid, remove=remove)
        log.info("started %s (pid %d), log %s", part, popen.pid, proc.log_path)
        return proc

    def _wait(self, proc: _Process, answers: Callable[[], bool], what: str) -> None:
        deadline = time.monotonic() + self.start_timeout
        while not answers():
            code = proc.popen.poll()
            if code is not None:
                raise StackError(f"{proc.log_path.stem} exited with code {code} before it could {what}; "
                                 f"{self._log_tail(proc.log_path)}")
            if time.monotonic() > deadline:
                raise StackError(f"{proc.log_path.stem} did not {what} within {self.start_timeout:g} s; "
                                 f"{self._log_tail(proc.log_path)}")
            time.sleep(0.2)

    def _stop_part(self, part: Part, how: Literal["graceful", "fast", "immediate", "kill"]) -> None:
        proc = self._procs.pop(part, None)
        if proc is None:
            return
        popen = proc.popen
        pg_ctl_error = None
        if how == "kill":
            # PostgreSQL's backends lead process groups of their own: kill them by parent first,
            # or they keep the shared memory and the next postmaster refuses to start.
            backends = procs.children(popen.pid) if part == "postgres" else []
            for pid in backends:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGKILL)
            procs.signal_group(popen.pid, signal.SIGKILL)
            clean = procs.wait_group(popen.pid, 10.0, popen)
            for pid in backends:
                procs.wait_group(pid, 10.0)
            # Reap the leader: a killed postmaster left a zombie would still "own" postmaster.pid,
            # and the next one would refuse to start.
            with contextlib.suppress(subprocess.TimeoutExpired):
                popen.wait(timeout=10.0)
        elif part == "postgres":
            procs.signal_group(popen.pid, signal.SIGCONT)  # a paused postmaster cannot answer pg_ctl
            pg_ctl_error = self._run_pg_ctl_stop("immediate" if how == "immediate" else "fast", popen)
            # pg_ctl waits for the postmaster; its last backends may take a moment more.
            clean = procs.stop_group(popen.pid, popen, grace=30.0)
        else:
            clean = procs.stop_group(popen.pid, popen, grace=30.0)
        if not clean:
            log.warning("%s did not stop within 30 s; killed it", part)
        if self._watchdog is not None:
            self._watchdog.forget(popen.pid)
        with self._log_file(part, f"{part} stopped ({how}), exit code {popen.returncode}"):
            pass
        log.info("stopped %s (%s)", part, how)
        if pg_ctl_error is not None:
            raise StackError(pg_ctl_error)

    def _pg_ctl_stop(self, mode: Literal["fast", "immediate"]) -> list[str]:
        return [str(self.pg_bin / "pg_ctl"), "stop", "-D", str(self._pg_data), "-m", mode, "-w",
                "-t", "30"]

    def _run_pg_ctl_stop(self, mode: Literal["fast", "immediate"],
                         popen: subprocess.Popen[bytes]) -> str | None:
        """Runs ``pg_ctl stop -m MODE``; returns what went wrong, or None."""
        if popen.poll() is not None:
            return None  # it exited on its own: nothing for pg_ctl to stop
        with self._log_file("postgres", f"pg_ctl stop -m {mode}") as out:
            try:
                result = subprocess.run(self._pg_ctl_stop(mode), stdin=subprocess.DEVNULL, stdout=out,
                                        stderr=subprocess.STDOUT, env=self._pg_env(), timeout=60,
                                        check=False, **_run_as_kwargs(self._pg_account()))
            except (OSError, subprocess.TimeoutExpired) as exc:
                return f"pg_ctl stop -m {mode} failed ({exc}); PostgreSQL was stopped by signals instead"
        if result.returncode != 0 and popen.poll() is None:
            return (f"pg_ctl stop -m {mode} failed with code {result.returncode}; PostgreSQL was "
                    f"stopped by signals instead; {self._log_tail(self.logs['postgres'])}")
        return None

    def _log_tail(self, path: Path) -> str:
        try:
            lines = path.read_text(errors="replace").splitlines()[-LOG_TAIL_LINES:]
        except FileNotFoundError:
            return f"no log at {path}"
        tail = " | ".join(line.strip() for line in lines if line.strip())
        for secret in (self.admin_password, self._pg_password, self._flask_secret_key):
            tail = tail.replace(secret, "***")
        return f"see {path}; last lines: {tail}"


def _child_env() -> dict[str, str]:
    """This process's environment without the settings that would point a part somewhere else."""
    return {key: value for key, value in os.environ.items()
            if not key.startswith(("MLFLOW_", "AWS_", "PG"))} | {"PYTHONUNBUFFERED": "1"}


def _run_as_kwargs(account: pwd.struct_passwd | None) -> dict:
    if account is None:
        return {}
    return {"user": account.pw_uid, "group": account.pw_gid, "extra_groups": []}


def serve_forever(workdir: Path | None = None) -> None:
    """Runs the stack for a person until Ctrl-C, SIGTERM or SIGHUP (its terminal closed), then stops
    everything. Killed outright (SIGKILL), its watchdog stops everything instead.

    Prints ``export VAR=value`` lines on stdout (the admin password included: the one place it is
    shown) and where the logs are on stderr.

    Args:
        workdir: Where the logs go and stay; ``None``: a temporary folder removed at the end.

    Raises:
        StackError: A part is missing, did not come up, or died while the stack ran.
    """

    def interrupt(signum: int, frame: object) -> None:
        raise KeyboardInterrupt

    stopping = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)
    # All set explicitly: a process started in the background by a shell inherits SIGINT ignored.
    previous = {sig: signal.signal(sig, interrupt) for sig in stopping}
    stack = Stack(workdir)
    try:
        stack.start()
        for name, value in stack.env().items():
            print(f"export {name}={shlex.quote(value)}")
        sys.stdout.flush()
        print(f"team stack up: MLflow {stack.tracking_uri} (user {stack.admin_username}), "
              f"S3 {stack.s3_endpoint_url} bucket {stack.bucket}; logs in {stack.workdir}"
              f"{' (removed at exit)' if workdir is None else ''}; Ctrl-C stops it",
              file=sys.stderr, flush=True)
        while True:
            stack.check()
            time.sleep(1.0)
    except KeyboardInterrupt:
        # After SIGHUP the terminal may be gone: a failed write must not skip the stop below.
        with contextlib.suppress(OSError):
            print("stopping the team stack", file=sys.stderr, flush=True)
    finally:
        # A second Ctrl-C must not leave half the stack running.
        for sig in stopping:
            signal.signal(sig, signal.SIG_IGN)
        try:
            stack.stop()
        finally:
            for sig, handler in previous.items():
                signal.signal(sig, handler)
