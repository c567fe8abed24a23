"""How a failure is handled, decided once: poison (dead-letter the records), transient (retry
the step) or fatal (stop). An adapter: it knows the drivers' public exception classes and
PostgreSQL's SQLSTATE classes, so the error tree in errors.py stays free of them.
"""

from __future__ import annotations

import asyncio
import enum

import asyncpg
from aiokafka.errors import KafkaError, KafkaTimeoutError, KafkaUnavailableError
from cassandra import OperationTimedOut, RequestExecutionException
from cassandra.cluster import NoHostAvailable

from cdc_sink.errors import FatalError, FencedError, PoisonError, TransientError


class Kind(enum.Enum):
    """What to do about a failure: dead-letter the records, retry the step, or stop."""

    POISON = "poison"
    TRANSIENT = "transient"
    FATAL = "fatal"


# By SQLSTATE class (the first two characters), as PostgreSQL groups its errors: 08 connection,
# 40 transaction rollback (serialization, deadlock), 53 insufficient resources, 57 operator
# intervention (admin shutdown, cannot connect now); 22 data exception, 23 integrity constraint.
SQLSTATE_CLASSES = {
    "08": Kind.TRANSIENT,
    "40": Kind.TRANSIENT,
    "53": Kind.TRANSIENT,
    "57": Kind.TRANSIENT,
    "22": Kind.POISON,
    "23": Kind.POISON,
}
SQLSTATES = {"42804": Kind.POISON}  # datatype mismatch: the data is at fault

# By exception class, the first match wins. Checked after the SQLSTATE, for errors without one.
EXCEPTION_CLASSES: tuple[
    tuple[type[BaseException] | tuple[type[BaseException], ...], Kind], ...
] = (
    (TransientError, Kind.TRANSIENT),
    (PoisonError, Kind.POISON),
    ((FatalError, FencedError), Kind.FATAL),
    # A value the driver cannot encode for its column (asyncpg raises these, and its
    # invalid-input InterfaceError is a ValueError too).
    ((TypeError, ValueError, OverflowError), Kind.POISON),
    # A missing feature fails the same way on every attempt.
    ((asyncpg.UnsupportedClientFeatureError, asyncpg.UnsupportedServerFeatureError), Kind.FATAL),
    # The connection's state is off (closed, broken, released, or its protocol state after an
    # admin shutdown lands on an idle connection): a retry runs on a fresh connection.
    ((asyncpg.InterfaceError, asyncpg.InternalClientError), Kind.TRANSIENT),
    ((ConnectionError, OSError, asyncio.TimeoutError), Kind.TRANSIENT),
    # aiokafka does not mark its request timeout and "no broker reachable" retriable, but they
    # are exactly what a broker restart looks like.
    ((KafkaTimeoutError, KafkaUnavailableError), Kind.TRANSIENT),
    ((NoHostAvailable, OperationTimedOut, RequestExecutionException), Kind.TRANSIENT),
)


def classify(exc: BaseException) -> Kind:
    """The kind of a failure, from its SQLSTATE class or its public exception class (never its
    message). Anything unknown is fatal: stopping is safe, guessing is not."""
    state = getattr(exc, "sqlstate", None)
    if isinstance(state, str):
        return SQLSTATES.get(state) or SQLSTATE_CLASSES.get(state[:2], Kind.FATAL)
    for classes, kind in EXCEPTION_CLASSES:
        if isinstance(exc, classes):
            return kind
    if isinstance(exc, KafkaError):
        return Kind.TRANSIENT if exc.retriable else Kind.FATAL
    return Kind.FATAL


# A table or column the sink made and recorded in _cdc_schema_metadata was dropped by hand.
_GONE = dict.fromkeys(
    ("42P01", "42703"),
    ". A table or column the sink made is gone: see the README, 'A target table was dropped'",
)


def refused(what: str, exc: asyncpg.PostgresError, stage: str) -> FatalError:
    """PostgreSQL refused something no retry will change (a missing privilege, a dropped table):
    stop, saying what and why."""
    return FatalError(
        f"PostgreSQL refused {what} ({exc.sqlstate} {type(exc).__name__}: {exc}); "
        f"nothing was committed{_GONE.get(exc.sqlstate, '')}",
        stage=stage,
    )
