"""Target tables: identifiers, column types, DDL text, and event → mutation conversion. Pure.

A Cassandra table `ks.t` lands in PostgreSQL as `<schema>.cdc_t` (CDC_SINK__TABLE_NAME_FORMAT):
its primary-key columns (partition then clustering, as in the event key) form the primary key,
each regular column maps by DESIGN.md's type table, and a few `_cdc_*` columns keep what the
merge needs (per-cell write timestamps, row marker, row tombstone) plus the write time and the
next expiry for operators and reconciliation.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import ipaddress
import re
import uuid
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field, replace
from decimal import Decimal, InvalidOperation
from typing import Any

from cdc_sink.errors import ConversionError, EventError
from cdc_sink.model.cql import CqlType, is_multi_cell, pg_type
from cdc_sink.model.events import RANGE_FIELDS, Bound, ChangeEvent, Mutation, Op
from cdc_sink.model.masking import ColumnMask, as_text
from cdc_sink.model.scalars import InvalidValue, guard, text_rendering
from cdc_sink.model.values import converter, unguarded_converter

PG_IDENTIFIER_BYTES = 63
META_COLUMNS: dict[str, str] = {
    "_cdc_cells": "jsonb NOT NULL DEFAULT '{}'",
    "_cdc_marker_ts": "bigint",
    "_cdc_marker_expires_us": "bigint",
    "_cdc_deleted_ts": "bigint",
    "_cdc_write_ts": "timestamptz",
    "_cdc_expires_at": "timestamptz",
    "_cdc_updated_at": "timestamptz NOT NULL DEFAULT now()",
}
# Columns every PostgreSQL table has already: no column of another kind may take their names.
PG_SYSTEM_COLUMNS = frozenset(("tableoid", "xmin", "cmin", "xmax", "cmax", "ctid"))
# Names a target table cannot give to a Cassandra column. Identifiers are quoted, so only an
# exact match clashes: `_CDC_CELLS` or `Xmin` are ordinary columns.
RESERVED_COLUMNS = frozenset(META_COLUMNS) | PG_SYSTEM_COLUMNS
# `<prefix><delimiter><keyspace><delimiter><table>`, Debezium's topic name: Cassandra allows
# only word characters in keyspace and table names, so any other delimiter sets them apart.
_DEBEZIUM_TOPIC = re.compile(r"(\W)(\w+)\1(\w+)$")


class IdentifierError(EventError):
    """A keyspace, table or column name PostgreSQL cannot hold faithfully."""


class ReservedColumnError(IdentifierError):
    """A Cassandra column whose name the target table cannot take (RESERVED_COLUMNS)."""


class TableOwnerError(EventError):
    """The event's Cassandra table maps to a target table made for another Cassandra table."""


def refuse_reserved(keyspace: str, table: str, columns: Iterable[str]) -> None:
    """Raise ReservedColumnError naming the first of `columns` (of keyspace.table) that is
    reserved. The sink never makes such a column, and refuses the whole table rather than
    apply its rows without it."""
    for name in columns:
        if name in RESERVED_COLUMNS:
            kind = (
                "a PostgreSQL system column"
                if name in PG_SYSTEM_COLUMNS
                else "one of the columns the sink keeps its own bookkeeping in"
            )
            raise ReservedColumnError(
                f"column {name!r} of {keyspace}.{table} has a name the target table cannot "
                f"take ({kind}): every record of the table is dead-lettered until the "
                "column is dropped or renamed in Cassandra"
            )


def require_owner(schema: TableSchema, keyspace: str, table: str, table_format: str) -> None:
    """Raise TableOwnerError unless `schema` was made for keyspace.table: a target table holds
    the rows of one Cassandra table, never of two whose names map to the same target."""
    if (schema.keyspace, schema.table) == (keyspace, table):
        return
    fix = (
        "put {keyspace} in it (e.g. 'cdc_{keyspace}_{table}') so that each keyspace gets a "
        "table of its own"
        if "{keyspace}" not in table_format
        else "separate {keyspace} and {table} so that the two names differ"
    )
    raise TableOwnerError(
        f"target table {schema.target!r} is owned by {schema.keyspace}.{schema.table} "
        f"(recorded in _cdc_schema_metadata), and {keyspace}.{table} maps to the same name "
        f"under CDC_SINK__TABLE_NAME_FORMAT={table_format!r}: {fix}, then replay these records"
    )


