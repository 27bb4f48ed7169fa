"""Server processes that never outlive the process that started them.

Every server the project starts (the team stack's PostgreSQL, moto and MLflow; serve-bench's
``mlflow models serve``; the tests' servers) runs in a process group of its own, so that stopping it
stops its workers too, and is registered with a :class:`Watchdog`: a small helper process, in a
session of its own, that stops every registered group once its parent is gone, however the parent
ended (SIGKILL and a closed terminal included).

Why a watchdog rather than ``prctl(PR_SET_PDEATHSIG)`` on each server: the death signal reaches only
the process it is set on, while ``mlflow server`` and ``mlflow models serve`` start uvicorn workers of
their own, and PostgreSQL's postmaster shuts its backends down cleanly only when asked as
``pg_ctl stop`` does. It also fires when the *thread* that started the child ends, not the process.
The watchdog instead reads a pipe from its parent: the kernel closes it when the parent dies, for any
reason, and the watchdog then runs each group's stop command (``pg_ctl stop -m fast`` for
PostgreSQL), SIGTERMs the rest and SIGKILLs whatever is left after a grace period.

Over 300 lines because the process groups and the watchdog that stops them are one mechanism:
split, neither half would say why the other exists.
"""

from __future__ import annotations

import contextlib
import json
import os
import select
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import IO, Any

HOST = "127.0.0.1"
GRACE_SECONDS = 15.0


def free_ports(count: int) -> list[int]:
    """``count`` distinct ports free on 127.0.0.1 now (held open together so they differ)."""
    with contextlib.ExitStack() as stack:
        sockets = [stack.enter_context(socket.socket()) for _ in range(count)]
        for sock in sockets:
            sock.bind((HOST, 0))
        return [sock.getsockname()[1] for sock in sockets]


def free_port() -> int:
    """A port free on 127.0.0.1 now."""
    return free_ports(1)[0]


def _live_processes() -> list[tuple[int, int, int]]:
    """``(pid, parent pid, process group)`` of every live process; zombies do not count."""
    found = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            # The command name (field 2) may hold spaces and parentheses: split after the last ")".
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except (FileNotFoundError, ProcessLookupError, IndexError):
            continue
        if fields[0] != "Z":
            found.append((int(stat.parent.name), int(fields[1]), int(fields[2])))
    return found


def group_members(pgid: int) -> list[int]:
    """The live processes of process group ``pgid``; zombies (dead, not yet reaped) do not count."""
    return [pid for pid, _, group in _live_processes() if group == pgid]


def children(pid: int) -> list[int]:
    """The live child processes of ``pid`` (zombies do not count)."""
    return [child for child, parent, _ in _live_processes() if parent == pid]


def group_alive(pgid: int) -> bool:
    """Whether any live process is left in process group ``pgid``."""
    if not Path("/proc/self/stat").exists():  # not Linux: zombies count as alive there
        try:
            os.killpg(pgid, 0)
        except ProcessLookupError:
            return False
        return True
    return bool(group_members(pgid))


def signal_group(pgid: int, sig: signal.Signals) -> None:
    """Sends ``sig`` to every process of group ``pgid``; a group already gone is no error."""
    with contextlib.suppress(ProcessLookupError):
        os.killpg(pgid, sig)


def wait_group(pgid: int, timeout: float, leader: subprocess.Popen | None = None) -> bool:
    """Waits until no live process is left in group ``pgid`` (reaping ``leader`` if it is our child);
    ``False`` on timeout."""
    deadline = time.monotonic() + timeout
    while True:
        if leader is not None:
            leader.poll()
        if not group_alive(pgid):
            return True
        if time.monotonic() > deadline:
            return False
        time.sleep(0.05)


def stop_group(
    pgid: int,
    leader: subprocess.Popen | None = None,
    grace: float = GRACE_SECONDS,
    first: signal.Signals = signal.SIGTERM,
) -> bool:
    """Sends ``first`` to group ``pgid`` (resuming it, should it be paused), then SIGKILL to what is
    left after ``grace`` seconds; returns whether it stopped without the SIGKILL."""
    signal_group(pgid, first)
    signal_group(pgid, signal.SIGCONT)  # a stopped process handles its signal only once resumed
    if wait_group(pgid, grace, leader):
        clean = True
    else:
        clean = False
        signal_group(pgid, signal.SIGKILL)
        wait_group(pgid, 10.0, leader)
    if leader is not None:
        with contextlib.suppress(subprocess.TimeoutExpired):
            leader.wait(timeout=5)
    return clean


