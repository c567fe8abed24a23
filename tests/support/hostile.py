"""Hostile input at the wire level: damaged Debezium records among good ones, for Hypothesis.

`hostile_runs()` draws a run: a history of good mutations (the Cassandra reference model says
what PostgreSQL holds after them), sent as schemaless JSON or Avro, with damaged records of
every kind in `DAMAGE_KINDS` placed among them, on the good records' partitions and on
partitions of their own. Hypothesis draws only small numbers (sizes, seeds, places); the bytes,
some of them megabytes, are made from those and the run's table name when the run is produced
(`HostileRun.records`), so an example stays small and a test session is reproducible.

Every damaged record is poison whatever the sink makes of its damage, never a valid event
written in an odd way: bytes that are neither Avro nor JSON, a schema id no registry issued, an
envelope without what every event has, a value its column cannot hold (text or a list in an
int column, a number beyond PostgreSQL's numeric range, a Kafka key the sink cannot read the
primary key from). It copies an INSERT of a row the good
records write, newer than all of them and with values they never use, so a damaged record
applied by mistake shows in the table.
"""

from __future__ import annotations

import base64
import dataclasses
import json
import random
import reprlib
import struct
import zlib
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from confluent_kafka.schema_registry import Schema, SchemaRegistryClient
from hypothesis import strategies as st

from tests.support.cassandra_model import CassandraModel, Mutation, to_envelope
from tests.support.debezium_avro import (
    WHOLE_SOURCE_FIELDS,
    a_cell,
    compact,
    envelope,
    key_schema,
    wire,
)
from tests.support.pipeline import random_history, schemaless_record
from tests.support.registry import store_without_validation

PARTITIONS = 8
GOOD_PARTITIONS = 4  # good records go to 0-3 by their Cassandra partition; 4-7 get only damage
TOPIC_MAX_MESSAGE_BYTES = 16 * 1024 * 1024  # the source topic's max.message.bytes
BASE_TS = 1_900_000_000_000_000
DAMAGED_INT = 424_242  # a value no good record writes (random_history draws 0-999)

TABLE_CQL = (
    "CREATE TABLE IF NOT EXISTS {ks}.{table} (p1 int, p2 text, c1 int, c2 text, v1 int, "
    "v2 text, v3 int, d decimal, n varint, PRIMARY KEY ((p1, p2), c1, c2)) WITH cdc = true"
)
ROW_COLUMNS = ("v1", "v2", "v3", "d", "n")  # d and n: only damaged records write them

# --- Avro: what the registry holds for a run ---------------------------------------------------

NAMESPACE = "io.debezium.connector.cassandra.hostile"
KEY_COLUMNS = [("p1", "int"), ("p2", "string"), ("c1", "int"), ("c2", "string")]
CELL_COLUMNS = [*KEY_COLUMNS, ("v1", "int"), ("v2", "string"), ("v3", "int")]


def connect_decimal(scale: int) -> dict[str, Any]:
    """A Connect Decimal as AvroData writes it: two's-complement bytes, `scale` digits."""
    return {
        "type": "bytes",
        "logicalType": "decimal",
        "precision": 64,
        "scale": scale,
        "connect.version": 1,
        "connect.parameters": {"scale": str(scale)},
        "connect.name": "org.apache.kafka.connect.data.Decimal",
    }


KEY_AVRO = key_schema(NAMESPACE, KEY_COLUMNS)
# decimal and varint in the connector's "string" handling mode
VALUE_AVRO = envelope(
    [*CELL_COLUMNS, ("d", "string"), ("n", "string")],
    namespace=NAMESPACE,
    distinct_names=True,
    source_fields=WHOLE_SOURCE_FIELDS,
)
# decimal and varint as exact Connect Decimals; PRECISE_WRITER has the same binary encoding with
# plain bytes, so a test can write numbers no Decimal conversion would survive in reasonable time
PRECISE_AVRO, PRECISE_WRITER = (
    envelope(
        [*CELL_COLUMNS, ("d", d), ("n", n)],
        namespace=f"{NAMESPACE}.precise",
        distinct_names=True,
        source_fields=WHOLE_SOURCE_FIELDS,
    )
    for d, n in ((connect_decimal(2), connect_decimal(0)), ("bytes", "bytes"))
)
DEEP_SCHEMA_DEPTHS = (900, 10_000, 100_000)  # arrays of arrays of … int, registered per run


