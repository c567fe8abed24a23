"""Cassandra column types: parsing, their PostgreSQL column types, and value conversion. Pure.

`converter(t)` turns one decoded Debezium cell (JSON- or Avro-decoded) into the object asyncpg's
binary codec expects for `pg_type(t)`; it is cached per type, so hot paths hold on to it.
Values that cannot be stored faithfully raise ConversionError (the record is dead-lettered).

Decisions worth knowing:
- time keeps microseconds in a `time` column (PostgreSQL's resolution); nanoseconds are dropped.
  Inside jsonb, times keep all nine digits: "13:45:30.123456789".
- duration (nanoseconds; Debezium already folded months into 30 days) becomes a `timedelta`,
  truncated toward zero to microseconds. Inside jsonb it is an ISO 8601 duration with signed
  fields and nanosecond seconds, e.g. "P33DT0.0000005S", "P-1DT-2H", "PT0S".
- decimal/varint are exact everywhere: jsonb gets the digits of the Decimal, never a float.
- jsonb has no NaN/Infinity: those floats and decimals become the strings "NaN", "Infinity",
  "-Infinity" inside jsonb. Columns of type real, double precision and numeric keep them.
- float inside jsonb is written as the shortest decimal that reads back as the same 32-bit
  float (as Cassandra prints it), so JSON-, Avro- and driver-sourced values render the same.
- asyncpg's default codecs silently write date 0001-01-01/9999-12-31 and timestamptz
  0001-01-01T00:00Z/9999-12-31T23:59:59.999999Z as -infinity/infinity; register
  PG_TUPLE_CODECS on every connection that writes these values.
"""

from __future__ import annotations

import base64
import binascii
import functools
import ipaddress
import json
import math
import re
import struct
import uuid
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, replace
from datetime import UTC, date, datetime, time, timedelta
from decimal import MAX_EMAX, MAX_PREC, MIN_EMIN, Context, Decimal, InvalidOperation
from typing import Any, TypeVar

from asyncpg.pgproto import pgproto

from cdc_sink.errors import ConversionError

__all__ = [
    "MAX_TYPE_DEPTH",
    "PG_TUPLE_CODECS",
    "CqlType",
    "OversizedDecimal",
    "converter",
    "decimal_from_bytes",
    "dump_json",
    "from_connect_schema",
    "parse_cql_type",
    "pg_type",
    "to_json_value",
    "to_pg",
]

Converter = Callable[[Any], Any]

MAX_TYPE_DEPTH = 32
"""How deeply types may nest (list<int> is two levels). Far beyond any real schema, and it
bounds every recursion over a type or a value of unknown type, so none can exhaust the stack."""


@dataclass(frozen=True)
class CqlType:
    """A Cassandra column type.

    `frozen` is only ever True on list/set/map/tuple/udt: for frozen<...>, for tuples (always
    frozen in Cassandra), and for such types nested inside a collection, tuple or udt (where
    Cassandra requires them to be frozen).
    """

    name: str
    params: tuple[CqlType, ...] = ()
    fields: tuple[tuple[str, CqlType], ...] = ()
    frozen: bool = False
    udt_name: str | None = None

    def __str__(self) -> str:
        if self.name == "udt":
            inner = _quote_name(self.udt_name or "udt")
        elif self.params:
            inner = f"{self.name}<{', '.join(map(str, self.params))}>"
        else:
            inner = self.name
        return f"frozen<{inner}>" if self.frozen else inner


_PG_SCALAR = {
    "ascii": "text",
    "text": "text",
    "varchar": "text",
    "boolean": "boolean",
    "tinyint": "smallint",
    "smallint": "smallint",
    "int": "integer",
    "bigint": "bigint",
    "counter": "bigint",
    "varint": "numeric",
    "decimal": "numeric",
    "float": "real",
    "double": "double precision",
    "blob": "bytea",
    "uuid": "uuid",
    "timeuuid": "uuid",
    "inet": "inet",
    "timestamp": "timestamptz",
    "date": "date",
    "time": "time",
    "duration": "interval",
}
_ARITY = {"list": 1, "set": 1, "map": 2}


def is_multi_cell(t: CqlType) -> bool:
    """A non-frozen collection: Cassandra stores each element as a cell of its own."""
    return t.name in _ARITY and not t.frozen


def _quote_name(name: str) -> str:
    if re.fullmatch(r"[a-z_][a-z0-9_]*", name):
        return name
    return '"' + name.replace('"', '""') + '"'


def _nest(t: CqlType) -> CqlType:
    """The type as it is when nested: non-scalars inside collections are always frozen."""
    return replace(t, frozen=True) if t.name not in _PG_SCALAR and not t.frozen else t


def udt_definitions(types: Iterable[CqlType]) -> dict[str, list[tuple[str, str]]]:
    """Every UDT used in `types` (nested ones too) as name -> [(field, type text)]: what
    `parse_cql_type` needs to rebuild the types from their text."""
    found: dict[str, list[tuple[str, str]]] = {}

    def visit(t: CqlType) -> None:
        if t.name == "udt" and t.udt_name and t.udt_name not in found:
            found[t.udt_name] = [(field, str(inner)) for field, inner in t.fields]
        for inner in (*t.params, *(f for _, f in t.fields)):
            visit(inner)

    for t in types:
        visit(t)
    return found


# --- parsing Cassandra's type text -------------------------------------------------------------

