"""The one-pass path (schema.direct) makes exactly the mutation interpret → resolve →
to_mutation make, or declines and leaves the record to them."""

from __future__ import annotations

import asyncio
import contextlib
import json
import math
import re
import time
from dataclasses import replace
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from cdc_sink.apply.codecs import use_asyncpg_uuids
from cdc_sink.decode.decoder import Decoder
from cdc_sink.errors import PoisonError
from cdc_sink.model.cql import parse_cql_type
from cdc_sink.model.events import Op, Position, interpret, op_name
from cdc_sink.model.masking import MaskingPolicy, parse_rules
from cdc_sink.schema.direct import direct_mutation
from cdc_sink.schema.tables import TableSchema
from cdc_synth import synth
from tests.support.cassandra_model import Mutation, to_envelope
from tests.unit.test_plan_model import SCHEMA as MODEL_SCHEMA
from tests.unit.test_plan_model import histories

POSITION = Position("cdc-events-t", 3, 42)
SYNTH = {(synth.KEYSPACE, table): synth.target_schema(table) for table in synth.TABLES}

# A table with a column of every Cassandra type the sink maps, collections of each kind among them.
EVERY_TYPE = {
    "k": "text",
    "c": "int",
    **{
        f"v_{name}": name
        for name in [
            *("ascii", "text", "varchar", "boolean", "tinyint", "smallint", "int", "bigint"),
            *("counter", "varint", "decimal", "float", "double", "blob", "uuid", "timeuuid"),
            *("inet", "timestamp", "date", "time", "duration"),
        ]
    },
    "v_list": "list<int>",
    "v_set": "set<text>",
    "v_map": "map<text, int>",
    "v_frozen_list": "frozen<list<decimal>>",
    "v_frozen_map": "frozen<map<int, frozen<set<text>>>>",
    "v_tuple": "frozen<tuple<int, text, timestamp>>",
}
WIDE = TableSchema(
    keyspace="ks",
    table="wide",
    target="cdc_wide",
    key_columns=("k", "c"),
    columns={name: parse_cql_type(cql) for name, cql in EVERY_TYPE.items()},
)
# The same table with every column `hash`ed that can be (its text made of each type's
# canonical text), the others nulled.
_UNHASHABLE = ("map", "frozen<map", "frozen<tuple")
_HASHED_RULES = "\n".join(
    f"ks.hashed.{name}={'null' if cql.startswith(_UNHASHABLE) else 'hash'}"
    for name, cql in EVERY_TYPE.items()
    if name not in ("k", "c")
)
HASHED = replace(WIDE, table="hashed", target="cdc_hashed").with_masks(
    MaskingPolicy(parse_rules(_HASHED_RULES), b"k" * 32).masks(
        "ks", "hashed", WIDE.columns, WIDE.key_columns
    )
)
TABLES = {("ks", "wide"): WIDE, ("ks", "hashed"): HASHED, ("ks", "model"): MODEL_SCHEMA}

# Values a decoded cell may hold: each type's own shapes (JSON and Avro), and wrong ones.
VALID: dict[str, list[Any]] = {
    "text": ["abc", "", "ü🙂"],
    "boolean": [True, False],
    "int": [0, -1, 127, 2**31 - 1],
    "bigint": [2**40, -(2**63)],
    "varint": [10**30, -7],
    "decimal": [{"scale": 2, "value": b"\x04\xd2"}, "1.50"],
    "float": [1.5, "NaN", 3],
    "blob": [b"\x00\x01", "AAE="],
    "uuid": ["1b4e28ba-2fa1-11d2-883f-0016d3cca427"],
    "inet": ["/127.0.0.1", "host/::1"],
    "timestamp": [1_700_000_000_000, "2024-01-02T03:04:05Z"],
    "date": [19_000, "2024-02-29"],
    "time": [3_600_000_000_000, "12:00:00.5"],
    "duration": [3_600_000_000_000, "PT1H"],
    "list": [[1, 2], [], [1, None]],
    "set": [["a", "b"], []],
    "map": [{"a": 1}, {}, [{"key": "a", "value": 1}], [["a", 1]], {"1": ["x"]}],
    "tuple": [[1, "x", 0], {"field1": 1, "field2": None, "field3": 5}],
}
WRONG = [None, "x", 5, 2**70, 1.5, float("nan"), b"\x00", [], {}, [None], {"a": [1]}, "\x00", True]


def shapes(cql: str) -> list[Any]:
    for family, values in VALID.items():
        if family in cql.split("<")[0] or cql.startswith(f"frozen<{family}"):
            return values
    aliases = {"ascii": "text", "varchar": "text", "tinyint": "int", "smallint": "int"}
    aliases |= {"counter": "bigint", "double": "float", "timeuuid": "uuid"}
    return VALID[aliases[cql]]


