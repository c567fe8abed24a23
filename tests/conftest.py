"""Shared fixtures: the real stack (started once per run) and unique names per test."""

from __future__ import annotations

from collections.abc import AsyncIterator, Iterator

import pytest

from tests.support.names import Unique
from tests.support.stack import Endpoints, StackUnavailable, find_stack
from tests.support.topics import remove_this_runs_topics


@pytest.fixture(scope="session")
def stack() -> Iterator[Endpoints]:
    """The real services. Never skipped: if they cannot be had, every integration test errors.
    The Kafka topics the run made are deleted at its end."""
    try:
        endpoints = find_stack()
    except StackUnavailable as exc:
        pytest.fail(str(exc), pytrace=False)
    yield endpoints
    remove_this_runs_topics(endpoints.kafka)


@pytest.fixture
async def unique(stack: Endpoints) -> AsyncIterator[Unique]:
    """Names no other test (or other run) uses. The schemas and keyspaces named with
    unique.schema and unique.keyspace are dropped when the test ends, passed or failed, after
    the test's own clean-up and that of the fixtures set up after this one."""
    names = Unique(stack)
    yield names
    await names.drop()


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """Tests under tests/unit are `unit`, under tests/integration `integration`, under
    tests/e2e `e2e` (Debezium's own connector in front of the sink)."""
    for item in items:
        path = str(item.path)
        if "/tests/unit/" in path:
            item.add_marker(pytest.mark.unit)
        elif "/tests/integration/" in path:
            item.add_marker(pytest.mark.integration)
        elif "/tests/e2e/" in path:
            item.add_marker(pytest.mark.e2e)
