"""Command line of the cdc-sink worker: `python -m cdc_sink COMMAND`."""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import gc
import json
import os
import platform
import signal
import sys
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

from cdc_recon.canonical import mismatch_key
from cdc_recon.cli import add_mask_command, add_reconcile_command
from cdc_sink import __version__
from cdc_sink.arguments import whole_number
from cdc_sink.config import Config, ConfigError
from cdc_sink.errors import SinkError
from cdc_sink.ops.audit import cli_actor, command_request_id
from cdc_sink.ops.logs import configure_logging, get_logger
from cdc_sink.ops.secrets import postgres_unreachable, secrets_for

if TYPE_CHECKING:
    import asyncpg

    from cdc_sink.dlq.replay import DlqFilter

log = get_logger("cdc_sink")


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
    run.set_defaults(handler=_serve)
    migrate = commands.add_parser("migrate", help="apply pending sql/ migrations (control tables)")
    migrate.set_defaults(handler=_migrate)
    _add_dlq_commands(commands)
    _add_gdpr_commands(commands)
    add_reconcile_command(commands)
    add_mask_command(commands)
    return parser


def _add_dlq_commands(commands: Any) -> None:
    dlq = commands.add_parser("dlq", help="list, show and replay dead-lettered records")
    dlq.set_defaults(handler=_dlq)
    actions = dlq.add_subparsers(dest="dlq_command", metavar="ACTION", required=True)

    def filters(parser: argparse.ArgumentParser) -> None:
        parser.add_argument("--topic", help="only records from this source topic")
        parser.add_argument("--error-class", help="only this error class (e.g. DecodeError)")
        parser.add_argument("--stage", help="only this stage (decode, interpret, convert, write)")
        parser.add_argument("--since", help="only records that failed at or after (ISO 8601)")

    listing = actions.add_parser("list", help="dead letters, oldest first")
    filters(listing)
    listing.add_argument("--status", choices=("pending", "replayed"), help="only this status")
    listing.add_argument(
        "--limit", type=whole_number(1), default=100, help="at most this many (100)"
    )
    listing.add_argument(
        "--after-id", type=whole_number(0), default=0, help="start after this id (paging)"
    )
    listing.add_argument("--json", action="store_true", help="one JSON object per line")
    show = actions.add_parser("show", help="one dead letter with its key, value and headers")
    show.add_argument("id", type=whole_number(1))
    replay = actions.add_parser(
        "replay",
        help="re-produce pending dead letters to their original topic and mark them replayed",
    )
    replay.add_argument("ids", type=whole_number(1), nargs="*", help="the dead letters to replay")
    filters(replay)
    replay.add_argument(
        "--all", action="store_true", help="replay every pending record (when no ids/filters)"
    )


def _add_gdpr_commands(commands: Any) -> None:
    gdpr = commands.add_parser("gdpr", help="erase a key for GDPR, show an erasure")
    gdpr.set_defaults(handler=_gdpr)
    actions = gdpr.add_subparsers(dest="gdpr_command", metavar="ACTION", required=True)
    erase = actions.add_parser(
        "erase", help="erase a row (its primary key) or a partition (its partition key)"
    )
    erase.add_argument("--table", required=True, help="target table, e.g. cdc_users")
    erase.add_argument(
        "--key", required=True, help="the key as a JSON object, e.g. '{\"user_id\": 42}'"
    )
    show = actions.add_parser("show", help="print an erasure's record as JSON")
    show.add_argument("id", type=whole_number(1))


def main(argv: list[str] | None = None) -> int:
    """Parse argv, run the chosen command and return the process exit code."""
    args = build_parser().parse_args(argv)
    if args.command == "version":  # the one command that reads no settings
        return _version()
    import uvloop

    from cdc_sink.app import load_settings

    with command_request_id():  # in the log lines and the audit rows of this command
        try:
            config = load_settings(file=args.config)
            configure_logging(
                config.log.level,
                json=config.log.json,
                repeat_window_s=config.log.repeat_window_seconds,
            )
            return int(uvloop.run(args.handler(config, args)))
        except ConfigError as exc:  # a setting, or a file one names (a CA bundle), is unusable
            print(f"cdc-sink: configuration error: {exc}", file=sys.stderr)
            return 2
        except SinkError as exc:  # fatal, or transient past its retries
            log.error("fatal", error=str(exc))
            print(f"cdc-sink: {exc}", file=sys.stderr)
            return 1


