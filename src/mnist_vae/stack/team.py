"""The team stack as a whole: :class:`Stack` starts its parts in order and stops them all, and
:func:`serve_forever` runs it for a person until Ctrl-C.

Start order: PostgreSQL (then its role and databases), S3 (then its bucket), MLflow (after its auth
config); stop order: the reverse. The work folder keeps the logs (``postgres.log``, ``s3.log``,
``mlflow.log``, ``watchdog.log``); the private folder, PostgreSQL's data and socket, goes with the
stack, and so does the work folder when the stack made it.

Over 300 lines because starting the parts in order, granting users and stopping everything on
every path out (SIGKILL included, through the watchdog) is one sequence, read top to bottom.
"""

from __future__ import annotations

import contextlib
import logging
import secrets
import shlex
import shutil
import signal
import sys
import tempfile
import time
from pathlib import Path
from types import TracebackType
from typing import TypeVar

from mnist_vae import procs
from mnist_vae.stack import postgres
from mnist_vae.stack.mlflow_server import AUTH_DB, TRACKING_DB, MlflowServer, PermissionName, ResourceType
from mnist_vae.stack.postgres import PG_BIN, Postgres
from mnist_vae.stack.s3 import FAKE_AWS, S3, s3_client
from mnist_vae.stack.server import Part, Server, Site, check_requirements, http_url, log_path

log = logging.getLogger(__name__)

PARTS: tuple[Part, ...] = ("postgres", "s3", "mlflow")
_S = TypeVar("_S", bound=Server)


