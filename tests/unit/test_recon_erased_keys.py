"""Reconciliation finds an erased key by the writer's rendering of the key's PostgreSQL values:
the value it rebuilds from a mismatch's canonical key renders exactly as the sink's own."""

from __future__ import annotations

from typing import Any

import pytest

from cdc_recon.canonical import for_postgres
from cdc_recon.readers import ReconTable, written_key
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
    driver value, has the writer's json_key text, so an erased key's mismatch is recognised."""
    t = parse_cql_type(name)
    stored = converter(t)(sent)
    rebuilt = written_key(_table(t), (for_postgres(t)(stored),))
    assert json_key(rebuilt) == json_key((stored,))


def test_a_decimal_key_with_trailing_zeros_is_not_recognised() -> None:
    """The known limit (README, GDPR erasure): a decimal key keeps only its canonical scale."""
    t = parse_cql_type("decimal")
    stored = converter(t)("-12.340")
    rebuilt = written_key(_table(t), (for_postgres(t)(stored),))
    assert json_key(rebuilt) != json_key((stored,))


def _table(t: Any) -> ReconTable:
    return ReconTable("cdc_t", "ks", "t", ("k",), ("k",), {"k": t})
