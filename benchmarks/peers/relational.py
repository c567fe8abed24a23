"""The generator's Cassandra mutations as a relational Debezium source would have emitted them.

Pure code. `Replica` replays `cdc_synth.synth.SynthEvent`s onto a row model (a partial update
keeps the columns it does not touch, an explicit null clears one, row, partition and range
deletes remove what Cassandra would remove) and yields, per mutation, the change records a
relational connector (MySQL, PostgreSQL with REPLICA IDENTITY FULL) writes: the standard
envelope with flat columns, `before` and `after` as full row images, op c/u/d, and a Kafka
tombstone after each delete when asked. A partition or range delete becomes one delete per
row it removes. `JsonRecords` encodes them as Kafka Connect's JsonConverter with schemas does.

TTLs are left out: the benchmark ends long before a session's day runs out.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from decimal import Decimal
from typing import Any

from cdc_synth.synth import TABLES, RangeBound, SynthEvent, TableSpec

CONNECTOR = "mysql"  # what source.connector says; the sink does not read it
_EPOCH = datetime(1970, 1, 1, tzinfo=UTC)

Key = tuple[Any, ...]
Row = dict[str, Any]


@dataclass(frozen=True, slots=True)
class Change:
    """One change record: `op` c/u/d with full row images, or a tombstone (`op` None)."""

    table: str
    key: Row
    op: str | None
    before: Row | None
    after: Row | None
    ts_us: int


class Replica:
    """The rows the mutations leave, table by table, in Python values as the generator made
    them (a column never written is None)."""

    def __init__(self, tombstones: bool = True) -> None:
        self.tombstones = tombstones
        self.rows: dict[str, dict[Key, Row]] = {table: {} for table in TABLES}
        self._partitions: dict[str, dict[Key, set[Key]]] = {table: {} for table in TABLES}

    def apply(self, event: SynthEvent) -> list[Change]:
        """Apply one mutation; return the change records it makes (none for a delete that
        finds no row)."""
        spec = TABLES[event.table]
        if event.op in ("i", "u"):
            key = tuple(event.key[c] for c in spec.key)
            before = self.rows[event.table].get(key)
            if before is None:
                after = dict.fromkeys((name for name, _ in spec.columns), None)
                after |= dict(event.key)
            else:
                after = dict(before)
            after |= event.cells
            self._store(spec, key, after)
            op = "c" if before is None else "u"
            return [Change(event.table, _key_of(spec, after), op, before, after, event.ts_us)]
        changes: list[Change] = []
        for key in self._deleted(spec, event):
            before = self._remove(spec, key)
            row_key = _key_of(spec, before)
            changes.append(Change(event.table, row_key, "d", before, None, event.ts_us))
            if self.tombstones:
                changes.append(Change(event.table, row_key, None, None, None, event.ts_us))
        return changes

    def changes(self, events: Iterable[SynthEvent]) -> Iterator[Change]:
        for event in events:
            yield from self.apply(event)

    def _deleted(self, spec: TableSpec, event: SynthEvent) -> list[Key]:
        """The stored keys a row, partition or range delete removes, in clustering order."""
        partition = tuple(event.key[c] for c in spec.partition_key)
        if not event.is_partition_delete and event.op == "d":
            key = tuple(event.key[c] for c in spec.key)
            return [key] if key in self.rows[spec.name] else []
        keys = sorted(
            self._partitions[spec.name].get(partition, ()),
            key=lambda k: _clustering_order(k[len(spec.partition_key) :]),
        )
        if event.op == "r":
            keys = [k for k in keys if _in_range(k[len(spec.partition_key) :], event)]
        return keys

    def _store(self, spec: TableSpec, key: Key, row: Row) -> None:
        self.rows[spec.name][key] = row
        partition = key[: len(spec.partition_key)]
        self._partitions[spec.name].setdefault(partition, set()).add(key)

    def _remove(self, spec: TableSpec, key: Key) -> Row:
        row = self.rows[spec.name].pop(key)
        partition = key[: len(spec.partition_key)]
        self._partitions[spec.name][partition].discard(key)
        return row


def _key_of(spec: TableSpec, row: Row) -> Row:
    return {c: row[c] for c in spec.key}


def _clustering_order(values: Key) -> Key:
    # The only clustering column is a timeuuid: Cassandra orders those by their time first.
    return tuple((v.time, v.bytes) for v in values)


def _in_range(clustering: Key, event: SynthEvent) -> bool:
    def compare(bound: RangeBound) -> int:
        mine, theirs = _clustering_order(clustering), _clustering_order(bound.values)
        return (mine > theirs) - (mine < theirs)

    start, end = event.range_start, event.range_end
    after_start = start is None or compare(start) > 0 or (start.inclusive and compare(start) == 0)
    before_end = end is None or compare(end) < 0 or (end.inclusive and compare(end) == 0)
    return after_start and before_end


# --- JsonConverter with schemas --------------------------------------------------------------


def _field_schema(cql: str, optional: bool) -> dict[str, Any]:
    """The Connect schema a relational connector gives a column of this (CQL) type: uuids as
    io.debezium.data.Uuid, timestamps as io.debezium.time.Timestamp, decimals as strings
    (decimal.handling.mode=string), inet as text, sets and lists as arrays, maps as JSON."""
    named = {
        "uuid": ("string", "io.debezium.data.Uuid"),
        "timeuuid": ("string", "io.debezium.data.Uuid"),
        "timestamp": ("int64", "io.debezium.time.Timestamp"),
    }
    schema: dict[str, Any]
    if cql in named:
        kind, name = named[cql]
        schema = {"type": kind, "name": name, "version": 1}
    elif cql == "bigint":
        schema = {"type": "int64"}
    elif cql in ("text", "inet", "decimal"):
        schema = {"type": "string"}
    elif cql.startswith(("set<", "list<")):
        schema = {"type": "array", "items": {"type": "string", "optional": True}}
    elif cql.startswith("map<"):
        schema = {"type": "string", "name": "io.debezium.data.Json", "version": 1}
    else:
        raise ValueError(f"no relational Connect schema for CQL type {cql!r}")
    return {**schema, "optional": optional}


def connect_value(cql: str, value: Any) -> Any:
    """A Python value of the generator as JSON in the relational envelope."""
    if value is None:
        return None
    if cql == "timestamp":
        delta: timedelta = value - _EPOCH
        return delta // timedelta(milliseconds=1)
    if cql.startswith("set<"):
        return sorted(value)
    if cql.startswith("list<"):
        return list(value)
    if cql.startswith("map<"):
        return json.dumps(value, sort_keys=True)
    if cql == "decimal":
        return format(value, "f")
    if cql in ("uuid", "timeuuid", "inet"):
        return str(value)
    return value


def _struct(name: str, fields: list[tuple[str, dict[str, Any]]], optional: bool) -> Any:
    return {
        "type": "struct",
        "fields": [{**schema, "field": field} for field, schema in fields],
        "optional": optional,
        "name": name,
    }


def schemas(spec: TableSpec, server: str = "bench") -> tuple[Any, Any]:
    """(key schema, envelope schema) of a table, as JsonConverter writes them."""
    prefix = f"{server}.shop.{spec.name}"
    key_fields = [(c, _field_schema(spec.cql(c), False)) for c in spec.key]
    key = _struct(f"{prefix}.Key", key_fields, False)
    columns = [(c, _field_schema(cql, c not in spec.key)) for c, cql in spec.columns]
    text = {"type": "string", "optional": False}
    source = _struct(
        "io.debezium.connector.mysql.Source",
        [
            ("version", text),
            ("connector", text),
            ("name", text),
            ("ts_ms", {"type": "int64", "optional": False}),
            ("db", text),
            ("table", {"type": "string", "optional": True}),
        ],
        False,
    )
    envelope = _struct(
        f"{prefix}.Envelope",
        [
            ("before", _struct(f"{prefix}.Value", columns, True)),
            ("after", _struct(f"{prefix}.Value", columns, True)),
            ("source", source),
            ("op", text),
            ("ts_ms", {"type": "int64", "optional": True}),
        ],
        False,
    )
    return key, envelope


def _compact(value: Any) -> bytes:
    return json.dumps(value, separators=(",", ":")).encode()


class JsonRecords:
    """Change records as Kafka key and value bytes (JsonConverter, schemas.enable=true)."""

    def __init__(self, server: str = "bench") -> None:
        self.server = server
        self._schemas = {
            table: tuple(_compact(s) for s in schemas(spec, server))
            for table, spec in TABLES.items()
        }

    def encode(self, change: Change) -> tuple[bytes, bytes | None]:
        """(key, value); the value is None for a tombstone."""
        spec = TABLES[change.table]
        key_schema, value_schema = self._schemas[change.table]
        key = {c: connect_value(spec.cql(c), v) for c, v in change.key.items()}
        key_bytes = b'{"schema":' + key_schema + b',"payload":' + _compact(key) + b"}"
        if change.op is None:
            return key_bytes, None
        payload = {
            "before": self._image(spec, change.before),
            "after": self._image(spec, change.after),
            "source": {
                "version": "3.6.0.Final",
                "connector": CONNECTOR,
                "name": self.server,
                "ts_ms": change.ts_us // 1000,
                "db": "shop",
                "table": change.table,
            },
            "op": change.op,
            "ts_ms": change.ts_us // 1000,
        }
        return key_bytes, b'{"schema":' + value_schema + b',"payload":' + _compact(payload) + b"}"

    @staticmethod
    def _image(spec: TableSpec, row: Row | None) -> Any:
        if row is None:
            return None
        return {c: connect_value(cql, row[c]) for c, cql in spec.columns}


# --- comparing tables -------------------------------------------------------------------------


def canonical(cql: str, value: Any) -> Any:
    """One column value in a form both the model and either sink's PostgreSQL column reduce to
    (uuid, timestamp with or without zone as UTC, numeric or text decimals, arrays, json or
    jsonb as text, inet or text)."""
    if value is None:
        return None
    if cql == "timestamp":
        if isinstance(value, datetime):
            moment = value if value.tzinfo else value.replace(tzinfo=UTC)
            return (moment - _EPOCH) // timedelta(milliseconds=1)
        return int(value)
    if cql.startswith("set<"):
        return tuple(sorted(value)) or None
    if cql.startswith("list<"):
        return tuple(value) or None
    if cql.startswith("map<"):
        mapping = json.loads(value) if isinstance(value, str) else value
        return tuple(sorted(mapping.items())) or None
    if cql == "decimal":
        return str(Decimal(str(value)))
    if cql in ("uuid", "timeuuid", "inet", "text"):
        return str(value)
    return value


def canonical_rows(spec: TableSpec, rows: Iterable[Row]) -> set[Key]:
    """Each row as a tuple of canonical values, in the table's column order."""
    return {tuple(canonical(cql, row[c]) for c, cql in spec.columns) for row in rows}
