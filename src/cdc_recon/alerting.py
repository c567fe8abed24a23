"""Alerting: the reconciliation metrics, and pushing them to the Pushgateway after each job.

Prometheus rules alert on these names; do not rename them:
  cdc_reconciliation_drift_percentage{table,strategy}            gauge
  cdc_reconciliation_mismatches{table,strategy}                  gauge (last job)
  cdc_reconciliation_last_job_failed{table,strategy}             gauge 0/1
  cdc_reconciliation_last_job_timestamp_seconds{table,strategy}  gauge (unix time it ended)
  cdc_reconciliation_last_job_duration_seconds{table,strategy}   gauge
  cdc_reconciliation_last_success_timestamp_seconds{table,strategy}  gauge (unix time the
      last job that succeeded ended; a failed job pushes none, so the one before stays)
  cdc_reconciliation_jobs_total{table,strategy,status}           counter (this process only)

The gauges of one (table, strategy) are pushed with grouping key job="cdc_reconciliation",
table, strategy (POST: other groups and metric names stay). A Pushgateway that cannot be
reached never fails the job: it is logged and counted in
cdc_reconciliation_push_failures_total.
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass

import structlog
from prometheus_client import CollectorRegistry, Counter, Gauge, pushadd_to_gateway

from cdc_sink.ops.metrics import erasure_suppressed_counter

log = structlog.get_logger(__name__)

PUSH_JOB = "cdc_reconciliation"
_GAUGES = {
    "drift": ("cdc_reconciliation_drift_percentage", "Drift found by the last job, in percent."),
    "mismatches": ("cdc_reconciliation_mismatches", "Differences found by the last job."),
    "failed": ("cdc_reconciliation_last_job_failed", "1 if the last job failed, else 0."),
    "ended": (
        "cdc_reconciliation_last_job_timestamp_seconds",
        "Unix time the last job ended.",
    ),
    "duration": ("cdc_reconciliation_last_job_duration_seconds", "Wall time of the last job."),
    "succeeded": (
        "cdc_reconciliation_last_success_timestamp_seconds",
        "Unix time the last job that succeeded ended.",
    ),
}


@dataclass(frozen=True)
class JobReport:
    """The outcome of one job, as metrics see it (drift/mismatches None when it failed)."""

    table: str
    strategy: str
    status: str
    ended_at: float
    duration_s: float
    drift_percentage: float | None
    mismatches: int | None


class ReconMetrics:
    """The reconciliation metrics on `registry` (the worker's, so /metrics shows them)."""

    def __init__(
        self, registry: CollectorRegistry | None = None, erasure_suppressed: Counter | None = None
    ) -> None:
        """`erasure_suppressed`: the worker's cdc_erasure_suppressed_total, which already is on
        `registry`; without it one of its own (a command's, never scraped)."""
        self.registry = registry or CollectorRegistry(auto_describe=True)
        self.erasure_suppressed = erasure_suppressed or erasure_suppressed_counter(self.registry)
        self.gauges = {
            key: Gauge(name, text, ["table", "strategy"], registry=self.registry)
            for key, (name, text) in _GAUGES.items()
        }
        self.jobs = Counter(
            "cdc_reconciliation_jobs_total",
            "Reconciliation jobs ended, by outcome.",
            ["table", "strategy", "status"],
            registry=self.registry,
        )
        self.push_failures = Counter(
            "cdc_reconciliation_push_failures_total",
            "Pushes to the Pushgateway that failed.",
            registry=self.registry,
        )

    def record(self, report: JobReport) -> None:
        for key, value in _values(report).items():
            self.gauges[key].labels(report.table, report.strategy).set(value)
        self.jobs.labels(report.table, report.strategy, report.status).inc()

    async def push(self, url: str | None, report: JobReport, timeout_s: float) -> None:
        """Push this job's gauges (if `url`); a failure is logged and counted, never raised."""
        if not url:
            return
        registry = CollectorRegistry()
        for key, value in _values(report).items():
            name, text = _GAUGES[key]
            Gauge(name, text, ["table", "strategy"], registry=registry).labels(
                report.table, report.strategy
            ).set(value)
        try:
            await asyncio.wait_for(
                asyncio.to_thread(
                    pushadd_to_gateway,
                    url,
                    job=PUSH_JOB,
                    registry=registry,
                    grouping_key={"table": report.table, "strategy": report.strategy},
                    timeout=timeout_s,
                ),
                timeout_s + 1,
            )
        except Exception as exc:  # noqa: BLE001 - an unreachable Pushgateway must not fail a job
            self.push_failures.inc()
            log.warning("reconciliation_push_failed", url=url, error=f"{type(exc).__name__}: {exc}")


def _values(report: JobReport) -> dict[str, float]:
    values = {
        "failed": 0.0 if report.status == "succeeded" else 1.0,
        "ended": report.ended_at,
        "duration": report.duration_s,
    }
    if report.status == "succeeded":
        values["succeeded"] = report.ended_at
    if report.drift_percentage is not None:
        values["drift"] = report.drift_percentage
    if report.mismatches is not None:
        values["mismatches"] = float(report.mismatches)
    return values
