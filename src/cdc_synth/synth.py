"""Synthetic Debezium Cassandra change events for a small `shop` keyspace, and a producer.

Generation is pure: a seeded `Generator` yields `SynthEvent`s (what the Cassandra mutation did,
in plain Python values) and the encoders turn each into Kafka key/value bytes exactly as the
connector would emit it (see the README's "What the sink reads"):

- `JsonEncoder`: Kafka Connect's JsonConverter with schemas.enable=true.
- `SchemalessJsonEncoder`: the same with schemas.enable=false (the payloads alone).
- `AvroEncoder`: Confluent's AvroConverter (wire format: magic 0, schema id, Avro body). The
  real connector names every cell struct `cell_value`, which Confluent-API registries refuse
  (HTTP 422) because the name is redefined per column type. As the community-patched connector
  does, each cell struct here gets its own name, `cell_value_<column>`; the binary encoding is
  the same. Decoding the duplicate-name form is covered by the decoder's own tests.

Values follow the connector's JSON encodings: timestamp = epoch ms (io.debezium.time.Timestamp),
uuid/timeuuid = canonical strings (io.debezium.data.Uuid), inet = "/a.b.c.d", decimal = plain
string (decimal.handling.mode=string), sets and lists = arrays, maps = objects (Avro: arrays of
MapEntry). Collections are always written whole (CQL assignment), never appended to: the
connector's delta form is lossy. Clearing a collection is sent as an empty one, as the
connector does; `SynthEvent.cells` records it as None.

`produce()` is the thin I/O part: it creates the topics, registers Avro schemas and sends with
acks=all, optionally at a fixed rate.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import io
import json
import random
import struct
import time
import uuid
from collections import deque
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, replace
from datetime import UTC, datetime, timedelta
from decimal import Decimal
from ipaddress import IPv4Address
from typing import Any

import fastavro

from cdc_sink.model.cql import parse_cql_type
from cdc_sink.schema.tables import TableSchema, target_name

__all__ = [
    "KEYSPACE",
    "TABLES",
    "AvroEncoder",
    "Generator",
    "JsonEncoder",
    "RangeBound",
    "SchemalessJsonEncoder",
    "Sent",
    "SynthEvent",
    "TableSpec",
    "avro_schemas",
    "cql_ddl",
    "delete_topics",
    "ensure_topics",
    "envelope",
    "expiry_us",
    "generate",
    "key_schema",
    "produce",
    "produce_encoded",
    "register_schemas",
    "target_schema",
    "topic_for",
    "value_schema",
]

KEYSPACE = "shop"
LOGICAL_NAME = "cdc"  # the connector's topic.prefix: it appears in source.name and schema names
CONNECTOR_VERSION = "3.6.1.Final"
DEFAULT_TOPIC_PREFIX = "cdc-events-"
PARTITIONS = 8
_MARSHAL = "org.apache.cassandra.db.marshal."


@dataclass(frozen=True)
class TableSpec:
    """One Cassandra table: columns in CQL order (partition key, clustering, regular)."""

    name: str
    partition_key: tuple[str, ...]
    clustering: tuple[str, ...]
    columns: tuple[tuple[str, str], ...]  # (name, CQL type)
    ttl_s: int | None = None  # every write is `USING TTL ttl_s`

    @property
    def key(self) -> tuple[str, ...]:
        return self.partition_key + self.clustering

    @property
    def regular(self) -> tuple[str, ...]:
        return tuple(name for name, _ in self.columns if name not in self.key)

    def cql(self, column: str) -> str:
        return dict(self.columns)[column]


TABLES: dict[str, TableSpec] = {
    "users": TableSpec(
        "users",
        ("user_id",),
        (),
        (
            ("user_id", "uuid"),
            ("email", "text"),
            ("name", "text"),
            ("created_at", "timestamp"),
            ("balance", "decimal"),
            ("tags", "set<text>"),
            ("prefs", "map<text, text>"),
            ("last_ip", "inet"),
        ),
    ),
    "orders": TableSpec(
        "orders",
        ("customer_id",),
        ("order_id",),
        (
            ("customer_id", "uuid"),
            ("order_id", "timeuuid"),
            ("status", "text"),
            ("total", "decimal"),
            ("items", "list<text>"),
            ("placed_at", "timestamp"),
        ),
    ),
    "sessions": TableSpec(
        "sessions",
        ("session_id",),
        (),
        (
            ("session_id", "uuid"),
            ("user_id", "uuid"),
            ("started_at", "timestamp"),
            ("duration_ms", "bigint"),
            ("device", "text"),
        ),
        ttl_s=86_400,
    ),
}
TABLE_WEIGHTS = {"users": 0.4, "orders": 0.4, "sessions": 0.2}


def target_schema(table: str, table_format: str = "cdc_{table}") -> TableSchema:
    """The PostgreSQL table the sink makes for a synth table, as from Cassandra's schema."""
    spec = TABLES[table]
    return TableSchema(
        keyspace=KEYSPACE,
        table=table,
        target=target_name(table_format, KEYSPACE, table),
        key_columns=spec.key,
        columns={column: parse_cql_type(cql) for column, cql in spec.columns},
        partition_columns=spec.partition_key,
    )


