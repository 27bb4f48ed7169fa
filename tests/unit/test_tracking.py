"""What the tracking helpers show of a URI: never its password."""

from __future__ import annotations

import http.server
import threading

import pytest

from mnist_vae.procs import free_port
from mnist_vae.tracking import TrackingUnavailableError, check_reachable, redacted


@pytest.mark.parametrize(
    ("uri", "shown"),
    [
        ("http://alice:s3cret@host:5000/path?x=1", "http://alice@host:5000/path?x=1"),
        ("https://alice:s3cret@Host.Example.com", "https://alice@Host.Example.com"),
        ("http://alice:p@ss:w0rd@host", "http://alice@host"),  # "@" and ":" in the password
        ("http://alice:s3cret@host:notaport", "http://alice@host:notaport"),
        ("http://alice:s3cret@[::1]:5000", "http://alice@[::1]:5000"),
        ("http://alice:@host", "http://alice@host"),  # an empty password
        ("postgresql+psycopg://optuna:s3cret@db/optuna", "postgresql+psycopg://optuna@db/optuna"),
        ("http://alice@host:5000", "http://alice@host:5000"),  # no password: unchanged
        ("http://host:5000", "http://host:5000"),
        ("sqlite:////tmp/mlflow.db", "sqlite:////tmp/mlflow.db"),
        ("journal:.tune/mnist-vae.journal", "journal:.tune/mnist-vae.journal"),
        ("http://alice:pa/ss@host:5000/api", "http://alice@host:5000/api"),  # "/" in the password
        ("http://alice:a/b@c@host/x?alias=a@b", "http://alice@host/x?alias=a@b"),
        (  # inside a message, two URIs
            "API request to https://alice:s3@cret@mlflow.example:5000/api failed; see http://h/x",
            "API request to https://alice@mlflow.example:5000/api failed; see http://h/x",
        ),
        ("failed (http://bob:x/y@127.0.0.1:9/api): refused", "failed (http://bob@127.0.0.1:9/api): refused"),
    ],
)
def test_redacted_drops_only_the_password(uri: str, shown: str) -> None:
    assert redacted(uri) == shown


def test_unreachable_server_error_hides_the_password() -> None:
    port = free_port()  # nothing listens there
    with pytest.raises(TrackingUnavailableError, match="cannot be reached") as error:
        check_reachable(f"http://alice:s3cret@127.0.0.1:{port}", timeout=2)
    assert "s3cret" not in str(error.value)
    assert f"http://alice@127.0.0.1:{port}" in str(error.value)


def test_unhealthy_server_error_hides_the_password() -> None:
    class Unhealthy(http.server.BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            self.send_response(503)
            self.send_header("Content-Length", "0")
            self.end_headers()

        def log_message(self, *args: object) -> None:
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Unhealthy)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        port = server.server_address[1]
        with pytest.raises(TrackingUnavailableError, match="answered 503") as error:
            check_reachable(f"http://alice:s3cret@127.0.0.1:{port}", timeout=5)
    finally:
        server.shutdown()
        server.server_close()
    assert "s3cret" not in str(error.value)
    assert f"http://alice@127.0.0.1:{port}/health" in str(error.value)
