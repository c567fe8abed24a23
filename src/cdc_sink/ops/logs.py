"""structlog set-up: one JSON object per line on stderr, secrets redacted before rendering.

Records from stdlib loggers (aiokafka, asyncpg, …) go through the same pipeline, so every line
on stderr has the same shape; the noisy libraries' repeated warnings are held back
(RepeatFilter). Lines written inside a sampled trace span carry its ids.
"""

from __future__ import annotations

import functools
import logging
import re
import sys
import time
from collections.abc import Callable
from typing import Any

import structlog
from opentelemetry import trace
from structlog.typing import EventDict, FilteringBoundLogger, Processor, WrappedLogger

from cdc_sink.config import LOG_LEVELS

__all__ = ["RepeatFilter", "add_trace_ids", "configure_logging", "get_logger", "redact_secrets"]

REDACTED = "***"
_LEVELS = {name: logging.getLevelNamesMapping()[name.upper()] for name in LOG_LEVELS}
_SECRET_KEY = re.compile(r"password|passwd|secret|token|dsn|authorization|api[_-]?key", re.I)
# scheme://user:password@host — the greedy password stops at the last "@" before the host, so
# a password that itself contains "@" is still removed whole.
_URL_PASSWORD = re.compile(r"(?P<head>\b[a-z][a-z0-9+.-]*://[^\s:/@]*:)[^\s/]*@", re.I)
# libpq keyword form: "host=… password=s3cret" or password='s 3cret'
_KV_PASSWORD = re.compile(r"(?P<head>\b(?:password|passwd)\s*=\s*)(?:'[^']*'|\S+)", re.I)

# The handler configure_logging installed, replaced (not duplicated) when it is called again.
_handler: logging.Handler | None = None
# aiokafka repeats its connection errors many times a second while a broker is away, and
# OpenTelemetry's exporter its own while the trace collector is.
NOISY_LIBRARIES = ("aiokafka", "opentelemetry")
# Loggers whose debug lines carry whole records (aiokafka's producer logs each message's key and
# value): records hold the clear values of masked columns, so these stay at info or above.
RECORD_DUMPING_LOGGERS = ("aiokafka.producer.producer",)


class RepeatFilter(logging.Filter):
    """Lets through the first warning or error of each message (logger, level and message
    template) of the `libraries`' loggers, then at most one per `window_s`, which says how many
    were held back since the last one shown. Their info lines (rebalances, for instance) and
    every record of other loggers always pass."""

    def __init__(
        self,
        libraries: tuple[str, ...],
        window_s: float,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        super().__init__()
        self.libraries = libraries
        self.window_s = window_s
        self.clock = clock
        self._shown: dict[tuple[str, int, str], tuple[float, int]] = {}  # -> (shown at, held)

    def filter(self, record: logging.LogRecord) -> bool:
        if record.levelno < logging.WARNING or not any(
            record.name == n or record.name.startswith(n + ".") for n in self.libraries
        ):
            return True
        key = (record.name, record.levelno, str(record.msg))
        now = self.clock()
        shown = self._shown.get(key)
        if shown is not None and now - shown[0] < self.window_s:
            self._shown[key] = (shown[0], shown[1] + 1)
            return False
        self._shown[key] = (now, 0)
        if shown is not None and shown[1]:
            record.msg = f"{record.getMessage()} ({shown[1]} more like this since the last shown)"
            record.args = None
        return True


@functools.lru_cache(maxsize=1024)  # the same few key names come back on every line
def _is_secret_key(key: Any) -> bool:
    return _SECRET_KEY.search(str(key)) is not None


def _scrub(value: Any) -> Any:
    if isinstance(value, str):
        # Each pattern needs its literal ("@", "="): most strings have neither and skip both.
        if "@" in value:
            value = _URL_PASSWORD.sub(rf"\g<head>{REDACTED}@", value)
        if "=" in value:
            value = _KV_PASSWORD.sub(rf"\g<head>{REDACTED}", value)
        return value
    if isinstance(value, dict):
        return {k: REDACTED if _is_secret_key(k) else _scrub(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return type(value)(_scrub(v) for v in value)
    return value


def redact_secrets(_: WrappedLogger, __: str, event_dict: EventDict) -> EventDict:
    """Processor: values of secret-named keys (at any depth) become "***", and passwords inside
    URLs/DSNs in any string become "***". Runs after tracebacks are rendered, so they are
    scrubbed too."""
    scrubbed: EventDict = _scrub(event_dict)
    return scrubbed


def add_trace_ids(_: WrappedLogger, __: str, event_dict: EventDict) -> EventDict:
    """Processor: a line written inside a sampled span (cdc_sink.ops.tracing) carries its
    `trace_id` and `span_id`, in the hex form trace back ends search for. Unsampled spans add
    nothing: their ids lead nowhere."""
    context = trace.get_current_span().get_span_context()
    if context.trace_flags.sampled:
        event_dict.setdefault("trace_id", format(context.trace_id, "032x"))
        event_dict.setdefault("span_id", format(context.span_id, "016x"))
    return event_dict


def configure_logging(
    level: str = "info", json: bool = True, repeat_window_s: float = 30.0
) -> None:
    """Route structlog and stdlib logging to stderr at `level` (debug, info, warning, error,
    critical): JSON lines if `json`, else human-readable console lines; a noisy library's
    repeated message at most once per `repeat_window_s` (0 shows every one). Call once at
    start-up; calling again replaces the previous set-up. Raises ValueError for an unknown
    level."""
    global _handler
    threshold = _LEVELS.get(level.lower())
    if threshold is None:
        raise ValueError(f"unknown log level {level!r}; expected one of {sorted(_LEVELS)}")
    shared: list[Processor] = [
        structlog.contextvars.merge_contextvars,
        structlog.processors.add_log_level,
        structlog.stdlib.add_logger_name,
        add_trace_ids,
        structlog.processors.TimeStamper(fmt="iso", utc=True),
    ]
    renderer: Processor = (
        structlog.processors.JSONRenderer() if json else structlog.dev.ConsoleRenderer(colors=False)
    )
    formatter = structlog.stdlib.ProcessorFormatter(
        foreign_pre_chain=shared,
        processors=[
            structlog.stdlib.ProcessorFormatter.remove_processors_meta,
            # Tracebacks as plain text: no frame locals, which could hold secrets.
            structlog.processors.format_exc_info,
            redact_secrets,
            renderer,
        ],
    )
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(formatter)
    if repeat_window_s > 0:
        handler.addFilter(RepeatFilter(NOISY_LIBRARIES, repeat_window_s))
    root = logging.getLogger()
    if _handler is not None:
        root.removeHandler(_handler)
    root.addHandler(handler)
    root.setLevel(threshold)
    for name in RECORD_DUMPING_LOGGERS:
        logging.getLogger(name).setLevel(max(threshold, logging.INFO))
    _handler = handler
    structlog.configure(
        processors=[*shared, structlog.stdlib.ProcessorFormatter.wrap_for_formatter],
        logger_factory=structlog.stdlib.LoggerFactory(),
        wrapper_class=structlog.make_filtering_bound_logger(threshold),
        cache_logger_on_first_use=True,
    )


def get_logger(name: str) -> FilteringBoundLogger:
    """A logger whose lines carry `logger=name`; bind topic/partition/offsets on it as needed."""
    logger: FilteringBoundLogger = structlog.get_logger(name)
    return logger
