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


# The modules that take longest, first: with `--dist loadfile --no-loadscope-reorder` pytest-xdist
# hands out whole modules in collection order, and a long one started last would leave the other
# worker idle at the end. (`make test-e2e` prints the slowest tests; this order follows them.)
HEAVY_FIRST = (
    "test_team",
    "test_gate",
    "test_experiments",
    "test_spark",
    "test_pipeline",
    "test_stack",
    "test_cli",
)


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Puts the heaviest end-to-end modules first (``make test-e2e`` runs them on two workers, a
    module's tests on one, so that its module fixtures are made once); each module keeps its order.
    A worker starts the session's team stack when one of its modules needs it."""
    e2e = [item for item in items if "e2e" in item.path.parts]
    in_e2e = {id(item) for item in e2e}

    def weight(item: pytest.Item) -> int:
        name = item.path.stem
        return HEAVY_FIRST.index(name) if name in HEAVY_FIRST else len(HEAVY_FIRST)

    rest = [item for item in items if id(item) not in in_e2e]
    items[:] = rest + sorted(e2e, key=weight)  # a stable sort: each module keeps its own order