def quote_ident(name: str) -> str:
    """Quote any name as a PostgreSQL identifier; refuse what would be silently altered.

    PostgreSQL truncates identifiers longer than 63 bytes (two long names could then collide)
    and cannot store NUL, so both are rejected instead of being mangled.
    """
    if not name or "\x00" in name:
        raise IdentifierError(f"invalid identifier {name!r}")
    if len(name.encode()) > PG_IDENTIFIER_BYTES:
        raise IdentifierError(
            f"identifier {name[:40]!r}… is {len(name.encode())} bytes; PostgreSQL keeps 63"
        )
    return '"' + name.replace('"', '""') + '"'


def qualified(schema: str, table: str) -> str:
    return f"{quote_ident(schema)}.{quote_ident(table)}"


def lock_id(*parts: str) -> int:
    """A PostgreSQL advisory-lock key (bigint) for what `parts` name, e.g. a target table."""
    digest = hashlib.blake2b("\x00".join(parts).encode(), digest_size=8).digest()
    return int.from_bytes(digest, "big", signed=True)


def lock_ids(first: str, rest: Iterable[str]) -> set[int]:
    """`{lock_id(first, part) for part in rest}`, hashing `first` once (a batch locks up to a
    thousand partitions of one table)."""
    prefix = hashlib.blake2b(first.encode() + b"\x00", digest_size=8)
    ids = set()
    for part in rest:
        digest = prefix.copy()
        digest.update(part.encode())
        ids.add(int.from_bytes(digest.digest(), "big", signed=True))
    return ids


def target_name(table_format: str, keyspace: str, table: str) -> str:
    """The PostgreSQL table name for a Cassandra table ({table} and {keyspace} fill in)."""
    return table_format.format(table=table, keyspace=keyspace)


def topic_source(topic: str) -> tuple[str, str] | None:
    """(keyspace, table) of a topic named as Debezium names them, None if the name does not
    end in `<delimiter><keyspace><delimiter><table>` with a delimiter that is not a word
    character."""
    found = _DEBEZIUM_TOPIC.search(topic)
    return (found[2], found[3]) if found else None


def name_collisions(topics: Iterable[str], table_format: str) -> dict[str, list[str]]:
    """The target names that tables of more than one keyspace map to, as far as the topics'
    names tell, each with those tables (`keyspace.table`, sorted)."""
    sources: dict[str, set[str]] = {}
    for topic in topics:
        source = topic_source(topic)
        if source is not None:
            target = target_name(table_format, *source)
            sources.setdefault(target, set()).add(".".join(source))
    return {target: sorted(found) for target, found in sources.items() if len(found) > 1}


def expiry_index_name(target: str) -> str:
    """Named by a hash of the table name, so any name fits in 63 bytes (sql/004 computes the
    same name for tables created before the index existed)."""
    digest = hashlib.md5(target.encode(), usedforsecurity=False).hexdigest()
    return "_cdc_expiry_" + digest[:16]


