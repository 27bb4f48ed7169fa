"""What the parts of the team stack share: a server process with a log, started, watched and stopped alike.

A part (:class:`Server`) runs one server as the leader of a process group of its own, started with
:func:`mnist_vae.procs.start` and registered with the stack's watchdog; its output and a line for
each start and stop go to ``PART.log`` in the work folder. The parts of one running stack share a
:class:`Site`: the folders, the watchdog, the start timeout and the secrets that must never show in
an error message.
"""

from __future__ import annotations

import contextlib
import importlib.util
import logging
import os
import signal
import subprocess
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import IO, ClassVar, Literal

from mnist_vae import procs
from mnist_vae.errors import UserError

log = logging.getLogger(__name__)

Part = Literal["postgres", "s3", "mlflow"]
# How a part stops: "graceful" is its own clean shutdown; PostgreSQL also knows pg_ctl's "fast" and
# "immediate" modes; "kill" is SIGKILL to the whole group, as a crash would.
How = Literal["graceful", "fast", "immediate", "kill"]

TEAM_EXTRA = "pip install -e '.[team]'"
LOG_TAIL_LINES = 15
STOP_GRACE = 30.0


class StackError(UserError):
    """A part of the team stack is missing, did not come up, or refused a request."""


def http_url(port: int) -> str:
    return f"http://{procs.HOST}:{port}"


def log_path(workdir: Path, part: Part) -> Path:
    """Where ``part`` writes its log in the work folder."""
    return workdir / f"{part}.log"


def child_env() -> dict[str, str]:
    """This process's environment without the settings that would point a part somewhere else."""
    return {
        key: value for key, value in os.environ.items() if not key.startswith(("MLFLOW_", "AWS_", "PG"))
    } | {"PYTHONUNBUFFERED": "1"}


def check_requirements(parts: Iterable[type[Server]]) -> None:
    """Raises :class:`StackError` naming the first Python module ``parts`` need that is missing."""
    for part in parts:
        for module, requirement in part.requires:
            if importlib.util.find_spec(module) is None:
                raise StackError(
                    f"{requirement} is not installed (module {module} is missing); "
                    f"install the team extra: {TEAM_EXTRA}"
                )


@dataclass(frozen=True)
class Site:
    """Where the parts of one running stack live, and what they share.

    Attributes:
        workdir: The logs and the auth config.
        private: PostgreSQL's data and socket; removed with the stack.
        watchdog: Stops every part should this process die.
        remove: The folders the watchdog removes after it stopped the parts.
        start_timeout: Seconds each part may take to answer after it is started.
        secrets: Passwords and keys, replaced by ``***`` in every log tail an error quotes.
        groups: Every process group started, for a check that none is left.
    """

    workdir: Path
    private: Path
    watchdog: procs.Watchdog
    remove: tuple[Path, ...]
    start_timeout: float
    secrets: tuple[str, ...]
    groups: set[int]

    @contextlib.contextmanager
    def log_file(self, part: Part, what: str) -> Iterator[IO[bytes]]:
        """``part``'s log, open for appending after a line that says ``what`` happens now."""
        with log_path(self.workdir, part).open("ab") as out:
            out.write(f"--- {time.strftime('%Y-%m-%d %H:%M:%S')} mnist-vae stack: {what}\n".encode())
            out.flush()
            yield out

    def log_tail(self, part: Part) -> str:
        """Where ``part``'s log is and its last lines, without any secret."""
        path = log_path(self.workdir, part)
        try:
            lines = path.read_text(errors="replace").splitlines()[-LOG_TAIL_LINES:]
        except FileNotFoundError:
            return f"no log at {path}"
        tail = " | ".join(line.strip() for line in lines if line.strip())
        for secret in self.secrets:
            tail = tail.replace(secret, "***")
        return f"see {path}; last lines: {tail}"


