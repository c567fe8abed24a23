"""argparse types shared by the commands of the sink and of reconciliation."""

from __future__ import annotations

import argparse
from collections.abc import Callable

BIGINT_MAX = 2**63 - 1  # ids and limits go to PostgreSQL as bigints


def whole_number(low: int, high: int = BIGINT_MAX) -> Callable[[str], int]:
    """An argparse type: an integer in [low, high], or a usage error saying so."""

    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"not a whole number: {text!r}") from None
        if not low <= value <= high:
            raise argparse.ArgumentTypeError(f"must be between {low} and {high}: {text}")
        return value

    return parse
