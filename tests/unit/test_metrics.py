"""Metrics render in the Prometheus text format on a registry of their own."""

from __future__ import annotations

from aiokafka import TopicPartition
from hypothesis import given
from hypothesis import strategies as st
from prometheus_client import REGISTRY
from prometheus_client.exposition import CONTENT_TYPE_LATEST
from prometheus_client.parser import text_string_to_metric_families

from cdc_sink.config import load_config
from cdc_sink.consumer.ownership import Owned
from cdc_sink.consumer.worker import Worker
from cdc_sink.ops.metrics import LATENCY_BUCKETS, Metrics, observe_all


def _samples(metrics: Metrics) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    body, _ = metrics.render()
    return {
        (sample.name, tuple(sorted(sample.labels.items()))): sample.value
        for family in text_string_to_metric_families(body.decode())
        for sample in family.samples
    }


def _record_one_of_each(metrics: Metrics) -> None:
    metrics.events_processed.labels(topic="cdc-events-users", table="users", op="c").inc(3)
    metrics.processing_latency.labels(table="users").observe(0.004)
    metrics.errors.labels(stage="decode", kind="poison").inc()
    metrics.backlog_depth.labels(topic="cdc-events-users", partition="2").set(42)
    metrics.batch_size.observe(700)
    metrics.transaction_duration.observe(0.02)
    metrics.retries.labels(stage="write").inc()
    metrics.dlq_records.labels(topic="cdc-events-users", reason="decode").inc()
    metrics.last_commit_timestamp.labels(topic="cdc-events-users", partition="2").set(1.7e9)
    metrics.assigned_partitions.set(8)


def test_render_exposes_every_metric_with_its_labels() -> None:
    """Each recorded metric appears under its documented name with its labels and value."""
    metrics = Metrics()
    _record_one_of_each(metrics)
    samples = _samples(metrics)
    topic, part = ("topic", "cdc-events-users"), ("partition", "2")
    expected = {
        ("cdc_events_processed_total", (("op", "c"), ("table", "users"), topic)): 3.0,
        ("cdc_processing_latency_seconds_count", (("table", "users"),)): 1.0,
        ("cdc_errors_total", (("kind", "poison"), ("stage", "decode"))): 1.0,
        ("cdc_backlog_depth", (part, topic)): 42.0,
        ("cdc_batch_size_count", ()): 1.0,
        ("cdc_batch_size_sum", ()): 700.0,
        ("cdc_transaction_duration_seconds_count", ()): 1.0,
        ("cdc_retries_total", (("stage", "write"),)): 1.0,
        ("cdc_dlq_records_total", (("reason", "decode"), topic)): 1.0,
        ("cdc_last_commit_timestamp_seconds", (part, topic)): 1.7e9,
        ("cdc_assigned_partitions", ()): 8.0,
    }
    assert {key: samples.get(key) for key in expected} == expected


def test_retry_counters_of_every_retrying_stage_start_at_zero() -> None:
    """A fresh worker exports cdc_retries_total at 0 for each stage that retries, and nothing
    else retried."""
    samples = _samples(Metrics())
    retries = {
        labels: value for (name, labels), value in samples.items() if name == "cdc_retries_total"
    }
    assert retries == {
        (("stage", "claim"),): 0.0,
        (("stage", "decode"),): 0.0,
        (("stage", "dlq"),): 0.0,
        (("stage", "write"),): 0.0,
    }


def test_histogram_buckets_span_the_documented_ranges() -> None:
    """Latency buckets run from 1 ms to 60 s; batch-size buckets from 1 to 5000 rows."""
    metrics = Metrics()
    _record_one_of_each(metrics)
    samples = _samples(metrics)
    latency = {
        dict(labels)["le"]
        for name, labels in samples
        if name == "cdc_processing_latency_seconds_bucket"
    }
    batch = {dict(labels)["le"] for name, labels in samples if name == "cdc_batch_size_bucket"}
    assert {"0.001", "60.0", "+Inf"} <= latency
    assert {"1.0", "5000.0", "+Inf"} <= batch
    le_4ms = ("cdc_processing_latency_seconds_bucket", (("le", "0.005"), ("table", "users")))
    assert samples[le_4ms] == 1.0


def _latency_lines(metrics: Metrics) -> list[str]:
    """The latency histogram's exposition, without its creation time (which differs)."""
    body, _ = metrics.render()
    return [
        line
        for line in body.decode().splitlines()
        if line.startswith("cdc_processing_latency_seconds") and "_created" not in line
    ]


# Latencies as the applier computes them (never negative), the buckets' own bounds among them.
latencies = st.lists(
    st.sampled_from([0.0, *LATENCY_BUCKETS, 1e9])
    | st.floats(min_value=0.0, max_value=120.0, allow_nan=False),
    max_size=60,
)


@given(batches=st.lists(latencies, max_size=4))
def test_observing_a_batch_at_once_exposes_what_one_at_a_time_does(
    batches: list[list[float]],
) -> None:
    """observe_all over each batch leaves the same bucket counts, count and sum in the
    exposition as observe per latency, to the last bit."""
    one_by_one, batched = Metrics(), Metrics()
    for batch in batches:
        histogram = one_by_one.processing_latency.labels("users")
        for latency in batch:
            histogram.observe(latency)
        observe_all(batched.processing_latency.labels("users"), batch)
    assert _latency_lines(batched) == _latency_lines(one_by_one)


def test_render_returns_the_prometheus_text_content_type() -> None:
    """render() answers prometheus_client's latest text exposition content type."""
    body, content_type = Metrics().render()
    assert content_type == CONTENT_TYPE_LATEST
    assert content_type.startswith("text/plain; version=")
    assert b"# TYPE cdc_events_processed_total counter" in body


def test_two_instances_do_not_share_or_collide() -> None:
    """Two Metrics() in one process register without a duplicate-name error and count apart."""
    first, second = Metrics(), Metrics()
    first.assigned_partitions.set(3)
    second.assigned_partitions.set(5)
    assert _samples(first)[("cdc_assigned_partitions", ())] == 3.0
    assert _samples(second)[("cdc_assigned_partitions", ())] == 5.0


def test_nothing_is_registered_on_the_global_default_registry() -> None:
    """Creating Metrics leaves prometheus_client's process-wide default registry untouched."""
    Metrics()
    assert REGISTRY.get_sample_value("cdc_assigned_partitions") is None
    assert not any(name.startswith("cdc_") for name in REGISTRY._names_to_collectors)


async def test_revoked_partitions_stop_being_reported() -> None:
    """After a rebalance takes a partition away, the worker no longer exports its backlog or
    commit time (the new owner does), while its other partitions stay reported."""
    worker = Worker(load_config({}))
    kept, revoked = TopicPartition("cdc-events-users", 1), TopicPartition("cdc-events-users", 2)
    for tp in (kept, revoked):
        worker.owned[tp] = Owned(epoch=1, next_offset=10)
        worker.metrics.backlog_depth.labels(tp.topic, str(tp.partition)).set(5)
        worker.metrics.last_commit_timestamp.labels(tp.topic, str(tp.partition)).set(1.7e9)

    await worker.release([revoked])

    reported = {
        (name, dict(labels)["partition"])
        for name, labels in _samples(worker.metrics)
        if name in ("cdc_backlog_depth", "cdc_last_commit_timestamp_seconds")
    }
    assert reported == {
        ("cdc_backlog_depth", "1"),
        ("cdc_last_commit_timestamp_seconds", "1"),
    }
    assert _samples(worker.metrics)[("cdc_assigned_partitions", ())] == 1
