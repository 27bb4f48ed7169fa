"""End-to-end fixtures: the team's stack (PostgreSQL, S3, MLflow with basic auth), started for real."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from mnist_vae import procs
from mnist_vae.stack import Stack


@pytest.fixture(scope="session")
def team_stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    """One stack for the whole session; tests may stop, kill and restart its parts, and must leave
    each part running when they end. At the end the fixture checks that nothing of it is left.
    Should the test process be killed, the stack's watchdog stops it."""
    stack = Stack(tmp_path_factory.mktemp("team-stack"), start_timeout=600)
    stack.start()
    try:
        yield stack
    finally:
        private = stack.private_dir
        stack.stop()
    left = sorted(group for group in stack.process_groups if procs.group_alive(group))
    assert not left, f"process groups of the stack still alive after stop: {left}"
    assert private is not None and not private.exists(), f"{private} was not removed"
