"""The brake on dead-lettering: a bad deploy must not quietly dead-letter a whole table.

Past its share of a partition's recent offsets, the partition pauses instead.
"""

from __future__ import annotations

import collections
from collections.abc import Sequence


class DlqLimiter:
    """Allows at most `max_share` of a partition's last `window` offsets to be dead-lettered.

    Pure bookkeeping: the runner asks `admits` before dead-lettering and calls `record` after
    the commit. A share of 1 or more never trips.
    """

    def __init__(self, max_share: float, window: int) -> None:
        self.window = window
        self.limit = int(max_share * window)
        self.enabled = max_share < 1
        self._dead: dict[tuple[str, int], collections.deque[int]] = {}

    def admits(self, topic: str, partition: int, offsets: Sequence[int], last_offset: int) -> bool:
        """Whether dead-lettering `offsets` keeps the partition within its share, counting the
        dead letters among the `window` offsets ending at `last_offset`."""
        if not self.enabled or not offsets:
            return True
        floor = last_offset - self.window
        recent = self._dead.get((topic, partition), ())
        return sum(o > floor for o in recent) + sum(o > floor for o in offsets) <= self.limit

    def record(self, topic: str, partition: int, offsets: Sequence[int]) -> None:
        if not self.enabled or not offsets:
            return
        dead = self._dead.setdefault((topic, partition), collections.deque())
        dead.extend(offsets)
        while dead and dead[0] <= dead[-1] - self.window:
            dead.popleft()

    def forget(self, topic: str, partition: int) -> None:
        self._dead.pop((topic, partition), None)