@dataclass(frozen=True)
class TableSchema:
    """What the sink knows of one target table: its columns and their Cassandra types."""

    keyspace: str
    table: str
    target: str
    key_columns: tuple[str, ...]
    columns: Mapping[str, CqlType]  # every column, key columns included
    partition_columns: tuple[str, ...] | None = None
    version: int = 1
    # PII masks by column (model.masking): each composes with the column's converter, so
    # every path that converts through `converters` / `unguarded` writes masked values only.
    masks: Mapping[str, ColumnMask] = field(default_factory=dict, compare=False)
    # Columns PostgreSQL holds as text (a `hash` rule made them so) that no rule masks now:
    # written as their values' canonical text (model.scalars.text_rendering), in the clear.
    rendered: frozenset[str] = field(default=frozenset(), compare=False)
    converters: dict[str, Callable[[Any], Any]] = field(init=False, compare=False)
    unguarded: dict[str, Callable[[Any], Any]] = field(init=False, compare=False)
    # Per column, the type its PostgreSQL column holds (`pg_type`): the Cassandra type, or
    # text for one a `hash` rule renders (ColumnMask.stored_type) or `rendered` names.
    stored_types: dict[str, CqlType] = field(init=False, compare=False)
    multi_cell: tuple[str, ...] = field(init=False, compare=False)  # non-frozen collections
    # `unguarded` of the columns an event's cells may name (schema.direct's one-pass path)
    cell_converters: dict[str, Callable[[Any], Any]] = field(init=False, compare=False)

    def __post_init__(self) -> None:
        for name in (self.target, *self.columns):
            quote_ident(name)
        refuse_reserved(self.keyspace, self.table, self.columns)
        for derived in ("converters", "unguarded", "stored_types"):
            object.__setattr__(self, derived, {})
        for name, cql in self.columns.items():
            mask = self.masks.get(name)
            render = text_rendering(cql) if name in self.rendered and mask is None else None
            if mask is not None:
                plain = unguarded_converter(cql)
                made = mask.guarded(cql, plain), mask.unguarded(plain), mask.stored_type or cql
            elif render is not None:
                made = guard(cql, render), render, as_text(cql)
            else:
                made = converter(cql), unguarded_converter(cql), cql
            self.converters[name], self.unguarded[name], self.stored_types[name] = made
        multi_cell = tuple(n for n, t in self.columns.items() if is_multi_cell(t))
        object.__setattr__(self, "multi_cell", multi_cell)
        # interpret never makes a cell of a key column or a range bound
        not_cells = {*self.key_columns, *RANGE_FIELDS}
        cells = {n: c for n, c in self.unguarded.items() if n not in not_cells}
        object.__setattr__(self, "cell_converters", cells)

    @property
    def value_columns(self) -> tuple[str, ...]:
        return tuple(name for name in self.columns if name not in self.key_columns)

    def with_columns(self, added: Mapping[str, CqlType]) -> TableSchema:
        """A new version of the schema with extra columns (existing ones never change type)."""
        fresh = {k: v for k, v in added.items() if k not in self.columns}
        if not fresh:
            return self
        return replace(self, columns={**self.columns, **fresh}, version=self.version + 1)

    def with_masks(
        self, masks: Mapping[str, ColumnMask], rendered: Iterable[str] | None = None
    ) -> TableSchema:
        """The same schema converting through `masks` (MaskingPolicy.masks), and
        writing the unmasked columns of `rendered` (if given) as text."""
        found = self.rendered if rendered is None else frozenset(rendered)
        return replace(self, masks=masks, rendered=found)

    def column_type(self, name: str) -> str:
        """The PostgreSQL type of column `name` (text where its values are stored as text)."""
        return pg_type(self.stored_types[name])

    def retyped(self, actual: Mapping[str, str]) -> dict[str, str]:
        """Of the columns `actual` (name -> PostgreSQL type, as format_type names it) lists,
        those whose type differs from what this schema writes only because a `hash` rule
        stores them as text now: name -> the type to change them to."""
        return {
            name: want
            for name, want in ((n, self.column_type(n)) for n in self.masks)
            if name in actual and actual[name] != want and want in ("text", "text[]")
        }

    def create_sql(self, schema: str) -> str:
        lines = [f"{quote_ident(n)} {self.column_type(n)}" for n in self.columns]
        lines += [f"{quote_ident(n)} {ddl}" for n, ddl in META_COLUMNS.items()]
        keys = ", ".join(quote_ident(k) for k in self.key_columns)
        lines.append(f"PRIMARY KEY ({keys})")
        body = ",\n  ".join(lines)
        return f"CREATE TABLE IF NOT EXISTS {qualified(schema, self.target)} (\n  {body}\n)"

    def expiry_index_sql(self, schema: str) -> str:
        """The index the expiry task reads (`_cdc_expires_at <= now`): partial, so rows without
        a TTL cost it nothing; without it each pass would scan the whole table."""
        return (
            f"CREATE INDEX IF NOT EXISTS {quote_ident(expiry_index_name(self.target))} "
            f"ON {qualified(schema, self.target)} (_cdc_expires_at) "
            "WHERE _cdc_expires_at IS NOT NULL"
        )

    def add_column_sql(self, schema: str, name: str) -> str:
        return (
            f"ALTER TABLE {qualified(schema, self.target)} ADD COLUMN IF NOT EXISTS "
            f"{quote_ident(name)} {self.column_type(name)}"
        )

    def to_mutation(self, event: ChangeEvent) -> Mutation:
        """Convert the event's key and cell values to PostgreSQL values (ConversionError if
        one does not fit), in this table's key order."""
        convert = self.unguarded
        try:  # the per-record path: one call per value; the checked path explains failures
            key = tuple(
                [None if (v := event.key[n]) is None else convert[n](v) for n in self.key_columns]
            )
            values = {
                n: None if (v := c.value) is None else convert[n](v) for n, c in event.cells.items()
            }
        except (KeyError, InvalidValue):
            key, values = self._checked_values(event)
        if event.op is Op.DELETE and not event.is_partition_delete:
            return Mutation(event, key, {})
        if event.op is not Op.RANGE:
            emptied = self.emptied(event, values) if self.multi_cell else ()
            return Mutation(event, key, values, emptied=emptied)
        start, end = self._bound(event.range_start), self._bound(event.range_end)
        marshal = {n: m for b in (event.range_start, event.range_end) if b for n, _, m in b.values}
        descending = tuple(
            marshal.get(name, "").startswith(REVERSED)
            for name in self.key_columns
            if event.key.get(name) is None
        )
        return Mutation(event, key, values, start, end, descending)

    def emptied(self, event: ChangeEvent, values: dict[str, Any]) -> tuple[str, ...]:
        """The non-frozen collections the event sends empty, their values set to None.

        Cassandra has no empty non-frozen collection: `c = null`, `c = {}`, `c = []` and
        `DELETE c` delete its elements, and Debezium sends each as an empty collection. That
        is a null and no live cell (it keeps no row alive), whereas an empty frozen collection
        is a value.
        """
        emptied = tuple(
            name
            for name in self.multi_cell
            if values.get(name) is not None and not event.cells[name].value
        )
        for name in emptied:
            values[name] = None
        return emptied

    def _checked_values(self, event: ChangeEvent) -> tuple[tuple[Any, ...], dict[str, Any]]:
        """(key, values) of the event, or the EventError / ConversionError saying why not."""
        missing = [name for name in self.key_columns if name not in event.key]
        if missing:
            raise EventError(f"the key lacks primary-key column(s) {', '.join(missing)}")
        key = tuple(self._convert(name, event.key[name]) for name in self.key_columns)
        values = {name: self._convert(name, cell.value) for name, cell in event.cells.items()}
        return key, values

    def _convert(self, column: str, value: Any) -> Any:
        if value is None:
            return None
        try:
            return self.converters[column](value)
        except ConversionError as exc:
            raise ConversionError(f"column {column!r}: {exc}") from exc

    def _bound(self, bound: Bound | None) -> tuple[Any, ...]:
        if bound is None:
            return ()
        return tuple(parse_clustering_text(text, marshal) for _, text, marshal in bound.values)