def cql_ddl(keyspace: str = KEYSPACE) -> list[str]:
    """CREATE statements (idempotent, cdc=true) for the tables, so a sink that reads
    system_schema learns the exact column types (decimal, inet) rather than strings."""
    statements = [
        f"CREATE KEYSPACE IF NOT EXISTS {keyspace} WITH replication = "
        "{'class': 'SimpleStrategy', 'replication_factor': 1}"
    ]
    for spec in TABLES.values():
        columns = ", ".join(f"{n} {t}" for n, t in spec.columns)
        partition = ", ".join(spec.partition_key)
        key = ", ".join([f"({partition})", *spec.clustering])
        statements.append(
            f"CREATE TABLE IF NOT EXISTS {keyspace}.{spec.name} ({columns}, "
            f"PRIMARY KEY ({key})) WITH cdc = true"
        )
    return statements


def topic_for(table: str, prefix: str = DEFAULT_TOPIC_PREFIX) -> str:
    return f"{prefix}{table}"


def expiry_us(ts_us: int, ttl_s: int) -> int:
    """A TTL'd cell's `deletion_ts`: Cassandra's local deletion time (whole seconds) in µs."""
    return (ts_us // 1_000_000 + ttl_s) * 1_000_000


# --- the events -------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class RangeBound:
    """One side of a range delete on the clustering columns (a prefix of them)."""

    values: tuple[Any, ...]
    inclusive: bool


@dataclass(frozen=True, slots=True)
class SynthEvent:
    """One Cassandra mutation, in Python values (uuid.UUID, datetime, Decimal, IPv4Address,
    frozenset for sets, list, dict).

    op: "i" insert, "u" update, "d" row or partition delete, "r" range delete. `key` holds
    every primary-key column; clustering columns are None for partition and range deletes.
    `cells` holds the non-key columns written (None = explicit null); {} for deletes. `ts_us`
    is the write timestamp, strictly increasing within one generator. `ttl_s` is set for
    writes `USING TTL`. The remaining fields only shape the envelope.
    """

    table: str
    op: str
    key: dict[str, Any]
    cells: dict[str, Any]
    ts_us: int
    ttl_s: int | None = None
    range_start: RangeBound | None = None
    range_end: RangeBound | None = None
    emitted_ms: int = 0  # the envelope's top-level ts_ms: when the connector read it
    commit_log: tuple[str, int] = ("", -1)  # source.file, source.pos

    @property
    def is_partition_delete(self) -> bool:
        return self.op == "d" and any(v is None for v in self.key.values())


class _Pool:
    """Keys with O(1) add, remove (of a key it holds) and uniform choice."""

    def __init__(self) -> None:
        self.items: list[Any] = []
        self.index: dict[Any, int] = {}

    def __len__(self) -> int:
        return len(self.items)

    def add(self, item: Any) -> None:
        if item not in self.index:
            self.index[item] = len(self.items)
            self.items.append(item)

    def remove(self, item: Any) -> None:
        at = self.index.pop(item)
        last = self.items.pop()
        if at < len(self.items):
            self.items[at] = last
            self.index[last] = at

    def choice(self, rng: random.Random) -> Any:
        return self.items[rng.randrange(len(self.items))]


_FIRST = ("ada", "grace", "alan", "edsger", "barbara", "ken", "linus", "margaret", "dennis")
_LAST = ("lovelace", "hopper", "turing", "dijkstra", "liskov", "thompson", "hamilton", "ritchie")
_DOMAINS = ("example.com", "mail.test", "shop.example", "corp.test")
_TAGS = ("vip", "newsletter", "beta", "mobile", "churn-risk", "b2b", "gift-card")
_PREFS = {
    "lang": ("en", "de", "fr", "ja"),
    "theme": ("dark", "light"),
    "currency": ("EUR", "USD", "JPY"),
}
_STATUSES = ("paid", "packed", "shipped", "delivered", "cancelled", "refunded")
_DEVICES = ("ios", "android", "web", "desktop")
_NULLABLE = {
    "users": ("name", "tags", "prefs", "last_ip"),
    "orders": ("items", "total"),
    "sessions": ("device", "duration_ms"),
}
_UPDATABLE = {
    "users": ("email", "name", "balance", "tags", "prefs", "last_ip"),
    "orders": ("status", "status", "status", "total", "items"),  # status changes most
    "sessions": ("duration_ms", "duration_ms", "device"),
}
_GREGORIAN_OFFSET = 0x01B21DD213814000  # 100 ns ticks from 1582-10-15 to the Unix epoch
_SEGMENT_BYTES = 32 * 1024 * 1024
_EPOCH = datetime(1970, 1, 1, tzinfo=UTC)


class Generator:
    """A seeded stream of realistic mutations: 40 % users, 40 % orders, 20 % sessions; about
    60 % inserts, 30 % partial updates, 10 % deletes (orders also partition and range deletes).

    Updates and deletes pick keys inserted earlier and not deleted since (an insert is made
    instead while there are none). `ts_us` starts at `start_us` and grows by 1 to 2*step_us-1
    µs per event. The same seed and start give the same events.
    """

    def __init__(self, seed: int = 0, *, start_us: int, step_us: int = 200) -> None:
        self.rng = random.Random(seed)  # noqa: S311 - synthetic data, not security
        self.ts_us = start_us
        self.step_us = max(1, step_us)
        self.users = _Pool()
        self.orders = _Pool()  # (customer_id, order_id)
        self.orders_of: dict[uuid.UUID, set[uuid.UUID]] = {}
        self.sessions = _Pool()
        self.user_ids: list[uuid.UUID] = []  # every user ever inserted: customers of orders
        self._segment = start_us // 1000
        self._pos = 0

    def take(self, n: int) -> list[SynthEvent]:
        return [self.next() for _ in range(n)]

    def live_rows(self) -> dict[str, int]:
        """Rows per table a Cassandra SELECT would return now, if no TTL has run out."""
        return {table: len(getattr(self, table)) for table in TABLES}

    def next(self) -> SynthEvent:
        rng = self.rng
        self.ts_us += rng.randint(1, 2 * self.step_us - 1)
        table = rng.choices(tuple(TABLE_WEIGHTS), weights=tuple(TABLE_WEIGHTS.values()))[0]
        roll = rng.random()
        op = "i" if roll < 0.6 else "u" if roll < 0.9 else "d"
        make: Callable[[str], SynthEvent] = getattr(self, f"_{table}")
        return self._stamp(make(op))

    def _stamp(self, event: SynthEvent) -> SynthEvent:
        self._pos += self.rng.randint(90, 400)
        if self._pos > _SEGMENT_BYTES:
            self._segment, self._pos = event.ts_us // 1000, 0
        return replace(
            event,
            emitted_ms=event.ts_us // 1000 + self.rng.randint(5, 250),  # commit-log read delay
            commit_log=(f"CommitLog-7-{self._segment}.log", self._pos),
        )

    # per table ----------------------------------------------------------------------------

    def _users(self, op: str) -> SynthEvent:
        rng, ts = self.rng, self.ts_us
        if op == "i" or not self.users:
            user_id = self._uuid4()
            self.users.add(user_id)
            self.user_ids.append(user_id)
            first, last = rng.choice(_FIRST), rng.choice(_LAST)
            cells: dict[str, Any] = {
                "email": f"{first}.{last}{rng.randint(1, 9999)}@{rng.choice(_DOMAINS)}",
                "name": f"{first.title()} {last.title()}",
                "created_at": self._ms(ts - rng.randint(0, 1000 * 86_400_000_000)),
                "balance": self._money(0, 5_000),
                "tags": self._tags(),
                "prefs": self._prefs(),
                "last_ip": self._ip() if rng.random() < 0.9 else None,
            }
            if rng.random() < 0.2:
                del cells["prefs"]  # an INSERT that leaves a column out writes no cell
            return SynthEvent("users", "i", {"user_id": user_id}, cells, ts)
        user_id = self.users.choice(rng)
        if op == "d":
            self.users.remove(user_id)
            return SynthEvent("users", "d", {"user_id": user_id}, {}, ts)
        return SynthEvent("users", "u", {"user_id": user_id}, self._update("users"), ts)

    def _orders(self, op: str) -> SynthEvent:
        rng, ts = self.rng, self.ts_us
        if op == "i" or not self.orders:
            customer = self._customer()
            order_id = self._timeuuid(ts)
            self.orders.add((customer, order_id))
            self.orders_of.setdefault(customer, set()).add(order_id)
            items = [f"SKU-{rng.randint(10000, 99999)}" for _ in range(rng.randint(1, 5))]
            cells = {
                "status": "pending",
                "total": self._money(5, 50 * len(items)),
                "items": items,
                "placed_at": self._ms(ts),
            }
            key = {"customer_id": customer, "order_id": order_id}
            return SynthEvent("orders", "i", key, cells, ts)
        customer, order_id = self.orders.choice(rng)
        key = {"customer_id": customer, "order_id": order_id}
        if op == "u":
            return SynthEvent("orders", "u", key, self._update("orders"), ts)
        kind = rng.random()
        live = sorted(self.orders_of[customer], key=lambda u: u.time)
        if kind < 0.15 and len(live) >= 2:
            return self._range_delete(customer, live)
        if kind < 0.3:
            for gone in live:
                self._forget_order(customer, gone)
            return SynthEvent("orders", "d", {"customer_id": customer, "order_id": None}, {}, ts)
        self._forget_order(customer, order_id)
        return SynthEvent("orders", "d", key, {}, ts)

    def _range_delete(self, customer: uuid.UUID, live: list[uuid.UUID]) -> SynthEvent:
        """DELETE … WHERE customer_id = ? AND order_id >(=) a AND order_id <(=) b, bounds
        taken from the customer's orders, in Cassandra's timeuuid (time) order."""
        rng = self.rng
        i = rng.randrange(len(live) - 1)
        j = rng.randrange(i + 1, len(live))
        start = None if rng.random() < 0.1 else RangeBound((live[i],), rng.random() < 0.8)
        end = RangeBound((live[j],), rng.random() < 0.8)
        # Each order's time is distinct (one per event), so the bounds are positions in `live`.
        first = 0 if start is None else i + (not start.inclusive)
        for order_id in live[first : j + end.inclusive]:
            self._forget_order(customer, order_id)
        key = {"customer_id": customer, "order_id": None}
        return SynthEvent("orders", "r", key, {}, self.ts_us, range_start=start, range_end=end)

    def _forget_order(self, customer: uuid.UUID, order_id: uuid.UUID) -> None:
        self.orders.remove((customer, order_id))
        self.orders_of[customer].discard(order_id)

    def _sessions(self, op: str) -> SynthEvent:
        rng, ts = self.rng, self.ts_us
        ttl = TABLES["sessions"].ttl_s
        if op == "i" or not self.sessions:
            session_id = self._uuid4()
            self.sessions.add(session_id)
            # duration_ms is unknown when the session starts: no cell for it.
            cells = {
                "user_id": self._customer(),
                "started_at": self._ms(ts),
                "device": rng.choice(_DEVICES),
            }
            return SynthEvent("sessions", "i", {"session_id": session_id}, cells, ts, ttl)
        session_id = self.sessions.choice(rng)
        if op == "d":
            self.sessions.remove(session_id)
            return SynthEvent("sessions", "d", {"session_id": session_id}, {}, ts)
        key = {"session_id": session_id}
        return SynthEvent("sessions", "u", key, self._update("sessions"), ts, ttl)

    # values -------------------------------------------------------------------------------

    def _update(self, table: str) -> dict[str, Any]:
        rng = self.rng
        names = sorted(set(rng.sample(_UPDATABLE[table], rng.randint(1, 3))))
        cells = {name: self._value(table, name) for name in names}
        if rng.random() < 0.15:
            cells[rng.choice(_NULLABLE[table])] = None
        return cells

    def _value(self, table: str, column: str) -> Any:
        rng = self.rng
        make: dict[tuple[str, str], Callable[[], Any]] = {
            ("users", "email"): lambda: (
                f"{rng.choice(_FIRST)}{rng.randint(1, 99999)}@{rng.choice(_DOMAINS)}"
            ),
            ("users", "name"): lambda: f"{rng.choice(_FIRST).title()} {rng.choice(_LAST).title()}",
            ("users", "balance"): lambda: self._money(0, 5_000),
            ("users", "tags"): self._tags,
            ("users", "prefs"): self._prefs,
            ("users", "last_ip"): self._ip,
            ("orders", "status"): lambda: rng.choice(_STATUSES),
            ("orders", "total"): lambda: self._money(5, 250),
            ("orders", "items"): lambda: [
                f"SKU-{rng.randint(10000, 99999)}" for _ in range(rng.randint(1, 5))
            ],
            ("sessions", "duration_ms"): lambda: rng.randint(1_000, 3_600_000),
            ("sessions", "device"): lambda: rng.choice(_DEVICES),
        }
        return make[table, column]()

    def _customer(self) -> uuid.UUID:
        if not self.user_ids:
            return self._uuid4()
        # Skewed towards early users, so customers have several orders (range deletes need them).
        return self.user_ids[int(len(self.user_ids) * self.rng.random() ** 3)]

    def _uuid4(self) -> uuid.UUID:
        return uuid.UUID(int=self.rng.getrandbits(128), version=4)

    def _timeuuid(self, ts_us: int) -> uuid.UUID:
        ticks = ts_us * 10 + _GREGORIAN_OFFSET + self.rng.randrange(10)
        clock_seq = self.rng.getrandbits(14)
        node = self.rng.getrandbits(48) | 0x010000000000  # multicast bit: not a real MAC
        return uuid.UUID(
            fields=(
                ticks & 0xFFFFFFFF,
                (ticks >> 32) & 0xFFFF,
                ((ticks >> 48) & 0x0FFF) | 0x1000,
                ((clock_seq >> 8) & 0x3F) | 0x80,
                clock_seq & 0xFF,
                node,
            )
        )

    @staticmethod
    def _ms(ts_us: int) -> datetime:
        return _EPOCH + timedelta(milliseconds=ts_us // 1000)

    def _money(self, low: int, high: int) -> Decimal:
        cents = self.rng.randint(low * 100, high * 100)
        return Decimal(cents).scaleb(-2)

    def _tags(self) -> frozenset[str]:
        return frozenset(self.rng.sample(_TAGS, self.rng.randint(1, 3)))

    def _prefs(self) -> dict[str, str]:
        chosen = self.rng.sample(sorted(_PREFS), self.rng.randint(1, len(_PREFS)))
        return {k: self.rng.choice(_PREFS[k]) for k in sorted(chosen)}

    def _ip(self) -> IPv4Address:
        return IPv4Address(
            (10 << 24) | self.rng.getrandbits(24)
            if self.rng.random() < 0.5
            else self.rng.randint(0x0B000000, 0xDF000000)
        )


def generate(
    n: int, seed: int = 0, *, start_us: int | None = None, step_us: int = 200
) -> list[SynthEvent]:
    """`n` events of a fresh Generator; `start_us` defaults to now."""
    start = time.time_ns() // 1000 if start_us is None else start_us
    return Generator(seed, start_us=start, step_us=step_us).take(n)


# --- the envelope (Kafka Connect data) --------------------------------------------------------


def _connect_type(cql: str) -> dict[str, Any]:
    """The connector's (optional) Connect schema of a CQL type, in JsonConverter's JSON form."""
    if cql in ("uuid", "timeuuid"):
        return {"type": "string", "optional": True, "name": "io.debezium.data.Uuid", "version": 1}
    if cql == "timestamp":
        return {
            "type": "int64",
            "optional": True,
            "name": "io.debezium.time.Timestamp",
            "version": 1,
        }
    if cql == "bigint":
        return {"type": "int64", "optional": True}
    if cql in ("text", "inet", "decimal"):  # inet and string-mode decimals are plain strings
        return {"type": "string", "optional": True}
    if cql.startswith(("set<", "list<")):
        return {"type": "array", "items": {"type": "string", "optional": True}, "optional": True}
    if cql.startswith("map<"):
        text = {"type": "string", "optional": True}
        return {"type": "map", "keys": text, "values": text, "optional": True}
    raise ValueError(f"no Connect schema for CQL type {cql!r}")


def _struct(name: str | None, fields: Sequence[tuple[str, dict[str, Any]]], optional: bool) -> Any:
    schema: dict[str, Any] = {
        "type": "struct",
        "fields": [{**s, "field": n} for n, s in fields],
        "optional": optional,
    }
    if name:
        schema["name"] = name
    return schema


def _string(optional: bool = False) -> dict[str, Any]:
    return {"type": "string", "optional": optional}


def _source_schema() -> Any:
    snapshot = {
        "type": "string",
        "optional": True,
        "name": "io.debezium.data.Enum",
        "version": 1,
        "parameters": {"allowed": "true,last,false,incremental"},
        "default": "false",
    }
    return _struct(
        "source",
        [
            ("version", _string()),
            ("connector", _string()),
            ("name", _string()),
            ("ts_ms", {"type": "int64", "optional": False}),
            ("snapshot", snapshot),
            ("db", _string()),
            ("sequence", _string(True)),
            ("ts_us", {"type": "int64", "optional": True}),
            ("ts_ns", {"type": "int64", "optional": True}),
            ("cluster", _string()),
            ("file", _string()),
            ("pos", {"type": "int32", "optional": False}),
            ("keyspace", _string()),
            ("table", _string()),
        ],
        optional=False,
    )


def _range_schema(name: str) -> Any:
    value = _struct("clustering_value", [(n, _string()) for n in ("name", "value", "type")], False)
    values = {"type": "array", "items": value, "optional": False, "name": "clustering_values"}
    return {**_struct(name, [("method", _string()), ("values", values)], True), "version": 1}


def _schema_name(table: str, suffix: str) -> str:
    return f"io.debezium.connector.cassandra.{LOGICAL_NAME}.{KEYSPACE}.{table}.{suffix}"


def key_schema(spec: TableSpec) -> Any:
    """The Kafka key's Connect schema: the primary-key columns, each optional."""
    return _struct(
        _schema_name(spec.name, "Key"), [(k, _connect_type(spec.cql(k))) for k in spec.key], False
    )


def value_schema(spec: TableSpec, *, unique_cells: bool = False) -> Any:
    """The envelope's Connect schema; cells are named `cell_value`, or `cell_value_<column>`
    with `unique_cells`."""
    cells = []
    for column, cql in spec.columns:
        cell = _struct(
            f"cell_value_{column}" if unique_cells else "cell_value",
            [
                ("value", _connect_type(cql)),
                ("deletion_ts", {"type": "int64", "optional": True}),
                ("set", {"type": "boolean", "optional": False}),
            ],
            True,
        )
        cells.append((column, {**cell, "version": 1}))
    cells += [(n, _range_schema(n)) for n in ("_range_start", "_range_end")]
    after = {**_struct("after", cells, False), "version": 1}
    return _struct(
        _schema_name(spec.name, "Envelope"),
        [
            ("ts_ms", {"type": "int64", "optional": False}),
            ("op", _string()),
            ("source", _source_schema()),
            ("after", after),
        ],
        False,
    )


def _is_collection(cql: str) -> bool:
    return cql.startswith(("set<", "list<", "map<"))


def _plain(value: Any, cql: str, avro: bool) -> Any:
    """A Python value as the connector's Connect value (None for a collection = emptied)."""
    if cql.startswith(("set<", "list<")):
        return sorted(value) if isinstance(value, frozenset) else list(value or ())
    if cql.startswith("map<"):
        entries = dict(value or {})
        return [{"key": k, "value": v} for k, v in entries.items()] if avro else entries
    if value is None:
        return None
    if cql == "timestamp":
        delta: timedelta = value - _EPOCH
        return delta // timedelta(milliseconds=1)
    if cql == "decimal":
        return format(value, "f")  # BigDecimal.toPlainString(): never an exponent
    if cql == "inet":
        return f"/{value}"  # InetAddress.toString() with an empty host name
    if cql in ("uuid", "timeuuid"):
        return str(value)
    return value


def _cell(value: Any, deletion_ts: int | None) -> dict[str, Any]:
    return {"value": value, "deletion_ts": deletion_ts, "set": True}


def _bound(spec: TableSpec, bound: RangeBound | None, start: bool) -> Any:
    if bound is None:
        return None
    side = "START" if start else "END"
    kind = "INCL" if bound.inclusive else "EXCL"
    marshal = {"timeuuid": "TimeUUIDType", "uuid": "UUIDType", "text": "UTF8Type"}
    return {
        "method": f"{kind}_{side}_BOUND",
        "values": [
            {"name": name, "value": str(value), "type": _MARSHAL + marshal[spec.cql(name)]}
            for name, value in zip(spec.clustering, bound.values, strict=False)
        ],
    }


def envelope(event: SynthEvent, *, avro: bool = False) -> tuple[dict[str, Any], dict[str, Any]]:
    """(key payload, value payload) of an event as Connect data (maps as MapEntry lists if
    `avro`), laid out as the connector fills them for each kind of mutation."""
    spec = TABLES[event.table]
    ts = event.ts_us
    key = {name: _plain(event.key[name], spec.cql(name), avro) for name in spec.key}
    after: dict[str, Any] = dict.fromkeys([*dict(spec.columns), "_range_start", "_range_end"])
    if event.op in ("i", "u"):
        expiry = expiry_us(ts, event.ttl_s) if event.ttl_s else None
        for name in spec.key:
            after[name] = _cell(key[name], None)
        for name, value in event.cells.items():
            # A null (or emptied collection) is a tombstone cell: it never expires.
            empty = value is None or (_is_collection(spec.cql(name)) and not value)
            after[name] = _cell(_plain(value, spec.cql(name), avro), None if empty else expiry)
    elif event.op == "d":
        for name in spec.key:
            after[name] = _cell(key[name], None) if key[name] is not None else _cell(None, ts)
        for name in spec.regular:
            after[name] = _cell(None, ts)
    else:  # range tombstone: the partition cells and the bounds only
        for name in spec.partition_key:
            after[name] = _cell(key[name], None)
        after["_range_start"] = _bound(spec, event.range_start, True)
        after["_range_end"] = _bound(spec, event.range_end, False)
    source = {
        "version": CONNECTOR_VERSION,
        "connector": "cassandra",
        "name": LOGICAL_NAME,
        "ts_ms": ts // 1000,
        "snapshot": "false",
        "db": "NULL",
        "sequence": None,
        "ts_us": ts,
        "ts_ns": ts * 1000,
        "cluster": "Test Cluster",
        "file": event.commit_log[0],
        "pos": event.commit_log[1],
        "keyspace": KEYSPACE,
        "table": event.table,
    }
    emitted = event.emitted_ms or ts // 1000
    return key, {"ts_ms": emitted, "op": event.op, "source": source, "after": after}


def _compact(obj: Any) -> bytes:
    return json.dumps(obj, separators=(",", ":")).encode()


class JsonEncoder:
    """Kafka Connect JsonConverter, schemas.enable=true: {"schema": …, "payload": …}."""

    def __init__(self) -> None:
        self._schemas = {
            table: (_compact(key_schema(spec)), _compact(value_schema(spec)))
            for table, spec in TABLES.items()
        }

    def encode(self, event: SynthEvent) -> tuple[bytes, bytes]:
        """(key bytes, value bytes), compact as JsonConverter writes them."""
        key_schema_bytes, value_schema_bytes = self._schemas[event.table]
        key, value = envelope(event)
        return (
            b'{"schema":' + key_schema_bytes + b',"payload":' + _compact(key) + b"}",
            b'{"schema":' + value_schema_bytes + b',"payload":' + _compact(value) + b"}",
        )


class SchemalessJsonEncoder:
    """Kafka Connect JsonConverter, schemas.enable=false: the payload alone."""

    def encode(self, event: SynthEvent) -> tuple[bytes, bytes]:
        """(key bytes, value bytes), compact as JsonConverter writes them."""
        key, value = envelope(event)
        return _compact(key), _compact(value)


# --- Avro (what Confluent's AvroData makes of the Connect schemas) -----------------------------


def _avro(schema: Mapping[str, Any]) -> Any:
    """Confluent AvroData's Avro form of a Connect schema (optional -> ["null", T])."""
    kind = schema["type"]
    name = schema.get("name")
    node: Any
    if kind == "struct":
        assert isinstance(name, str)
        namespace, _, short = name.rpartition(".")
        node = {"type": "record", "name": short}
        if namespace:
            node["namespace"] = namespace
        node["fields"] = []
        for f in schema["fields"]:
            entry = {"name": f["field"], "type": _avro(f)}
            if f.get("optional"):
                entry["default"] = None
            node["fields"].append(entry)
    elif kind == "array":
        node = {"type": "array", "items": _avro(schema["items"])}
    elif kind == "map":  # AvroData: optional keys make every map an array of MapEntry
        entry_fields = [
            {"name": n, "type": _avro(schema[k]), "default": None}
            for n, k in (("key", "keys"), ("value", "values"))
        ]
        node = {
            "type": "array",
            "items": {
                "type": "record",
                "name": "MapEntry",
                "namespace": "io.confluent.connect.avro",
                "fields": entry_fields,
            },
        }
    else:
        primitive = {"string": "string", "int64": "long", "int32": "int", "boolean": "boolean"}
        node = primitive[kind]
        if name:
            node = {"type": node}
    if isinstance(node, dict):
        if schema.get("version") is not None:
            node["connect.version"] = schema["version"]
        if schema.get("parameters"):
            node["connect.parameters"] = schema["parameters"]
        if name:
            node["connect.name"] = name
    return ["null", node] if schema.get("optional") else node


def _dedupe_clustering_value(schema: Any) -> Any:
    """Define `clustering_value` once (in _range_start) and refer to it by name after."""
    after = next(f for f in schema["fields"] if f["name"] == "after")["type"]
    end = next(f for f in after["fields"] if f["name"] == "_range_end")["type"][1]
    values = next(f for f in end["fields"] if f["name"] == "values")["type"]
    values["items"] = "clustering_value"
    return schema


def avro_schemas(table: str) -> tuple[Any, Any]:
    """(key, value) Avro schemas of a table, with a unique name per cell struct."""
    spec = TABLES[table]
    value = value_schema(spec, unique_cells=True)
    return _avro(key_schema(spec)), _dedupe_clustering_value(_avro(value))


class AvroEncoder:
    """Confluent AvroConverter: magic byte 0, big-endian schema id, Avro binary body.

    `ids` maps each table to its registered (key schema id, value schema id).
    """

    def __init__(self, ids: Mapping[str, tuple[int, int]]) -> None:
        self._writers: dict[str, tuple[bytes, Any, bytes, Any]] = {}
        for table, (key_id, value_id) in ids.items():
            key, value = avro_schemas(table)
            self._writers[table] = (
                b"\x00" + struct.pack(">I", key_id),
                fastavro.parse_schema(key),
                b"\x00" + struct.pack(">I", value_id),
                fastavro.parse_schema(value),
            )

    def encode(self, event: SynthEvent) -> tuple[bytes, bytes]:
        key_head, key_schema_, value_head, value_schema_ = self._writers[event.table]
        key, value = envelope(event, avro=True)
        return _write(key_head, key_schema_, key), _write(value_head, value_schema_, value)


def _write(head: bytes, schema: Any, datum: Any) -> bytes:
    out = io.BytesIO()
    out.write(head)
    fastavro.schemaless_writer(out, schema, datum)
    return out.getvalue()


# --- I/O: registry, topics, producing ----------------------------------------------------------


async def register_schemas(
    registry_url: str, topic_prefix: str = DEFAULT_TOPIC_PREFIX
) -> dict[str, tuple[int, int]]:
    """Register every table's key and value schema under `<topic>-key` / `<topic>-value`
    (TopicNameStrategy) with a Confluent-API registry; return the ids per table."""
    import httpx2 as httpx

    ids: dict[str, tuple[int, int]] = {}
    headers = {"Content-Type": "application/vnd.schemaregistry.v1+json"}
    async with httpx.AsyncClient(timeout=30, headers=headers) as client:
        for table in TABLES:
            found = []
            for suffix, schema in zip(("key", "value"), avro_schemas(table), strict=True):
                subject = f"{topic_for(table, topic_prefix)}-{suffix}"
                response = await client.post(
                    f"{registry_url.rstrip('/')}/subjects/{subject}/versions",
                    json={"schema": json.dumps(schema), "schemaType": "AVRO"},
                )
                if response.status_code != 200:
                    raise RuntimeError(
                        f"registering {subject}: HTTP {response.status_code} {response.text[:300]}"
                    )
                found.append(int(response.json()["id"]))
            ids[table] = (found[0], found[1])
    return ids


async def delete_topics(bootstrap: str, wanted: Callable[[str], bool]) -> list[str]:
    """Delete every topic whose name `wanted` accepts; return their names, sorted."""
    from aiokafka.admin import AIOKafkaAdminClient

    admin = AIOKafkaAdminClient(bootstrap_servers=bootstrap, request_timeout_ms=30_000)
    await admin.start()
    try:
        names = sorted(name for name in await admin.list_topics() if wanted(name))
        for start in range(0, len(names), 100):  # a bounded request each
            await admin.delete_topics(names[start : start + 100])
        return names
    finally:
        await admin.close()


async def ensure_topics(
    bootstrap: str, topics: Iterable[str], partitions: int = PARTITIONS, replication: int = 1
) -> None:
    """Create the topics that do not exist yet (existing ones are left as they are) and wait
    until every partition has a leader; TimeoutError after 30 s."""
    from aiokafka.admin import AIOKafkaAdminClient, NewTopic
    from aiokafka.errors import TopicAlreadyExistsError

    wanted = list(topics)
    admin = AIOKafkaAdminClient(bootstrap_servers=bootstrap)
    await admin.start()
    try:
        existing = set(await admin.list_topics())
        missing = [NewTopic(t, partitions, replication) for t in wanted if t not in existing]
        if missing:
            with contextlib.suppress(TopicAlreadyExistsError):  # created meanwhile: fine
                await admin.create_topics(missing)
        # A producer that sees a new topic before its leaders are elected gets
        # NotLeaderForPartition and retries; waiting here keeps runs clean and comparable.
        deadline = time.monotonic() + 30
        while True:
            described = await admin.describe_topics(wanted)
            if all(
                t["error_code"] == 0
                and t["partitions"]
                and all(p["leader"] >= 0 for p in t["partitions"])
                for t in described
            ):
                return
            if time.monotonic() > deadline:
                raise TimeoutError(f"topics without leaders after 30 s: {wanted}")
            await asyncio.sleep(0.2)
    finally:
        await admin.close()


@dataclass(frozen=True, slots=True)
class Sent:
    """Where one event landed and when it was sent (`sent_at`: time.time())."""

    topic: str
    partition: int
    offset: int
    timestamp_ms: int
    sent_at: float


_Encoded = list[tuple[str, bytes | None, bytes | None]]


async def _encode_all(
    bootstrap: str,
    events: Iterable[SynthEvent],
    fmt: str,
    registry_url: str | None,
    topic_prefix: str,
) -> _Encoded:
    """(topic, key, value) of every event, encoded before any clock starts (with a rate, the
    sends are what the box should spend its CPU on while the sink is measured: the real
    connector runs elsewhere); the topics exist on return."""
    encoder: JsonEncoder | SchemalessJsonEncoder | AvroEncoder
    if fmt == "json":
        encoder = JsonEncoder()
    elif fmt == "json-schemaless":
        encoder = SchemalessJsonEncoder()
    elif fmt == "avro":
        if not registry_url:
            raise ValueError("Avro needs the schema registry URL")
        encoder = AvroEncoder(await register_schemas(registry_url, topic_prefix))
    else:
        raise ValueError(f"unknown format {fmt!r} (json, json-schemaless or avro)")
    topics = {table: topic_for(table, topic_prefix) for table in TABLES}
    await ensure_topics(bootstrap, topics.values())
    return [(topics[event.table], *encoder.encode(event)) for event in events]


async def produce(
    bootstrap: str,
    events: Iterable[SynthEvent],
    fmt: str,
    registry_url: str | None = None,
    rate: float | None = None,
    *,
    topic_prefix: str = DEFAULT_TOPIC_PREFIX,
    on_sent: Callable[[int], None] | None = None,
    client: str = "aiokafka",
) -> list[Sent]:
    """Send every event (fmt "json", "json-schemaless" or "avro"; Avro needs `registry_url`)
    with acks=all and wait for every acknowledgement; return where each landed, in event order.

    Topics are created with 8 partitions if missing. With `rate` (events/s) sends are paced
    evenly; each record's Kafka timestamp is its send time either way, so end-to-end latency
    can be measured from it. `on_sent(n)` is called with the running count after each chunk.
    Raises on the first failed send. `client` "librdkafka" sends through confluent-kafka: a
    send then costs the caller a few µs instead of tens, so a benchmark's producer takes
    little of the CPU the measured worker shares with it (same murmur2 partitioner as Kafka's
    Java client and aiokafka).
    """
    if client not in ("aiokafka", "librdkafka"):
        raise ValueError(f"unknown client {client!r} (aiokafka or librdkafka)")
    encoded = await _encode_all(bootstrap, events, fmt, registry_url, topic_prefix)
    if client == "librdkafka":
        return await _produce_librdkafka(bootstrap, encoded, rate, on_sent)
    return await _produce_aiokafka(bootstrap, encoded, rate, on_sent)


async def produce_encoded(
    bootstrap: str, records: Sequence[tuple[str, bytes | None, bytes | None]]
) -> list[Sent]:
    """Send already encoded (topic, key, value) records through librdkafka with acks=all, as
    fast as the broker takes them, creating missing topics first; return where each landed, in
    order. For streams this module does not encode itself (another envelope, tombstones)."""
    await ensure_topics(bootstrap, {topic for topic, _, _ in records})
    return await _produce_librdkafka(bootstrap, list(records), None, None)


async def _produce_aiokafka(
    bootstrap: str, encoded: _Encoded, rate: float | None, on_sent: Callable[[int], None] | None
) -> list[Sent]:
    from aiokafka import AIOKafkaProducer

    producer = AIOKafkaProducer(
        bootstrap_servers=bootstrap, acks="all", linger_ms=5, max_batch_size=256 * 1024
    )
    await producer.start()
    results: list[Sent] = []
    pending: deque[tuple[asyncio.Future[Any], float]] = deque()

    def harvest() -> None:
        while pending and pending[0][0].done():
            future, sent_at = pending.popleft()
            meta = future.result()  # raises the send's error, if it failed
            results.append(Sent(meta.topic, meta.partition, meta.offset, meta.timestamp, sent_at))
        if on_sent is not None:
            on_sent(len(results))

    try:
        for topic in {topic for topic, _, _ in encoded}:
            await producer.partitions_for(topic)  # metadata before the clock starts
        began = time.monotonic()
        for index, (topic, key, value) in enumerate(encoded):
            if rate:
                delay = began + index / rate - time.monotonic()
                if delay > 0.002:  # sleep in >= 2 ms steps; events due meanwhile go together
                    harvest()
                    await asyncio.sleep(delay)
            now = time.time()
            future = await producer.send(topic, value, key=key, timestamp_ms=int(now * 1000))
            pending.append((future, now))
            if len(pending) >= 5_000:  # bound what is held; waiting here is backpressure
                await asyncio.gather(*(f for f, _ in pending), return_exceptions=True)
                harvest()
        if pending:
            await asyncio.gather(*(f for f, _ in pending), return_exceptions=True)
            harvest()
    finally:
        await producer.stop()
    return results


async def _produce_librdkafka(
    bootstrap: str, encoded: _Encoded, rate: float | None, on_sent: Callable[[int], None] | None
) -> list[Sent]:
    from confluent_kafka import Producer

    producer = Producer(
        {
            "bootstrap.servers": bootstrap,
            "acks": "all",
            # Retries after NotLeaderForPartition would otherwise reorder a partition's events.
            "enable.idempotence": True,
            "linger.ms": 5,
            "partitioner": "murmur2_random",
            "queue.buffering.max.messages": 200_000,
        }
    )
    results: list[Sent | None] = [None] * len(encoded)
    failures: list[str] = []

    def delivered(index: int, sent_at: float, err: Any, msg: Any) -> None:
        if err is not None:
            failures.append(f"{msg.topic()}: {err}")
            return
        results[index] = Sent(
            msg.topic(), msg.partition(), msg.offset(), msg.timestamp()[1], sent_at
        )

    def served() -> None:
        producer.poll(0)
        if failures:
            raise RuntimeError(f"send failed: {failures[0]}")

    producer.list_topics(timeout=10)  # metadata before the clock starts
    began = time.monotonic()
    last_report = began
    for index, (topic, key, value) in enumerate(encoded):
        if rate:
            delay = began + index / rate - time.monotonic()
            if delay > 0.002:  # sleep in >= 2 ms steps; events due meanwhile go together
                served()
                await asyncio.sleep(delay)
        now = time.time()
        callback = functools.partial(delivered, index, now)
        while True:
            try:
                producer.produce(topic, value, key, timestamp=int(now * 1000), on_delivery=callback)
                break
            except BufferError:  # librdkafka's queue is full: wait for acknowledgements
                await asyncio.to_thread(producer.poll, 0.05)
        if on_sent is not None and time.monotonic() - last_report >= 1:
            last_report = time.monotonic()
            served()
            on_sent(index + 1)
    left = await asyncio.to_thread(producer.flush, 60)
    served()
    if left or None in results:
        raise RuntimeError(f"{left} sends not acknowledged within 60 s")
    if on_sent is not None:
        on_sent(len(encoded))
    return [sent for sent in results if sent is not None]