_TOKEN = re.compile(r'\s*(?:([<>,])|"((?:[^"]|"")+)"|([A-Za-z_]\w*(?:\.[A-Za-z_]\w*)?))', re.ASCII)


def parse_cql_type(
    text: str, udts: Mapping[str, Sequence[tuple[str, str]]] | None = None
) -> CqlType:
    """Parse a system_schema type string ("frozen<map<text, frozen<list<int>>>>", "address").

    `udts` maps UDT name -> [(field, type text)] for the keyspace. When it is given, a name not
    in it is an error; when it is None, UDTs come back with empty `fields`. ValueError on
    anything that is not a supported type, or one nested deeper than MAX_TYPE_DEPTH.
    """
    return _parse(text, udts, nested=False, seen=(), depth=0)


def _bad_type(text: str, reason: str) -> ValueError:
    return ValueError(f"invalid CQL type {text!r}: {reason}")


def _parse(
    text: str,
    udts: Mapping[str, Sequence[tuple[str, str]]] | None,
    nested: bool,
    seen: tuple[str, ...],
    depth: int,
) -> CqlType:
    tokens: list[tuple[str, str]] = []
    pos, stripped = 0, text.strip()
    while pos < len(stripped):
        m = _TOKEN.match(stripped, pos)
        if m is None:
            raise _bad_type(text, f"cannot read it at offset {pos}")
        sym, quoted, word = m.groups()
        if sym:
            tokens.append(("sym", sym))
        elif quoted is not None:
            tokens.append(("quoted", quoted.replace('""', '"')))
        else:
            tokens.append(("word", word))
        pos = m.end()
    parser = _Parser(text, tokens, udts, depth)
    result = parser.parse_type(nested, seen)
    if parser.pos != len(tokens):
        raise _bad_type(text, "text follows the type")
    return result


class _Parser:
    """Recursive descent over the tokens of one type string."""

    def __init__(
        self,
        text: str,
        tokens: list[tuple[str, str]],
        udts: Mapping[str, Sequence[tuple[str, str]]] | None,
        depth: int,
    ) -> None:
        self.text, self.tokens, self.udts, self.pos = text, tokens, udts, 0
        self.depth = depth  # types enclosing the one being parsed (UDTs included)

    def _next(self) -> tuple[str, str]:
        if self.pos >= len(self.tokens):
            raise _bad_type(self.text, "it ends too early")
        self.pos += 1
        return self.tokens[self.pos - 1]

    def _peek_open(self) -> bool:
        return self.pos < len(self.tokens) and self.tokens[self.pos] == ("sym", "<")

    def _params(self, seen: tuple[str, ...], *, inner: bool = True) -> tuple[CqlType, ...]:
        """The types between < and >: one level deeper, unless they are frozen<>'s."""
        if self._next() != ("sym", "<"):
            raise _bad_type(self.text, "'<' expected")
        if inner:
            self._enter()
        params = [self.parse_type(True, seen)]
        while (token := self._next()) == ("sym", ","):
            params.append(self.parse_type(True, seen))
        if token != ("sym", ">"):
            raise _bad_type(self.text, "'>' or ',' expected")
        if inner:
            self.depth -= 1
        return tuple(params)

    def _enter(self) -> None:
        """One level deeper (the caller steps back once done): ValueError past the limit."""
        self.depth += 1
        if self.depth >= MAX_TYPE_DEPTH:
            raise _bad_type(self.text, f"nested deeper than {MAX_TYPE_DEPTH} levels")

    def parse_type(self, nested: bool, seen: tuple[str, ...]) -> CqlType:
        kind, word = self._next()
        if kind == "sym":
            raise _bad_type(self.text, f"unexpected {word!r}")
        if kind == "quoted":
            return self._udt(word, nested, seen)
        low = word.lower()
        if low == "frozen":
            params = self._params(seen, inner=False)
            if len(params) != 1 or params[0].name in _PG_SCALAR:
                raise _bad_type(self.text, "frozen<> takes one collection, tuple or UDT")
            return replace(params[0], frozen=True)
        if low in _ARITY:
            params = self._params(seen)
            if len(params) != _ARITY[low]:
                raise _bad_type(self.text, f"{low} takes {_ARITY[low]} type(s)")
            return CqlType(low, tuple(map(_nest, params)), frozen=nested)
        if low == "tuple":
            return CqlType("tuple", tuple(map(_nest, self._params(seen))), frozen=True)
        if self._peek_open():
            raise _bad_type(self.text, f"{word!r} is not supported")
        if low in _PG_SCALAR:
            return CqlType(low)
        return self._udt(word.rpartition(".")[2], nested, seen)

    def _udt(self, name: str, frozen: bool, seen: tuple[str, ...]) -> CqlType:
        if self.udts is None:
            return CqlType("udt", frozen=frozen, udt_name=name)
        if name not in self.udts:
            raise _bad_type(self.text, f"no type or UDT is named {name!r}")
        if name in seen:
            raise _bad_type(self.text, f"UDT {name!r} contains itself")
        self._enter()
        fields = tuple(
            (field, _nest(_parse(type_text, self.udts, True, (*seen, name), self.depth)))
            for field, type_text in self.udts[name]
        )
        self.depth -= 1
        return CqlType("udt", fields=fields, frozen=frozen, udt_name=name)


# --- Kafka Connect schemas ---------------------------------------------------------------------

