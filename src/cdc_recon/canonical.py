"""Canonical form of a row, the same for both sides, and its digests. Pure, no I/O.

A Cassandra value (as cassandra-driver returns it) is first converted with the sink's own
converter (`cdc_sink.model.values.converter`), so it becomes exactly what the sink would have
written to PostgreSQL; a PostgreSQL value (as asyncpg returns it) is taken as it is. Both then
get one plain representation per type (`for_cassandra`, `for_postgres`):

- integers stay ints, booleans bools, text str;
- decimal/varint: the normalised digits ("1.50" and "1.5" are the same number), NaN/±Infinity
  as words; float/double: Python's repr of the double ("NaN", "Infinity", "-Infinity");
- timestamp: microseconds since the epoch; date/time: ISO text; duration: microseconds;
- blob: hex; uuid, timeuuid, inet: their standard text;
- list: the canonical elements in order; set: sorted; a non-frozen collection that is empty
  is null (Cassandra cannot tell an empty non-frozen collection from null);
- jsonb (map, tuple, UDT, nested collections): parsed, walked with the column's type (numbers
  by value, sets sorted, UDT fields complete) and written as compact JSON with sorted keys.

Equal data gives equal canonical values, whatever driver, codec, key order or number
formatting produced it; that is what keeps identical tables from ever showing a difference.
"""

from __future__ import annotations

import datetime as dt
import functools
import hashlib
import json
import math
import sys
from collections.abc import Callable, Iterable, Mapping, Sequence
from decimal import MAX_EMAX, MAX_PREC, MIN_EMIN, Context, Decimal, InvalidOperation
from typing import Any

from cdc_sink.errors import ConversionError
from cdc_sink.model.cql import CqlType, pg_type
from cdc_sink.model.jsonb import to_json_value
from cdc_sink.model.values import converter

__all__ = [
    "CanonRow",
    "bucket_of",
    "differing_columns",
    "driver_exact",
    "epoch_micros",
    "for_cassandra",
    "for_converted",
    "for_postgres",
    "key_text",
    "row_digest",
]

Canon = Any  # None | bool | int | str | list[Canon]: a canonical value
CanonRow = tuple[tuple[Canon, ...], tuple[Canon, ...]]  # (key values, other column values)

_EXACT = Context(prec=MAX_PREC, Emax=MAX_EMAX, Emin=MIN_EMIN)
_EPOCH = dt.datetime(1970, 1, 1, tzinfo=dt.UTC)
_NAIVE_EPOCH = dt.datetime(1970, 1, 1)
_MICRO = dt.timedelta(microseconds=1)
UNCONVERTIBLE = "!unconvertible:"  # a Cassandra value the sink could not have stored


def for_cassandra(t: CqlType) -> Callable[[Any], Canon]:
    """A cassandra-driver value of type `t` → its canonical form, resolved once per type
    (readers call it per value). A value the sink's converter refuses comes back as a marker
    string that no PostgreSQL value canonicalises to, so it is reported as a difference rather
    than hidden."""
    if pg_type(t) == "jsonb":
        # The JSON value the sink would write, without rendering and re-parsing its text.
        return _canon(t, functools.partial(to_json_value, t), functools.partial(_json_finish, t))
    return _canon(t, converter(t), _column(t))


def for_converted(
    t: CqlType, convert: Callable[[Any], Any], stored: CqlType
) -> Callable[[Any], Canon]:
    """for_cassandra of a column the sink writes through `convert` (its TableSchema's
    converter: masked, or rendered as text) into a column holding `stored`."""
    return _canon(t, convert, _column(stored))


def _canon(
    t: CqlType, convert: Callable[[Any], Any], column: Callable[[Any], Canon]
) -> Callable[[Any], Canon]:
    fix = _exact_fixer(t)

    def canon(value: Any) -> Canon:
        if value is None:
            return None
        try:
            converted = convert(value if fix is None else fix(value))
        except ConversionError as exc:
            return f"{UNCONVERTIBLE}{exc}"
        return None if converted is None else column(converted)

    return canon


def for_postgres(t: CqlType) -> Callable[[Any], Canon]:
    """An asyncpg value of a column holding `t` → its canonical form, resolved once per type
    (readers call it per value)."""
    column = _column(t)
    return lambda value: None if value is None else column(value)


