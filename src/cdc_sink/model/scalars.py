"""The scalar Cassandra types' values: for each, the object asyncpg's binary codec expects for
its PostgreSQL column and its JSON value inside jsonb (SCALARS), and what every converter shares
(InvalidValue, guard). Pure.

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
"""

from __future__ import annotations

import base64
import binascii
import functools
import ipaddress
import math
import re
import struct
import uuid
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from datetime import UTC, date, datetime, time, timedelta
from decimal import MAX_EMAX, MAX_PREC, MIN_EMIN, Context, Decimal, InvalidOperation
from typing import Any, TypeVar

from cdc_sink.errors import ConversionError
from cdc_sink.model.cql import CqlType

Converter = Callable[[Any], Any]


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


def valid_text(v: Any) -> str:
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


def float_json(f: float) -> float | str:
    if math.isfinite(f):
        return f
    return "NaN" if math.isnan(f) else ("Infinity" if f > 0 else "-Infinity")


def _float32_json(f: float) -> float | str:
    if not math.isfinite(f):
        return float_json(f)
    single = _as_float32(f)
    assert single is not None  # _float refused what overflows
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


def _stdlib_uuid(raw: str | bytes) -> uuid.UUID:
    return uuid.UUID(bytes=raw) if isinstance(raw, bytes) else uuid.UUID(raw)


_make_uuid: Callable[[str | bytes], uuid.UUID] = _stdlib_uuid


def use_uuid_type(make: Callable[[str | bytes], uuid.UUID]) -> None:
    """Convert UUIDs with `make` (from their text or their 16 bytes, ValueError if not a UUID)
    into a uuid.UUID subclass, instead of uuid.UUID. apply.codecs installs asyncpg's UUID (the type
    it returns for uuid columns): parsing, hashing and str() cost a fraction of the stdlib
    class's, and keys hash and print often."""
    global _make_uuid
    _make_uuid = make
    _UUIDS.clear()


def _uuid_text(text: str) -> uuid.UUID:
    try:
        return _make_uuid(text)
    except ValueError:
        return _make_uuid(uuid.UUID(text).bytes)  # braces, urn:uuid: ... or a clear ValueError