_CONNECT_LOGICAL = {
    "io.debezium.time.Timestamp": "timestamp",
    "io.debezium.time.Date": "date",
    "io.debezium.time.NanoDuration": "duration",
    "io.debezium.time.NanoTime": "time",
    "io.debezium.data.Uuid": "uuid",
    "io.debezium.data.VariableScaleDecimal": "decimal",
}
_CONNECT_PLAIN = {
    "int8": "tinyint",
    "int16": "smallint",
    "int32": "int",
    "int64": "bigint",
    "float": "float",
    "float32": "float",
    "double": "double",
    "float64": "double",
    "boolean": "boolean",
    "string": "text",
    "bytes": "blob",
}


def from_connect_schema(schema: Mapping[str, Any]) -> CqlType:
    """Best-effort CqlType from a Kafka Connect JSON schema as Debezium's Cassandra connector
    writes it. Debezium sends time as plain int64, inet and string-mode decimals as plain
    strings: these come back as bigint/text (prefer parse_cql_type when system_schema is at
    hand). Frozenness is unknown at the top level (False; tuples are always frozen).
    ValueError if the schema is not understood or nests types deeper than MAX_TYPE_DEPTH.
    """
    try:
        return _from_connect(schema, nested=False, depth=1)
    except (KeyError, TypeError, AttributeError) as exc:
        raise ValueError(f"invalid Kafka Connect schema: {exc!r}") from exc


def _from_connect(schema: Mapping[str, Any], nested: bool, depth: int) -> CqlType:
    if depth > MAX_TYPE_DEPTH:
        raise ValueError(
            f"invalid Kafka Connect schema: nested deeper than {MAX_TYPE_DEPTH} levels"
        )
    kind, name = schema.get("type"), schema.get("name")
    if name in _CONNECT_LOGICAL:
        return CqlType(_CONNECT_LOGICAL[name])
    if name == "org.apache.kafka.connect.data.Decimal":
        scale = str((schema.get("parameters") or {}).get("scale", "0"))
        return CqlType("varint" if scale == "0" else "decimal")
    if kind in _CONNECT_PLAIN:
        return CqlType(_CONNECT_PLAIN[kind])
    if kind == "array":
        return CqlType(
            "list", (_nest(_from_connect(schema["items"], True, depth + 1)),), frozen=nested
        )
    if kind == "map":
        key, value = (_nest(_from_connect(schema[k], True, depth + 1)) for k in ("keys", "values"))
        return CqlType("map", (key, value), frozen=nested)
    if kind == "struct":
        fields = [
            (f["field"], _nest(_from_connect(f, True, depth + 1))) for f in schema.get("fields", [])
        ]
        names = [f for f, _ in fields]
        if (
            str(name or "").endswith("Tuple")
            and fields
            and names == [f"field{i}" for i in range(1, len(fields) + 1)]
        ):
            return CqlType("tuple", tuple(t for _, t in fields), frozen=True)
        udt_name = str(name).rpartition(".")[2] if name else None
        return CqlType("udt", fields=tuple(fields), frozen=nested, udt_name=udt_name)
    raise ValueError(f"invalid Kafka Connect schema: type {kind!r}, name {name!r}")


# --- PostgreSQL column types -------------------------------------------------------------------


def pg_type(t: CqlType) -> str:
    """The PostgreSQL column type: DESIGN.md's mapping; non-scalar elements make jsonb."""
    scalar = _PG_SCALAR.get(t.name)
    if scalar is not None:
        return scalar
    if t.name in ("list", "set"):
        element = _PG_SCALAR.get(t.params[0].name)
        if element is not None:
            return element + "[]"
    if t.name not in ("list", "set", "map", "tuple", "udt"):
        raise ValueError(f"unknown CQL type name {t.name!r}")
    return "jsonb"


# --- values ------------------------------------------------------------------------------------


class InvalidValue(Exception):
    """A value that cannot be converted. converter() turns it into a ConversionError; the
    functions of unguarded_converter() raise it as it is."""

    def __init__(self, problem: str, value: Any) -> None:
        super().__init__(problem)
        self.problem, self.value = problem, value


def _preview(value: Any) -> str:
    try:
        text = repr(value)
    except ValueError:  # an int of more than 4,300 digits has no repr (sys.int_info)
        text = f"<{type(value).__name__} too large to show>"
    except RecursionError:  # containers nested about as deep as the interpreter's stack
        text = f"<{type(value).__name__} nested too deeply to show>"
    return text if len(text) <= 80 else text[:77] + "..."


def _is_int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _int_of(v: Any, attribute: str) -> int | None:
    """`v` if it is an int, else its int `attribute` (the Cassandra driver's Date, Time, ...)."""
    if not _is_int(v):
        v = getattr(v, attribute, None)
    return int(v) if _is_int(v) else None


def _text(v: Any) -> str:
    if not isinstance(v, str):
        raise InvalidValue("expected a string", v)
    if "\x00" in v:
        raise InvalidValue("PostgreSQL cannot store the NUL character (U+0000)", v)
    if not v.isascii():
        try:
            v.encode()
        except UnicodeEncodeError:
            raise InvalidValue("not valid Unicode (unpaired surrogate)", v) from None
    return v


def _integer(bits: int) -> Converter:
    low, high = -(1 << (bits - 1)), (1 << (bits - 1)) - 1

    def convert(v: Any) -> int:
        if type(v) is not int and not _is_int(v):
            raise InvalidValue("expected an integer", v)
        if not low <= v <= high:
            raise InvalidValue(f"out of the {bits}-bit integer range", v)
        return int(v)

    return convert


