"""The capture side's alerts on the real stack: the Debezium agent's JMX exporter and the
cdc_raw exporter serve the series deploy/prometheus/rules/debezium.yml reads, and a write to a
CDC table moves both, so a Prometheus of the test's own that scrapes them evaluates the rules
cleanly and no capture alert fires."""

from __future__ import annotations

import time
from collections.abc import Callable
from pathlib import Path

from tests.support.alerting import alerts
from tests.support.names import Unique
from tests.support.pipeline import cassandra_session, create_cassandra_table
from tests.support.prometheus import SCRAPE_SECONDS, Prometheus, capture_jobs, private_prometheus
from tests.support.stack import Endpoints

WAIT_SECONDS = 90
WRITTEN = 'sum(cassandra_cdc_raw_written_bytes{job="cassandra-cdc"})'
POSITION = (
    'debezium_cassandra_connector_metrics_commitlogposition{job="debezium-agent",'
    'context="streaming"}'
)


def _value(prometheus: Prometheus, expression: str) -> float | None:
    found = prometheus.query(expression)
    return float(found[0]["value"][1]) if found else None


def _until(what: str, check: Callable[[], bool]) -> None:
    deadline = time.monotonic() + WAIT_SECONDS
    while not check():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(SCRAPE_SECONDS)


def test_a_cdc_write_moves_both_sides_of_the_stall_alert(
    stack: Endpoints, unique: Unique, tmp_path: Path
) -> None:
    """After writes to a CDC table, cdc_raw's written bytes rise and the agent's commit log
    position moves; the capture rules evaluate cleanly, every capture alert's expression is
    false and none fires, and the cdc_raw share is a fraction of cdc_total_space."""
    keyspace = unique.keyspace("capture")
    with private_prometheus([], stack.pushgateway_url, tmp_path, capture_jobs(stack)) as prom:
        prom.wait_scraped(1, WAIT_SECONDS, job="debezium-agent")
        prom.wait_scraped(1, WAIT_SECONDS, job="cassandra-cdc")
        _until("a sample of cdc_raw's written bytes", lambda: _value(prom, WRITTEN) is not None)
        before = _value(prom, WRITTEN)
        assert before is not None
        create_cassandra_table(
            stack,
            keyspace,
            f"CREATE TABLE {keyspace}.t (id int PRIMARY KEY, v text) WITH cdc = true",
        )
        session = cassandra_session(stack)
        try:
            for i in range(50):
                session.execute(f"INSERT INTO {keyspace}.t (id, v) VALUES (%s, %s)", (i, "x" * 64))
        finally:
            session.cluster.shutdown()
        # Cassandra syncs the commit log (and the _cdc.idx offsets) once a second here.
        _until("the writes in cdc_raw", lambda: (_value(prom, WRITTEN) or 0) > before)
        _until(
            "the agent to read them",
            lambda: bool(prom.query(f"sum(changes({POSITION}[1m])) > 0")),
        )
        share = _value(
            prom, 'cassandra_cdc_raw_bytes{job="cassandra-cdc"} / cassandra_cdc_total_space_bytes'
        )
        assert share is not None
        assert 0 < share < 0.8
        # Each expression is false now that the agent has read what was written (the stall
        # alert may have gone pending for the second between a sync and the agent's read:
        # its `for` is there for that).
        for name in ("DebeziumAgentDown", "DebeziumAgentStalled", "CassandraCdcSpaceFilling"):
            assert prom.query(str(alerts()[name]["expr"])) == [], name
            assert [a for a in prom.alerts(name) if a["state"] == "firing"] == [], name
        (group,) = (g for g in prom.rule_groups() if g["name"] == "debezium-agent")
        unhealthy = [rule["name"] for rule in group["rules"] if rule["health"] != "ok"]
        assert unhealthy == [], unhealthy