def deep_schema(depth: int) -> str:
    """A record whose one field nests arrays `depth` deep, as text (json cannot write it)."""
    nested = '{"type":"array","items":' * depth + '"int"' + "}" * depth
    return '{"type":"record","name":"Deep","fields":[{"name":"v","type":' + nested + "}]}"


def deep_datum(depth: int) -> bytes:
    """The Avro body of `deep_schema(depth)` holding [[…[0]…]]: one item per level."""
    return b"\x02" * depth + b"\x00" + b"\x00" * depth


@dataclass(frozen=True)
class SchemaIds:
    """The ids a run's Avro records are written with."""

    key: int
    value: int
    precise: int
    deep: Mapping[int, int]  # nesting depth -> id


def register_schemas(registry_url: str, subject_prefix: str) -> SchemaIds:
    """Register the run's schemas; the deep ones through Apicurio's own API, since the
    Confluent API refuses JSON nested more than 1,000 deep."""
    with SchemaRegistryClient({"url": registry_url}) as client:
        schemas = {"key": KEY_AVRO, "value": VALUE_AVRO, "precise": PRECISE_AVRO}
        key, value, precise = (
            client.register_schema(f"{subject_prefix}-{name}", Schema(json.dumps(schema), "AVRO"))
            for name, schema in schemas.items()
        )
    deep = {
        depth: store_without_validation(
            registry_url, f"{subject_prefix}-deep{depth}", deep_schema(depth)
        )
        for depth in DEEP_SCHEMA_DEPTHS
    }
    return SchemaIds(key, value, precise, deep)


# --- the run -----------------------------------------------------------------------------------


@dataclass(frozen=True)
class Wire:
    """Where a run's records go: the Cassandra keyspace and table they name, the schema ids."""

    keyspace: str
    table: str
    ids: SchemaIds


@dataclass(frozen=True)
class Damage:
    """One damaged record (a burst of them for `random_schema_id`), as Hypothesis drew it."""

    kind: str
    variant: str
    size: int  # bytes, characters, digits, nesting depth or records, by kind (see SIZES)
    seed: int
    partition: int
    place: int  # produced after this many good records


@dataclass(frozen=True)
class Placed:
    """A record to produce; `damage` is None for a good one."""

    partition: int
    key: bytes | None
    value: bytes | None
    damage: Damage | None


@dataclass(frozen=True)
class HostileRun:
    """Good mutations (`random_history(seed)`) and the damage placed among them."""

    seed: int
    history: tuple[Mutation, ...]
    avro: frozenset[int]  # indexes of the good records sent as Avro
    huge_texts: tuple[tuple[int, int], ...]  # (index, characters): a valid v2 of that size
    damages: tuple[Damage, ...]

    def __repr__(self) -> str:
        damages = "".join(f"\n    {d}," for d in self.damages)
        return (
            f"HostileRun(seed={self.seed}, good={len(self.history)}, avro={len(self.avro)}, "
            f"huge_texts={self.huge_texts}, damages=[{damages}\n])"
        )

    def _repr_pretty_(self, printer: Any, cycle: bool) -> None:
        printer.text(repr(self))  # Hypothesis's printer would show every good mutation

    def records(self, where: Wire) -> list[Placed]:
        """Every record in the order to produce: the good ones in history order, each damage
        after its `place` good ones."""
        good = [
            Placed(
                good_partition(m),
                *(avro_record(m, where) if i in self.avro else json_record(m, where)),
                None,
            )
            for i, m in enumerate(self.history)
        ]
        placed = sorted(self.damages, key=lambda d: d.place)
        out: list[Placed] = []
        for i, record in enumerate([*good, None]):
            while placed and placed[0].place <= i:
                damage = placed.pop(0)
                out += [
                    Placed(damage.partition, key, value, damage)
                    for key, value in damaged(damage, self.history, where)
                ]
            if record is not None:
                out.append(record)
        return out

    def expected_rows(self) -> dict[tuple[Any, ...], dict[str, Any]]:
        """What PostgreSQL must hold after the run: the model's rows of the good records."""
        keys = {m.key for m in self.history if len(m.key) == 4}
        rows = CassandraModel(list(self.history)).select(2**62, keys)
        scalars = [c for c in ROW_COLUMNS if c not in ("d", "n")]
        return {
            key: {**{c: row[c] for c in scalars}, "d": None, "n": None} for key, row in rows.items()
        }


