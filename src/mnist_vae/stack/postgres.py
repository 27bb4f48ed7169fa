"""The stack's PostgreSQL 15: a private cluster in a temporary folder, run as an unprivileged account
when this process is root.

Its data and unix socket sit in the stack's private folder, outside the work folder: PostgreSQL's
account must be able to reach it and a unix socket path is limited to 107 bytes. Local (socket) logins
are trusted, as the socket's folder is open only to that account and root; TCP logins on 127.0.0.1
need the password of the role ``mlflow``, which owns the databases clients use. It is stopped with
``pg_ctl stop``, by the stack and by the watchdog alike, and killed with its backends, which lead
process groups of their own.
"""

from __future__ import annotations

import os
import pwd
import signal
import subprocess
from collections.abc import Sequence
from pathlib import Path
from typing import Literal

from mnist_vae import procs
from mnist_vae.stack.server import TEAM_EXTRA, How, Server, Site, StackError

PG_BIN = Path("/usr/lib/postgresql/15/bin")
PG_SUPERUSER = "postgres"
DB_ROLE = "mlflow"

StopMode = Literal["fast", "immediate"]


def check_installed(bin_dir: Path) -> None:
    """Raises :class:`StackError` unless PostgreSQL 15's programs are in ``bin_dir``."""
    for tool in ("initdb", "postgres", "pg_ctl"):
        if not os.access(bin_dir / tool, os.X_OK):
            raise StackError(
                f"PostgreSQL 15 is not installed: {bin_dir / tool} is missing; "
                "install the Debian package postgresql-15 (apt-get install postgresql-15)"
            )


def check_libpq() -> None:
    """Raises :class:`StackError` unless psycopg finds libpq (the binary wheel's or the system's)."""
    try:
        import psycopg  # noqa: F401
    except ImportError as exc:
        raise StackError(
            f"psycopg cannot load libpq ({exc}); install the team extra, which brings "
            f"psycopg[binary]: {TEAM_EXTRA}"
        ) from None


def database_uri(port: int, database: str) -> str:
    """The SQLAlchemy URL of ``database`` as the role ``mlflow``, without its password."""
    # No password in the URI: libpq reads it from PGPASSWORD in the client's environment, so it
    # appears neither in `ps` nor in anything that prints the URI.
    return f"postgresql+psycopg://{DB_ROLE}@{procs.HOST}:{port}/{database}"


