"""A Cassandra table of every supported type, filled on both sides the way production fills them.

Cassandra gets each row through cassandra-driver (native values, `USING TIMESTAMP`). PostgreSQL
gets the same rows the way the sink gets them: as the values Debezium's Cassandra connector
puts in its change events (epoch milliseconds, days, nanoseconds, "/a.b.c.d" addresses,
{scale, value} decimals, two's-complement varints, maps of entries, tuple structs, …), turned
into ChangeEvents, resolved by the sink's Catalog (which reads Cassandra's system_schema) and
applied by PgWriter. Nothing converts a Cassandra value into a PostgreSQL value here.
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime as dt
import functools
import ipaddress
import math
import struct
import uuid
from collections import namedtuple
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass
from decimal import Decimal
from typing import Any

import asyncpg
from cassandra.cluster import Session
from cassandra.concurrent import execute_concurrent_with_args
from cassandra.util import Date, Duration, Time

from cdc_recon.alerting import ReconMetrics
from cdc_recon.readers import connect_cassandra
from cdc_recon.service import Reconciler
from cdc_recon.settings import ReconciliationConfig
from cdc_sink.apply.writer import Batch, PgWriter, prepare_connection
from cdc_sink.config import load_config
from cdc_sink.model.events import Cell, ChangeEvent, Op, Position
from cdc_sink.model.masking import MaskingPolicy
from cdc_sink.ops.migrate import migrate
from cdc_sink.schema.catalog import CassandraSystemSchema, Catalog
from cdc_sink.schema.tables import TableSchema
from tests.support.names import Unique
from tests.support.pipeline import cassandra_session
from tests.support.stack import Endpoints

TABLE = "everything"
TARGET = "cdc_everything"
TS0 = 1_700_000_000_000_000  # write timestamps: TS0 + row number (µs)
NAN, INF = float("nan"), float("inf")

UDT_CQL = (
    "CREATE TYPE {ks}.address (street text, zip varint, price decimal, "
    "geo frozen<tuple<double, double>>, tags frozen<set<text>>, since timestamp)"
)
TABLE_CQL = """CREATE TABLE {ks}.everything (
  id int, region text, seq timeuuid,
  t_text text, t_ascii ascii, t_varchar varchar, t_tiny tinyint, t_small smallint, t_int int,
  t_big bigint, t_varint varint, t_dec decimal, t_float float, t_double double,
  t_bool boolean, t_blob blob, t_uuid uuid, t_timeuuid timeuuid, t_inet inet,
  t_ts timestamp, t_date date, t_time time, t_dur duration,
  l_int list<int>, s_text set<text>, m_text_int map<text, int>, l_ts list<timestamp>,
  s_dec set<decimal>, f_list frozen<list<double>>, f_set frozen<set<uuid>>,
  f_map frozen<map<int, text>>, tup tuple<int, text, timestamp>, addr address,
  f_addr frozen<address>, m_nested map<text, frozen<list<int>>>, l_addr list<frozen<address>>,
  PRIMARY KEY ((id, region), seq)
)"""
KEY = ("id", "region", "seq")
Address = namedtuple("Address", ["street", "zip", "price", "geo", "tags", "since"])


def twos(n: int) -> bytes:
    """n as minimal big-endian two's complement (Java's BigInteger.toByteArray())."""
    return n.to_bytes((n + (n < 0)).bit_length() // 8 + 1, "big", signed=True)


def f32(x: float) -> float:
    return float(struct.unpack(">f", struct.pack(">f", x))[0])


def _decimal(d: Decimal) -> dict[str, Any]:
    """Debezium's VariableScaleDecimal struct."""
    sign, digits, exponent = d.as_tuple()
    assert isinstance(exponent, int)
    unscaled = int("".join(map(str, digits)) or "0") * (-1 if sign else 1)
    return {"scale": -exponent, "value": twos(unscaled)}


def _ms(stamp: dt.datetime) -> int:
    return (stamp - dt.datetime(1970, 1, 1)) // dt.timedelta(milliseconds=1)


@dataclass(frozen=True)
class Row:
    """One row: the driver's values (for Cassandra) and Debezium's (for the sink's event)."""

    key: dict[str, Any]
    driver: dict[str, Any]
    debezium: dict[str, Any]
    debezium_key: dict[str, Any]
    ts: int


