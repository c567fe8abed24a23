"""asyncpg codecs for the values the model converts (an adapter: the model imports no driver).

asyncpg's default codecs silently write date 0001-01-01/9999-12-31 and timestamptz
0001-01-01T00:00Z/9999-12-31T23:59:59.999999Z as -infinity/infinity; register PG_TUPLE_CODECS
on every connection that writes these values. A process that writes calls `use_asyncpg_uuids`
once, at start-up, to have the model convert UUIDs to asyncpg's own UUID type.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from datetime import UTC, date, datetime, timedelta
from typing import Any

from asyncpg.pgproto import pgproto

from cdc_sink.model.scalars import use_uuid_type

_PG_EPOCH = datetime(2000, 1, 1, tzinfo=UTC)
_PG_EPOCH_ORDINAL = _PG_EPOCH.toordinal()
_INT32_MAX, _INT64_MAX = 2**31 - 1, 2**63 - 1
_MICROSECOND = timedelta(microseconds=1)


def use_asyncpg_uuids() -> None:
    """Have the model convert UUIDs to asyncpg's UUID type, the one it returns for uuid columns
    (see model.scalars.use_uuid_type): cheaper to parse, hash and print. Process-wide; equal
    to, and hashed like, the uuid.UUIDs converted before."""
    use_uuid_type(pgproto.UUID)


def _encode_date(d: date) -> tuple[int]:
    return (d.toordinal() - _PG_EPOCH_ORDINAL,)


def _decode_date(value: tuple[int]) -> date:
    days = value[0]
    if abs(days) >= _INT32_MAX:  # PostgreSQL's ±infinity
        return date.max if days > 0 else date.min
    return date.fromordinal(days + _PG_EPOCH_ORDINAL)


_UNIX_TO_PG_EPOCH_US = 946_684_800_000_000
# The instants a datetime can hold (years 1..9999), as µs since 1970: a row must read back.
_DATETIME_MIN_US = -62_135_596_800_000_000
_DATETIME_MAX_US = 253_402_300_799_999_999


def _encode_timestamptz(stamp: datetime | int) -> tuple[int]:
    if isinstance(stamp, int):
        # µs since 1970: the writer's own stamps, which would otherwise become a datetime
        # only to be taken apart again here, for every staged row.
        if not _DATETIME_MIN_US <= stamp <= _DATETIME_MAX_US:
            raise OverflowError(f"{stamp} µs since 1970 is outside the years 1..9999")
        return (stamp - _UNIX_TO_PG_EPOCH_US,)
    if stamp.tzinfo is None:
        stamp = stamp.replace(tzinfo=UTC)
    return ((stamp - _PG_EPOCH) // _MICROSECOND,)


def _decode_timestamptz(value: tuple[int]) -> datetime:
    micros = value[0]
    if abs(micros) >= _INT64_MAX:  # PostgreSQL's ±infinity
        return (datetime.max if micros > 0 else datetime.min).replace(tzinfo=UTC)
    return _PG_EPOCH + timedelta(microseconds=micros)


PG_TUPLE_CODECS: Mapping[str, tuple[Callable[[Any], tuple[int]], Callable[[tuple[int]], Any]]] = {
    "date": (_encode_date, _decode_date),
    "timestamptz": (_encode_timestamptz, _decode_timestamptz),
}
"""Per type, (encoder, decoder) for asyncpg's `set_type_codec(..., format="tuple")`
(writer.prepare_connection): the extreme dates and instants are stored as they are, ±infinity
reads back as the extreme date/datetime, naive datetimes are taken as UTC, and a timestamptz
may also be given as an int, µs since 1970."""