class Postgres(Server):
    """PostgreSQL 15 on ``port`` of 127.0.0.1, its cluster in the site's private folder.

    Args:
        site: The running stack's folders and watchdog.
        port: Its TCP port.
        bin_dir: The folder holding PostgreSQL 15's ``initdb``, ``postgres`` and ``pg_ctl``.
        user: The unprivileged account it runs as when this process is root (it refuses to run as
            root).
        password: The password of the role ``mlflow``.

    Raises:
        StackError: This process is root and ``user`` does not exist.
    """

    name = "postgres"
    requires = (("psycopg", "psycopg[binary]"),)
    workers_lead_groups = True

    def __init__(self, site: Site, port: int, *, bin_dir: Path, user: str, password: str) -> None:
        super().__init__(site, port)
        self.bin_dir = bin_dir
        self.password = password
        self.data = site.private / "data"
        self.socket_dir = site.private / "socket"
        self._account = _account(user)
        self._uid = self._account.pw_uid if self._account is not None else None
        self._gid = self._account.pw_gid if self._account is not None else None

    def init(self) -> None:
        """Creates the cluster (``initdb``), owned by the account it runs as.

        Raises:
            StackError: ``initdb`` failed.
        """
        self.socket_dir.mkdir()
        if self._account is not None:
            for path in (self.site.private, self.socket_dir):
                os.chown(path, self._account.pw_uid, self._account.pw_gid)
        # Local (socket) logins need no password: the socket sits in a folder only PostgreSQL's
        # account and root can enter. TCP logins need the role's password.
        argv = [
            str(self.bin_dir / "initdb"), "-D", str(self.data), "-U", PG_SUPERUSER,
            "--auth-local=trust", "--auth-host=scram-sha-256", "--encoding=UTF8", "--locale=C",
            "--no-sync", "--no-instructions",
        ]  # fmt: skip
        with self.site.log_file(self.name, "initdb") as out:
            result = subprocess.run(
                argv,
                stdin=subprocess.DEVNULL,
                stdout=out,
                stderr=subprocess.STDOUT,
                env=self._env(),
                timeout=120,
                **procs.run_as(self._uid, self._gid),
            )
        if result.returncode != 0:
            raise StackError(f"initdb failed with code {result.returncode}; {self.site.log_tail(self.name)}")

    def start(self) -> None:
        """Starts PostgreSQL on its port (after a kill, it recovers from its write-ahead log first).

        Raises:
            StackError: It exited or did not accept connections within the start timeout.
        """
        argv = [
            str(self.bin_dir / "postgres"), "-D", str(self.data), "-p", str(self.port),
            "-c", f"listen_addresses={procs.HOST}",
            "-c", f"unix_socket_directories={self.socket_dir}",
            # The data is thrown away with the stack: no need to survive a power cut.
            "-c", "fsync=off",
        ]  # fmt: skip
        self._spawn(argv, self._env(), uid=self._uid, gid=self._gid, stop=self._pg_ctl_stop("fast"))
        self._wait(self._answers, "accept connections")

    def stop(self, mode: StopMode = "fast") -> None:
        """Stops PostgreSQL with ``pg_ctl stop -m MODE``: ``fast`` rolls back open transactions and
        closes sessions cleanly; ``immediate`` aborts, like a crash (recovery at the next start).

        Raises:
            StackError: ``pg_ctl`` failed; the postmaster's group was stopped all the same, by
                SIGTERM, then SIGKILL for what was left after the grace period.
        """
        self.halt(mode)

    def kill(self) -> None:
        """SIGKILLs the postmaster and all its backends, as an out-of-memory killer would."""
        self.halt("kill")

    def restart(self, mode: StopMode = "fast") -> None:
        """``pg_ctl stop -m MODE``, then a new postmaster, this stack's child (``pg_ctl restart``
        would detach it, and its exit would go unnoticed)."""
        self.stop(mode)
        self.start()

    def create_role(self, databases: Sequence[str]) -> None:
        """Creates the login role ``mlflow`` with its password, and ``databases``, which it owns."""
        from psycopg import sql

        with self._connect_superuser() as conn:
            # The password goes in as a SCRAM verifier computed here, as psql's \password does, so
            # the server never sees it and cannot log it (e.g. in an error statement).
            verifier = conn.pgconn.encrypt_password(
                self.password.encode(), DB_ROLE.encode(), b"scram-sha-256"
            ).decode()
            conn.execute(
                sql.SQL("CREATE ROLE {} LOGIN PASSWORD {}").format(
                    sql.Identifier(DB_ROLE), sql.Literal(verifier)
                )
            )
            for database in databases:
                _create_database(conn, database)

    def create_database(self, name: str) -> str:
        """Creates a database owned by the role ``mlflow`` and returns its URL, without the password."""
        with self._connect_superuser() as conn:
            _create_database(conn, name)
        return database_uri(self.port, name)

    def _connect_superuser(self, timeout: float = 2.0):  # -> psycopg.Connection
        import psycopg

        return psycopg.connect(
            host=str(self.socket_dir),
            port=self.port,
            user=PG_SUPERUSER,
            dbname="postgres",
            connect_timeout=max(1, round(timeout)),
            autocommit=True,
        )

    def _answers(self) -> bool:
        import psycopg

        try:
            with self._connect_superuser():
                return True
        except psycopg.OperationalError:
            return False

    def _env(self) -> dict[str, str]:
        return {
            "PATH": os.environ.get("PATH", "/usr/bin:/bin"),
            "LC_ALL": "C",
            "HOME": str(self.site.private),
            "TZ": "UTC",
        }

    def _pg_ctl_stop(self, mode: StopMode) -> list[str]:
        return [str(self.bin_dir / "pg_ctl"), "stop", "-D", str(self.data), "-m", mode, "-w", "-t", "30"]

    def _ask_to_stop(self, popen: subprocess.Popen[bytes], how: How) -> str | None:
        procs.signal_group(popen.pid, signal.SIGCONT)  # a paused postmaster cannot answer pg_ctl
        # pg_ctl waits for the postmaster only; its last backends may take a moment more, which
        # the stop by signals that follows waits for.
        return self._run_pg_ctl_stop("immediate" if how == "immediate" else "fast", popen)

    def _run_pg_ctl_stop(self, mode: StopMode, popen: subprocess.Popen[bytes]) -> str | None:
        """Runs ``pg_ctl stop -m MODE``; returns what went wrong, or None."""
        if popen.poll() is not None:
            return None  # it exited on its own: nothing for pg_ctl to stop
        with self.site.log_file(self.name, f"pg_ctl stop -m {mode}") as out:
            try:
                result = subprocess.run(
                    self._pg_ctl_stop(mode),
                    stdin=subprocess.DEVNULL,
                    stdout=out,
                    stderr=subprocess.STDOUT,
                    env=self._env(),
                    timeout=60,
                    check=False,
                    **procs.run_as(self._uid, self._gid),
                )
            except (OSError, subprocess.TimeoutExpired) as exc:
                return f"pg_ctl stop -m {mode} failed ({exc}); PostgreSQL was stopped by signals instead"
        if result.returncode != 0 and popen.poll() is None:
            return (
                f"pg_ctl stop -m {mode} failed with code {result.returncode}; PostgreSQL was "
                f"stopped by signals instead; {self.site.log_tail(self.name)}"
            )
        return None


def _create_database(conn, name: str) -> None:  # conn: psycopg.Connection
    from psycopg import sql

    conn.execute(sql.SQL("CREATE DATABASE {} OWNER {}").format(sql.Identifier(name), sql.Identifier(DB_ROLE)))


def _account(user: str) -> pwd.struct_passwd | None:
    """The account PostgreSQL runs as: ``user`` when we are root, else ourselves (``None``)."""
    if os.geteuid() != 0:
        return None
    try:
        return pwd.getpwnam(user)
    except KeyError:
        raise StackError(
            f"PostgreSQL refuses to run as root and the account {user!r} "
            "does not exist; pass pg_user= an unprivileged account"
        ) from None
