"""What the DLQ topic receives for a dead letter, by the topic's `max.message.bytes`."""

from __future__ import annotations

import pytest

from cdc_sink.dlq.letters import dlq_headers, dlq_message, message_bytes
from cdc_sink.errors import FatalError
from tests.unit.test_dlq import letter

MiB = 1024 * 1024


def test_a_letter_that_fits_goes_whole_and_names_its_row() -> None:
    """Key, value, own headers and context, with `cdc.dlq.id`; nothing says it is elsewhere."""
    dead = letter(dlq_id=7)
    (key, value, headers), whole = dlq_message(dead, "group-a", MiB)
    assert (key, value, whole) == (b"k", b"v", True)
    assert headers == dlq_headers(dead, "group-a")
    assert headers[0] == ("trace", b"abc")
    assert ("cdc.dlq.id", b"7") in headers
    assert not any(name.startswith("cdc.payload.") for name, _ in headers)


def test_a_letter_too_large_for_the_topic_goes_without_its_record() -> None:
    """Over the limit: no key, an empty value, none of its own headers; the context says the
    record is in PostgreSQL, in which row, and how large it was; the message fits."""
    dead = letter(value=bytes(2 * MiB), dlq_id=7)
    (key, value, headers), whole = dlq_message(dead, "group-a", MiB)
    assert (key, value, whole) == (None, b"", False)
    context = dict(headers)
    assert "trace" not in context
    assert context["cdc.payload.stored"] == b"postgres"
    assert context["cdc.dlq.id"] == b"7"
    assert int(context["cdc.payload.bytes"] or b"") > 2 * MiB
    assert context["cdc.source.offset"] == b"42"
    assert message_bytes(key, value, headers) <= MiB


def test_the_limit_is_the_topics_max_message_bytes_inclusive() -> None:
    """A message exactly as large as the limit goes whole; one byte less of limit, it does not."""
    dead = letter(value=bytes(100_000), dlq_id=1)
    size = message_bytes(dead.key, dead.value, dlq_headers(dead, "g"))
    assert dlq_message(dead, "g", size)[1]
    assert not dlq_message(dead, "g", size - 1)[1]


def test_a_dlq_topic_too_small_for_the_context_stops_the_worker() -> None:
    """If not even the error context fits, nothing can be dead-lettered: a fatal error says
    which setting to raise."""
    with pytest.raises(FatalError, match=r"max\.message\.bytes \(200\)"):
        dlq_message(letter(dlq_id=1), "g", 200)
