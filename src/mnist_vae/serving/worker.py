"""Settings of a process of ``mlflow models serve`` that runs this project's model: its torch threads
and TCP_NODELAY on the connections it accepts (:func:`tune`, called when the model loads)."""

from __future__ import annotations

import os
import re
import socket
import sys
from pathlib import Path

import torch

from mnist_vae.errors import UserError

# torch threads of each serving process; default: the cores divided among the server's workers.
THREADS_ENV = "MNIST_VAE_SERVE_THREADS"


class ServingConfigError(UserError, ValueError):
    """The serving process's environment holds a setting it cannot use."""


def server_workers() -> int | None:
    """``--workers`` of the uvicorn that runs MLflow's scoring server in this process, else None.

    With one worker uvicorn serves in its own process; with more, each worker is a child of the
    uvicorn supervisor. MLflow always passes ``--workers N``.
    """
    for pid in ("self", str(os.getppid())):
        try:
            args = Path(f"/proc/{pid}/cmdline").read_bytes().decode(errors="replace").split("\0")
        except OSError:  # not Linux, or the parent is gone
            return None
        if len(args) > 1 and any(Path(a).name == "uvicorn" for a in args[:2]):
            match = re.search(r"--workers[= ](\d+)", " ".join(args))
            return int(match.group(1)) if match else 1
    return None


def tune(workers: int) -> None:
    """Per-worker settings of a serving process.

    Threads: torch uses every core by default, so with two workers on two cores each request's
    forward pass asks for both cores while the other worker and the event loops want them too.
    Each worker takes its share, ``cores // workers`` (all of them for one worker), unless
    ``$MNIST_VAE_SERVE_THREADS`` says otherwise.

    TCP_NODELAY: with ``--workers`` > 1, uvicorn (0.54) binds the listening socket itself with
    ``proto`` 0, so asyncio does not set TCP_NODELAY on accepted connections; every keep-alive
    response's body then waits for the client's delayed ACK, ~40 ms on Linux
    (github.com/Kludex/uvicorn/issues/3149). Linux copies TCP_NODELAY from a listening socket to
    the connections it accepts, so it is set on the server socket this worker inherited.
    """
    threads = _threads_asked()
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    torch.set_num_threads(threads or max(1, cores // workers))
    sockets = _nodelay_on_server_sockets()
    # One line per worker in the server's log: what it runs with, read back from torch and the socket.
    print(
        f"mnist-vae serving worker {os.getpid()}: {torch.get_num_threads()} torch threads "
        f"({workers} workers, {cores} cores), TCP_NODELAY on {sockets} server sockets",
        file=sys.stderr,
        flush=True,
    )


def threads_from_env() -> None:
    """Sets torch's threads to ``$MNIST_VAE_SERVE_THREADS`` when it is set; else leaves them."""
    threads = _threads_asked()
    if threads:
        torch.set_num_threads(threads)


def _threads_asked() -> int | None:
    threads = os.environ.get(THREADS_ENV, "").strip()
    if threads and not (threads.isdigit() and int(threads) > 0):
        raise ServingConfigError(f"${THREADS_ENV}: expected a positive integer, got {threads!r}")
    return int(threads) if threads else None


def _nodelay_on_server_sockets() -> int:
    """Sets TCP_NODELAY on this process's bound, unconnected TCP sockets (the server's socket);
    returns how many it set it on.

    Not only listening ones: the first worker loads the model before its server calls ``listen()``
    on the socket the supervisor bound, and may finish loading before any other worker does.
    """
    try:
        fds = [int(fd) for fd in os.listdir("/proc/self/fd")]
    except OSError:  # not Linux: nothing to do, asyncio's behaviour elsewhere differs anyway
        return 0
    done = 0
    for fd in fds:
        try:
            sock = socket.socket(fileno=fd)  # reads family, type and protocol from the fd
        except OSError:  # not a socket, or closed since listed
            continue
        try:
            if (
                sock.family in (socket.AF_INET, socket.AF_INET6)
                and sock.type == socket.SOCK_STREAM
                and sock.getsockname()[1] != 0
                and not _connected(sock)
            ):
                sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
                done += sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY) != 0
        except OSError:
            pass
        finally:
            sock.detach()  # the fd stays open: it belongs to the server
    return done


def _connected(sock: socket.socket) -> bool:
    try:
        sock.getpeername()
    except OSError:
        return False
    return True
