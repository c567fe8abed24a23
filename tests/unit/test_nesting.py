"""nesting.deeper_than: how deeply lists and dicts nest, told without recursing."""

from __future__ import annotations

from typing import Any

import pytest

from cdc_sink.decode.nesting import MAX_NESTING, deeper_than


def nested(levels: int) -> Any:
    """`levels` lists and dicts, alternating, around a 1."""
    value: Any = 1
    for level in range(levels):
        value = [value] if level % 2 else {"k": value}
    return value


@pytest.mark.parametrize("levels", [0, 1, 2, 50, MAX_NESTING])
def test_values_up_to_the_limit_are_not_too_deep(levels: int) -> None:
    """Nesting of exactly the limit, or less, passes; scalars have no nesting at all."""
    assert not deeper_than(nested(levels))
    assert not deeper_than([nested(levels - 1), 2, {"a": [], "b": {}}] if levels else 5)


@pytest.mark.parametrize("levels", [MAX_NESTING + 1, 500_000])
def test_values_past_the_limit_are_too_deep_however_deep(levels: int) -> None:
    """One level more is too deep, and so is a depth that would exhaust any recursive walk;
    a deep branch is found among shallow ones."""
    assert deeper_than(nested(levels))
    assert deeper_than({"flat": list(range(1000)), "deep": [nested(levels - 1)]})


def test_the_limit_can_be_given() -> None:
    """`levels` sets the limit: [[1]] is two levels."""
    assert deeper_than([[1]], 1)
    assert not deeper_than([[1]], 2)
