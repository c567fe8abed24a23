"""Reconciliation's settings: the `[reconciliation]` section (CDC_RECONCILIATION__*).

Reconciliation owns them; the sink's configuration only reads them in, as a section the
composition root names when it loads the settings (`SECTIONS`).
"""

from __future__ import annotations

from dataclasses import dataclass

from cdc_sink.config import Config, ConfigError

RECON_STRATEGIES = ("row_count", "checksum", "timestamp_range", "sample")
CONSISTENCY_LEVELS = (
    "ONE",
    "TWO",
    "THREE",
    "QUORUM",
    "ALL",
    "LOCAL_QUORUM",
    "EACH_QUORUM",
    "LOCAL_ONE",
)


@dataclass(frozen=True)
class ReconciliationConfig:
    enabled: bool = False
    interval_seconds: int = 3600
    schedule: str = ""  # "users:checksum@3600,orders:row_count@600"; no @ = interval_seconds
    consistency: str = "LOCAL_QUORUM"
    page_size: int = 5000
    concurrency: int = 4
    # Jobs run at once by one worker; more wait, pending. Every job takes CPU from the same
    # Cassandra and PostgreSQL the pipeline uses, so by default they take turns.
    max_running_jobs: int = 1
    # Rows a worker's jobs read per second from each side (0: unlimited): a scan paced so,
    # the pipeline sharing Cassandra and PostgreSQL keeps most of their time.
    max_rows_per_second: int = 50_000
    buckets: int = 4096
    sample_size: int = 1000
    window_seconds: int = 3600
    settle_seconds: int = 300
    poll_seconds: float = 10.0
    push_timeout_seconds: float = 5.0

    def schedule_entries(self) -> list[tuple[str, str, int]]:
        """(table, strategy, interval seconds) per entry of `schedule`; ConfigError if bad."""
        entries = []
        for raw in filter(None, (part.strip() for part in self.schedule.split(","))):
            spec, _, every = raw.partition("@")
            table, _, strategy = spec.partition(":")
            if not table or strategy not in RECON_STRATEGIES:
                raise ConfigError(
                    f"CDC_RECONCILIATION__SCHEDULE entry {raw!r}: expected "
                    f"table:strategy[@seconds] with a strategy among {', '.join(RECON_STRATEGIES)}"
                )
            try:
                interval = int(every) if every else self.interval_seconds
            except ValueError:
                raise ConfigError(
                    f"CDC_RECONCILIATION__SCHEDULE entry {raw!r}: {every!r} is not whole seconds"
                ) from None
            if interval < 1:
                raise ConfigError(f"CDC_RECONCILIATION__SCHEDULE entry {raw!r}: interval < 1 s")
            entries.append((table.strip(), strategy, interval))
        return entries

    def validate(self) -> None:
        if self.consistency.upper() not in CONSISTENCY_LEVELS:
            raise ConfigError(
                f"CDC_RECONCILIATION__CONSISTENCY must be one of {', '.join(CONSISTENCY_LEVELS)}"
            )
        for name in (
            "interval_seconds",
            "page_size",
            "concurrency",
            "max_running_jobs",
            "buckets",
            "sample_size",
            "window_seconds",
        ):
            if getattr(self, name) < 1:
                raise ConfigError(f"CDC_RECONCILIATION__{name.upper()} must be >= 1")
        if self.max_rows_per_second < 0:
            raise ConfigError("CDC_RECONCILIATION__MAX_ROWS_PER_SECOND must be >= 0 (0: unlimited)")
        if self.settle_seconds < 0:
            raise ConfigError("CDC_RECONCILIATION__SETTLE_SECONDS must be >= 0")
        for name in ("poll_seconds", "push_timeout_seconds"):
            if not getattr(self, name) > 0:
                raise ConfigError(f"CDC_RECONCILIATION__{name.upper()} must be > 0")
        self.schedule_entries()


SECTION = "reconciliation"
SECTIONS = {SECTION: ReconciliationConfig}  # for cdc_sink.config.load_config(sections=…)


def reconciliation_settings(config: Config) -> ReconciliationConfig:
    """The `[reconciliation]` section of `config` (its defaults if it was loaded without it)."""
    return config.section(SECTION, ReconciliationConfig)
