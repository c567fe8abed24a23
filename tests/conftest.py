"""Shared fixtures: the real stack (started once per run) and unique names per test."""

from __future__ import annotations

import uuid
from collections.abc import Callable, Iterator

import pytest

from tests.support.stack import Endpoints, StackUnavailable, find_stack


@pytest.fixture(scope="session")
def stack() -> Iterator[Endpoints]:
    """The real services. Never skipped: if they cannot be had, every integration test errors."""
    try:
        yield find_stack()
    except StackUnavailable as exc:
        pytest.fail(str(exc), pytrace=False)


@pytest.fixture
def unique() -> Callable[[str], str]:
    """Make names no other test (or earlier run) uses: unique("topic") -> "topic_3f2a9c1b7d"."""

    def make(prefix: str) -> str:
        return f"{prefix}_{uuid.uuid4().hex[:10]}"

    return make


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """Tests under tests/unit are `unit`, under tests/integration are `integration`."""
    for item in items:
        path = str(item.path)
        if "/tests/unit/" in path:
            item.add_marker(pytest.mark.unit)
        elif "/tests/integration/" in path:
            item.add_marker(pytest.mark.integration)