VARIANTS = 1009  # rows share their rich values in this many variants (building them is slow)


def make_row(i: int) -> Row:
    """Row `i`: every type, with edge values (pre-1970, NaN, ±Infinity, huge numbers, IPv6,
    nanosecond times, negative durations, nested collections) spread over the rows. The rich
    values repeat every VARIANTS rows; the key, write time and a few scalars are unique."""
    d = dict(_values(i % VARIANTS))
    d["t_text"] = (None, None) if i % 17 == 0 else (f"héllo {i} 😀",) * 2
    d["t_big"] = ((i * 11400714819323198485) % 2**64 - 2**63,) * 2
    d["t_int"] = ((i * 2654435761) % 2**32 - 2**31,) * 2
    seq = uuid.UUID(fields=(i * 3, 7, 0x1000 | (i % 97), 0x80, 1, 0x0242AC120003))
    key = {"id": i % 1000, "region": f"r{i // 5000}", "seq": seq}
    debezium_key = {**key, "seq": str(seq)}
    return Row(
        key,
        {name: value[0] for name, value in d.items()},
        {name: value[1] for name, value in d.items()},
        debezium_key,
        TS0 + i,
    )


@functools.lru_cache(maxsize=VARIANTS)
def _values(i: int) -> dict[str, tuple[Any, Any]]:
    """column -> (driver value, Debezium value) of variant `i`."""
    d: dict[str, tuple[Any, Any]] = {}
    d["t_ascii"] = (f"ascii-{i}",) * 2
    d["t_varchar"] = ("" if i % 5 == 0 else f"v{i}",) * 2
    d["t_tiny"] = ((i % 256) - 128,) * 2
    d["t_small"] = ((i * 7) % 65536 - 32768,) * 2
    varint = (-1) ** i * (i * 10**25 + 7)
    d["t_varint"] = (varint, twos(varint))
    dec = Decimal(f"{(-1) ** i * i}.{i % 1000:03d}") if i % 4 else Decimal(f"{i}E+{i % 7}")
    d["t_dec"] = (dec, _decimal(dec))
    fl = [NAN, INF, -INF, -0.0][i % 4] if i % 50 == 0 else f32(i / 3.0)
    d["t_float"] = (fl, fl)
    dbl = [NAN, -INF, 1e308, 5e-324][i % 4] if i % 40 == 0 else i * math.pi
    d["t_double"] = (dbl, dbl)
    d["t_bool"] = (i % 3 == 0,) * 2
    blob = i.to_bytes(4, "big") + bytes([0, 255, i % 256])
    d["t_blob"] = (blob, blob)
    u = uuid.UUID(int=(i * 0x9E3779B97F4A7C15F39CC0605CEDC835) % 2**128)
    d["t_uuid"] = (u, str(u))
    tu = uuid.UUID(fields=(i, i % 65536, 0x1000 | (i % 4096), 0x80, i % 256, 0x0242AC120002))
    d["t_timeuuid"] = (tu, str(tu))
    ip = ipaddress.ip_address(f"10.{i % 256}.{i // 256 % 256}.7" if i % 3 else f"2001:db8::{i:x}")
    d["t_inet"] = (str(ip), f"/{ip}")
    stamp = dt.datetime(1970, 1, 1) + dt.timedelta(milliseconds=(i - 50_000) * 987_654_321 + i)
    d["t_ts"] = (stamp, _ms(stamp))
    days = (i * 37) % 40_000 - 20_000
    d["t_date"] = (Date(days), days)
    nanos = (i * 123_456_789_123) % (86_400 * 10**9)
    d["t_time"] = (Time(nanos), nanos)
    sign = -1 if i % 9 == 0 else 1
    months, dur_days, dur_ns = sign * (i % 3), sign * (i % 40), sign * (i * 1_000_001)
    d["t_dur"] = (
        Duration(months, dur_days, dur_ns),
        (months * 30 + dur_days) * 86_400 * 10**9 + dur_ns,
    )
    d["l_int"] = ([i, -i, i * 2],) * 2
    texts = sorted({f"s{i % 7}", f"t{i}", "ü"})
    d["s_text"] = (set(texts), texts)
    d["m_text_int"] = ({"a": i, f"k{i}": -i}, {"a": i, f"k{i}": -i})
    stamps = [dt.datetime(1960, 1, 1) + dt.timedelta(seconds=i * s) for s in (1, 1000)]
    d["l_ts"] = (stamps, [_ms(s) for s in stamps])
    decs = sorted({Decimal(i) / 8, Decimal("-1.10"), Decimal("1E-20")})
    d["s_dec"] = (set(decs), [_decimal(x) for x in decs])
    doubles = [i / 7, -0.5, INF if i % 11 == 0 else 1e-300]
    d["f_list"] = (doubles, doubles)
    uuids = sorted({uuid.UUID(int=i), uuid.UUID(int=2**127 + i)})
    d["f_set"] = (set(uuids), [str(x) for x in uuids])
    d["f_map"] = ({i: "x", -1: f"y{i}"}, [{"key": -1, "value": f"y{i}"}, {"key": i, "value": "x"}])
    tstamp = dt.datetime(2001, 2, 3) + dt.timedelta(milliseconds=i)
    d["tup"] = ((i, f"t{i}", tstamp), {"field1": i, "field2": f"t{i}", "field3": _ms(tstamp)})
    since = dt.datetime(1950, 1, 1) + dt.timedelta(seconds=i)
    price = Decimal(i) / 100
    address = Address(f"{i} Main", i * 10**20, price, (i / 3, -i / 3), {"a", f"b{i}"}, since)
    address_dbz = {
        "street": f"{i} Main",
        "zip": i * 10**20,
        "price": _decimal(price),
        "geo": {"field1": i / 3, "field2": -i / 3},
        "tags": sorted({"a", f"b{i}"}),
        "since": _ms(since),
    }
    d["addr"] = (address, address_dbz)
    d["f_addr"] = (address._replace(street=None), {**address_dbz, "street": None})
    d["m_nested"] = ({"p": [i, 1], "q": []}, {"p": [i, 1], "q": []})
    d["l_addr"] = ([address, address], [address_dbz, address_dbz])
    return d


