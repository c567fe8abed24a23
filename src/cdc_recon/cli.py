"""`python -m cdc_sink reconcile run|repair`: one job or one repair from the command line;
`python -m cdc_sink mask apply`: re-masking after a rule change (cdc_recon.remask).

Exit codes: 0 when the job ran (whatever drift it found) or the repair finished; 1 when the job
failed or a service cannot be reached; 2 for an unknown table, strategy or job, or bad options.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import dataclasses
import json
import os
import socket
import sys
from collections.abc import AsyncIterator
from typing import Any

import asyncpg

from cdc_recon.alerting import ReconMetrics
from cdc_recon.errors import (
    InvalidRequestError,
    ReconError,
    UnknownJobError,
    UnknownStrategyError,
    UnknownTableError,
)
from cdc_recon.readers import CassandraReader, connect_cassandra
from cdc_recon.remask import DEFAULT_BATCH_ROWS, Remasker
from cdc_recon.service import Reconciler, recon_pool
from cdc_recon.settings import reconciliation_settings
from cdc_recon.targets import resolve_table
from cdc_sink.apply.codecs import use_asyncpg_uuids
from cdc_sink.apply.suppression import Suppression
from cdc_sink.arguments import whole_number
from cdc_sink.config import Config
from cdc_sink.model.masking import MaskingError, masking_policy
from cdc_sink.ops.audit import audit, cli_actor
from cdc_sink.ops.secrets import PostgresLogin, postgres_unreachable, secrets_for
from cdc_sink.ops.tracing import tracing, tracing_instance

USAGE_ERRORS = (UnknownTableError, UnknownStrategyError, UnknownJobError, InvalidRequestError)


def add_reconcile_command(commands: Any) -> None:
    """Register `reconcile run|repair` on the sink's command line (argparse subparsers)."""
    reconcile_ = commands.add_parser(
        "reconcile", help="compare PostgreSQL with Cassandra (run a job, repair its mismatches)"
    )
    reconcile_.set_defaults(handler=reconcile)
    actions = reconcile_.add_subparsers(dest="action", metavar="ACTION", required=True)
    job = actions.add_parser("run", help="run one reconciliation job now and print its summary")
    job.add_argument("--table", required=True, help="target table (or Cassandra table name)")
    job.add_argument(
        "--strategy",
        required=True,
        help="row_count, checksum, timestamp_range or sample",
    )
    job.add_argument("--window-start", help="timestamp_range: ISO 8601 start (inclusive)")
    job.add_argument("--window-end", help="timestamp_range: ISO 8601 end (exclusive)")
    job.add_argument("--sample-size", type=whole_number(1), help="sample: how many keys to compare")
    job.add_argument("--seed", type=int, help="sample: random seed (repeatable draws)")
    repair = actions.add_parser("repair", help="repair the open mismatches of a job")
    repair.add_argument(
        "--job", type=whole_number(1), required=True, help="the reconciliation job id"
    )


async def reconcile(config: Config, args: argparse.Namespace) -> int:
    """Run `reconcile run` or `reconcile repair`, traced; print the outcome; return the exit
    code."""
    use_asyncpg_uuids()
    try:
        with tracing(config.tracing, tracing_instance()):
            async with secrets_for(config) as (config, login):
                return await _reconcile(config, login, args)
    except ReconError as exc:
        print(f"cdc-sink reconcile: {exc}", file=sys.stderr)
        return 2 if isinstance(exc, USAGE_ERRORS) else 1


@contextlib.asynccontextmanager
async def _connected(
    config: Config, login: PostgresLogin
) -> AsyncIterator[tuple[asyncpg.Pool, Any]]:
    """A PostgreSQL pool on migrated control tables and a Cassandra session, closed after."""
    try:
        pool = await recon_pool(config.postgres, login)
    except (OSError, asyncpg.PostgresError, asyncpg.InterfaceError) as exc:
        raise ReconError(str(postgres_unreachable(config.postgres, exc))) from exc
    session: Any = None
    try:
        ready = await pool.fetchval(
            "SELECT count(*) FROM information_schema.columns WHERE table_schema = $1 "
            "AND table_name = '_cdc_reconciliation_jobs' AND column_name = 'options'",
            config.postgres.schema,
        )
        if not ready:
            raise ReconError(
                "the control tables are missing or outdated: run `python -m cdc_sink migrate`"
            )
        settings = reconciliation_settings(config)
        session = await asyncio.to_thread(connect_cassandra, config.cassandra, settings.consistency)
        yield pool, session
    finally:
        if session is not None:
            with contextlib.suppress(Exception):
                await asyncio.to_thread(session.cluster.shutdown)
        await pool.close()


