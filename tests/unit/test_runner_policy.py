"""Retry decisions: SQLSTATE classes decide transient vs data errors; backoff is bounded."""

from __future__ import annotations

import random

import aiokafka.errors
import asyncpg
import pytest
from cassandra import OperationTimedOut
from cassandra.cluster import NoHostAvailable

from cdc_sink.errors import DecodeError, FatalError, FencedError, TransientError
from cdc_sink.failures import Kind, classify
from cdc_sink.retry import backoff_delay


def is_transient(exc: BaseException) -> bool:
    return classify(exc) is Kind.TRANSIENT


def is_data_error(exc: BaseException) -> bool:
    return classify(exc) is Kind.POISON


@pytest.mark.parametrize(
    "exc",
    [
        asyncpg.exceptions.SerializationError("x"),  # 40001
        asyncpg.exceptions.DeadlockDetectedError("x"),  # 40P01
        asyncpg.exceptions.TooManyConnectionsError("x"),  # 53300
        asyncpg.exceptions.AdminShutdownError("x"),  # 57P01
        asyncpg.exceptions.CannotConnectNowError("x"),  # 57P03
        asyncpg.exceptions.ConnectionDoesNotExistError("x"),  # 08003
        ConnectionResetError(),
        TimeoutError(),
        TransientError("broker unavailable"),
        asyncpg.exceptions._base.InternalClientError(
            "cannot switch to state 15; another operation (2) is in progress"
        ),
    ],
)
def test_transient_failures_are_retried(exc: BaseException) -> None:
    """Connection loss, timeouts, serialization failures, deadlocks and shutdowns retry."""
    assert is_transient(exc)
    assert not is_data_error(exc)


@pytest.mark.parametrize(
    "exc",
    [
        asyncpg.exceptions.NumericValueOutOfRangeError("x"),  # 22003
        asyncpg.exceptions.CharacterNotInRepertoireError("x"),  # 22021
        asyncpg.exceptions.UniqueViolationError("x"),  # 23505
        asyncpg.exceptions.DatatypeMismatchError("x"),  # 42804
        asyncpg.exceptions._base.DataError("invalid input for query argument $1"),
        TypeError("an integer is required"),  # asyncpg's COPY encoder
        OverflowError("int too big to convert"),
    ],
)
def test_data_errors_are_isolated_not_retried(exc: BaseException) -> None:
    """Values that do not fit and constraint violations are the data's fault, not transient."""
    assert is_data_error(exc)
    assert not is_transient(exc)


def test_permission_errors_are_neither() -> None:
    """Insufficient privilege (42501) is fatal: neither retried nor blamed on one record."""
    exc = asyncpg.exceptions.InsufficientPrivilegeError("x")
    assert not is_transient(exc)
    assert not is_data_error(exc)


def test_backoff_is_full_jitter_and_capped() -> None:
    """Delays stay within [0, min(cap, base * 2**attempt)] and reach the cap."""
    rng = random.Random(7)
    for attempt in range(12):
        bound = min(60.0, 0.1 * 2**attempt)
        delays = [backoff_delay(attempt, 0.1, 60.0, rng) for _ in range(200)]
        assert all(0 <= d <= bound for d in delays)
        assert max(delays) > bound * 0.8


def test_retry_settings_are_validated() -> None:
    """Retry settings read from the environment; nonsense is refused naming the setting."""
    from cdc_sink.config import ConfigError, load_config

    config = load_config({"CDC_SINK__RETRY_ATTEMPTS": "3", "CDC_SINK__RETRY_MAX_SECONDS": "5"})
    assert (config.sink.retry_attempts, config.sink.retry_max_seconds) == (3, 5.0)
    with pytest.raises(ConfigError, match="CDC_SINK__RETRY_ATTEMPTS"):
        load_config({"CDC_SINK__RETRY_ATTEMPTS": "0"})
    with pytest.raises(ConfigError, match="CDC_SINK__RETRY_BASE_SECONDS"):
        load_config({"CDC_SINK__RETRY_BASE_SECONDS": "90"})


@pytest.mark.parametrize(
    "exc",
    [
        aiokafka.errors.KafkaConnectionError("x"),
        aiokafka.errors.NodeNotReadyError("x"),
        aiokafka.errors.RequestTimedOutError(),
        aiokafka.errors.NotLeaderForPartitionError(),
        aiokafka.errors.CoordinatorNotAvailableError(),
        aiokafka.errors.KafkaTimeoutError(),  # not marked retriable by aiokafka
        aiokafka.errors.KafkaUnavailableError(),  # idem
    ],
)
def test_broker_unavailability_is_transient(exc: BaseException) -> None:
    """What a broker restart raises (connection lost, no leader, request timeout, no broker
    reachable) is retried, e.g. when claiming partitions during a rebalance."""
    assert is_transient(exc)


@pytest.mark.parametrize(
    "exc",
    [
        aiokafka.errors.TopicAuthorizationFailedError(),
        aiokafka.errors.GroupAuthorizationFailedError(),
        aiokafka.errors.IllegalStateError("x"),
    ],
)
def test_kafka_permission_and_state_errors_are_not_transient(exc: BaseException) -> None:
    """Missing ACLs and client misuse are not retried."""
    assert not is_transient(exc)


def test_lost_connection_interface_errors_are_transient() -> None:
    """asyncpg's client-side errors about a closed or released connection retry."""
    assert is_transient(asyncpg.InterfaceError("the underlying connection is closed"))
    assert is_transient(asyncpg.InterfaceError("connection has been released back to the pool"))


@pytest.mark.parametrize(
    "exc",
    [
        asyncpg.exceptions.ClientConfigurationError("x"),
        asyncpg.exceptions.UnsupportedClientFeatureError("x"),
        asyncpg.exceptions.UnsupportedServerFeatureError("x"),
        asyncpg.exceptions._base.DataError("invalid input for query argument"),
    ],
)
def test_interface_errors_about_settings_or_input_are_not_transient(exc: BaseException) -> None:
    """A bad client setting, a missing feature or input the driver cannot encode fails the
    same way on every retry: not transient (the attempts would only delay the outcome)."""
    assert not is_transient(exc)


@pytest.mark.parametrize(
    ("exc", "kind"),
    [
        (asyncpg.exceptions.InsufficientPrivilegeError("x"), Kind.FATAL),  # 42501
        (asyncpg.exceptions.UndefinedTableError("x"), Kind.FATAL),  # 42P01
        (asyncpg.exceptions.SerializationError("x"), Kind.TRANSIENT),  # 40001
        (asyncpg.exceptions.NotNullViolationError("x"), Kind.POISON),  # 23502
        (DecodeError("bad bytes"), Kind.POISON),
        (FatalError("stop"), Kind.FATAL),
        (FencedError("moved"), Kind.FATAL),
        (NoHostAvailable("down", {}), Kind.TRANSIENT),
        (OperationTimedOut("slow"), Kind.TRANSIENT),
        (KeyError("a defect"), Kind.FATAL),
    ],
)
def test_the_classification_table(exc: BaseException, kind: Kind) -> None:
    """SQLSTATE classes, the sink's own tree and the drivers' public classes each map to one
    kind; anything unknown is fatal."""
    assert classify(exc) is kind