def create_keyspace(session: Session, keyspace: str) -> None:
    session.execute(
        f"CREATE KEYSPACE {keyspace} WITH replication = "
        "{'class': 'SimpleStrategy', 'replication_factor': 1}"
    )
    session.execute(UDT_CQL.format(ks=keyspace))
    session.execute(TABLE_CQL.format(ks=keyspace))


def load_cassandra(session: Session, keyspace: str, rows: list[Row]) -> None:
    """Insert every row with its write timestamp (USING TIMESTAMP), 128 in flight."""
    columns = [*KEY, *rows[0].driver]
    statement = session.prepare(
        f"INSERT INTO {keyspace}.{TABLE} ({', '.join(columns)}) "
        f"VALUES ({', '.join('?' * len(columns))}) USING TIMESTAMP ?"
    )
    params = [(*r.key.values(), *r.driver.values(), r.ts) for r in rows]
    for ok, result in execute_concurrent_with_args(session, statement, params, concurrency=128):
        assert ok, result


def event(keyspace: str, row: Row, op: Op = Op.INSERT) -> ChangeEvent:
    """The ChangeEvent the sink's interpret step makes of Debezium's record for this write."""
    return ChangeEvent(
        keyspace=keyspace,
        table=TABLE,
        op=op,
        key=row.debezium_key,
        cells={name: Cell(value, None) for name, value in row.debezium.items()},
        ts_us=row.ts,
        snapshot=False,
        position=Position(f"cdc-events-{TABLE}", 0, row.ts - TS0),
    )


async def sink_connection(dsn: str, schema: str) -> asyncpg.Connection:
    conn = await asyncpg.connect(dsn, server_settings={"search_path": schema})
    await prepare_connection(conn)
    await migrate(conn, schema)
    return conn


