"""Logging writes one redacted JSON object per line on stderr."""

from __future__ import annotations

import json
import logging
from collections.abc import Iterator
from datetime import UTC, datetime
from typing import Any

import pytest
import structlog
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.sampling import TraceIdRatioBased

from cdc_sink.ops.logs import RepeatFilter, configure_logging, get_logger, redact_secrets

DSN = "postgresql://cdc_sink:s3cret@127.0.0.1:15432/cdc"


@pytest.fixture(autouse=True)
def _restore_logging() -> Iterator[None]:
    """configure_logging changes process-wide state; put it back for the next test."""
    root = logging.getLogger()
    handlers, level = list(root.handlers), root.level
    yield
    for handler in list(root.handlers):
        if handler not in handlers:
            root.removeHandler(handler)
    root.setLevel(level)
    structlog.contextvars.clear_contextvars()
    structlog.reset_defaults()


def lines(capsys: pytest.CaptureFixture[str]) -> list[dict[str, Any]]:
    captured = capsys.readouterr()
    assert captured.out == ""
    return [json.loads(line) for line in captured.err.splitlines()]


def test_each_event_is_one_json_line_with_standard_fields(
    capsys: pytest.CaptureFixture[str],
) -> None:
    """A log call writes one JSON object: UTC ISO timestamp, level, event, logger, context."""
    configure_logging("info")
    log = get_logger("cdc_sink.consume").bind(topic="cdc-events-users", partition=3)
    log.info("batch_applied", first_offset=100, last_offset=199)
    log.info("second")
    first, second = lines(capsys)
    stamp = datetime.fromisoformat(first.pop("timestamp"))
    assert stamp.utcoffset() == UTC.utcoffset(None)
    assert abs((datetime.now(UTC) - stamp).total_seconds()) < 60
    assert first == {
        "event": "batch_applied",
        "level": "info",
        "logger": "cdc_sink.consume",
        "topic": "cdc-events-users",
        "partition": 3,
        "first_offset": 100,
        "last_offset": 199,
    }
    assert second["event"] == "second"


def test_context_bound_in_contextvars_is_included(capsys: pytest.CaptureFixture[str]) -> None:
    """Values bound with structlog.contextvars (e.g. a trace id) appear on every line."""
    configure_logging()
    with structlog.contextvars.bound_contextvars(trace_id="4bf92f35", partition=1):
        get_logger("cdc_sink.write").info("flushed")
    (line,) = lines(capsys)
    assert (line["trace_id"], line["partition"]) == ("4bf92f35", 1)


@pytest.mark.parametrize("ratio", [1.0, 0.0])
def test_lines_inside_a_sampled_span_carry_its_ids(
    capsys: pytest.CaptureFixture[str], ratio: float
) -> None:
    """Inside a span that is sampled (exported), a line carries its trace and span ids as
    hex; inside one that is not, and outside any span, it carries none."""
    configure_logging()
    tracer = TracerProvider(sampler=TraceIdRatioBased(ratio)).get_tracer("test")
    with tracer.start_as_current_span("cdc.batch") as span:
        get_logger("cdc_sink.runner").info("batch_committed")
    get_logger("cdc_sink.runner").info("caught_up")
    inside, outside = lines(capsys)
    context = span.get_span_context()
    if ratio:
        assert inside["trace_id"] == format(context.trace_id, "032x")
        assert inside["span_id"] == format(context.span_id, "016x")
    else:
        assert "trace_id" not in inside
        assert "span_id" not in inside
    assert "trace_id" not in outside


def test_exception_is_rendered_as_text_traceback(capsys: pytest.CaptureFixture[str]) -> None:
    """log.exception() adds the traceback, with the error message, under "exception"."""
    configure_logging()
    try:
        raise RuntimeError("checkpoint conflict")
    except RuntimeError:
        get_logger("cdc_sink.checkpoint").exception("commit_failed")
    (line,) = lines(capsys)
    assert line["level"] == "error"
    assert line["exception"].startswith("Traceback (most recent call last):")
    assert "RuntimeError: checkpoint conflict" in line["exception"]