REVERSED = "org.apache.cassandra.db.marshal.ReversedType("
_MARSHAL = "org.apache.cassandra.db.marshal."


def _parse_timestamp(text: str) -> dt.datetime:
    value = dt.datetime.fromisoformat(text.replace("Z", "+00:00"))
    return value if value.tzinfo else value.replace(tzinfo=dt.UTC)


_TEXT_PARSERS: dict[str, Callable[[str], Any]] = {
    "Int32Type": int,
    "LongType": int,
    "ShortType": int,
    "ByteType": int,
    "CounterColumnType": int,
    "UTF8Type": str,
    "AsciiType": str,
    "BooleanType": lambda s: s.lower() == "true",
    "DoubleType": float,
    "FloatType": float,
    "DecimalType": Decimal,
    "IntegerType": Decimal,
    "UUIDType": uuid.UUID,
    "TimeUUIDType": uuid.UUID,
    "LexicalUUIDType": uuid.UUID,
    "TimestampType": _parse_timestamp,
    "SimpleDateType": dt.date.fromisoformat,
    "TimeType": lambda s: dt.time.fromisoformat(s[:15]),
    "BytesType": lambda s: bytes.fromhex(s.removeprefix("0x")),
    "InetAddressType": lambda s: ipaddress.ip_address(s.lstrip("/")),
}


def parse_clustering_text(text: str, marshal: str) -> Any:
    """A range bound's value (Cassandra's text rendering) as the PostgreSQL value it bounds."""
    name = marshal
    if name.startswith(REVERSED):
        name = name[len(REVERSED) : -1]
    name = re.sub(r"\(.*\)$", "", name.removeprefix(_MARSHAL))
    parser = _TEXT_PARSERS.get(name)
    if parser is None:
        raise EventError(f"range tombstone on a clustering type the sink cannot order: {marshal}")
    try:
        return parser(text)
    except (ValueError, InvalidOperation) as exc:
        raise EventError(f"range bound {text!r} is not a valid {name}") from exc
