"""Errors of the reconciliation service, under the sink's one error root.

A ReconError fails the job it happens in (recorded with its message) and nothing else; the
subclasses tell callers (CLI, HTTP) which answer to give.
"""

from __future__ import annotations

from cdc_sink.errors import SinkError


class ReconError(SinkError):
    """A reconciliation job cannot run or complete; the message says why."""


class UnknownTableError(ReconError):
    """The table is not one the sink writes (or Cassandra no longer has it)."""


class UnknownStrategyError(ReconError):
    """The strategy name is not one of row_count, checksum, timestamp_range, sample."""


class UnknownJobError(ReconError):
    """No job (or mismatch) has this id."""


class InvalidRequestError(ReconError):
    """Options that do not fit the strategy (a window with its end before its start, …)."""
