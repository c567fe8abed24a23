"""Prometheus metrics of one worker, all on one registry the `Metrics` instance owns (not the
global default registry: several workers, or tests, in one process never collide on names)."""

from __future__ import annotations

from bisect import bisect_left
from collections.abc import Iterable

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, pushadd_to_gateway
from prometheus_client.exposition import CONTENT_TYPE_LATEST, generate_latest

__all__ = [
    "DEAD_LETTER",
    "RECONCILIATION",
    "STREAM",
    "Metrics",
    "erasure_suppressed_counter",
    "observe_all",
    "push_fatal_exit",
]

FATAL_EXIT_JOB = "cdc-sink"  # the pushed group's job label, as the workers' scrape job

# 1 ms … 60 s: a healthy pipeline sits in the low milliseconds, a stalled one in tens of seconds.
LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60)
BATCH_BUCKETS = (1, 5, 10, 25, 50, 100, 250, 500, 1000, 2500, 5000)
# The stages that retry with the sink's retry policy: their counters are exported at 0 from the
# start, so dashboards show them and rate() sees a worker's first retry.
RETRIED_STAGES = ("write", "decode", "dlq", "claim")
# cdc_erasure_suppressed_total's paths: change events (replayed dead letters among them), poison
# records not dead-lettered, reconciliation's findings and repairs.
STREAM, DEAD_LETTER, RECONCILIATION = "stream", "dead_letter", "reconciliation"


def erasure_suppressed_counter(registry: CollectorRegistry) -> Counter:
    """cdc_erasure_suppressed_total{table,path} on `registry`: the worker's, or reconciliation's
    own when it runs from the command line."""
    return Counter(
        "cdc_erasure_suppressed_total",
        "Writes skipped because their key was erased for GDPR, by path: change events and "
        "replays (stream), poison records not dead-lettered (dead_letter), reconciliation "
        "mismatches not reported or repaired (reconciliation).",
        ["table", "path"],
        registry=registry,
    )


class Metrics:
    """Every metric the worker exports. Adapters and the runner record; pure code only counts."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        r = self.registry
        self.events_processed = Counter(
            "cdc_events_processed_total",
            "Change events committed to PostgreSQL, by operation (insert, update, delete, "
            "partition_delete, range_delete, snapshot).",
            ["topic", "table", "op"],
            registry=r,
        )
        self.processing_latency = Histogram(
            "cdc_processing_latency_seconds",
            "From the event's Kafka timestamp to its commit in PostgreSQL.",
            ["table"],
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self.errors = Counter(
            "cdc_errors_total",
            "Failures by pipeline stage and kind (poison, transient, fatal).",
            ["stage", "kind"],
            registry=r,
        )
        self.backlog_depth = Gauge(
            "cdc_backlog_depth",
            "Records not yet committed: end offset minus committed position.",
            ["topic", "partition"],
            registry=r,
        )
        self.batch_size = Histogram(
            "cdc_batch_size",
            "Rows written per PostgreSQL transaction.",
            buckets=BATCH_BUCKETS,
            registry=r,
        )
        self.transaction_duration = Histogram(
            "cdc_transaction_duration_seconds",
            "Wall time of one batch transaction, BEGIN to COMMIT.",
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self.retries = Counter(
            "cdc_retries_total", "Retries after a transient failure.", ["stage"], registry=r
        )
        for stage in RETRIED_STAGES:
            self.retries.labels(stage)
        self.dlq_records = Counter(
            "cdc_dlq_records_total",
            "Records sent to the dead-letter queue.",
            ["topic", "reason"],
            registry=r,
        )
        self.dlq_oversized_records = Counter(
            "cdc_dlq_oversized_records_total",
            "Dead letters too large for the DLQ topic: produced without their record, which "
            "_cdc_dlq_records keeps whole.",
            ["topic"],
            registry=r,
        )
        self.dlq_partition_paused = Gauge(
            "cdc_dlq_partition_paused",
            "1 while the partition is paused because its dead-letter share passed the limit.",
            ["topic", "partition"],
            registry=r,
        )
        self.last_commit_timestamp = Gauge(
            "cdc_last_commit_timestamp_seconds",
            "Unix time of the last checkpoint committed for the partition.",
            ["topic", "partition"],
            registry=r,
        )
        self.assigned_partitions = Gauge(
            "cdc_assigned_partitions", "Partitions currently assigned to this worker.", registry=r
        )
        self.table_name_collisions = Gauge(
            "cdc_table_name_collisions",
            "Target table names that tables of several keyspaces map to, as the topics "
            "matching the pattern showed at start-up (CDC_SINK__TABLE_NAME_FORMAT).",
            registry=r,
        )
        self.erasure_suppressed = erasure_suppressed_counter(r)
        self.retention_purged = Counter(
            "cdc_retention_purged_total",
            "Rows housekeeping deleted because they passed their retention period, by table "
            "(_cdc_dlq_records, _cdc_reconciliation_mismatches, _cdc_audit_log).",
            ["table"],
            registry=r,
        )
        # Only with PostgreSQL logins leased from Vault (CDC_VAULT__POSTGRES_ROLE).
        self.postgres_login_expiry = Gauge(
            "cdc_postgres_login_expiry_timestamp_seconds",
            "Unix time the leased PostgreSQL login ends unless renewed or replaced.",
            registry=r,
        )
        self.postgres_login_lease = Gauge(
            "cdc_postgres_login_lease_seconds",
            "Duration Vault first granted the current PostgreSQL login.",
            registry=r,
        )

    def render(self) -> tuple[bytes, str]:
        """The exposition body of this registry and its content type, for GET /metrics."""
        return generate_latest(self.registry), CONTENT_TYPE_LATEST


def observe_all(histogram: Histogram, amounts: Iterable[float]) -> None:
    """Observe each amount (never NaN) on a histogram without labels, or one label set's
    child, as `observe` one at a time would: the same bucket counts, and the same sum to the
    last bit (added in the same order), with one update per bucket touched instead of one per
    amount. prometheus_client has no batched observe, hence its internals here. Only for
    histograms one thread observes (the worker's event loop)."""
    bounds = histogram._upper_bounds
    counts = [0] * len(bounds)
    total = histogram._sum.get()
    for amount in amounts:
        total += amount
        counts[bisect_left(bounds, amount)] += 1  # the first bound >= amount, as observe finds
    histogram._sum.set(total)
    for bucket, count in zip(histogram._buckets, counts, strict=True):
        if count:
            bucket.inc(count)


def push_fatal_exit(
    url: str, stage: str, *, instance: str, consumer_group: str, timeout_s: float
) -> None:
    """Push `cdc_fatal_exit_timestamp_seconds{stage}` = now to the Pushgateway at `url`, in the
    group job="cdc-sink", `instance`, `consumer_group` (replacing that group's earlier exit):
    a worker that stops on a fatal error is gone before any scrape could see it counted.
    Blocking; raises what the HTTP request raises."""
    registry = CollectorRegistry()
    Gauge(
        "cdc_fatal_exit_timestamp_seconds",
        "Unix time the worker last stopped on a fatal error, by stage.",
        ["stage"],
        registry=registry,
    ).labels(stage).set_to_current_time()
    pushadd_to_gateway(
        url,
        job=FATAL_EXIT_JOB,
        registry=registry,
        grouping_key={"instance": instance, "consumer_group": consumer_group},
        timeout=timeout_s,
    )
