"""Cassandra values inside jsonb: lists, sets, maps, tuples and UDTs as JSON values, and the
JSON text PostgreSQL stores. Pure."""

from __future__ import annotations

import base64
import functools
import json
from collections.abc import Iterable, Mapping
from decimal import Decimal
from typing import Any

from cdc_sink.model.cql import MAX_TYPE_DEPTH, CqlType
from cdc_sink.model.scalars import (
    BEYOND_NUMERIC,
    SCALARS,
    Converter,
    InvalidValue,
    OversizedDecimal,
    decimal_json,
    float_json,
    guard,
    items,
    nullable,
    valid_text,
)


def _map_entries(v: Any) -> Iterable[tuple[Any, Any]]:
    if type(v) is dict or isinstance(v, Mapping):
        return v.items()
    entries = []
    for entry in items(v):
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
        return decimal_json(v) if isinstance(v, Decimal) else v
    if isinstance(v, str):
        return valid_text(v)
    if isinstance(v, float):
        return float_json(v)
    if isinstance(v, bytes | bytearray):
        return base64.b64encode(v).decode("ascii")
    if isinstance(v, Mapping | list | tuple) and depth > MAX_TYPE_DEPTH:
        raise InvalidValue(f"nested deeper than {MAX_TYPE_DEPTH} levels", v)
    if isinstance(v, Mapping):
        return {_key_text(_json_any(k, depth + 1)): _json_any(x, depth + 1) for k, x in v.items()}
    if isinstance(v, list | tuple):
        return [_json_any(x, depth + 1) for x in v]
    if isinstance(v, OversizedDecimal):
        raise InvalidValue(BEYOND_NUMERIC, v)
    raise InvalidValue("cannot render as JSON", v)


@functools.lru_cache(maxsize=4096)
def _json_converter(t: CqlType) -> Converter:
    """Non-None value -> JSON value (finite Decimals stay Decimal; dump_json writes them)."""
    if t.name in SCALARS:
        return SCALARS[t.name][1]
    if t.name in ("list", "set"):
        element = nullable(_json_converter(t.params[0]))
        return lambda v: [element(x) for x in items(v)]
    if t.name == "map":
        key, value = _json_converter(t.params[0]), nullable(_json_converter(t.params[1]))

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
    elements = [nullable(_json_converter(p)) for p in t.params]
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
    fields = {name: nullable(_json_converter(ft)) for name, ft in t.fields}

    def convert(v: Any) -> dict[str, Any]:
        if hasattr(v, "_asdict"):  # the Cassandra driver's namedtuple UDTs
            v = v._asdict()
        if not isinstance(v, Mapping):
            raise InvalidValue("expected a mapping of UDT fields", v)
        unknown = [k for k in v if k not in fields]
        if unknown:
            raise InvalidValue(f"field {unknown[0]!r} is not in {t}", v)
        return {name: convert(v.get(name)) for name, convert in fields.items()}

    return convert


def _needs_exact(t: CqlType) -> bool:
    """Whether JSON values of `t` may hold Decimals (json.dumps cannot write them exactly)."""
    if t.name in ("decimal", "varint") or (t.name == "udt" and not t.fields):
        return True
    return any(map(_needs_exact, t.params)) or any(_needs_exact(ft) for _, ft in t.fields)


# One encoder for every value: json.dumps with any non-default option builds a new encoder per
# call, which costs several times the encoding of a small map.
_dumps = json.JSONEncoder(ensure_ascii=False, separators=(",", ":"), allow_nan=False).encode


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


def jsonb_converter(t: CqlType) -> Converter:
    """The function non-None value -> the JSON text of a jsonb column; InvalidValue when the
    value cannot be stored."""
    to_json = _json_converter(t)
    dumps = dump_json if _needs_exact(t) else _dumps
    return lambda v: dumps(to_json(v))


def to_json_value(t: CqlType, value: Any) -> Any:
    """A value as plain JSON-able Python for jsonb: finite decimals stay Decimal (write them with
    dump_json), NaN/±Infinity become strings, bytes base64, instants ISO 8601."""
    return _guarded_json(t)(value)


@functools.lru_cache(maxsize=4096)
def _guarded_json(t: CqlType) -> Converter:
    return guard(t, _json_converter(t))