def _version() -> int:
    print(f"cdc-sink {__version__} (Python {platform.python_version()}, {sys.platform})")
    return 0


GC_YOUNG_THRESHOLD = 50_000


def tune_gc() -> None:
    """Make the cyclic garbage collector cheap for the worker: each record allocates dozens of
    short-lived containers (decoded dicts, events, row states) that reference counting frees,
    almost none in cycles, yet with the default threshold (700 allocations) the collector runs
    every few records and now and then walks the older generations, which hold every imported
    module. Freezing what start-up allocated keeps it out of later collections, and a higher
    young threshold makes collections rare; cycles are still collected."""
    gc.collect()
    gc.freeze()
    gc.set_threshold(GC_YOUNG_THRESHOLD, *gc.get_threshold()[1:])


@contextlib.asynccontextmanager
async def _connection(config: Config) -> AsyncIterator[tuple[Config, asyncpg.Connection]]:
    """The settings with Vault's secrets filled in and one connection for a short command
    (FatalError naming the setting if it fails); at the end the connection is closed and a
    leased user revoked."""
    import asyncpg

    async with secrets_for(config) as (config, login):
        try:
            conn = await login.connect(server_settings={"search_path": config.postgres.schema})
        except (OSError, asyncpg.PostgresError, asyncpg.InterfaceError) as exc:
            raise postgres_unreachable(login.postgres, exc) from exc
        try:
            yield config, conn
        finally:
            await conn.close()


async def _migrate(config: Config, args: argparse.Namespace) -> int:
    from cdc_sink.ops.migrate import migrate

    async with _connection(config) as (config, conn):
        applied = await migrate(conn, config.postgres.schema)
    print(f"applied: {', '.join(applied)}" if applied else "nothing to apply: up to date")
    return 0


async def _dlq(config: Config, args: argparse.Namespace) -> int:
    from cdc_sink.dlq.replay import DlqFilter

    names = ("ids", "status", "topic", "error_class", "stage", "since")
    try:
        where = DlqFilter.from_mapping({n: v for n in names if (v := getattr(args, n, None))})
    except ValueError as exc:
        print(f"cdc-sink: {exc}", file=sys.stderr)
        return 2
    async with _connection(config) as (config, conn):
        return await _dlq_command(conn, config, args, where)


async def _dlq_command(
    conn: asyncpg.Connection, config: Config, args: argparse.Namespace, where: DlqFilter
) -> int:
    """`dlq list|show|replay` on an open connection."""
    from aiokafka.errors import KafkaError

    from cdc_sink.dlq.producer import DlqProducer
    from cdc_sink.dlq.replay import list_dead_letters, replay_dead_letters, show_dead_letter
    from cdc_sink.ops.kafka_security import client_security, unreachable

    if args.dlq_command == "list":
        rows = await list_dead_letters(conn, where, limit=args.limit, after_id=args.after_id)
        for row in rows:
            if args.json:
                print(json.dumps(row, default=str))
            else:
                print(
                    f"{row['id']:>8}  {row['status']:<8}  {row['failed_at']:%Y-%m-%d %H:%M:%S}"
                    f"  {row['source_topic']}[{row['source_partition']}]@"
                    f"{row['source_offset']}  {row['stage']}/{row['error_class']}: "
                    f"{row['error_message'][:120]}"
                )
        return 0
    if args.dlq_command == "show":
        shown = await show_dead_letter(conn, args.id)
        if shown is None:
            print(f"cdc-sink: no dead letter {args.id}", file=sys.stderr)
            return 1
        print(json.dumps(shown, default=str, indent=2, ensure_ascii=False))
        return 0
    if where.is_empty and not args.all:
        print(
            "cdc-sink: say which records to replay: ids, --topic/--error-class/--stage/"
            "--since, or --all",
            file=sys.stderr,
        )
        return 2
    producer = DlqProducer(
        config.kafka.bootstrap_servers,
        config.dlq.topic,
        security=client_security(config.kafka),
    )
    try:
        await producer.start()
    except KafkaError as exc:
        raise unreachable(config.kafka, "replay producer", exc) from exc
    try:
        replayed = await replay_dead_letters(conn, producer, where, actor=cli_actor())
    finally:
        await producer.stop()
    print(f"replayed {len(replayed)} record(s): {', '.join(map(str, replayed)) or '-'}")
    return 0


