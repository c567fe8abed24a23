"""Erased keys and reconciliation agree on what a key is: reconciliation finds an erased key
from a mismatch's canonical key, and an erasure finds the mismatches of its key."""

from __future__ import annotations

import json
from decimal import Decimal
from typing import Any

import pytest

from cdc_recon.canonical import for_postgres, key_text, mismatch_key
from cdc_recon.readers import ReconTable, written_key
from cdc_sink.apply.suppression import by_value
from cdc_sink.apply.writer import json_key
from cdc_sink.model.cql import parse_cql_type
from cdc_sink.model.values import converter

# (CQL type, a value as Debezium sends it) for every type a primary key may have.
KEY_VALUES: list[tuple[str, Any]] = [
    ("text", 'Zoë "quoted" \\ ✓'),
    ("ascii", "plain"),
    ("varchar", ""),
    ("int", -2_147_483_648),
    ("bigint", 9_007_199_254_740_993),
    ("smallint", -7),
    ("tinyint", 127),
    ("varint", "123456789012345678901234567890"),
    ("decimal", "-12.34"),
    ("decimal", "1200"),
    ("decimal", "-12.340"),
    ("decimal", "1.2E+3"),
    ("decimal", "0.00"),
    ("double", -0.0),
    ("float", 1.5),
    ("double", -0.1),
    ("boolean", False),
    ("uuid", "5B6F3E2A-1C4D-4E8F-9A0B-1C2D3E4F5A6B"),
    ("timeuuid", "e7b8a8a0-94c4-11ee-b9d1-0242ac120002"),
    ("timestamp", 1_700_000_000_123),
    ("timestamp", -62_135_596_800_000),
    ("date", 19_000),
    ("time", 36_000_123_456_789),
    ("inet", "10.0.0.1"),
    ("inet", "2001:db8::ff00:42:8329"),
    ("blob", "AAEC/w=="),
]


@pytest.mark.parametrize(("name", "sent"), KEY_VALUES)
def test_a_key_rebuilt_from_its_canonical_form_renders_as_the_writer_s(
    name: str, sent: Any
) -> None:
    """For each key type, the canonical key value reconciliation holds, turned back into a
    value, hashes as the sink's (by_value: 12.340 is 12.34, -0.0 is 0.0), so reconciliation
    recognises an erased key."""
    t = parse_cql_type(name)
    stored = converter(t)(sent)
    rebuilt = written_key(_table(t), (for_postgres(t)(stored),))
    assert json_key(by_value(rebuilt)) == json_key(by_value((stored,)))


def test_keys_without_trailing_zeros_are_hashed_from_their_usual_text() -> None:
    """by_value changes only what PostgreSQL holds as equal to a shorter form, so the hashes of
    keys erased before it stay valid."""
    assert (
        json_key(by_value((Decimal("1200"), Decimal("-0.5"), 1.5, "x")))
        == '["1200","-0.5",1.5,"x"]'
    )


def _table(t: Any) -> ReconTable:
    return ReconTable("cdc_t", "ks", "t", ("k",), ("k",), {"k": t})


@pytest.mark.parametrize(("name", "sent"), KEY_VALUES)
def test_an_erasure_finds_the_mismatches_of_its_key(name: str, sent: Any) -> None:
    """The row_key an erasure deletes mismatches by (mismatch_key, from the sink's values) is
    the one reconciliation records for the key, also where it differs from the sink's JSON
    (timestamps as microseconds, floats and varints as text); a partition key is its prefix."""
    t = parse_cql_type(name)
    stored = converter(t)(sent)
    columns = {"k": t, "c": parse_cql_type("int")}
    recorded = key_text([for_postgres(t)(stored), 7])
    assert mismatch_key(columns, ("k", "c"), (stored, 7)) == recorded
    assert json.loads(mismatch_key(columns, ("k", "c"), (stored,))) == json.loads(recorded)[:1]