class Stack:
    """PostgreSQL, S3 (moto) and an MLflow server with basic auth, for as long as the ``with`` block runs.

    Example::

        with Stack(tmp_path) as stack:
            env = stack.env()                # MLFLOW_TRACKING_URI, admin credentials, S3 endpoint...
            stack.part("postgres").kill()    # a fault...
            stack.part("postgres").start()   # ...and the recovery

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
        self._groups: set[int] = set()
        self._watchdog: procs.Watchdog | None = None
        self._postgres: Postgres | None = None
        self._s3: S3 | None = None
        self._mlflow: MlflowServer | None = None

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
        assert not self._servers(), "the stack is already running"
        postgres.check_installed(self.pg_bin)
        check_requirements((Postgres, S3, MlflowServer))
        postgres.check_libpq()
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
            site = Site(
                workdir=self.workdir,
                private=self._private,
                watchdog=self._watchdog,
                remove=(self._private, self.workdir) if self._own_workdir else (self._private,),
                start_timeout=self.start_timeout,
                secrets=(self.admin_password, self._pg_password, self._flask_secret_key),
                groups=self._groups,
            )
            self._postgres = Postgres(
                site, self.pg_port, bin_dir=self.pg_bin, user=self.pg_user, password=self._pg_password
            )
            self._s3 = S3(site, self.s3_port, bucket=self.bucket)
            self._mlflow = MlflowServer(
                site,
                self.mlflow_port,
                pg_port=self.pg_port,
                database_password=self._pg_password,
                s3_endpoint_url=self.s3_endpoint_url,
                bucket=self.bucket,
                admin_username=self.admin_username,
                admin_password=self.admin_password,
                flask_secret_key=self._flask_secret_key,
                default_permission=self.default_permission,
            )
            self._postgres.init()
            self._postgres.start()
            self._postgres.create_role(databases=(TRACKING_DB, AUTH_DB))
            self._s3.start()
            self._mlflow.write_auth_config()
            self._mlflow.start()
        except BaseException:
            try:
                self.stop()
            except Exception as exc:  # the failure that got us here is the one to report
                log.warning("stopping the stack after a failed start failed too: %s", exc)
            raise
        log.info(
            "team stack up: MLflow %s, S3 %s, PostgreSQL port %d",
            self.tracking_uri,
            self.s3_endpoint_url,
            self.pg_port,
        )

    def stop(self) -> None:
        """Stops every part (MLflow first) and removes the temporary folders; safe to call twice.

        Every part is stopped even when stopping one fails; the first failure is raised at the end
        (the others are logged).
        """
        errors: list[Exception] = []
        for server in reversed(self._servers()):
            try:
                server.halt("graceful")
            except Exception as exc:  # collected: the other parts must stop all the same
                log.warning("stopping %s failed: %s", server.name, exc)
                errors.append(exc)
        self._postgres = self._s3 = self._mlflow = None
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
        return all(self.is_running(part) for part in PARTS)

    def is_running(self, part: Part) -> bool:
        """Whether ``part``'s leader process is alive (not whether it answers yet)."""
        return any(server.name == part and server.running for server in self._servers())

    def check(self) -> None:
        """Raises :class:`StackError` naming the log of the first part that exited on its own."""
        for server in self._servers():
            server.check()

    def pause(self, part: Part) -> None:
        """Freezes every process of ``part`` (SIGSTOP): it accepts connections but never answers, as
        behind a network partition, and keeps its state (moto's objects survive, unlike a restart)."""
        self.part(part).pause()

    def resume(self, part: Part) -> None:
        """Lets a paused part run again (SIGCONT)."""
        self.part(part).resume()

    @property
    def pids(self) -> dict[Part, int]:
        """The leader process id of each running part (also its process group id)."""
        return {server.name: server.pid for server in self._servers() if server.pid is not None}

    @property
    def process_groups(self) -> frozenset[int]:
        """Every process group this stack ever started, for a check that none is left."""
        return frozenset(self._groups)

    @property
    def logs(self) -> dict[Part, Path]:
        """Each part's log file in the work folder."""
        assert self.workdir is not None, "the stack was never started"
        return {part: log_path(self.workdir, part) for part in PARTS}

    @property
    def private_dir(self) -> Path | None:
        """The temporary folder with PostgreSQL's data and socket, while the stack runs."""
        return self._private

    # ----------------------------------------------------------------------------------------------
    # What a client needs

    @property
    def tracking_uri(self) -> str:
        return http_url(self.mlflow_port)

    @property
    def s3_endpoint_url(self) -> str:
        return http_url(self.s3_port)

    @property
    def database_password(self) -> str:
        """The password of the PostgreSQL role ``mlflow`` (over TCP, port :attr:`pg_port`)."""
        return self._pg_password

    def create_database(self, name: str) -> str:
        """Creates a database owned by the role ``mlflow`` (e.g. for an Optuna study) and returns its
        SQLAlchemy URL, without the password: a client gives it in ``PGPASSWORD``
        (:attr:`database_password`), which libpq reads."""
        return _started(self._postgres).create_database(name)

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
        return s3_client(self.s3_endpoint_url)

    def create_user(self, username: str, password: str | None = None) -> str:
        """Creates an MLflow user and returns its password (see :meth:`MlflowServer.create_user`)."""
        return _started(self._mlflow).create_user(username, password)

    def grant(
        self, username: str, resource_type: ResourceType, resource_id: str, permission: PermissionName
    ) -> None:
        """Grants ``username`` a permission on one resource (see :meth:`MlflowServer.grant`)."""
        _started(self._mlflow).grant(username, resource_type, resource_id, permission)

    # ----------------------------------------------------------------------------------------------
    # One part: faults and recoveries

    def part(self, name: Part) -> Server:
        """One part of the running stack, to start, stop, kill, restart, pause or resume on its own."""
        return _started({"postgres": self._postgres, "s3": self._s3, "mlflow": self._mlflow}[name])

    def _servers(self) -> list[Server]:
        """The parts, in start order, from the stack's start to its stop."""
        return [server for server in (self._postgres, self._s3, self._mlflow) if server is not None]


def _started(server: _S | None) -> _S:
    assert server is not None, "the stack is not running"
    return server


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

    stopping = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)
    with procs.signals_raise(lambda signum: KeyboardInterrupt(), *stopping):
        stack = Stack(workdir)
        try:
            stack.start()
            for name, value in stack.env().items():
                print(f"export {name}={shlex.quote(value)}")
            sys.stdout.flush()
            print(
                f"team stack up: MLflow {stack.tracking_uri} (user {stack.admin_username}), "
                f"S3 {stack.s3_endpoint_url} bucket {stack.bucket}; logs in {stack.workdir}"
                f"{' (removed at exit)' if workdir is None else ''}; Ctrl-C stops it",
                file=sys.stderr,
                flush=True,
            )
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
            stack.stop()