def good_partition(m: Mutation) -> int:
    """Every event of a Cassandra partition on one Kafka partition, as the connector keys it."""
    return zlib.crc32(repr(m.key[:2]).encode()) % GOOD_PARTITIONS


def envelope_of(m: Mutation, where: Wire) -> tuple[dict[str, Any], dict[str, Any]]:
    key, value = to_envelope(m)
    value["source"].update(keyspace=where.keyspace, table=where.table)
    return key, value


def json_record(m: Mutation, where: Wire) -> tuple[bytes, bytes]:
    return schemaless_record(m, where.keyspace, where.table)


def avro_record(
    m: Mutation, where: Wire, numbers: Mapping[str, bytes] | None = None
) -> tuple[bytes, bytes]:
    """The mutation in the Confluent wire format; with `numbers`, written with the precise
    schema and those two's-complement bytes as d and n cells."""
    key, value = envelope_of(m, where)
    after = value["after"]
    after["d"] = after["n"] = None
    if numbers is None:
        return wire(where.ids.key, KEY_AVRO, key), wire(where.ids.value, VALUE_AVRO, value)
    after.update({column: a_cell(raw) for column, raw in numbers.items()})
    return wire(where.ids.key, KEY_AVRO, key), wire(where.ids.precise, PRECISE_WRITER, value)


# --- the damage --------------------------------------------------------------------------------

Record = tuple[bytes | None, bytes | None]
HOLE = "\x00hole"  # a string json writes as "\u0000hole", replaced by raw JSON text


def spliced(document: Any, fragment: bytes) -> bytes:
    """`document` as JSON with the string HOLE in it replaced by the raw text `fragment`."""
    return compact(document).replace(compact(HOLE), fragment)


@dataclass
class Original:
    """The INSERT a damaged record copies: a row the good records write, newer than all of
    them, with values they never use; as envelope dicts to edit and in both encodings."""

    key: dict[str, Any]
    value: dict[str, Any]
    json: Record
    avro: Record
    where: Wire
    mutation: Mutation

    @classmethod
    def of(cls, rng: random.Random, history: Sequence[Mutation], where: Wire) -> Original:
        rows = sorted({m.key for m in history if len(m.key) == 4}) or [(0, "p0", 0, "x")]
        newest = max((m.ts for m in history), default=BASE_TS)
        cells = {"v1": (DAMAGED_INT, None), "v2": ("damaged", None), "v3": (DAMAGED_INT, None)}
        m = Mutation("insert", newest + 1_000 + rng.randrange(1_000), rng.choice(rows), cells)
        key, value = envelope_of(m, where)
        return cls(key, value, json_record(m, where), avro_record(m, where), where, m)

    def edited(self, change: Callable[[dict[str, Any], dict[str, Any]], Any]) -> Record:
        """The JSON record after `change(key, value)` edits copies of the envelope."""
        key, value = json.loads(compact(self.key)), json.loads(compact(self.value))
        change(key, value)
        return compact(key), compact(value)


def truncated(rng: random.Random, record: Record, variant: str) -> Record:
    """Cut short: no prefix of a JSON object or of an Avro datum is a whole one."""
    key, value = record
    assert key is not None
    assert value is not None
    if variant == "key":
        return key[: rng.randrange(len(key))], value
    return key, value[: rng.randrange(len(value))]


def truncated_json(d: Damage, rng: random.Random, o: Original) -> list[Record]:
    return [truncated(rng, o.json, d.variant)]


def truncated_avro(d: Damage, rng: random.Random, o: Original) -> list[Record]:
    return [truncated(rng, o.avro, d.variant)]