async def _gdpr(config: Config, args: argparse.Namespace) -> int:
    """`gdpr erase|show`: exit 2 for a bad key or table, 1 for an unknown erasure."""
    from cdc_sink.app import NoRegistry
    from cdc_sink.decode.decoder import Decoder
    from cdc_sink.decode.registry import ConfluentRegistry
    from cdc_sink.ops.erasure import ErasureError, erase, erasure

    async with _connection(config) as (config, conn):
        if args.gdpr_command == "show":
            found = await erasure(conn, args.id)
            if found is None:
                print(f"cdc-sink: no erasure {args.id}", file=sys.stderr)
                return 1
            print(json.dumps(found, default=str))
            return 0
        hash_key = config.gdpr.hash_key
        if hash_key is None:
            print("cdc-sink: erasure needs CDC_GDPR__HASH_KEY", file=sys.stderr)
            return 2
        registry = (
            ConfluentRegistry.from_config(config.schema_registry)
            if config.schema_registry.url
            else None
        )
        try:
            key = json.loads(args.key)
            if not isinstance(key, dict):
                raise ErasureError("--key must be a JSON object")
            done = await erase(
                conn,
                config.postgres.schema,
                args.table,
                key,
                hash_key=hash_key,
                decoder=Decoder(registry or NoRegistry()),
                actor=cli_actor(),
                mismatch_key=mismatch_key,
            )
        except (ValueError, ErasureError) as exc:
            print(f"cdc-sink: {exc}", file=sys.stderr)
            return 2
        finally:
            if registry is not None:
                await registry.close()
        print(json.dumps(done, default=str))
        return 0


async def _serve(config: Config, args: argparse.Namespace) -> int:
    from cdc_sink.app import SinkApp

    tune_gc()
    worker = SinkApp(config, stop_when_caught_up=args.stop_when_caught_up)
    running = asyncio.ensure_future(worker.run())
    requested = asyncio.Event()

    def on_signal() -> None:
        worker.stop()
        requested.set()

    loop = asyncio.get_running_loop()
    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, on_signal)
    code = await supervise(running, requested, config.sink.shutdown_timeout_seconds)
    if not running.done():
        # Even cancelled, the worker did not wind down: leave now rather than hang; whatever
        # it had in flight was not committed and is read again after a restart.
        sys.stderr.flush()
        os._exit(code)
    return code


async def supervise(running: asyncio.Future[int], requested: asyncio.Event, limit_s: float) -> int:
    """The exit code of `running` (the worker), bounded once a stop is `requested`.

    From the request on, the worker has `limit_s` seconds. It normally finishes its batch,
    commits, leaves the group and returns well within that. If it has not returned when all
    but a grace period (a third of the timeout, at most 5 s) is used, it is cancelled: the
    transaction in flight rolls back, the consumer still leaves the group, and the code is 0
    (an abandoned batch is read again after a restart). If it has not returned at the
    deadline even then, 1 is returned and `running` is left as it is.
    """
    signalled = asyncio.ensure_future(requested.wait())
    either: set[asyncio.Future[Any]] = {running, signalled}
    try:
        await asyncio.wait(either, return_when=asyncio.FIRST_COMPLETED)
    finally:
        signalled.cancel()
    if not running.done():
        grace = min(5.0, limit_s / 3)
        began = time.monotonic()
        await asyncio.wait({running}, timeout=limit_s - grace)
        if not running.done():
            log.warning("shutdown_abandons_batch", waited_s=round(time.monotonic() - began, 2))
            running.cancel()
            await asyncio.wait({running}, timeout=grace)
            if not running.done():
                log.error("shutdown_timeout", timeout_s=limit_s)
                return 1
    if running.cancelled():
        return 0
    return running.result()