def kill_group(
    pgid: int, leader: subprocess.Popen | None = None, *, children_first: bool = False, timeout: float = 10.0
) -> bool:
    """SIGKILLs group ``pgid`` and waits up to ``timeout`` for it to go, reaping ``leader``; returns
    whether the group was gone in time. ``children_first``: the leader's children are killed first
    and waited for too, for a server whose workers lead groups of their own (PostgreSQL's backends,
    which would otherwise keep its shared memory and make the next postmaster refuse to start)."""
    orphans = children(pgid) if children_first else []
    for pid in orphans:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)
    signal_group(pgid, signal.SIGKILL)
    clean = wait_group(pgid, timeout, leader)
    for pid in orphans:
        wait_group(pid, timeout)
    if leader is not None:
        # A killed leader left a zombie still "owns" what it held (a postmaster its postmaster.pid).
        with contextlib.suppress(subprocess.TimeoutExpired):
            leader.wait(timeout=timeout)
    return clean


def run_as(uid: int | None, gid: int | None = None) -> dict[str, Any]:
    """The ``subprocess`` arguments that run a child as ``uid``:``gid`` with no supplementary groups;
    none (the child runs as this process) when ``uid`` is None."""
    if uid is None:
        return {}
    return {"user": uid, "group": gid, "extra_groups": []}


def start(
    argv: Sequence[str],
    *,
    log: IO[bytes] | int | None = subprocess.DEVNULL,
    env: dict[str, str] | None = None,
    cwd: Path | None = None,
    watchdog: Watchdog | None = None,
    stop: Sequence[str] | None = None,
    uid: int | None = None,
    gid: int | None = None,
    remove: Sequence[Path] = (),
    **popen: Any,
) -> subprocess.Popen[bytes]:
    """Starts ``argv`` (as ``uid``:``gid``, if given) as the leader of a new process group (and
    session), its output to ``log``, and registers the group with ``watchdog``, which stops it
    should this process die first (see :meth:`Watchdog.watch` for ``stop`` and ``remove``)."""
    process = subprocess.Popen(
        list(argv),
        stdin=subprocess.DEVNULL,
        stdout=log,
        stderr=subprocess.STDOUT,
        env=env,
        cwd=cwd,
        start_new_session=True,
        **run_as(uid, gid),
        **popen,
    )
    if watchdog is not None:
        watchdog.watch(process.pid, stop, uid=uid, gid=gid, remove=remove)
    return process


