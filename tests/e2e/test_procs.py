"""The watchdog behind every server the project starts: a parent killed outright (SIGKILL) leaves no
server behind, its workers included, and a stop command (as ``pg_ctl stop``) runs first."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from mnist_vae import procs

pytestmark = pytest.mark.slow

# A parent that starts a "server" with a worker of its own (sh forks sleep) in a group of its own,
# registers it with a stop command that leaves a mark, prints the group and waits to be killed.
PARENT = """
import sys, time
from mnist_vae import procs
watchdog = procs.Watchdog()
server = procs.start(["sh", "-c", "sleep 300 & wait"])
watchdog.watch(server.pid, ["touch", sys.argv[1]])
print(server.pid, watchdog.pid, flush=True)
time.sleep(300)
"""


def test_a_killed_parent_leaves_no_server(tmp_path: Path) -> None:
    mark = tmp_path / "stop-command-ran"
    parent = subprocess.Popen([sys.executable, "-c", PARENT, str(mark)], stdout=subprocess.PIPE, text=True)
    try:
        group, watchdog = map(int, parent.stdout.readline().split())
        deadline = time.monotonic() + 30
        while len(procs.group_members(group)) < 2:  # sh and its sleep
            assert time.monotonic() < deadline, "the server's worker did not start"
            time.sleep(0.1)
        os.kill(parent.pid, signal.SIGKILL)
        parent.wait()
    finally:
        if parent.poll() is None:
            parent.kill()
            parent.wait()
    deadline = time.monotonic() + 30
    while procs.group_alive(group) and time.monotonic() < deadline:
        time.sleep(0.2)
    assert not procs.group_alive(group), procs.group_members(group)
    assert mark.exists(), "the stop command did not run"
    while Path(f"/proc/{watchdog}").exists() and time.monotonic() < deadline:
        time.sleep(0.2)
    assert procs.group_members(watchdog) == [], "the watchdog did not exit"