def test_stdlib_records_share_the_json_format(capsys: pytest.CaptureFixture[str]) -> None:
    """Records from stdlib loggers (aiokafka, asyncpg) come out as the same JSON lines."""
    configure_logging()
    logging.getLogger("aiokafka.consumer").warning("heartbeat failed for %s", "group-1")
    (line,) = lines(capsys)
    assert line["event"] == "heartbeat failed for group-1"
    assert (line["level"], line["logger"]) == ("warning", "aiokafka.consumer")
    assert "timestamp" in line


@pytest.mark.parametrize(
    "key",
    [
        "password",
        "PG_PASSWORD",
        "passwd",
        "client_secret",
        "vault_token",
        "dsn",
        "Authorization",
        "api_key",
        "API-KEY",
    ],
)
def test_secret_named_keys_are_redacted(capsys: pytest.CaptureFixture[str], key: str) -> None:
    """A value under a key named like a secret is replaced by "***", whatever its case."""
    configure_logging()
    get_logger("cdc_sink.secrets").info("connecting", **{key: "hunter2", "host": "db"})
    (line,) = lines(capsys)
    assert (line[key], line["host"]) == ("***", "db")


def test_password_inside_a_dsn_is_redacted_everywhere(capsys: pytest.CaptureFixture[str]) -> None:
    """A URL's password is replaced in values, in the event text and in tracebacks."""
    configure_logging()
    log = get_logger("cdc_sink.write")
    log.info(f"connecting to {DSN}", target=DSN)
    try:
        raise ConnectionError(f"cannot reach {DSN}")
    except ConnectionError:
        log.exception("connect_failed")
    logging.getLogger("asyncpg").error("lost %s", DSN)
    output = capsys.readouterr().err
    assert "s3cret" not in output
    info, failure, foreign = (json.loads(line) for line in output.splitlines())
    redacted = "postgresql://cdc_sink:***@127.0.0.1:15432/cdc"
    assert info["target"] == redacted
    assert info["event"] == f"connecting to {redacted}"
    assert redacted in failure["exception"]
    assert foreign["event"] == f"lost {redacted}"


def test_nested_values_are_redacted() -> None:
    """Secret keys and DSN passwords are redacted inside nested dicts, lists and tuples."""
    event = {
        "event": "config_loaded",
        "config": {
            "postgres": {"host": "db", "Password": "pw", "url": DSN},
            "vault": {"role_id": "r", "secret_id": "s"},
            "brokers": ["kafka://admin:adm1n@k1:9092", "k2:9092"],
        },
        "pair": ("redis://:p@ss@cache:6379/0", 5),
        "count": 3,
        "missing": None,
    }
    assert redact_secrets(None, "info", event) == {
        "event": "config_loaded",
        "config": {
            "postgres": {
                "host": "db",
                "Password": "***",
                "url": "postgresql://cdc_sink:***@127.0.0.1:15432/cdc",
            },
            "vault": {"role_id": "r", "secret_id": "***"},
            "brokers": ["kafka://admin:***@k1:9092", "k2:9092"],
        },
        "pair": ("redis://:***@cache:6379/0", 5),
        "count": 3,
        "missing": None,
    }


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("http://example.com:8080/a@b", "http://example.com:8080/a@b"),
        ("postgresql://cdc_sink@db/cdc", "postgresql://cdc_sink@db/cdc"),
        ("see https://u:pw@h/x and amqp://a:b@c", "see https://u:***@h/x and amqp://a:***@c"),
        ("host=db user=cdc password=s3cret port=5432", "host=db user=cdc password=*** port=5432"),
        ("dbname=cdc password='a b c'", "dbname=cdc password=***"),
    ],
)
def test_string_redaction_touches_only_credentials(text: str, expected: str) -> None:
    """Only the password part of a URL or libpq keyword DSN changes; other URLs stay intact."""
    assert redact_secrets(None, "info", {"event": text}) == {"event": expected}


def test_level_filters_structlog_and_stdlib(capsys: pytest.CaptureFixture[str]) -> None:
    """Below the configured level nothing is written, from structlog or stdlib loggers."""
    configure_logging("WARNING")
    log = get_logger("cdc_sink.runner")
    log.debug("d")
    log.info("i")
    logging.getLogger("aiokafka").info("foreign info")
    log.warning("w")
    logging.getLogger("aiokafka").error("foreign error")
    assert [line["event"] for line in lines(capsys)] == ["w", "foreign error"]


