"""Cassandra values as PostgreSQL column values. Pure.

`converter(t)` turns one decoded Debezium cell (JSON- or Avro-decoded) into the object asyncpg's
binary codec expects for `pg_type(t)`: a scalar's value (model.scalars), an array of them, or
jsonb text (model.jsonb). It is cached per type, so hot paths hold on to it. Values that cannot
be stored faithfully raise ConversionError (the record is dead-lettered).
"""

from __future__ import annotations

import functools
from typing import Any

from cdc_sink.model.cql import CqlType, pg_type
from cdc_sink.model.jsonb import jsonb_converter
from cdc_sink.model.scalars import SCALARS, Converter, guard, items, nullable


@functools.lru_cache(maxsize=4096)
def converter(t: CqlType) -> Converter:
    """The function value -> asyncpg binary-codec object for a `pg_type(t)` column (None stays
    None); ConversionError when the value cannot be stored. Cached: hold on to it per column."""
    return guard(t, unguarded_converter(t))


@functools.lru_cache(maxsize=4096)
def unguarded_converter(t: CqlType) -> Converter:
    """converter(t) without its guard, for hot loops: the value must not be None, and a value
    that cannot be stored raises InvalidValue (without the type's name: call converter(t) on it
    for the error to report)."""
    if t.name in SCALARS:
        return SCALARS[t.name][0]
    if pg_type(t) != "jsonb":
        element = nullable(SCALARS[t.params[0].name][0])
        return lambda v: [element(x) for x in items(v)]
    return jsonb_converter(t)


def to_pg(t: CqlType, value: Any) -> Any:
    """One decoded Debezium value as asyncpg's binary codec expects it for `pg_type(t)`."""
    return converter(t)(value)