class Watchdog:
    """A helper process that stops the registered process groups once this process is gone.

    Use it as a context manager; :meth:`close` (the end of the ``with`` block) makes it stop
    whatever is still registered and waits for it to finish. Its messages go to ``log``.

    Example::

        with Watchdog() as watchdog:
            server = start(["mlflow", "models", "serve", ...], watchdog=watchdog)
            ...
            stop_group(server.pid, server)
            watchdog.forget(server.pid)
    """

    def __init__(self, log: IO[bytes] | int | None = subprocess.DEVNULL) -> None:
        read, write = os.pipe()  # both ends non-inheritable: no server holds the write end open
        try:
            self._process = subprocess.Popen(
                [sys.executable, "-m", "mnist_vae.procs", str(os.getpid())],
                stdin=read,
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
        finally:
            os.close(read)
        self._pipe: IO[str] | None = os.fdopen(write, "w", buffering=1)

    @property
    def pid(self) -> int:
        return self._process.pid

    def watch(
        self,
        pgid: int,
        stop: Sequence[str] | None = None,
        *,
        uid: int | None = None,
        gid: int | None = None,
        remove: Sequence[Path] = (),
    ) -> None:
        """Registers group ``pgid``: should this process die, the watchdog runs ``stop`` (as
        ``uid``/``gid``; e.g. ``pg_ctl stop``) or sends SIGTERM, SIGKILLs what is left after a
        grace period, then removes the ``remove`` folders."""
        self._send(
            {
                "watch": pgid,
                "stop": list(stop) if stop else None,
                "uid": uid,
                "gid": gid,
                "remove": [str(path) for path in remove],
            }
        )

    def forget(self, pgid: int) -> None:
        """Unregisters a group this process stopped itself."""
        self._send({"forget": pgid})

    def close(self, timeout: float = 60.0) -> None:
        """Lets the watchdog stop what is still registered, and waits for it; safe to call twice."""
        if self._pipe is None:
            return
        self._pipe.close()
        self._pipe = None
        try:
            self._process.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            self._process.kill()
            self._process.wait()

    def __enter__(self) -> Watchdog:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def _send(self, message: dict[str, Any]) -> None:
        assert self._pipe is not None, "the watchdog was closed"
        self._pipe.write(json.dumps(message) + "\n")


def _stop_watched(pgid: int, spec: dict[str, Any]) -> None:
    """Stops one group for a parent that died: its stop command first, then SIGTERM, then SIGKILL."""
    if not group_alive(pgid):
        return
    if spec["stop"]:
        try:
            subprocess.run(
                spec["stop"],
                stdin=subprocess.DEVNULL,
                timeout=GRACE_SECONDS,
                check=False,
                **run_as(spec["uid"], spec["gid"]),
            )
        except (OSError, subprocess.TimeoutExpired) as exc:
            print(f"watchdog: {spec['stop'][0]} failed: {exc}", file=sys.stderr, flush=True)
    if stop_group(pgid):
        print(f"watchdog: stopped process group {pgid}", file=sys.stderr, flush=True)
    else:
        print(f"watchdog: killed process group {pgid} after {GRACE_SECONDS:g} s", file=sys.stderr, flush=True)


def _watch(parent: int) -> None:
    """The watchdog's loop: registrations arrive on stdin; EOF (or a new parent) means stop them all."""
    # In a session of its own no terminal signal reaches it; a stray Ctrl-C must not either.
    for sig in (signal.SIGINT, signal.SIGHUP):
        signal.signal(sig, signal.SIG_IGN)
    watched: dict[int, dict[str, Any]] = {}
    buffer = b""
    while True:
        ready, _, _ = select.select([0], [], [], 1.0)
        if not ready:
            # A fork of the parent may hold the pipe open: check the parent too, but only once
            # the pipe is drained, or a registration sent just before the parent died is lost.
            if os.getppid() != parent:
                break
            continue
        chunk = os.read(0, 65536)
        if not chunk:
            break
        buffer += chunk
        *lines, buffer = buffer.split(b"\n")
        for line in lines:
            message = json.loads(line)
            if "watch" in message:
                watched[message["watch"]] = message
            else:
                watched.pop(message["forget"], None)
    for pgid, spec in watched.items():
        _stop_watched(pgid, spec)
    for spec in watched.values():
        for path in spec["remove"]:
            shutil.rmtree(path, ignore_errors=True)


if __name__ == "__main__":
    _watch(int(sys.argv[1]))


@contextlib.contextmanager
def signals_raise(error: Callable[[int], BaseException], *signals: signal.Signals) -> Iterator[None]:
    """While the block runs, each of ``signals`` raises ``error(signum)`` where the main thread is,
    so that the ``finally`` and ``except`` clauses of the block run as for Ctrl-C; the previous
    handlers come back at its end. Off the main thread, where Python cannot set handlers, signals
    are left alone.

    A stopped training (SIGTERM as KeyboardInterrupt), a benchmark that stops its servers (SIGTERM
    as SystemExit) and the team stack run for a person (SIGINT, SIGTERM and SIGHUP) use it.
    """
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def handler(signum: int, frame: object) -> None:
        raise error(signum)

    # All set explicitly: a process started in the background by a shell inherits SIGINT ignored.
    previous = {sig: signal.signal(sig, handler) for sig in signals}
    try:
        yield
    finally:
        for sig, old in previous.items():
            signal.signal(sig, old)