def test_reconfiguring_replaces_instead_of_duplicating(capsys: pytest.CaptureFixture[str]) -> None:
    """Calling configure_logging twice still writes each event once, at the newer level."""
    configure_logging("error")
    configure_logging("debug")
    get_logger("cdc_sink.runner").debug("once")
    assert [line["event"] for line in lines(capsys)] == ["once"]


def test_console_format_is_not_json(capsys: pytest.CaptureFixture[str]) -> None:
    """json=False writes human-readable lines, still redacted."""
    configure_logging("info", json=False)
    get_logger("cdc_sink.cli").info("starting", dsn=DSN)
    err = capsys.readouterr().err
    assert "starting" in err
    assert "s3cret" not in err
    with pytest.raises(json.JSONDecodeError):
        json.loads(err.splitlines()[0])


def test_invalid_level_is_a_value_error_naming_it() -> None:
    """An unknown level name raises ValueError that quotes the bad name."""
    with pytest.raises(ValueError, match="'verbose'"):
        configure_logging("verbose")


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def _record(name: str, msg: str, *args: Any, level: int = logging.ERROR) -> logging.LogRecord:
    return logging.LogRecord(name, level, __file__, 1, msg, args, None)


def test_a_noisy_librarys_repeated_message_is_shown_once_per_window() -> None:
    """aiokafka's "Unable connect" every few ms while a broker is away: the first passes, the
    rest of the window are held back, and the first one after it says how many were."""
    clock = Clock()
    noise = RepeatFilter(("aiokafka",), 30.0, clock)

    def shown(*records: logging.LogRecord) -> list[str]:
        return [r.getMessage() for r in records if noise.filter(r)]

    joining = "(Re-)joining group %s"
    assert (
        shown(*(_record("aiokafka", joining, "g", level=logging.INFO) for _ in range(3)))
        == ["(Re-)joining group g"] * 3
    )  # info lines are never held back

    unable = "Unable connect to node with id %s: %s"
    assert shown(*(_record("aiokafka", unable, 1, f"refused {i}") for i in range(50))) == [
        "Unable connect to node with id 1: refused 0"
    ]
    # Other messages, levels and loggers of the library are counted on their own.
    assert shown(
        _record("aiokafka", "Unable to update metadata from %s", [1]),
        _record("aiokafka", unable, 1, "refused", level=logging.WARNING),
        _record("aiokafka.consumer.group_coordinator", unable, 1, "refused"),
    ) == [
        "Unable to update metadata from [1]",
        "Unable connect to node with id 1: refused",
        "Unable connect to node with id 1: refused",
    ]
    clock.now += 29.9
    assert shown(_record("aiokafka", unable, 1, "late")) == []
    clock.now += 0.2
    assert shown(_record("aiokafka", unable, 1, "again"), _record("aiokafka", unable, 2, "x")) == [
        "Unable connect to node with id 1: again (50 more like this since the last shown)"
    ]
    clock.now += 31
    assert shown(_record("aiokafka", unable, 1, "quiet")) == [
        "Unable connect to node with id 1: quiet (1 more like this since the last shown)"
    ]
    clock.now += 31
    assert shown(_record("aiokafka", unable, 1, "alone")) == [
        "Unable connect to node with id 1: alone"
    ]


def test_the_sinks_own_lines_and_other_libraries_are_never_held_back(
    capsys: pytest.CaptureFixture[str],
) -> None:
    """Only the noisy library's loggers are thinned: every batch_committed line and every
    line of another library (or one merely named alike) is written."""
    configure_logging("info")
    log = get_logger("cdc_sink.runner")
    for offset in range(5):
        log.info("batch_committed", next_offset=offset)
        logging.getLogger("asyncpg").error("connection lost")
        logging.getLogger("aiokafkaish").error("not aiokafka")
        logging.getLogger("aiokafka").error("Unable connect to node with id %s", 1)
    events = [line["event"] for line in lines(capsys)]
    assert events.count("batch_committed") == 5
    assert events.count("connection lost") == 5
    assert events.count("not aiokafka") == 5
    assert events.count("Unable connect to node with id 1") == 1


def test_a_zero_window_shows_every_line(capsys: pytest.CaptureFixture[str]) -> None:
    configure_logging("info", repeat_window_s=0)
    for _ in range(3):
        logging.getLogger("aiokafka").error("Unable connect to node with id %s", 1)
    assert [line["event"] for line in lines(capsys)] == ["Unable connect to node with id 1"] * 3