@st.composite
def cells(draw: st.DrawFn, cql: str) -> Any:
    wrong = draw(st.integers(0, 9)) == 0  # one cell in ten: a row of several has one often
    value = draw(st.sampled_from(WRONG if wrong else shapes(cql)))
    shape = draw(st.sampled_from(["cell"] * 27 + ["no value", "not a struct", "bad ttl"]))
    if shape == "no value":
        return {"deletion_ts": None, "set": True}
    if shape == "not a struct":
        return value
    expires = draw(st.sampled_from([None, None, 1_900_000_000_000_000]))
    if shape == "bad ttl":
        expires = draw(st.sampled_from(["1", 1.5, True]))
    return {"value": value, "deletion_ts": expires, "set": True}


@st.composite
def wide_records(draw: st.DrawFn) -> tuple[Any, dict[str, Any]]:
    """A record of the every-type table, most of them well formed, some not in one way."""
    key: Any = {"k": draw(st.sampled_from(["a", "ü"])), "c": draw(st.sampled_from([1, -2]))}
    flaw = draw(st.sampled_from([None] * 12 + ["key", "op", "source", "ts", "column", "after"]))
    if flaw == "key":
        key = draw(
            st.sampled_from(
                [
                    *({"k": "a", "c": None}, {"k": "a"}, {"k": "a", "c": 1, "x": 1}),
                    *({"k": 5, "c": 1}, {}, None, [], {"k": None, "c": None}),
                ]
            )
        )
    ops = ["i", "u", "d"] if flaw != "op" else ["r", "x", "", None, 5, ["i"]]
    source: Any = {
        "keyspace": "ks",
        "table": "wide",
        "ts_us": 1_700_000_000_000_001,
        "snapshot": draw(st.sampled_from([None, "false", "true", "last", "FALSE", True, 0])),
    }
    if flaw == "source":
        source = draw(
            st.sampled_from(
                [
                    *(None, [], {**source, "keyspace": "other"}),
                    *({**source, "table": ["wide"]}, {**source, "keyspace": None}),
                ]
            )
        )
    if flaw == "ts":
        source["ts_us"] = draw(st.sampled_from([None, "1", 1.5, True]))
        source["ts_ms"] = draw(st.sampled_from([None, 1_700_000_000_000]))
    columns = draw(st.lists(st.sampled_from(list(EVERY_TYPE)), unique=True, max_size=6))
    after: Any = {name: draw(cells(EVERY_TYPE[name])) for name in columns}
    after |= {name: None for name in draw(st.lists(st.sampled_from(list(EVERY_TYPE))))}
    if flaw == "column":
        after[draw(st.sampled_from(["unknown", "_range_start", "_cdc_cells"]))] = {
            "value": 1,
            "deletion_ts": None,
            "set": True,
        }
    if flaw == "after":
        after = draw(st.sampled_from([None, [], "after"]))
    return key, {"op": draw(st.sampled_from(ops)), "source": source, "after": after}


def general_path(key: Any, value: Any) -> Any:
    """What consumer.prepare makes of the record without the one-pass path, the catalog warm."""
    event = interpret(key, value, POSITION)
    schema = TABLES[event.keyspace, event.table]
    assert event.cells.keys() <= schema.columns.keys()  # else resolving would evolve the table
    return schema.to_mutation(event), schema, op_name(event)


def same(direct: Any, general: Any) -> bool:
    """Equal mutations, NaN equal to NaN, key and value order included."""
    return repr(direct) == repr(general)


@pytest.fixture(scope="module", autouse=True)
def asyncpg_uuids() -> None:
    """UUIDs convert to asyncpg's type, as in the worker."""
    use_asyncpg_uuids()


def fits(column: str, value: Any) -> bool:
    try:
        WIDE.converters[column](value)
    except PoisonError:
        return False
    return True


def known(keyspace: str, table: str) -> TableSchema | None:
    return TABLES.get((keyspace, table))


