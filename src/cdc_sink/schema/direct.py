"""Decoded record → Mutation in one pass, for the common row events. Pure, no I/O.

The general path takes three steps: `events.interpret` checks the envelope and builds the
ChangeEvent, the catalog resolves its table, `TableSchema.to_mutation` converts its key and
cells. For an insert, update or row delete of a table the catalog knows already, every cell
naming one of its columns, `direct_mutation` does the same in one walk over the record and
returns the same Mutation. Whatever it does not take — a partition or range delete, a new column,
an envelope the general path would refuse, a value a converter refuses — it declines (None):
the caller then takes the general path, which makes the record's mutation, or its error, as it
always has.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from cdc_sink.model.events import (
    RANGE_FIELDS,
    Cell,
    ChangeEvent,
    Mutation,
    Op,
    Position,
    is_snapshot,
    op_name,
)
from cdc_sink.schema.tables import TableSchema

# The ops of a single row; a range tombstone ("r") always takes the general path.
_ROW_OPS = {"i": Op.INSERT, "u": Op.UPDATE, "d": Op.DELETE}

Known = Callable[[str, str], TableSchema | None]  # (keyspace, table) -> its resolved schema


def direct_mutation(
    known: Known, key: Any, value: Any, position: Position
) -> tuple[Mutation, TableSchema, str] | None:
    """The record's (mutation, table, op name) exactly as interpret → resolve → to_mutation
    make them, or None where this path declines (see the module). `known` is the catalog's
    schema of a source, if it has one. Never raises for a record: anything the record trips
    here, the general path reports."""
    try:
        return _direct(known, key, value, position)
    except Exception:  # noqa: BLE001 - declined: the general path meets it again and reports it
        return None


def _direct(
    known: Known, key: Any, value: Any, position: Position
) -> tuple[Mutation, TableSchema, str] | None:
    op_text = value.get("op")
    op = _ROW_OPS.get(op_text) if type(op_text) is str else None
    source, after = value.get("source"), value.get("after")
    if op is None or type(source) is not dict or type(after) is not dict or type(key) is not dict:
        return None
    keyspace, table = source.get("keyspace"), source.get("table")
    if type(keyspace) is not str or type(table) is not str:
        return None
    # The catalog knows only sources whose names interpret accepted.
    schema = known(keyspace, table)
    ts_us = source.get("ts_us")
    if schema is None or type(ts_us) is not int:
        return None
    key_columns, convert = schema.key_columns, schema.unguarded
    if len(key) != len(key_columns):
        return None  # then `name in key` below is `name in key_columns`
    converted_key = []
    for name in key_columns:
        raw = key.get(name)
        if raw is None:
            return None  # a missing column, or a partition delete's
        converted_key.append(convert[name](raw))

    cells: dict[str, Cell] = {}
    values: dict[str, Any] = {}
    if op is not Op.DELETE:
        cell_converters = schema.cell_converters
        for name, cell in after.items():
            if cell is None:
                continue  # untouched
            to_pg = cell_converters.get(name)
            if to_pg is None:
                if name in key or name in RANGE_FIELDS:
                    continue
                return None  # a column the table lacks: resolving adds it
            if type(cell) is not dict:
                return None
            raw = cell["value"]  # a struct without it: KeyError, declined
            expires = cell.get("deletion_ts")
            if expires is not None and type(expires) is not int:
                return None
            cells[name] = Cell(raw, expires)
            values[name] = None if raw is None else to_pg(raw)

    event = ChangeEvent(
        keyspace=keyspace,
        table=table,
        op=op,
        key=key,  # the decoder's own dict, made for this record alone
        cells=cells,
        ts_us=ts_us,
        snapshot=is_snapshot(source.get("snapshot")),
        position=position,
    )
    emptied = schema.emptied(event, values) if schema.multi_cell else ()
    mutation = Mutation(event, tuple(converted_key), values, emptied=emptied)
    return mutation, schema, op_name(event)
