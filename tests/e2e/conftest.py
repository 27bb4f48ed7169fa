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


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Groups for ``pytest -n 2 --dist loadgroup`` (``make test-e2e``): the tests of one module run
    on one worker, so that its module fixtures are made once; every module that uses the session's
    team stack runs on the same worker, so that the stack is started once."""
    e2e = [item for item in items if "e2e" in item.path.parts]
    on_stack = {item.module.__name__ for item in e2e if "team_stack" in item.fixturenames}
    for item in e2e:
        if item.get_closest_marker("xdist_group") is None:
            module = item.module.__name__
            item.add_marker(pytest.mark.xdist_group("team-stack" if module in on_stack else module))