async def _reconcile(config: Config, login: PostgresLogin, args: argparse.Namespace) -> int:
    async with _connected(config, login) as (pool, session):
        reconciler = Reconciler(
            pool,
            config.postgres.schema,
            session,
            reconciliation_settings(config),
            metrics=ReconMetrics(),
            pushgateway_url=config.pushgateway.url,
            owner=f"cli-{socket.gethostname()}-{os.getpid()}",
            suppression=Suppression(config.gdpr.hash_key),
            masking=masking_policy(config.masking),
        )
        if args.action == "repair":
            summary = await reconciler.repair(args.job)
            await audit(pool, cli_actor(), "reconciliation_repair", dataclasses.asdict(summary))
            print(
                f"job {summary.job_id}: repaired {summary.repaired}, "
                f"not converged {summary.unresolved}, cannot repair {summary.skipped}, "
                f"erased keys left out {summary.erased}"
            )
            return 0 if summary.unresolved == 0 and summary.skipped == 0 else 1
        options = {
            name: value
            for name in ("window_start", "window_end", "sample_size", "seed")
            if (value := getattr(args, name)) is not None
        }
        job = await reconciler.run(args.table, args.strategy, options, trigger="cli")
        arguments = {"table": args.table, "strategy": args.strategy, **options}
        await audit(pool, cli_actor(), "reconciliation_job", {"job": job["id"], **arguments})
        print(_summary(job))
        if job["status"] != "succeeded":
            print(f"cdc-sink reconcile: job {job['id']} failed: {job['error']}", file=sys.stderr)
            return 1
        return 0


def add_mask_command(commands: Any) -> None:
    """Register `mask apply` on the sink's command line (argparse subparsers)."""
    mask_ = commands.add_parser(
        "mask", help="re-apply PII masking rules to the rows already written (after a change)"
    )
    mask_.set_defaults(handler=mask)
    actions = mask_.add_subparsers(dest="action", metavar="ACTION", required=True)
    apply = actions.add_parser(
        "apply",
        help="rewrite a table's masked columns from Cassandra's values, in small batches; "
        "resumes where an interrupted run stopped",
    )
    apply.add_argument("--table", required=True, help="target table (or Cassandra table name)")
    apply.add_argument(
        "--column",
        action="append",
        default=[],
        help="also rewrite this column (e.g. one whose rule was removed); repeatable",
    )
    apply.add_argument(
        "--batch-rows", type=whole_number(1), default=DEFAULT_BATCH_ROWS, help="rows per batch"
    )
    apply.add_argument(
        "--max-batches", type=whole_number(1), help="stop after this many batches (resumable)"
    )
    apply.add_argument(
        "--restart", action="store_true", help="start from the first row, not where a run stopped"
    )


async def mask(config: Config, args: argparse.Namespace) -> int:
    """Run `mask apply`; print its outcome as JSON; return the exit code (0 finished or
    stopped by --max-batches, 1 a service failed, 2 bad options, unknown table or column)."""
    use_asyncpg_uuids()
    try:
        async with (
            secrets_for(config) as (config, login),
            _connected(config, login) as (pool, session),
        ):
            masking = masking_policy(config.masking)  # the key may come from Vault
            settings = reconciliation_settings(config)
            table = await resolve_table(pool, config.postgres.schema, session, args.table, masking)
            remasker = Remasker(
                pool,
                config.postgres.schema,
                CassandraReader(session, concurrency=settings.concurrency),
                table,
                args.column,
                batch_rows=args.batch_rows,
            )
            arguments = {"table": table.target, "columns": list(remasker.columns)}
            await audit(pool, cli_actor(), "mask_apply", arguments)
            outcome = await remasker.run(restart=args.restart, max_batches=args.max_batches)
            if outcome.finished:
                await audit(pool, cli_actor(), "mask_apply_finished", dataclasses.asdict(outcome))
            print(json.dumps(dataclasses.asdict(outcome)))
            return 0
    except (ReconError, MaskingError) as exc:
        print(f"cdc-sink mask: {exc}", file=sys.stderr)
        return 2 if isinstance(exc, (*USAGE_ERRORS, MaskingError)) else 1


def _summary(job: dict[str, Any]) -> str:
    lines = [
        f"job {job['id']}: {job['strategy']} of {job['target_table']}: {job['status']}",
    ]
    if job["status"] == "succeeded":
        lines.append(
            f"  cassandra rows {job['cassandra_rows']}, postgres rows {job['postgres_rows']}, "
            f"mismatches {job['mismatches']}, drift {job['drift_percentage']:.4f} %"
        )
        if job["window_start"] is not None:
            lines.append(f"  window [{job['window_start']}, {job['window_end']})")
        lines.append(f"  details {json.dumps(job['details'], default=str)}")
    else:
        lines.append(f"  error: {job['error']}")
    return "\n".join(lines)