def driver_exact(t: CqlType, value: Any) -> Any:
    """Undo cassandra-driver's float rounding of timestamps.

    The driver turns a timestamp's epoch milliseconds into a datetime through a float of
    seconds, which is off by microseconds far from 1970 (year 400 by ~8 µs). Cassandra keeps
    milliseconds, so rounding back to the nearest millisecond restores the stored value.
    Collections, tuples and UDTs holding timestamps are rebuilt with the fix applied.
    """
    fix = _exact_fixer(t)
    return value if fix is None or value is None else fix(value)


@functools.lru_cache(maxsize=1024)
def _exact_fixer(t: CqlType) -> Callable[[Any], Any] | None:
    if t.name == "timestamp":
        return _round_ms
    if t.name in ("list", "set", "tuple", "map"):
        fixes = [_exact_fixer(p) for p in t.params]
        if not any(fixes):
            return None
        if t.name == "map":
            key_fix, value_fix = (f or (lambda x: x) for f in fixes)
            return lambda v: {
                key_fix(k): None if x is None else value_fix(x) for k, x in dict(v).items()
            }
        if t.name == "tuple":
            return lambda v: tuple(
                x if f is None or x is None else f(x) for f, x in zip(fixes, v, strict=False)
            )
        fix = fixes[0]
        assert fix is not None
        return lambda v: [None if x is None else fix(x) for x in v]
    if t.name == "udt" and t.fields:
        fields = [(name, _exact_fixer(ft)) for name, ft in t.fields]
        if not any(f for _, f in fields):
            return None

        def udt(v: Any) -> Any:
            items = v._asdict() if hasattr(v, "_asdict") else dict(v)
            return {
                name: (items.get(name) if f is None or items.get(name) is None else f(items[name]))
                for name, f in fields
            }

        return udt
    return None