def _boolean(v: Any) -> bool:
    if not isinstance(v, bool):
        raise InvalidValue("expected a boolean", v)
    return v


_NONFINITE = {"NaN": math.nan, "Infinity": math.inf, "-Infinity": -math.inf}
_FLOAT32_MAX = 3.4028234663852886e38


def _double(v: Any) -> float:
    if isinstance(v, float):
        return float(v)
    if isinstance(v, str):
        if v in _NONFINITE:
            return _NONFINITE[v]
        raise InvalidValue('expected a number or "NaN"/"Infinity"/"-Infinity"', v)
    if _is_int(v):
        try:
            return float(v)
        except OverflowError:
            raise InvalidValue("too large for a double", v) from None
    raise InvalidValue("expected a number", v)


def _float(v: Any) -> float:
    f = _double(v)
    if abs(f) > _FLOAT32_MAX and not math.isinf(f) and _as_float32(f) is None:
        raise InvalidValue("out of the 32-bit float range", v)  # as asyncpg's float4 encoder would
    return f


def _float_json(f: float) -> float | str:
    if math.isfinite(f):
        return f
    return "NaN" if math.isnan(f) else ("Infinity" if f > 0 else "-Infinity")


def _float32_json(f: float) -> float | str:
    if not math.isfinite(f):
        return _float_json(f)
    single = _as_float32(f)
    if single is None:
        raise InvalidValue("out of the 32-bit float range", f)
    for digits in range(1, 9):  # 9 significant digits always read back as the same float32
        short = float(f"{single:.{digits}g}")
        if _as_float32(short) == single:
            return short
    return float(f"{single:.9g}")


def _as_float32(f: float) -> float | None:
    """`f` rounded to the nearest 32-bit float, None if that overflows."""
    try:
        return float(struct.unpack(">f", struct.pack(">f", f))[0])
    except OverflowError:
        return None


def _blob(v: Any) -> bytes:
    if isinstance(v, bytes):
        return v
    if isinstance(v, bytearray | memoryview):
        return bytes(v)
    if isinstance(v, str):
        try:
            return base64.b64decode(v, validate=True)
        except (binascii.Error, ValueError):
            raise InvalidValue("not valid base64", v) from None
    raise InvalidValue("expected bytes or a base64 string", v)


_PARSED_KEPT = 65_536
_Parsed = TypeVar("_Parsed")
_UUIDS: dict[str, uuid.UUID] = {}
_INETS: dict[str, ipaddress.IPv4Address | ipaddress.IPv6Address] = {}


def _parse_kept(
    kept: dict[str, _Parsed], text: str, parse: Callable[[str], _Parsed], problem: str
) -> _Parsed:
    """parse(text), remembered by its text (a bounded memo): keys and references repeat across
    events, and parsing a UUID or an address costs ~1-2 µs."""
    found = kept.get(text)
    if found is None:
        try:
            found = parse(text)
        except ValueError:
            raise InvalidValue(problem, text) from None
        if len(kept) >= _PARSED_KEPT:
            kept.clear()
        kept[text] = found
    return found


PgUUID: Callable[[str | bytes], uuid.UUID] = pgproto.UUID


def _uuid_text(text: str) -> uuid.UUID:
    """asyncpg's UUID (a uuid.UUID subclass; the type it returns for uuid columns): parsing,
    hashing and str() cost a fraction of the stdlib class's, and keys hash and print often."""
    try:
        return PgUUID(text)
    except ValueError:
        return PgUUID(uuid.UUID(text).bytes)  # braces, urn:uuid: ... or a clear ValueError


def _uuid(v: Any) -> uuid.UUID:
    if isinstance(v, str):
        return _parse_kept(_UUIDS, v, _uuid_text, "not a UUID")
    if isinstance(v, uuid.UUID):
        return v
    try:
        if isinstance(v, bytes):
            return PgUUID(v)
    except ValueError:
        pass
    raise InvalidValue("not a UUID", v)


_IpAddress = ipaddress.IPv4Address | ipaddress.IPv6Address


def _inet_text(text: str) -> _IpAddress:
    # Java's InetAddress.toString(): "hostname/address", hostname often empty.
    return ipaddress.ip_address(text.rpartition("/")[2])


def _inet(v: Any) -> _IpAddress:
    if isinstance(v, str):
        return _parse_kept(_INETS, v, _inet_text, "not an IP address")
    if isinstance(v, _IpAddress):
        return v
    try:
        if isinstance(v, bytes):
            return ipaddress.ip_address(v)
    except ValueError:
        pass
    raise InvalidValue("not an IP address", v)


_EPOCH = datetime(1970, 1, 1, tzinfo=UTC)
_EPOCH_ORDINAL = _EPOCH.toordinal()
_DATETIME_RANGE = "outside the years 1..9999 that can be converted"


def _timestamp(v: Any) -> datetime:
    if type(v) is int or _is_int(v):
        try:
            return _EPOCH + timedelta(milliseconds=int(v))
        except OverflowError:
            raise InvalidValue(_DATETIME_RANGE, v) from None
    if isinstance(v, datetime):
        stamp = v
    elif isinstance(v, str):
        try:
            stamp = datetime.fromisoformat(v)
        except ValueError:
            raise InvalidValue("not an ISO 8601 timestamp", v) from None
    else:
        raise InvalidValue("expected epoch milliseconds or an ISO 8601 string", v)
    if stamp.tzinfo is None:
        return stamp.replace(tzinfo=UTC)  # Cassandra timestamps are instants in UTC
    try:
        return stamp.astimezone(UTC)
    except OverflowError:
        raise InvalidValue(_DATETIME_RANGE, v) from None


