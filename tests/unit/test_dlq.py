"""The pure parts of the dead-letter queue: limit, headers, error kinds, replay filters."""

from __future__ import annotations

import datetime as dt

import pytest
from aiokafka.errors import (
    KafkaConnectionError,
    KafkaTimeoutError,
    MessageSizeTooLargeError,
    NotLeaderForPartitionError,
    TopicAuthorizationFailedError,
)

from cdc_sink.config import ConfigError, load_config
from cdc_sink.dlq.letters import DeadLetter, dlq_headers, headers_from_json, headers_to_json
from cdc_sink.dlq.limiter import DlqLimiter
from cdc_sink.dlq.producer import kafka_failure
from cdc_sink.dlq.replay import DlqFilter
from cdc_sink.errors import FatalError, TransientError

FAILED_AT = dt.datetime(2026, 11, 25, 12, 0, tzinfo=dt.UTC)


def letter(**changes: object) -> DeadLetter:
    fields: dict[str, object] = {
        "topic": "cdc-events-users",
        "partition": 3,
        "offset": 42,
        "timestamp_ms": 1_700_000_000_000,
        "key": b"k",
        "value": b"v",
        "headers": (("trace", b"abc"),),
        "error_class": "DecodeError",
        "message": "bad bytes",
        "stage": "decode",
        "schema_id": 7,
        "failed_at": FAILED_AT,
    }
    fields.update(changes)
    return DeadLetter(**fields)  # type: ignore[arg-type]


def test_limiter_admits_up_to_its_share_of_the_window() -> None:
    """10 % of a 100-offset window is 10 dead letters: 10 pass, the 11th does not."""
    limiter = DlqLimiter(0.1, 100)
    assert limiter.admits("t", 0, list(range(10)), last_offset=99)
    limiter.record("t", 0, list(range(10)))
    assert not limiter.admits("t", 0, [50], last_offset=99)
    assert limiter.admits("t", 1, [50], last_offset=99)  # partitions count apart


def test_limiter_forgets_dead_letters_that_left_the_window() -> None:
    """Dead letters older than the window no longer count; `forget` clears a partition."""
    limiter = DlqLimiter(0.1, 100)
    limiter.record("t", 0, list(range(10)))
    assert limiter.admits("t", 0, [150], last_offset=150)
    assert not limiter.admits("t", 0, [60], last_offset=60)
    limiter.forget("t", 0)
    assert limiter.admits("t", 0, list(range(50, 60)), last_offset=60)


def test_limiter_with_a_share_of_one_never_trips() -> None:
    """max_share >= 1 turns the limit off."""
    assert DlqLimiter(1.0, 10).admits("t", 0, list(range(1000)), last_offset=999)


def test_a_zero_share_dead_letters_nothing() -> None:
    """max_share 0: the first dead letter pauses the partition."""
    assert not DlqLimiter(0.0, 1000).admits("t", 0, [5], last_offset=5)


def test_dlq_headers_keep_the_originals_and_add_the_context() -> None:
    """The DLQ record carries its own headers first, then every piece of error context."""
    headers = dlq_headers(letter(), "group-a")
    assert headers[0] == ("trace", b"abc")
    context = {k: v.decode() for k, v in headers[1:]}
    assert context == {
        "cdc.error.class": "DecodeError",
        "cdc.error.message": "bad bytes",
        "cdc.error.stage": "decode",
        "cdc.source.topic": "cdc-events-users",
        "cdc.source.partition": "3",
        "cdc.source.offset": "42",
        "cdc.source.timestamp": "1700000000000",
        "cdc.schema.id": "7",
        "cdc.failed.at": "2026-11-25T12:00:00+00:00",
        "cdc.consumer.group": "group-a",
    }


def test_headers_survive_the_table_as_text_or_base64() -> None:
    """UTF-8 header values stay readable in `_cdc_dlq_records`; other bytes and a missing
    value round-trip."""
    original = [
        ("text", "é".encode()),
        ("binary", b"\xff\x00\x01"),
        ("empty", b""),
        ("null", None),  # a header without a value, which Kafka allows
    ]
    stored = headers_to_json(original)
    assert '"value": "\\u00e9"' in stored
    assert headers_from_json(stored) == original


@pytest.mark.parametrize(
    ("error", "kind"),
    [
        (KafkaConnectionError(), TransientError),
        (KafkaTimeoutError(), TransientError),
        (NotLeaderForPartitionError(), TransientError),
        (TopicAuthorizationFailedError(), FatalError),
        (MessageSizeTooLargeError(), FatalError),
    ],
)
def test_kafka_errors_are_transient_or_fatal(error: Exception, kind: type) -> None:
    """Timeouts and retriable broker errors retry; authorization and size errors stop."""
    assert isinstance(kafka_failure(error, "producing"), kind)  # type: ignore[arg-type]


def test_replay_filter_builds_parameterised_sql() -> None:
    """Every field becomes a parameter, never text in the SQL."""
    where = DlqFilter.from_mapping(
        {"ids": "3,4", "topic": "t'; DROP", "since": "2026-11-25T10:00:00", "status": "pending"}
    )
    condition, values = where.where()
    assert "DROP" not in condition
    assert values == [
        "pending",
        "t'; DROP",
        [3, 4],
        dt.datetime(2026, 11, 25, 10, tzinfo=dt.UTC),
    ]
    assert DlqFilter().where() == ("true", [])
    assert DlqFilter().is_empty
    assert not where.is_empty


@pytest.mark.parametrize(
    "raw",
    [{"colour": "red"}, {"status": "lost"}, {"ids": ["x"]}, {"since": "yesterday"}],
)
def test_replay_filter_refuses_bad_fields(raw: dict[str, object]) -> None:
    """Unknown fields, statuses, ids and times are refused with a message."""
    with pytest.raises(ValueError, match=r"filter|status"):
        DlqFilter.from_mapping(raw)


@pytest.mark.parametrize(
    ("setting", "value"),
    [
        ("CDC_DLQ__MAX_SHARE", "-0.5"),
        ("CDC_DLQ__WINDOW_RECORDS", "0"),
        ("CDC_DLQ__TOPIC", " "),
        ("CDC_DLQ__TOPIC", "dead letters"),
        ("CDC_DLQ__TOPIC_PARTITIONS", "0"),
        ("CDC_DLQ__TOPIC_REPLICATION_FACTOR", "-1"),
    ],
)
def test_bad_dlq_settings_are_refused_by_name(setting: str, value: str) -> None:
    """Each invalid DLQ setting stops start-up with a message naming it."""
    with pytest.raises(ConfigError, match=setting):
        load_config({setting: value})