@pytest.mark.parametrize("table", ["wide", "hashed"])
@settings(max_examples=1500, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(record=wide_records())
def test_every_type_ttl_null_and_flaw_converts_as_the_three_stages_do(
    table: str, record: tuple[Any, dict[str, Any]]
) -> None:
    """For records of a table with every Cassandra type (TTLs, nulls, deletes, collections,
    wrong values, broken envelopes), plain or with every column hashed, the one-pass mutation
    equals the three stages'; where it declines, the three stages convert or refuse the
    record themselves."""
    key, value = record
    if isinstance(value.get("source"), dict) and value["source"].get("table") == "wide":
        value["source"]["table"] = table
    direct = direct_mutation(known, key, value, POSITION)
    if direct is None:
        # refused or evolved by the general path, as without the one-pass path
        with contextlib.suppress(PoisonError, KeyError, AssertionError):
            general_path(key, value)
        return
    assert same(direct, general_path(key, value))


@pytest.mark.parametrize("table", ["wide", "hashed"])
def test_well_formed_rows_of_every_type_take_the_one_pass_path(table: str) -> None:
    """An insert, update or row delete of a known table with valid cells is not declined,
    whatever its column types, hashed or not."""
    after = {}
    for name, cql in EVERY_TYPE.items():
        if name not in ("k", "c"):
            [valid, *_] = [v for v in shapes(cql) if fits(name, v)]
            after[name] = {"value": valid, "deletion_ts": None, "set": True}
    source = {"keyspace": "ks", "table": table, "ts_us": 7, "snapshot": "false"}
    for op in "iud":
        key, value = {"k": "a", "c": 1}, {"op": op, "source": source, "after": after}
        direct = direct_mutation(known, key, value, POSITION)
        assert direct is not None
        assert same(direct, general_path(key, value))
        if table == "hashed" and op != "d":
            digests = {
                n: v for n, v in direct[0].values.items() if HASHED.masks[n].rule.method == "hash"
            }
            assert len(digests) == len(EVERY_TYPE) - 2 - 3
            for name, digest in digests.items():
                for one in digest if isinstance(digest, list) else [digest]:
                    assert re.fullmatch("[0-9a-f]{64}", one), name


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(history=histories())
def test_model_histories_convert_as_the_three_stages_do(history: list[Mutation]) -> None:
    """The planner property's histories (TTLs, nulls, emptied collections, row, partition and
    range deletes): equal mutations for every row event, the others declined."""
    for m in history:
        key, value = to_envelope(m)
        direct = direct_mutation(known, key, value, POSITION)
        mutation, schema, op = general_path(key, value)
        if m.kind in ("delete_partition", "delete_range"):
            assert direct is None
        else:
            assert direct is not None
            assert same(direct, (mutation, schema, op))


@pytest.mark.parametrize("fmt", ["json", "avro"])
def test_the_generators_events_convert_as_the_three_stages_do(fmt: str) -> None:
    """Every generated event, decoded as the worker decodes it: equal mutations, and only
    partition and range deletes declined."""
    events = synth.generate(3000, seed=11, start_us=time.time_ns() // 1000)
    ids = {table: (2 * n + 1, 2 * n + 2) for n, table in enumerate(synth.TABLES)}
    texts = {
        schema_id: json.dumps(schema)
        for table, pair in ids.items()
        for schema_id, schema in zip(pair, synth.avro_schemas(table), strict=True)
    }

    class Registry:
        async def schema_by_id(self, schema_id: int) -> str:
            return texts[schema_id]

    encoder: Any = synth.JsonEncoder() if fmt == "json" else synth.AvroEncoder(ids)
    decoder = Decoder(Registry())

    async def decode_all() -> list[Any]:
        return [await decoder.decode(*encoder.encode(e)) for e in events]

    taken = 0
    for decoded in asyncio.run(decode_all()):
        direct = direct_mutation(
            lambda ks, t: SYNTH.get((ks, t)), decoded.key, decoded.value, POSITION
        )
        event = interpret(decoded.key, decoded.value, POSITION)
        schema = SYNTH[event.keyspace, event.table]
        general = schema.to_mutation(event), schema, op_name(event)
        if event.op is Op.RANGE or event.is_partition_delete:
            assert direct is None
        else:
            assert direct is not None
            assert same(direct, general)
            taken += 1
    assert taken > len(events) * 0.9


def test_a_value_the_converter_refuses_is_left_to_the_general_path() -> None:
    """Declined, so that the record's ConversionError is the general path's, naming the column."""
    source = {"keyspace": "ks", "table": "wide", "ts_us": 7}
    after = {"v_int": {"value": 2**40, "deletion_ts": None, "set": True}}
    value = {"op": "i", "source": source, "after": after}
    assert direct_mutation(known, {"k": "a", "c": 1}, value, POSITION) is None
    with pytest.raises(PoisonError, match="v_int"):
        general_path({"k": "a", "c": 1}, value)


def test_nan_values_compare_equal_in_these_tests() -> None:
    """`same` is not fooled by NaN, which equals nothing, itself included."""
    assert same((math.nan,), (float("nan"),))