def _timestamp_json(stamp: datetime) -> str:
    spec = "milliseconds" if stamp.microsecond % 1000 == 0 else "microseconds"
    return stamp.replace(tzinfo=None).isoformat(timespec=spec) + "Z"


def _date(v: Any) -> date:
    if (days := _int_of(v, "days_from_epoch")) is not None:
        try:
            return date.fromordinal(_EPOCH_ORDINAL + days)
        except (ValueError, OverflowError):
            raise InvalidValue(_DATETIME_RANGE, v) from None
    if isinstance(v, datetime):
        return v.date()
    if isinstance(v, date):
        return v
    if isinstance(v, str):
        try:
            return date.fromisoformat(v)
        except ValueError:
            raise InvalidValue("not an ISO 8601 date", v) from None
    raise InvalidValue("expected days since the epoch", v)


_NANOS_PER_DAY = 86_400 * 10**9
_TIME_TEXT = re.compile(r"([0-9]{2}):([0-9]{2}):([0-9]{2})(?:\.([0-9]{1,9}))?", re.ASCII)


def _time_nanos(v: Any) -> int:
    nanos = _int_of(v, "nanosecond_time")
    if nanos is None:
        if isinstance(v, time):
            nanos = ((v.hour * 60 + v.minute) * 60 + v.second) * 10**9 + v.microsecond * 1000
        elif isinstance(v, str) and (m := _TIME_TEXT.fullmatch(v)) and int(m[2]) < 60 > int(m[3]):
            seconds = int(m[1]) * 3600 + int(m[2]) * 60 + int(m[3])
            nanos = seconds * 10**9 + int((m[4] or "").ljust(9, "0"))
        else:
            raise InvalidValue("expected nanoseconds since midnight", v)
    if not 0 <= nanos < _NANOS_PER_DAY:
        raise InvalidValue("not a time of day", v)
    return nanos