class Server:
    """One part of the stack: a server on ``port`` of 127.0.0.1, which can be started, stopped,
    killed, paused and started again while the others run.

    A subclass sets :attr:`name` and :attr:`requires` and implements :meth:`start` with
    :meth:`_spawn` and :meth:`_wait`.
    """

    name: ClassVar[Part]
    #: The Python modules it needs, each with the requirement that brings it.
    requires: ClassVar[tuple[tuple[str, str], ...]] = ()
    #: Whether its workers lead process groups of their own, so that a kill must find them by parent.
    workers_lead_groups: ClassVar[bool] = False

    def __init__(self, site: Site, port: int) -> None:
        self.site = site
        self.port = port
        self._popen: subprocess.Popen[bytes] | None = None

    @property
    def log_path(self) -> Path:
        return log_path(self.site.workdir, self.name)

    @property
    def pid(self) -> int | None:
        """The leader process id (also its process group id), from its start until it is stopped."""
        return self._popen.pid if self._popen is not None else None

    @property
    def running(self) -> bool:
        """Whether the leader process is alive (not whether it answers yet)."""
        return self._popen is not None and self._popen.poll() is None

    def start(self) -> None:
        """Starts the server and returns once it answers.

        Raises:
            StackError: It exited or did not answer within the start timeout.
        """
        raise NotImplementedError

    def stop(self) -> None:
        """Stops the server (SIGTERM to its group; SIGKILL to what is left after 30 s)."""
        self.halt("graceful")

    def kill(self) -> None:
        """SIGKILLs the server and its workers, as a crash would."""
        self.halt("kill")

    def restart(self) -> None:
        self.stop()
        self.start()

    def pause(self) -> None:
        """Freezes every process of the server (SIGSTOP): it accepts connections but never answers, as
        behind a network partition, and keeps its state (moto's objects survive, unlike a restart)."""
        assert self._popen is not None, f"{self.name} is not running"
        procs.signal_group(self._popen.pid, signal.SIGSTOP)

    def resume(self) -> None:
        """Lets a paused server run again (SIGCONT)."""
        assert self._popen is not None, f"{self.name} is not running"
        procs.signal_group(self._popen.pid, signal.SIGCONT)

    def check(self) -> None:
        """Raises :class:`StackError` naming the log, should the server have exited on its own."""
        code = self._popen.poll() if self._popen is not None else None
        if code is not None:
            raise StackError(f"{self.name} exited with code {code}; {self.site.log_tail(self.name)}")

    def halt(self, how: How) -> None:
        """Stops the server as ``how`` says, unregisters it from the watchdog and notes it in its log;
        nothing to do if it is not running.

        Raises:
            StackError: Its own stop command failed; its group was stopped by signals all the same.
        """
        popen, self._popen = self._popen, None
        if popen is None:
            return
        error = None
        if how == "kill":
            clean = procs.kill_group(popen.pid, popen, children_first=self.workers_lead_groups)
        else:
            error = self._ask_to_stop(popen, how)
            clean = procs.stop_group(popen.pid, popen, grace=STOP_GRACE)
        if not clean:
            log.warning("%s did not stop within %g s; killed it", self.name, STOP_GRACE)
        self.site.watchdog.forget(popen.pid)
        with self.site.log_file(self.name, f"{self.name} stopped ({how}), exit code {popen.returncode}"):
            pass
        log.info("stopped %s (%s)", self.name, how)
        if error is not None:
            raise StackError(error)

    def _ask_to_stop(self, popen: subprocess.Popen[bytes], how: How) -> str | None:
        """Runs the server's own stop command before the signals, if it has one; returns what went
        wrong, or None."""
        return None

    def _spawn(
        self,
        argv: list[str],
        env: dict[str, str],
        *,
        uid: int | None = None,
        gid: int | None = None,
        cwd: Path | None = None,
        stop: Sequence[str] | None = None,
    ) -> None:
        """Starts ``argv`` (as ``uid``:``gid``, if given) in a group of its own watched by the
        watchdog, which runs ``stop`` (as the same account) first should this process die."""
        assert not self.running, f"{self.name} is already running"
        with self.site.log_file(self.name, f"starting {self.name}") as out:
            self._popen = procs.start(
                argv,
                log=out,
                env=env,
                cwd=cwd,
                watchdog=self.site.watchdog,
                stop=stop,
                uid=uid,
                gid=gid,
                remove=self.site.remove,
            )
        self.site.groups.add(self._popen.pid)
        log.info("started %s (pid %d), log %s", self.name, self._popen.pid, self.log_path)

    def _wait(self, answers: Callable[[], bool], what: str) -> None:
        """Returns once ``answers()`` is true; raises :class:`StackError` should the server exit or
        not ``what`` within the start timeout."""
        assert self._popen is not None, f"{self.name} was not started"
        deadline = time.monotonic() + self.site.start_timeout
        while not answers():
            code = self._popen.poll()
            if code is not None:
                raise StackError(
                    f"{self.name} exited with code {code} before it could {what}; "
                    f"{self.site.log_tail(self.name)}"
                )
            if time.monotonic() > deadline:
                raise StackError(
                    f"{self.name} did not {what} within {self.site.start_timeout:g} s; "
                    f"{self.site.log_tail(self.name)}"
                )
            time.sleep(0.2)