def deep_json(d: Damage, rng: random.Random, o: Original) -> list[Record]:
    """Arrays or objects nested `size` deep where no event has them (a whole value, an int
    cell, a Kafka key without the key columns) or beside an envelope without its op."""
    arrays = b"[" * d.size + b"]" * d.size
    objects = b'{"a":' * d.size + b"null" + b"}" * d.size
    if d.variant == "document":
        return [(o.json[0], arrays)]
    if d.variant == "object":
        return [(o.json[0], objects)]
    if d.variant == "key":
        return [(objects, o.json[1])]
    if d.variant == "schema":
        payload = {k: v for k, v in o.value.items() if k != "op"}
        return [(o.json[0], b'{"schema":' + objects + b',"payload":' + compact(payload) + b"}")]
    value = json.loads(compact(o.value))
    value["after"]["v1"]["value"] = HOLE
    return [(o.json[0], spliced(value, arrays))]


def deep_avro_schema(d: Damage, rng: random.Random, o: Original) -> list[Record]:
    """A registered schema nested `size` deep, and a datum of it (not an envelope at all)."""
    header = b"\x00" + struct.pack(">I", o.where.ids.deep[d.size])
    return [(o.avro[0], header + deep_datum(d.size))]


def big_number(rng: random.Random, size: int) -> tuple[str, bytes]:
    """`size` decimal digits and `size` two's-complement bytes of a positive number: either is
    beyond PostgreSQL's numeric (131,072 digits before the point) from 150,000 up."""
    digits = str(rng.randrange(1, 10)) + "".join(rng.choices("0123456789", k=size - 1))
    return digits, b"\x7f" + rng.randbytes(size - 1)


def huge_number(d: Damage, rng: random.Random, o: Original) -> list[Record]:
    digits, raw = big_number(rng, d.size)
    if d.variant in ("avro_decimal", "avro_varint"):
        column = "d" if d.variant == "avro_decimal" else "n"
        return [avro_record(o.mutation, o.where, {column: raw})]
    if d.variant == "int_literal":  # a JSON number: no parser need accept 150,000 digits
        value = json.loads(compact(o.value))
        value["after"]["v1"]["value"] = HOLE
        return [(o.json[0], spliced(value, digits.encode()))]
    changes: dict[str, Callable[[dict[str, Any]], Any]] = {
        "decimal_text": lambda after: after.update(d=a_cell(f"{digits}.5")),
        "varint_text": lambda after: after.update(n=a_cell(digits)),
        "varint_base64": lambda after: after.update(n=a_cell(base64.b64encode(raw).decode())),
        "decimal_variable_scale": lambda after: after.update(
            d=a_cell({"scale": 0, "value": base64.b64encode(raw).decode()})
        ),
    }
    return [o.edited(lambda _, value: changes[d.variant](value["after"]))]


def huge_string(d: Damage, rng: random.Random, o: Original) -> list[Record]:
    """A string of `size` characters where no event can have one: an int cell, a column name
    (Cassandra allows 48 characters), the op, the keyspace or table name."""
    text = "x" * d.size
    changes: dict[str, Callable[[dict[str, Any]], Any]] = {
        "int_column": lambda value: value["after"]["v1"].update(value=text),
        "column_name": lambda value: value["after"].update({text: a_cell(1)}),
        "op": lambda value: value.update(op=f"i{text}"),
        "table": lambda value: value["source"].update(table=text),
        "keyspace": lambda value: value["source"].update(keyspace=text),
    }
    return [o.edited(lambda _, value: changes[d.variant](value))]


WRONG_TYPES: dict[str, Callable[[dict[str, Any], dict[str, Any]], Any]] = {
    "text_in_int": lambda _, v: v["after"]["v1"].update(value="forty-two"),
    "list_in_int": lambda _, v: v["after"]["v1"].update(value=[4, 2]),
    "object_in_int": lambda _, v: v["after"]["v1"].update(value={"value": 42}),
    "list_for_cell": lambda _, v: v["after"].update(v1=[4, 2]),
    "text_for_cell": lambda _, v: v["after"].update(v1="42"),
    "list_for_after": lambda _, v: v.update(after=list(v["after"].values())),
    "text_for_source": lambda _, v: v.update(source="cassandra"),
    "text_for_timestamp": lambda _, v: v["source"].update(ts_us=str(v["source"]["ts_us"])),
    "float_for_timestamp": lambda _, v: v["source"].update(ts_us=float(v["source"]["ts_us"])),
    "number_for_op": lambda _, v: v.update(op=1),
    "text_for_expiry": lambda _, v: v["after"]["v1"].update(deletion_ts="tomorrow"),
    "text_in_int_key": lambda k, _: k.update(p1="zero"),
}


