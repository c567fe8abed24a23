"""Command line of the cdc-sink worker: `python -m cdc_sink COMMAND`."""

from __future__ import annotations

import argparse
import asyncio
import gc
import platform
import signal
import sys
from collections.abc import Coroutine
from pathlib import Path
from typing import Any

from cdc_sink import __version__
from cdc_sink.config import Config, ConfigError, load_config
from cdc_sink.errors import FatalError
from cdc_sink.logs import configure_logging, get_logger


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m cdc_sink",
        description=(
            "Streams Debezium Cassandra change events from Kafka into PostgreSQL "
            "and reconciles PostgreSQL against Cassandra. Settings come from CDC_* "
            "environment variables (see the README) and an optional TOML file."
        ),
    )
    parser.add_argument("--version", action="version", version=f"cdc-sink {__version__}")
    parser.add_argument(
        "--config", type=Path, help="TOML settings file (default: $CDC_CONFIG_FILE, if set)"
    )
    commands = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    commands.add_parser("version", help="print the version of cdc-sink and its runtime")
    run = commands.add_parser(
        "run", help="consume as a consumer-group member and apply events until stopped"
    )
    run.add_argument(
        "--stop-when-caught-up",
        action="store_true",
        help="exit 0 once everything up to the end offsets seen at start is applied",
    )
    commands.add_parser("migrate", help="apply pending sql/ migrations (control tables)")
    return parser


def main(argv: list[str] | None = None) -> int:
    """Parse argv, run the chosen command and return the process exit code."""
    args = build_parser().parse_args(argv)
    if args.command == "version":
        print(f"cdc-sink {__version__} (Python {platform.python_version()}, {sys.platform})")
        return 0
    try:
        config = load_config(file=args.config)
    except ConfigError as exc:
        print(f"cdc-sink: configuration error: {exc}", file=sys.stderr)
        return 2
    configure_logging(config.log.level, json=config.log.json)
    try:
        if args.command == "migrate":
            return _run(_migrate(config))
        if args.command == "run":
            return _run(_serve(config, stop_when_caught_up=args.stop_when_caught_up))
    except FatalError as exc:
        get_logger("cdc_sink").error("fatal", error=str(exc))
        print(f"cdc-sink: {exc}", file=sys.stderr)
        return 1
    raise AssertionError(f"unhandled command {args.command!r}")  # argparse only allows known ones


def _run(coroutine: Coroutine[Any, Any, int]) -> int:
    import uvloop

    return uvloop.run(coroutine)


GC_YOUNG_THRESHOLD = 50_000


def tune_gc() -> None:
    """Make the cyclic garbage collector cheap for the worker's allocation pattern.

    Every record allocates dozens of short-lived containers (decoded dicts, events, row
    states) that reference counting frees; almost none form cycles. With the default threshold
    (700 allocations) the collector runs every few records and, every tenth and hundredth time,
    walks the older generations too, which hold every imported module. Freezing what start-up
    allocated keeps it out of every later collection, and a higher young threshold makes the
    collections rare; cycles are still collected.
    """
    gc.collect()
    gc.freeze()
    gc.set_threshold(GC_YOUNG_THRESHOLD, *gc.get_threshold()[1:])


async def _migrate(config: Config) -> int:
    import asyncpg

    from cdc_sink.migrate import migrate

    try:
        conn = await asyncpg.connect(config.postgres.dsn.reveal())
    except (OSError, asyncpg.PostgresError) as exc:
        raise FatalError(f"cannot connect to PostgreSQL (CDC_POSTGRES__DSN): {exc}") from exc
    try:
        applied = await migrate(conn, config.postgres.schema)
    finally:
        await conn.close()
    print(f"applied: {', '.join(applied)}" if applied else "nothing to apply: up to date")
    return 0


async def _serve(config: Config, *, stop_when_caught_up: bool) -> int:
    from cdc_sink.runner import Worker

    tune_gc()
    worker = Worker(config, stop_when_caught_up=stop_when_caught_up)
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, worker.stop)
    return await worker.run()
