"""A dead letter: a record that cannot be applied, kept with why it failed, and the message
the DLQ topic receives for it. Any record Kafka delivered can be dead-lettered, however large
(`dlq_message`).
"""

from __future__ import annotations

import base64
import datetime as dt
import json
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from aiokafka.record.default_records import DefaultRecordBatchBuilder

from cdc_sink.errors import FatalError
from cdc_sink.model.events import Key
from cdc_sink.schema.tables import TableSchema

Header = tuple[str, bytes | None]  # Kafka allows a header without a value
Message = tuple[bytes | None, bytes | None, list[Header]]  # key, value, headers


@dataclass(frozen=True)
class DeadLetter:
    """A record that could not be applied, with where it came from and why."""

    topic: str
    partition: int
    offset: int
    timestamp_ms: int | None
    key: bytes | None
    value: bytes | None
    headers: tuple[Header, ...]
    error_class: str
    message: str
    stage: str
    schema_id: int | None
    failed_at: dt.datetime
    dlq_id: int | None = None  # its `_cdc_dlq_records` row, reserved before it is produced
    payload_in_topic: bool = True  # False: too large, its DLQ message carries the context only
    # A letter for a whole record batch that could not be read: its first offset (`offset` is
    # its last).
    first_offset: int | None = None
    # The target table and key of its row, when the record was read that far: a letter of an
    # erased key is skipped, not kept (suppression.py).
    row: tuple[TableSchema, Key] | None = None

    def offsets(self, window: int) -> range:
        """The offsets this letter stands for, at most the last `window` of them."""
        first = self.offset if self.first_offset is None else self.first_offset
        return range(max(first, self.offset - window + 1), self.offset + 1)


def dlq_headers(letter: DeadLetter, consumer_group: str) -> list[Header]:
    """The record's own headers followed by the error context (all values UTF-8 text)."""
    return [*letter.headers, *context_headers(letter, consumer_group)]


def context_headers(letter: DeadLetter, consumer_group: str) -> list[Header]:
    """Why and where the record failed; `cdc.dlq.id` once its row is reserved."""
    context = {
        "cdc.error.class": letter.error_class,
        "cdc.error.message": letter.message,
        "cdc.error.stage": letter.stage,
        "cdc.source.topic": letter.topic,
        "cdc.source.partition": str(letter.partition),
        "cdc.source.offset": str(letter.offset),
        "cdc.source.timestamp": "" if letter.timestamp_ms is None else str(letter.timestamp_ms),
        "cdc.schema.id": "" if letter.schema_id is None else str(letter.schema_id),
        "cdc.failed.at": letter.failed_at.isoformat(),
        "cdc.consumer.group": consumer_group,
    }
    if letter.dlq_id is not None:
        context["cdc.dlq.id"] = str(letter.dlq_id)
    return [(k, v.encode()) for k, v in context.items()]


def message_bytes(key: bytes | None, value: bytes | None, headers: Sequence[Header]) -> int:
    """The most a message takes in a record batch of its own: what the broker compares with
    the topic's `max.message.bytes` (the sink sends uncompressed)."""
    return int(DefaultRecordBatchBuilder.estimate_size_in_bytes(key, value, list(headers)))


def dlq_message(letter: DeadLetter, consumer_group: str, max_bytes: int) -> tuple[Message, bool]:
    """What the DLQ topic receives for `letter`, and whether it carries the record.

    The record (key, value, own headers) with the error context if that fits `max_bytes`, the
    topic's `max.message.bytes`; else no key, an empty value (Kafka wants one of the two) and
    the context plus `cdc.payload.stored: postgres` and `cdc.payload.bytes` (the size that did
    not fit): the record is then only in its `_cdc_dlq_records` row (`cdc.dlq.id`). Raises
    FatalError if not even the context fits."""
    whole = dlq_headers(letter, consumer_group)
    size = message_bytes(letter.key, letter.value, whole)
    if size <= max_bytes:
        return (letter.key, letter.value, whole), True
    context = [
        *context_headers(letter, consumer_group),
        ("cdc.payload.stored", b"postgres"),
        ("cdc.payload.bytes", str(size).encode()),
    ]
    if message_bytes(None, b"", context) > max_bytes:
        raise FatalError(
            f"the DLQ topic's max.message.bytes ({max_bytes}) is too small even for a dead "
            "letter's error context; raise it (64 KiB or more)"
        )
    return (None, b"", context), False


def headers_to_json(headers: Sequence[Header]) -> str:
    """Headers as JSON for `_cdc_dlq_records`: text stays readable, other bytes as base64."""
    out: list[dict[str, str | None]] = []
    for key, value in headers:
        if value is None:
            out.append({"key": key, "value": None})
            continue
        try:
            out.append({"key": key, "value": value.decode("utf-8")})
        except UnicodeDecodeError:
            out.append({"key": key, "base64": base64.b64encode(value).decode()})
    return json.dumps(out)


def headers_from_json(stored: Any) -> list[Header]:
    """The inverse of `headers_to_json` (accepts the decoded JSON or its text)."""
    items = json.loads(stored) if isinstance(stored, str) else stored
    return [(item["key"], _header_value(item)) for item in items]


def _header_value(item: dict[str, Any]) -> bytes | None:
    if "base64" in item:
        return base64.b64decode(item["base64"])
    text = item["value"]
    return None if text is None else text.encode()