def wrong_type(d: Damage, rng: random.Random, o: Original) -> list[Record]:
    """A field of the wrong JSON type, or Avro bytes read with the key's schema."""
    if d.variant == "list_document":
        return [(o.json[0], compact([o.value]))]
    if d.variant == "avro_key_schema":
        value = o.avro[1]
        assert value is not None
        return [(o.avro[0], b"\x00" + struct.pack(">I", o.where.ids.key) + value[5:])]
    return [o.edited(WRONG_TYPES[d.variant])]


def random_bytes(rng: random.Random, size: int) -> bytes:
    """Random bytes that do not start with the Avro magic byte (random ids are their own kind)."""
    return bytes([rng.randrange(1, 256)]) + rng.randbytes(max(0, size - 1))


def random_value_or_key(d: Damage, rng: random.Random, o: Original) -> list[Record]:
    noise = random_bytes(rng, d.size)
    return [(noise, o.json[1]) if d.variant == "key" else (o.json[0], noise)]


def random_schema_id(d: Damage, rng: random.Random, o: Original) -> list[Record]:
    """`size` records in the wire format under ids no registry issued (small ids are real
    ones in a shared registry; negative ones are invalid in Java's reading)."""
    low, high = (1 << 31, 1 << 32) if d.variant == "negative" else (1 << 24, 1 << 31)
    same = rng.randrange(low, high)
    out: list[Record] = []
    for _ in range(d.size):
        schema_id = same if d.variant == "same" else rng.randrange(low, high)
        noise = b"\x00" + struct.pack(">I", schema_id) + rng.randbytes(rng.randrange(33))
        out.append((noise, o.json[1]) if d.variant == "key" else (o.avro[0], noise))
    return out


def oversized(d: Damage, rng: random.Random, o: Original) -> list[Record]:
    """A record of `size` bytes, beyond Kafka's default 1 MiB, damaged as the other kinds."""
    key, value = o.avro
    assert value is not None
    if d.variant == "random":
        return [(o.json[0], random_bytes(rng, d.size))]
    if d.variant == "key":
        return [(random_bytes(rng, d.size), o.json[1])]
    if d.variant == "avro_trailing":
        return [(key, value + rng.randbytes(d.size))]
    if d.variant == "text_in_int":
        return [o.edited(lambda _, v: v["after"]["v1"].update(value="9" * d.size))]
    long = o.edited(lambda _, v: v["after"]["v2"].update(value="x" * d.size))[1]
    assert long is not None
    return [(o.json[0], long[:-1])]  # "truncated_json"


MAKERS: dict[str, Callable[[Damage, random.Random, Original], list[Record]]] = {
    "truncated_json": truncated_json,
    "truncated_avro": truncated_avro,
    "deep_json": deep_json,
    "deep_avro_schema": deep_avro_schema,
    "huge_number": huge_number,
    "huge_string": huge_string,
    "wrong_type": wrong_type,
    "random_bytes": random_value_or_key,
    "random_schema_id": random_schema_id,
    "oversized": oversized,
}
DAMAGE_KINDS = tuple(MAKERS)
VARIANTS: dict[str, tuple[str, ...]] = {
    "truncated_json": ("value", "key"),
    "truncated_avro": ("value", "key"),
    "deep_json": ("document", "object", "key", "schema", "cell_value"),
    "deep_avro_schema": ("value",),
    "huge_number": (
        "decimal_text",
        "varint_text",
        "varint_base64",
        "decimal_variable_scale",
        "int_literal",
        "avro_decimal",
        "avro_varint",
    ),
    "huge_string": ("int_column", "column_name", "op", "table", "keyspace"),
    "wrong_type": (*WRONG_TYPES, "list_document", "avro_key_schema"),
    "random_bytes": ("value", "key"),
    "random_schema_id": ("distinct", "same", "negative", "key"),
    "oversized": ("random", "key", "avro_trailing", "text_in_int", "truncated_json"),
}
SIZES: dict[str, st.SearchStrategy[int]] = {
    "truncated_json": st.just(0),
    "truncated_avro": st.just(0),
    # beyond any recursive parser's reach, and just under CPython's recursion limit
    "deep_json": st.integers(10_000, 100_000) | st.integers(500, 999),
    "deep_avro_schema": st.sampled_from(DEEP_SCHEMA_DEPTHS),
    "huge_number": st.integers(150_000, 1_000_000),
    "huge_string": st.integers(100_000, 4_000_000),
    "wrong_type": st.just(0),
    "random_bytes": st.integers(1, 4096),
    "random_schema_id": st.integers(1, 40),
    "oversized": st.integers(1_500_000, 6_000_000),
}