def _round_ms(value: Any) -> Any:
    if not isinstance(value, dt.datetime):
        return value
    naive = value.astimezone(dt.UTC).replace(tzinfo=None) if value.tzinfo else value
    micros = (naive - _NAIVE_EPOCH) // _MICRO
    return _NAIVE_EPOCH + dt.timedelta(milliseconds=(micros + 500) // 1000)


@functools.lru_cache(maxsize=4096)
def _column(t: CqlType) -> Callable[[Any], Canon]:
    kind = pg_type(t)
    if kind == "jsonb":
        return lambda v: _json_column(t, v)
    if kind.endswith("[]"):
        element = _SCALAR[t.params[0].name]
        ordered = t.name == "list"

        def array(v: Any) -> Canon:
            items = [None if x is None else element(x) for x in v]
            if not items and not t.frozen:
                return None
            return items if ordered else _sorted(items)

        return array
    return _SCALAR[t.name]


def _decimal(value: Any) -> str:
    d = value if isinstance(value, Decimal) else Decimal(str(value))
    if d.is_nan():
        return "NaN"
    if d.is_infinite():
        return "Infinity" if d > 0 else "-Infinity"
    if d.is_zero():
        return "0"
    return str(d.normalize(_EXACT))


def _float(value: Any) -> str:
    if isinstance(value, str):  # also "NaN" and "±Infinity", as jsonb holds them
        value = Decimal(value)
    f = float(value)
    if math.isnan(f):
        return "NaN"
    if math.isinf(f):
        return "Infinity" if f > 0 else "-Infinity"
    return repr(f)


def epoch_micros(value: Any) -> int:
    stamp: dt.datetime = value if value.tzinfo else value.replace(tzinfo=dt.UTC)
    return (stamp - _EPOCH) // _MICRO


def _duration(value: Any) -> int:
    delta: dt.timedelta = value
    return (delta.days * 86_400 + delta.seconds) * 1_000_000 + delta.microseconds


def _inet(value: Any) -> str:
    # asyncpg reads a host address as IPv4Address/IPv6Address, a masked one as an interface.
    network = getattr(value, "network", None)
    if network is not None and network.prefixlen == network.max_prefixlen:
        return str(value.ip)
    return str(value)


_SCALAR: dict[str, Callable[[Any], Canon]] = {
    "boolean": bool,
    "tinyint": int,
    "smallint": int,
    "int": int,
    "bigint": int,
    "counter": int,
    "varint": _decimal,
    "decimal": _decimal,
    "float": _float,
    "double": _float,
    "blob": lambda v: bytes(v).hex(),
    "uuid": str,
    "timeuuid": str,
    "inet": _inet,
    "timestamp": epoch_micros,
    "date": lambda v: v.isoformat(),
    "time": lambda v: v.isoformat(timespec="microseconds"),
    "duration": _duration,
    **{name: str for name in ("ascii", "text", "varchar")},
}


def _json_column(t: CqlType, value: Any) -> Canon:
    # Numbers as Decimal: a float would round away digits of decimals nested in the JSON.
    if isinstance(value, str | bytes):
        value = json.loads(value, parse_float=Decimal, parse_int=_json_int)
    return _json_finish(t, value)


def _json_int(text: str) -> int | Decimal:
    """A JSON integer as int, or as Decimal when it has more digits than Python turns into an
    int (sys.get_int_max_str_digits): jsonb numbers are numerics of up to 131072 digits, and
    only a varint's can be that long, which compares as a Decimal anyway."""
    limit = sys.get_int_max_str_digits()
    return Decimal(text) if limit and len(text) > limit else int(text)


def _json_finish(t: CqlType, parsed: Any) -> Canon:
    canonical = _json(t, parsed)
    if canonical in ([], {}) and not t.frozen and t.name in ("list", "set", "map"):
        return None
    return _sorted_keys(canonical)


def _json(t: CqlType, value: Any) -> Any:
    """Walk a parsed JSON value with its type; anything unexpected is kept as it is (so it
    shows as a difference instead of raising)."""
    if value is None:
        return None
    try:
        name = t.name
        if name in ("decimal", "varint"):
            return _decimal(value)
        if name in ("float", "double"):
            return _float(value)
        if name in ("list", "set") and isinstance(value, list):
            items = [_json(t.params[0], x) for x in value]
            return items if name == "list" else _sorted(items)
        if name == "map" and isinstance(value, Mapping):
            return {str(k): _json(t.params[1], x) for k, x in value.items()}
        if name == "tuple" and isinstance(value, list):
            return [_json(p, x) for p, x in zip(t.params, value, strict=False)] + value[
                len(t.params) :
            ]
        if name == "udt" and isinstance(value, Mapping):
            fields = dict(t.fields)
            out = {f: _json(ft, value.get(f)) for f, ft in t.fields}
            out.update({k: v for k, v in value.items() if k not in fields})
            return out
    except (ValueError, TypeError, InvalidOperation):
        return value
    return value


_compact = json.JSONEncoder(separators=(",", ":"), ensure_ascii=False).encode
# A shape the type does not explain (say a UDT stored in Debezium's raw form) keeps its numbers
# as Decimal: written as their text, so it compares unequal instead of failing the job.
_sorted_keys = json.JSONEncoder(separators=(",", ":"), sort_keys=True, default=str).encode


def _sorted(items: list[Canon]) -> list[Canon]:
    """A set's canonical elements in one order: their own when they compare (all str or all
    int), else by their JSON text."""
    try:
        return sorted(items)
    except TypeError:
        return sorted(items, key=_sorted_keys)


def key_text(key: Sequence[Canon]) -> str:
    """The canonical key as compact JSON text (stored as the mismatch's row_key)."""
    return _compact(list(key))


def mismatch_key(columns: Mapping[str, CqlType], key_columns: Sequence[str], values: Any) -> str:
    """The `row_key` a mismatch of this key (or its leading columns: a partition key) is
    recorded under, from the sink's converted values of `key_columns`."""
    leading = key_columns[: len(values)]
    return key_text([for_postgres(columns[c])(v) for c, v in zip(leading, values, strict=True)])


def row_digest(row: CanonRow) -> bytes:
    """SHA-256 of the canonical row (key and values)."""
    return hashlib.sha256(_compact([row[0], row[1]]).encode()).digest()


def bucket_of(key: str, buckets: int) -> int:
    """The checksum bucket of a canonical key text: a hash, not Cassandra's token, so both
    sides agree without knowing the partitioner."""
    digest = hashlib.blake2b(key.encode(), digest_size=8).digest()
    return int.from_bytes(digest, "big") % buckets


def differing_columns(
    names: Iterable[str], cassandra: Sequence[Canon], postgres: Sequence[Canon]
) -> list[str]:
    """The names of the columns whose canonical values differ."""
    return [n for n, a, b in zip(names, cassandra, postgres, strict=True) if a != b]
