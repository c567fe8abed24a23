"""The one error tree of the sink: every failure is a PoisonError (dead-letter the record and
move on), a TransientError (retry the step with backoff, committing nothing meanwhile) or a
FatalError (stop without committing)."""

from __future__ import annotations


class SinkError(Exception):
    """Root of every error the sink raises on purpose."""


class PoisonError(SinkError):
    """A record that can never be applied as it is; `stage` names where it was found."""

    def __init__(self, message: str, *, stage: str) -> None:
        super().__init__(message)
        self.stage = stage


class DecodeError(PoisonError):
    """The record's bytes are not a Debezium event we can read."""

    def __init__(self, message: str) -> None:
        super().__init__(message, stage="decode")


class EventError(PoisonError):
    """The record decoded, but is not a valid Debezium Cassandra change event."""

    def __init__(self, message: str) -> None:
        super().__init__(message, stage="interpret")


class ConversionError(PoisonError):
    """A value does not fit its PostgreSQL column (NUL in text, out-of-range number, …)."""

    def __init__(self, message: str) -> None:
        super().__init__(message, stage="convert")


# The stage of a dead letter standing for a whole record batch none of whose records was read.
UNREAD_BATCH_STAGE = "fetch"


class BatchInflateError(PoisonError):
    """A compressed record batch inflates beyond the limit (or is not valid for its codec):
    none of its records can be read, so the batch is dead-lettered as one."""

    def __init__(self, message: str) -> None:
        super().__init__(message, stage=UNREAD_BATCH_STAGE)


class UnexpectedError(PoisonError):
    """The sink's own code failed on this record in a way it does not foresee (a defect)."""


class TransientError(SinkError):
    """A failure expected to pass (connection lost, timeout, serialization failure): retry the
    same step with backoff."""


class FatalError(SinkError):
    """A failure retrying cannot fix and skipping would lose data (misconfiguration,
    permissions): stop without committing. `stage` names where it happened (the label of
    cdc_errors_total{kind="fatal"})."""

    def __init__(self, message: str, *, stage: str = "run") -> None:
        super().__init__(message)
        self.stage = stage


class FencedError(SinkError):
    """Another worker owns the partition now: abandon the batch, commit nothing, re-sync."""