def damaged(damage: Damage, history: Sequence[Mutation], where: Wire) -> list[Record]:
    """The records of one damage, made from its seed and the run's table: the same example
    run again (Hypothesis replays a failure) meets schema ids the worker has not seen yet."""
    rng = random.Random(f"{damage.seed}:{where.table}")
    return MAKERS[damage.kind](damage, rng, Original.of(rng, history, where))


@st.composite
def damages(draw: st.DrawFn, kind: str, good: int) -> Damage:
    """A damage of `kind` on any partition, placed anywhere among `good` good records."""
    return Damage(
        kind=kind,
        variant=draw(st.sampled_from(VARIANTS[kind])),
        size=draw(SIZES[kind]),
        seed=draw(st.integers(0, 2**32 - 1)),
        partition=draw(st.integers(0, PARTITIONS - 1)),
        place=draw(st.integers(0, good)),
    )


@st.composite
def hostile_runs(draw: st.DrawFn, kinds: Sequence[str] = DAMAGE_KINDS) -> HostileRun:
    """A run: 20-150 good mutations (a third of the runs all JSON, a third all Avro, a third
    mixed), up to two of them with a valid v2 of 100,000-4,000,000 characters, one damage of
    each of `kinds` and up to three more of any of them."""
    count = draw(st.integers(20, 150))
    seed = draw(st.integers(0, 2**32 - 1))
    rng = random.Random(seed)
    history = random_history(rng, count, keys=draw(st.integers(6, 60)), base_ts=BASE_TS)
    share = draw(st.sampled_from([0.0, 0.5, 1.0]))
    avro = frozenset(i for i in range(count) if rng.random() < share)
    texts = [i for i, m in enumerate(history) if m.cells.get("v2", (None,))[0] is not None]
    huge = draw(st.lists(st.integers(100_000, 4_000_000), max_size=min(2, len(texts))))
    huge_texts = tuple(zip(rng.sample(texts, len(huge)), huge, strict=True))
    for i, size in huge_texts:
        m = history[i]
        history[i] = dataclasses.replace(m, cells={**m.cells, "v2": (f"{i}:" + "h" * size, None)})
    required = [draw(damages(kind, count)) for kind in kinds]
    extra = draw(
        st.lists(st.sampled_from(list(kinds)).flatmap(lambda k: damages(k, count)), max_size=3)
    )
    return HostileRun(seed, tuple(history), avro, huge_texts, (*required, *extra))


# --- reading the outcome -----------------------------------------------------------------------

_SHORT = reprlib.Repr()
_SHORT.maxstring = _SHORT.maxother = 60


def row_differences(
    actual: Mapping[tuple[Any, ...], Any], expected: Mapping[tuple[Any, ...], Any]
) -> list[str]:
    """What differs between two tables of rows, one short line per key (values abbreviated:
    some are megabytes)."""
    return [
        f"{key}: table {_SHORT.repr(actual.get(key))}, model {_SHORT.repr(expected.get(key))}"
        for key in sorted(actual.keys() | expected.keys(), key=repr)
        if actual.get(key) != expected.get(key)
    ]