async def sink_schema(
    pool: asyncpg.Pool,
    schema: str,
    session_factory: Any,
    keyspace: str,
    first: Row,
    masking: MaskingPolicy | None = None,
) -> TableSchema:
    """The target table as the sink creates it (types from Cassandra's system_schema), masked
    by `masking`'s rules."""
    system_schema = CassandraSystemSchema(session_factory)
    catalog = Catalog(pool, schema, "cdc_{table}", system_schema, masking)
    try:
        return await catalog.resolve(event(keyspace, first), {}, {})
    finally:  # a cluster left open fires its timers into an executor shut down at exit
        await system_schema.close()


async def apply_in_parallel(
    dsn: str, schema: str, table: TableSchema, events: list[ChangeEvent], writers: int = 3
) -> None:
    """Apply events as several sink workers would: disjoint keys, a PgWriter per connection."""
    share = -(-len(events) // writers)
    conns = [await sink_connection(dsn, schema) for _ in range(writers)]
    try:
        await asyncio.gather(
            *(
                apply_events(conn, schema, table, iter(events[i * share : (i + 1) * share]))
                for i, conn in enumerate(conns)
            )
        )
    finally:
        for conn in conns:
            await conn.close()


async def apply_events(
    conn: asyncpg.Connection, schema: str, table: TableSchema, events: Iterator[ChangeEvent]
) -> None:
    """Apply events through PgWriter, 2000 per transaction, as the sink's batches would."""
    writer = PgWriter(conn, schema, "recon-test")
    batch: list[Any] = []
    for e in events:
        batch.append(table.to_mutation(e))
        if len(batch) == 2000:
            await writer.apply(Batch(tables=[(table, batch)]))
            batch = []
    if batch:
        await writer.apply(Batch(tables=[(table, batch)]))


@dataclass
class Setup:
    """Both sides of one test table, and a Reconciler over them."""

    keyspace: str
    schema: str
    session: Any  # the test's own Cassandra session (for seeding drift)
    pool: asyncpg.Pool
    reconciler: Reconciler
    rows: list[Row]


@contextlib.asynccontextmanager
async def reconciler_on(
    stack: Endpoints,
    schema: str,
    pushgateway_url: str | None = None,
    masking: MaskingPolicy | None = None,
    **settings: Any,
) -> AsyncIterator[Reconciler]:
    """A Reconciler over PostgreSQL schema `schema` and the stack's Cassandra, with a pool and
    a Cassandra session of its own (closed on leaving)."""
    cassandra = {k: v for k, v in stack.values.items() if k.startswith("CDC_CASSANDRA__")}
    recon_session = connect_cassandra(load_config(cassandra).cassandra, "LOCAL_QUORUM")
    pool = await asyncpg.create_pool(
        stack.postgres_dsn,
        min_size=1,
        max_size=6,
        server_settings={"search_path": schema},
        init=prepare_connection,
    )
    assert pool is not None
    try:
        yield Reconciler(
            pool,
            schema,
            recon_session,
            ReconciliationConfig(**settings),
            metrics=ReconMetrics(),
            pushgateway_url=pushgateway_url,
            owner="test",
            masking=masking,
        )
    finally:
        await pool.close()
        recon_session.cluster.shutdown()


async def make_setup(
    stack: Endpoints,
    unique: Unique,
    count: int,
    pushgateway_url: str | None = None,
    masking: MaskingPolicy | None = None,
    keyspace: str | None = None,
    **settings: Any,
) -> AsyncIterator[Setup]:
    """Create both sides with `count` identical rows (in `keyspace`, a `unique` one by default;
    the sink's side masked by `masking`); `unique` drops both after the test."""
    keyspace, schema = keyspace or unique.keyspace("recon"), unique.schema("recon")
    session = cassandra_session(stack)
    conn = await sink_connection(stack.postgres_dsn, schema)  # makes the control tables
    await conn.close()
    try:
        async with reconciler_on(stack, schema, pushgateway_url, masking, **settings) as reconciler:
            pool = reconciler.pool
            create_keyspace(session, keyspace)
            rows = [make_row(i) for i in range(count)]
            load_cassandra(session, keyspace, rows)
            table = await sink_schema(
                pool, schema, lambda: cassandra_session(stack), keyspace, rows[0], masking
            )
            await apply_in_parallel(
                stack.postgres_dsn, schema, table, [event(keyspace, r) for r in rows]
            )
            yield Setup(keyspace, schema, session, pool, reconciler, rows)
    finally:
        session.cluster.shutdown()
