"""Range tombstones compare clustering values in Cassandra's order, not Python's."""

from __future__ import annotations

import uuid

from cdc_sink.apply.plan import RangeTombstone, covers

# time_low wraps between these two: as 128-bit integers the later one is smaller.
EARLIER = uuid.UUID("f8a0de59-e915-11ef-8000-000000000000")
LATER = uuid.UUID("00c7d7fe-e916-11ef-8000-000000000000")


def test_timeuuid_ranges_follow_time_order() -> None:
    """A range between two timeuuids covers its ends and nothing outside, by time."""
    assert EARLIER.time < LATER.time
    rng = RangeTombstone((EARLIER,), True, (LATER,), True, ts=1)
    assert covers(rng, (EARLIER,))
    assert covers(rng, (LATER,))
    before = uuid.uuid1(node=1, clock_seq=0)
    assert not covers(RangeTombstone((LATER,), False, (), True, ts=1), (EARLIER,))
    assert covers(RangeTombstone((), True, (), True, ts=1), (before,))


def test_descending_clustering_reverses_the_order() -> None:
    """For a DESC clustering column the range start is the greater value."""
    rng = RangeTombstone((10,), True, (5,), False, ts=1, descending=(True,))
    assert covers(rng, (10,))
    assert covers(rng, (6,))
    assert not covers(rng, (5,))
    assert not covers(rng, (11,))