def _time(v: Any) -> time:
    micros = _time_nanos(v) // 1000  # PostgreSQL time has microsecond resolution
    seconds, micro = divmod(micros, 1_000_000)
    return time(seconds // 3600, seconds // 60 % 60, seconds % 60, micro)


def _time_json(v: Any) -> str:
    seconds, nanos = divmod(_time_nanos(v), 10**9)
    return f"{seconds // 3600:02d}:{seconds // 60 % 60:02d}:{seconds % 60:02d}.{nanos:09d}"


def _duration_nanos(v: Any) -> int:
    if _is_int(v):
        return int(v)
    if isinstance(v, timedelta):
        return (v.days * 86_400 + v.seconds) * 10**9 + v.microseconds * 1000
    months, days = _int_of(v, "months"), _int_of(v, "days")
    nanos = _int_of(v, "nanoseconds")
    if months is not None and days is not None and nanos is not None:
        # The Cassandra driver's Duration: fold months into 30 days, as Debezium does.
        return (months * 30 + days) * _NANOS_PER_DAY + nanos
    raise InvalidValue("expected nanoseconds", v)


def _duration(v: Any) -> timedelta:
    nanos = _duration_nanos(v)
    micros = abs(nanos) // 1000  # truncate toward zero: -1500 ns is -1 µs, like +1500 ns is +1
    try:
        return timedelta(microseconds=micros if nanos >= 0 else -micros)
    except OverflowError:
        raise InvalidValue("too long for an interval", v) from None


def _duration_json(v: Any) -> str:
    nanos = _duration_nanos(v)
    if nanos == 0:
        return "PT0S"
    sign = "-" if nanos < 0 else ""
    days, rest = divmod(abs(nanos), _NANOS_PER_DAY)
    hours, rest = divmod(rest, 3_600 * 10**9)
    minutes, rest = divmod(rest, 60 * 10**9)
    seconds, fraction = divmod(rest, 10**9)
    clock = "".join(f"{sign}{n}{unit}" for n, unit in ((hours, "H"), (minutes, "M")) if n)
    if seconds or fraction:
        clock += f"{sign}{seconds}" + f".{fraction:09d}".rstrip("0").rstrip(".") + "S"
    return "P" + (f"{sign}{days}D" if days else "") + (f"T{clock}" if clock else "")


_EXACT = Context(prec=MAX_PREC, Emax=MAX_EMAX, Emin=MIN_EMIN)
# Unambiguous: where two parts could match the same digits, a long run of digits that fails at
# its end makes the regex backtrack in quadratic time (16 s for 40,000 characters).
_DECIMAL_TEXT = re.compile(r"[+-]?(?:[0-9]+(?:\.[0-9]*)?|\.[0-9]+)(?:[eE][+-]?[0-9]+)?", re.ASCII)
_INTEGER_TEXT = re.compile(r"[+-]?[0-9]+", re.ASCII)
_SPECIAL_DECIMALS = {k: Decimal(k) for k in _NONFINITE}
_PG_MAX_SCALE, _PG_MAX_INT_DIGITS = 16383, 131072
_BEYOND_NUMERIC = (
    f"outside PostgreSQL's numeric range (at most {_PG_MAX_INT_DIGITS} digits before the "
    f"decimal point and {_PG_MAX_SCALE} after)"
)
_LOG10_2 = math.log10(2)
_DIRECT_BITS = 1 << 12  # below this, Decimal(int) is as fast as splitting


@dataclass(frozen=True, slots=True)
class OversizedDecimal:
    """A Connect Decimal left unconverted because no PostgreSQL numeric can hold it: what
    `decimal_from_bytes` gives instead of spending the time to convert it. Converters refuse it."""

    size: int  # bytes of the unscaled value
    scale: int

    def __repr__(self) -> str:
        return f"<{self.size}-byte unscaled value, scale {self.scale}>"


def _numeric(d: Decimal, v: Any) -> Decimal:
    if d.is_finite():
        exponent = d.as_tuple().exponent
        assert isinstance(exponent, int)
        if exponent < -_PG_MAX_SCALE or d.adjusted() >= _PG_MAX_INT_DIGITS:
            raise InvalidValue(_BEYOND_NUMERIC, v)
    elif d.is_snan():
        raise InvalidValue("signaling NaN", v)
    return d


def _surely_beyond_numeric(unscaled: int, scale: int) -> bool:
    """Whether unscaled * 10**-scale is certainly outside numeric's range, told from the bit
    length alone: |unscaled| has at least (bits - 1)·log10(2) + 1 digits (with a digit to
    spare for rounding). A False is settled exactly once converted (`_numeric`)."""
    if not -_PG_MAX_INT_DIGITS < scale <= _PG_MAX_SCALE:
        return True  # more than 16383 digits after the point, or 131072 before (zero included)
    return (unscaled.bit_length() - 1) * _LOG10_2 - scale > _PG_MAX_INT_DIGITS + 1


def _int_decimal(n: int) -> Decimal:
    """Decimal(n), exactly. CPython converts a long int in time quadratic in its length (a
    60 KB one takes a third of a second); halving it and recombining with decimal's
    multiplication, which is sub-quadratic, is ten times faster there."""
    bits = n.bit_length()
    if bits <= _DIRECT_BITS:
        return Decimal(n)
    half = 1 << ((bits - 1).bit_length() - 1)  # a power of two: few distinct powers to cache
    high = n >> half
    return _EXACT.fma(_int_decimal(high), _power_of_two(half), _int_decimal(n - (high << half)))


@functools.lru_cache(maxsize=32)
def _power_of_two(exponent: int) -> Decimal:
    return _EXACT.power(2, exponent)


def _scaled(unscaled: int, scale: int, v: Any) -> Decimal:
    """unscaled * 10**-scale as an exact Decimal in numeric's range; InvalidValue otherwise,
    before any conversion work when the bit length already tells."""
    if unscaled.bit_length() <= _DIRECT_BITS and not scale:
        return Decimal(unscaled)  # the common case: far inside numeric's range
    if _surely_beyond_numeric(unscaled, scale):
        raise InvalidValue(_BEYOND_NUMERIC, v)
    return _numeric(_int_decimal(unscaled).scaleb(-scale, _EXACT), v)


def decimal_from_bytes(raw: bytes, scale: int) -> Decimal | OversizedDecimal:
    """A Connect Decimal (big-endian two's complement unscaled value, `scale`) as an exact
    Decimal, or an OversizedDecimal when its size alone shows no numeric can hold it. Linear
    in the length of `raw` until the conversion, which only values that may fit reach."""
    unscaled = int.from_bytes(raw, "big", signed=True)
    if _surely_beyond_numeric(unscaled, scale):
        return OversizedDecimal(len(raw), scale)
    return _int_decimal(unscaled).scaleb(-scale, _EXACT)


def _unscaled(raw: Any, v: Any) -> int:
    if isinstance(raw, str):
        try:
            raw = base64.b64decode(raw, validate=True)
        except (binascii.Error, ValueError):
            raise InvalidValue("not valid base64", v) from None
    if not isinstance(raw, bytes | bytearray) or not raw:
        raise InvalidValue("expected big-endian two's complement bytes", v)
    return int.from_bytes(raw, "big", signed=True)


def _decimal(v: Any) -> Decimal:
    if isinstance(v, str):
        if v in _SPECIAL_DECIMALS:
            return _SPECIAL_DECIMALS[v]
        if not _DECIMAL_TEXT.fullmatch(v):
            raise InvalidValue("not a decimal number", v)
        try:
            parsed = Decimal(v)  # linear in the length of the text
        except InvalidOperation:  # an exponent beyond even decimal's (±999999999999999999)
            raise InvalidValue(_BEYOND_NUMERIC, v) from None
        return _numeric(parsed, v)
    if isinstance(v, float):
        # Debezium's lossy "double" mode: keep the shortest decimal that is this double.
        return Decimal(repr(v)) if math.isfinite(v) else Decimal(_float_json(v))
    if isinstance(v, Decimal):
        return _numeric(v, v)
    if _is_int(v):
        return _scaled(v, 0, v)
    if isinstance(v, Mapping):  # io.debezium.data.VariableScaleDecimal {scale, value}
        scale: Any = v.get("scale")
        if not _is_int(scale):
            raise InvalidValue("expected an integer scale", v)
        return _scaled(_unscaled(v.get("value"), v), int(scale), v)
    if isinstance(v, OversizedDecimal):
        raise InvalidValue(_BEYOND_NUMERIC, v)
    raise InvalidValue("expected a decimal", v)


def _varint(v: Any) -> Decimal:
    # A str of digits is "string" mode; any other str is base64 bytes ("precise" mode over JSON).
    # Base64 made only of digits would be misread: callers that know the Connect schema says
    # bytes should pass bytes.
    if _is_int(v):
        return _scaled(v, 0, v)
    if isinstance(v, str) and _INTEGER_TEXT.fullmatch(v):  # "string" mode
        return _numeric(Decimal(v), v)
    if isinstance(v, str | bytes | bytearray):  # Connect Decimal, scale 0 ("precise" mode)
        return _scaled(_unscaled(v, v), 0, v)
    if isinstance(v, Decimal) and v.is_finite() and v == v.to_integral_value():
        return _numeric(v, v)
    if isinstance(v, OversizedDecimal):
        raise InvalidValue(_BEYOND_NUMERIC, v)
    raise InvalidValue("expected an integer", v)


def _decimal_json(d: Decimal) -> Decimal | str:
    if d.is_finite():
        return d
    return "NaN" if d.is_nan() else ("Infinity" if d > 0 else "-Infinity")


# Per scalar CQL type: (to the PostgreSQL column value, to a JSON value inside jsonb).
_SCALARS: dict[str, tuple[Converter, Converter]] = {
    "boolean": (_boolean, _boolean),
    "tinyint": (_integer(8),) * 2,
    "smallint": (_integer(16),) * 2,
    "int": (_integer(32),) * 2,
    "bigint": (_integer(64),) * 2,
    "counter": (_integer(64),) * 2,
    "float": (_float, lambda v: _float32_json(_float(v))),
    "double": (_double, lambda v: _float_json(_double(v))),
    "blob": (_blob, lambda v: base64.b64encode(_blob(v)).decode("ascii")),
    "uuid": (_uuid, lambda v: str(_uuid(v))),
    "timeuuid": (_uuid, lambda v: str(_uuid(v))),
    "inet": (_inet, lambda v: str(_inet(v))),
    "timestamp": (_timestamp, lambda v: _timestamp_json(_timestamp(v))),
    "date": (_date, lambda v: _date(v).isoformat()),
    "time": (_time, _time_json),
    "duration": (_duration, _duration_json),
    "decimal": (_decimal, lambda v: _decimal_json(_decimal(v))),
    "varint": (_varint, lambda v: _decimal_json(_varint(v))),
    **{name: (_text, _text) for name in ("ascii", "text", "varchar")},
}


def _items(v: Any) -> Iterable[Any]:
    if isinstance(v, str | bytes | bytearray | Mapping) or not isinstance(v, Iterable):
        raise InvalidValue("expected a list", v)
    return v


def _map_entries(v: Any) -> Iterable[tuple[Any, Any]]:
    if isinstance(v, Mapping):
        return v.items()
    entries = []
    for entry in _items(v):
        if isinstance(entry, Mapping) and entry.keys() == {"key", "value"}:  # Avro MapEntry
            entries.append((entry["key"], entry["value"]))
        elif isinstance(entry, list | tuple) and len(entry) == 2:  # JsonConverter [k, v]
            entries.append((entry[0], entry[1]))
        else:
            raise InvalidValue("expected a map entry", entry)
    return entries


def _key_text(key: Any) -> str:
    return key if isinstance(key, str) else dump_json(key)


def _json_any(v: Any, depth: int = 1) -> Any:
    """A value of unknown type (a UDT whose fields are unknown), made safe for jsonb. Its
    nesting is the value's own, not a type's: bounded like a type's."""
    if v is None or isinstance(v, bool | int | Decimal):
        return _decimal_json(v) if isinstance(v, Decimal) else v
    if isinstance(v, str):
        return _text(v)
    if isinstance(v, float):
        return _float_json(v)
    if isinstance(v, bytes | bytearray):
        return base64.b64encode(v).decode("ascii")
    if isinstance(v, Mapping | list | tuple) and depth > MAX_TYPE_DEPTH:
        raise InvalidValue(f"nested deeper than {MAX_TYPE_DEPTH} levels", v)
    if isinstance(v, Mapping):
        return {_key_text(_json_any(k, depth + 1)): _json_any(x, depth + 1) for k, x in v.items()}
    if isinstance(v, list | tuple):
        return [_json_any(x, depth + 1) for x in v]
    if isinstance(v, OversizedDecimal):
        raise InvalidValue(_BEYOND_NUMERIC, v)
    raise InvalidValue("cannot render as JSON", v)


def _nullable(convert: Converter) -> Converter:
    return lambda v: None if v is None else convert(v)


@functools.lru_cache(maxsize=4096)
def _json_converter(t: CqlType) -> Converter:
    """Non-None value -> JSON value (finite Decimals stay Decimal; dump_json writes them)."""
    if t.name in _SCALARS:
        return _SCALARS[t.name][1]
    if t.name in ("list", "set"):
        element = _nullable(_json_converter(t.params[0]))
        return lambda v: [element(x) for x in _items(v)]
    if t.name == "map":
        key, value = _json_converter(t.params[0]), _nullable(_json_converter(t.params[1]))

        def convert_map(v: Any) -> dict[str, Any]:
            out: dict[str, Any] = {}
            for k, x in _map_entries(v):
                if k is None:
                    raise InvalidValue("null map key", v)
                out[_key_text(key(k))] = value(x)
            return out

        return convert_map
    if t.name == "tuple":
        return _tuple_json(t)
    if t.name == "udt":
        return _udt_json(t)
    raise ValueError(f"unknown CQL type name {t.name!r}")


def _tuple_json(t: CqlType) -> Converter:
    elements = [_nullable(_json_converter(p)) for p in t.params]
    names = [f"field{i}" for i in range(1, len(elements) + 1)]

    def convert(v: Any) -> list[Any]:
        if isinstance(v, Mapping):  # Debezium's struct with fields field1..fieldN
            if not v.keys() <= set(names):
                raise InvalidValue(f"tuple fields are {names[0]}..{names[-1]}", v)
            v = [v.get(name) for name in names]
        elif not isinstance(v, list | tuple) or len(v) != len(elements):
            raise InvalidValue(f"expected a tuple of {len(elements)}", v)
        return [convert(x) for convert, x in zip(elements, v, strict=True)]

    return convert


def _udt_json(t: CqlType) -> Converter:
    if not t.fields:
        return _json_any
    fields = [(name, _nullable(_json_converter(ft))) for name, ft in t.fields]
    known = {name for name, _ in fields}

    def convert(v: Any) -> dict[str, Any]:
        if hasattr(v, "_asdict"):  # the Cassandra driver's namedtuple UDTs
            v = v._asdict()
        if not isinstance(v, Mapping):
            raise InvalidValue("expected a mapping of UDT fields", v)
        unknown = [k for k in v if k not in known]
        if unknown:
            raise InvalidValue(f"field {unknown[0]!r} is not in {t}", v)
        return {name: convert(v.get(name)) for name, convert in fields}

    return convert


def _needs_exact(t: CqlType) -> bool:
    """Whether JSON values of `t` may hold Decimals (json.dumps cannot write them exactly)."""
    if t.name in ("decimal", "varint") or (t.name == "udt" and not t.fields):
        return True
    return any(map(_needs_exact, t.params)) or any(_needs_exact(ft) for _, ft in t.fields)


_dumps = functools.partial(json.dumps, ensure_ascii=False, separators=(",", ":"), allow_nan=False)


def dump_json(value: Any) -> str:
    """Compact JSON text for a JSON value; finite Decimals are written with all their digits.

    Same output as json.dumps(..., ensure_ascii=False, separators=(",", ":")), key order kept.
    """
    parts: list[str] = []
    _write_json(value, parts)
    return "".join(parts)


def _write_json(value: Any, out: list[str]) -> None:
    if isinstance(value, Decimal):
        out.append(str(value))  # JSON number grammar accepts Decimal's "1.5E+7" too
    elif isinstance(value, dict):
        out.append("{")
        for i, (key, item) in enumerate(value.items()):
            out.append("," + _dumps(key) + ":" if i else _dumps(key) + ":")
            _write_json(item, out)
        out.append("}")
    elif isinstance(value, list):
        out.append("[")
        for i, item in enumerate(value):
            if i:
                out.append(",")
            _write_json(item, out)
        out.append("]")
    else:
        out.append(_dumps(value))


def _guard(t: CqlType, convert: Converter) -> Converter:
    def guarded(v: Any) -> Any:
        if v is None:
            return None
        try:
            return convert(v)
        except InvalidValue as exc:
            raise ConversionError(f"{t}: {exc.problem}: {_preview(exc.value)}") from None

    return guarded


@functools.lru_cache(maxsize=4096)
def converter(t: CqlType) -> Converter:
    """The function value -> asyncpg binary-codec object for a `pg_type(t)` column (None stays
    None); ConversionError when the value cannot be stored. Cached: hold on to it per column."""
    return _guard(t, unguarded_converter(t))


@functools.lru_cache(maxsize=4096)
def unguarded_converter(t: CqlType) -> Converter:
    """converter(t) without its guard, for hot loops: the value must not be None, and a value
    that cannot be stored raises InvalidValue (without the type's name: call converter(t) on it
    for the error to report)."""
    if t.name in _SCALARS:
        return _SCALARS[t.name][0]
    if pg_type(t) != "jsonb":
        element = _nullable(_SCALARS[t.params[0].name][0])
        return lambda v: [element(x) for x in _items(v)]
    to_json = _json_converter(t)
    dumps = dump_json if _needs_exact(t) else _dumps
    return lambda v: dumps(to_json(v))


def to_pg(t: CqlType, value: Any) -> Any:
    """One decoded Debezium value as asyncpg's binary codec expects it for `pg_type(t)`."""
    return converter(t)(value)


def to_json_value(t: CqlType, value: Any) -> Any:
    """A value as plain JSON-able Python for jsonb: finite decimals stay Decimal (write them with
    dump_json), NaN/±Infinity become strings, bytes base64, instants ISO 8601."""
    return _guarded_json(t)(value)


@functools.lru_cache(maxsize=4096)
def _guarded_json(t: CqlType) -> Converter:
    return _guard(t, _json_converter(t))


# --- asyncpg codecs that keep the edges of time ------------------------------------------------

_PG_EPOCH = datetime(2000, 1, 1, tzinfo=UTC)
_PG_EPOCH_ORDINAL = _PG_EPOCH.toordinal()
_INT32_MAX, _INT64_MAX = 2**31 - 1, 2**63 - 1
_MICROSECOND = timedelta(microseconds=1)


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
"""asyncpg's default date/timestamptz codecs write date 0001-01-01/9999-12-31 and the instants
0001-01-01T00:00Z/9999-12-31T23:59:59.999999Z as -infinity/infinity. On each connection:
`for name, (enc, dec) in PG_TUPLE_CODECS.items(): await conn.set_type_codec(name,
schema="pg_catalog", encoder=enc, decoder=dec, format="tuple")` stores them as they are (and
reads ±infinity back as the extreme date/datetime, naive datetimes are taken as UTC). A
timestamptz may also be given as an int, µs since 1970."""
