"""Shared fixtures: the real stack (started once per run) and unique names per test."""

from __future__ import annotations

from collections.abc import Callable, Iterator

import pytest

from tests.support.stack import Endpoints, StackUnavailable, find_stack
from tests.support.topics import remove_this_runs_topics, unique_name


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
def unique() -> Callable[[str], str]:
    """Make names no other test (or other run) uses: unique("topic") -> "topic_3f2a9c1b7d40",
    this run's token and eight random hex digits."""
    return unique_name


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
