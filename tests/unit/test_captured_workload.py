"""The demo's real-pipeline workload: a seeded, repeatable list of CQL statements."""

from __future__ import annotations

from cdc_synth.captured import workload


def test_workload_is_repeatable_and_stays_in_its_keyspace() -> None:
    """The same seed gives the same statements, and every one names only the given keyspace."""
    statements = workload("demo_ks", seed=3)
    assert statements == workload("demo_ks", seed=3)
    assert statements != workload("demo_ks", seed=4)
    for cql, _ in statements:
        assert " demo_ks." in cql


def test_workload_writes_every_kind_of_change() -> None:
    """Inserts, partial updates, a null, a whole-collection overwrite, row, partition and range
    deletes and TTL'd inserts are all there, each statement binding as many values as it has
    placeholders."""
    statements = workload("ks", customers=20)
    texts = [cql for cql, _ in statements]
    for fragment in (
        "INSERT INTO ks.users",
        "UPDATE ks.users SET balance",
        "SET name = null",
        "SET tags = %s",
        "DELETE FROM ks.users WHERE user_id = %s",
        "DELETE FROM ks.orders WHERE customer_id = %s AND order_id > %s",
        "USING TTL 86400",
    ):
        assert any(fragment in text for text in texts), fragment
    assert "DELETE FROM ks.orders WHERE customer_id = %s" in texts
    for cql, params in statements:
        assert cql.count("%s") == len(params), cql