def _uuid(v: Any) -> uuid.UUID:
    if isinstance(v, str):
        return _parse_kept(_UUIDS, v, _uuid_text, "not a UUID")
    if isinstance(v, uuid.UUID):
        return v
    try:
        if isinstance(v, bytes):
            return _make_uuid(v)
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
BEYOND_NUMERIC = (
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
            raise InvalidValue(BEYOND_NUMERIC, v)
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
        raise InvalidValue(BEYOND_NUMERIC, v)
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
            raise InvalidValue(BEYOND_NUMERIC, v) from None
        return _numeric(parsed, v)
    if isinstance(v, float):
        # Debezium's lossy "double" mode: keep the shortest decimal that is this double.
        return Decimal(repr(v)) if math.isfinite(v) else Decimal(float_json(v))
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
        raise InvalidValue(BEYOND_NUMERIC, v)
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
        raise InvalidValue(BEYOND_NUMERIC, v)
    raise InvalidValue("expected an integer", v)


def decimal_json(d: Decimal) -> Decimal | str:
    if d.is_finite():
        return d
    return "NaN" if d.is_nan() else ("Infinity" if d > 0 else "-Infinity")


# Per scalar CQL type: (to the PostgreSQL column value, to a JSON value inside jsonb).
SCALARS: dict[str, tuple[Converter, Converter]] = {
    "boolean": (_boolean, _boolean),
    "tinyint": (_integer(8),) * 2,
    "smallint": (_integer(16),) * 2,
    "int": (_integer(32),) * 2,
    "bigint": (_integer(64),) * 2,
    "counter": (_integer(64),) * 2,
    "float": (_float, lambda v: _float32_json(_float(v))),
    "double": (_double, lambda v: float_json(_double(v))),
    "blob": (_blob, lambda v: base64.b64encode(_blob(v)).decode("ascii")),
    **dict.fromkeys(("uuid", "timeuuid"), (_uuid, lambda v: str(_uuid(v)))),
    "inet": (_inet, lambda v: str(_inet(v))),
    "timestamp": (_timestamp, lambda v: _timestamp_json(_timestamp(v))),
    "date": (_date, lambda v: _date(v).isoformat()),
    "time": (_time, _time_json),
    "duration": (_duration, _duration_json),
    "decimal": (_decimal, lambda v: decimal_json(_decimal(v))),
    "varint": (_varint, lambda v: decimal_json(_varint(v))),
    **{name: (valid_text, valid_text) for name in ("ascii", "text", "varchar")},
}


def _decimal_text(d: Decimal) -> str:
    if not d.is_finite():
        return str(decimal_json(d))
    if d.is_zero():
        return "0"
    return format(d.normalize(_EXACT), "f")


def _float_text(f: float | str) -> str:
    if isinstance(f, str):  # NaN, Infinity, -Infinity
        return f
    return repr(f + 0.0)  # -0.0 + 0.0 is 0.0: equal values render alike


def _int_text(convert: Converter) -> Converter:
    return lambda v: str(convert(v))


def _inet_render(v: Any) -> str:
    address = _inet(v)
    mapped = getattr(address, "ipv4_mapped", None)
    # RFC 5952's form for an IPv4-mapped address, whatever the Python version prints.
    return f"::ffff:{mapped}" if mapped is not None else str(address)


# Per scalar CQL type: a value as canonical text (README "PII masking"): what `hash` digests
# when the column is not text, so that the digest of a known value can be computed by hand.
TEXT_RENDERINGS: dict[str, Converter] = {
    "boolean": lambda v: "true" if _boolean(v) else "false",
    **{n: _int_text(SCALARS[n][0]) for n in ("tinyint", "smallint", "int", "bigint", "counter")},
    "varint": lambda v: _decimal_text(_varint(v)),
    "decimal": lambda v: _decimal_text(_decimal(v)),
    "float": lambda v: _float_text(_float32_json(_float(v))),
    "double": lambda v: _float_text(float_json(_double(v))),
    "blob": lambda v: "0x" + _blob(v).hex(),
    **dict.fromkeys(("uuid", "timeuuid"), lambda v: str(_uuid(v)).lower()),
    "inet": _inet_render,
    "timestamp": lambda v: _timestamp_json(_timestamp(v)),
    "date": lambda v: _date(v).isoformat(),
    "time": _time_json,
    "duration": _duration_json,
    **{name: valid_text for name in ("ascii", "text", "varchar")},
}


def text_rendering(t: CqlType) -> Converter | None:
    """A value of `t` (a scalar, or a list or set of scalars) -> its canonical text (a list of
    texts, None elements kept); None for a type without one (maps, tuples, UDTs, nested
    collections). InvalidValue for a value the type's converter refuses."""
    if t.name in TEXT_RENDERINGS:
        return TEXT_RENDERINGS[t.name]
    if t.name in ("list", "set") and t.params[0].name in TEXT_RENDERINGS:
        element = nullable(TEXT_RENDERINGS[t.params[0].name])
        return lambda v: [element(x) for x in items(v)]
    return None


def guard(t: CqlType, convert: Converter, shown: str | None = None) -> Converter:
    """`convert` for any value (None stays None); InvalidValue becomes a ConversionError naming
    `t`, the problem and a preview of the value (`shown` instead, if given: a mask's marker)."""

    def guarded(v: Any) -> Any:
        if v is None:
            return None
        try:
            return convert(v)
        except InvalidValue as exc:
            value = _preview(exc.value) if shown is None else shown
            raise ConversionError(f"{t}: {exc.problem}: {value}") from None

    return guarded


def items(v: Any) -> Iterable[Any]:
    if type(v) is list:  # what both decoders make: spares the ABC checks below
        return v
    if isinstance(v, str | bytes | bytearray | Mapping) or not isinstance(v, Iterable):
        raise InvalidValue("expected a list", v)
    return v


def nullable(convert: Converter) -> Converter:
    return lambda v: None if v is None else convert(v)
