"""Running the demo: the checks a person can fix before anything slow starts (a port in use, a login
variable that is missing or malformed), and serving the page until Ctrl-C or SIGTERM.

Gradio and torch are imported only by :func:`serve`, so that a failed check answers at once.
"""

from __future__ import annotations

import logging
import os
import signal
import socket
import threading
from collections.abc import Mapping
from typing import TYPE_CHECKING

from mnist_vae.errors import UserError
from mnist_vae.procs import signals_raise

if TYPE_CHECKING:
    from mnist_vae.demo.page import Page

log = logging.getLogger(__name__)


class DemoStartError(UserError):
    """The demo cannot start as asked: its port, its address or its login variable."""


def check_port(host: str, port: int) -> None:
    """Fails at once when ``host``:``port`` cannot be listened on (in use, or not this machine's).

    Bound with ``SO_REUSEADDR`` as uvicorn binds, so a port a stopped demo left in TIME_WAIT counts
    as free.

    Raises:
        DemoStartError: The address cannot be bound; the message says why.
    """
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    except socket.gaierror as exc:
        raise DemoStartError(f"--host {host}: not an address of this machine ({exc.strerror})") from None
    family, kind, proto, _, address = infos[0]
    with socket.socket(family, kind, proto) as probe:
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            probe.bind(address)
        except OSError as exc:
            raise DemoStartError(
                f"cannot listen on {host}:{port} ({exc.strerror}); is another server there? "
                "Choose another port with --port"
            ) from None


def login_from_env(variable: str | None, environ: Mapping[str, str] = os.environ) -> tuple[str, str] | None:
    """The user and password that ``variable`` holds as ``user:password``; None without a variable.

    The password may itself hold colons: the user name ends at the first one. Messages name the
    variable, never its value.

    Raises:
        DemoStartError: The variable is unset, empty, or not ``user:password``.
    """
    if variable is None:
        return None
    value = environ.get(variable, "")
    if not value:
        raise DemoStartError(
            f"--auth-env {variable}: ${variable} is not set or empty; expected user:password"
        )
    user, colon, password = value.partition(":")
    if not (colon and user.strip() and password):
        raise DemoStartError(
            f"--auth-env {variable}: expected ${variable} to hold user:password, "
            "a user name and a password after the first colon (the value is not shown)"
        )
    return user, password


def serve(page: Page, card: str, host: str, port: int, login: tuple[str, str] | None) -> None:
    """Serves the page on ``host``:``port`` until SIGINT (Ctrl-C) or SIGTERM, then stops the
    server and returns. ``card`` is the model card (Markdown); ``login`` asks for that user."""
    import numpy as np

    from mnist_vae.demo import app
    from mnist_vae.demo import page as work

    if page.test is None:
        log.warning("no test digits to rank scores among: %s", page.missing)
    # torchvision's grid (samples, interpolations) imports in a second or more: now, not on the
    # first request.
    work.picture(np.zeros((2, 784), dtype=np.float32))
    blocks = app.build(page, card)
    stop = threading.Event()
    try:
        # SIGTERM (a service manager, `kill`) ends it as Ctrl-C does, from the launch on: the
        # server closes its port and the command exits 0.
        with signals_raise(lambda signum: KeyboardInterrupt(), signal.SIGINT, signal.SIGTERM):
            url = app.launch(blocks, host, port, login)
            log.info("demo on %s%s; Ctrl-C stops it", url, " (login required)" if login else "")
            stop.wait()
    except KeyboardInterrupt:
        pass
    finally:
        blocks.close(verbose=False)
    log.info("demo stopped")
