"""A key's JSON text is the one every worker version renders: advisory-lock ids and stored
tombstone keys derive from it, so it must stay exactly json.dumps' output."""

from __future__ import annotations

import datetime as dt
import ipaddress
import json
import uuid
from decimal import Decimal
from typing import Any

import pytest
from asyncpg.pgproto.pgproto import UUID as PgUUID
from hypothesis import given
from hypothesis import strategies as st

from cdc_sink.apply.writer import _jsonable, json_key


def _reference(values: tuple[Any, ...]) -> str:
    return json.dumps([_jsonable(v) for v in values], separators=(",", ":"))


EDGE_VALUES = [
    "",
    "plain",
    'quote " and backslash \\',
    "tab\tnewline\ncontrol\x01",
    "unicode é 中文 😀",
    "\u2028\u2029",
    0,
    -1,
    2**70,
    -(2**70),
    True,
    False,
    None,
    0.0,
    -0.0,
    1.5,
    1e300,
    float("nan"),
    float("inf"),
    float("-inf"),
    uuid.UUID("12345678-1234-5678-1234-567812345678"),
    PgUUID("12345678-1234-5678-1234-567812345678"),
    Decimal("-12.340"),
    b"\x00\xffab",
    dt.datetime(1969, 12, 31, 23, 59, 59, 999999, tzinfo=dt.UTC),
    dt.date(1, 1, 1),
    dt.time(23, 59, 59, 123456),
    ipaddress.ip_address("10.0.0.1"),
    ipaddress.ip_address("::1"),
    [1, 2],
]


@pytest.mark.parametrize("value", EDGE_VALUES, ids=repr)
def test_each_kind_of_value_renders_as_json_dumps_does(value: Any) -> None:
    assert json_key((value,)) == _reference((value,))
    assert json_key(("k", value, 7)) == _reference(("k", value, 7))


def test_the_empty_key() -> None:
    assert json_key(()) == "[]"


@given(
    st.tuples(
        st.text(),
        st.integers(),
        st.one_of(st.none(), st.booleans(), st.floats(), st.uuids(), st.text()),
    )
)
def test_random_keys_render_as_json_dumps_does(values: tuple[Any, ...]) -> None:
    assert json_key(values) == _reference(values)
