"""The composition root of `python -m cdc_sink run`: opens every resource the worker needs
(SinkApp._open says in which order), hosts the HTTP listeners and the reconciliation loop, and
closes them all in reverse order."""

from __future__ import annotations

import asyncio
import contextlib
import functools
import socket
from collections.abc import Awaitable, Callable, Mapping
from pathlib import Path
from typing import Any

import asyncpg
from aiokafka import AIOKafkaConsumer
from aiokafka.errors import KafkaError

from cdc_recon.api import reconciliation_routes
from cdc_recon.canonical import mismatch_key
from cdc_recon.runtime import ReconciliationRuntime
from cdc_recon.settings import SECTIONS as RECONCILIATION_SECTIONS
from cdc_sink.apply.codecs import use_asyncpg_uuids
from cdc_sink.config import Config, KafkaConfig, load_config
from cdc_sink.consumer import compression
from cdc_sink.consumer.worker import Worker
from cdc_sink.decode.decoder import Decoder
from cdc_sink.decode.registry import ConfluentRegistry
from cdc_sink.dlq.producer import DlqProducer
from cdc_sink.dlq.replay import ResumeRequests, dlq_routes
from cdc_sink.errors import DecodeError, FatalError
from cdc_sink.model.masking import masking_policy
from cdc_sink.ops.auth import Authenticator
from cdc_sink.ops.erasure import gdpr_routes
from cdc_sink.ops.housekeeping import housekeeping
from cdc_sink.ops.http import Listener, new_app, probe_routes
from cdc_sink.ops.kafka_security import client_security, unreachable
from cdc_sink.ops.logs import get_logger
from cdc_sink.ops.metrics import push_fatal_exit
from cdc_sink.ops.migrate import migrate, pending
from cdc_sink.ops.pools import BoundedPool, open_pool
from cdc_sink.ops.secrets import postgres_unreachable, secrets_for
from cdc_sink.ops.tracing import tracing, tracing_instance
from cdc_sink.schema import cassandra
from cdc_sink.schema.catalog import CassandraSystemSchema, Catalog

log = get_logger("cdc_sink.runner")

FATAL_PUSH_TIMEOUT_S = 5.0  # the exit waits this long at most for the Pushgateway
# At shutdown, for a Kafka client to leave the group and close: with the broker away, aiokafka
# may otherwise wait out a coordinator lookup or request timeout (tens of seconds).
KAFKA_CLOSE_TIMEOUT_S = 5.0


def load_settings(environ: Mapping[str, str] | None = None, file: Path | None = None) -> Config:
    """The process's settings (see config.load_config): the sink's sections and the one
    reconciliation owns."""
    return load_config(environ, file, sections=RECONCILIATION_SECTIONS)


class SinkApp:
    """One sink process: the worker with everything it runs on, until stopped or caught up."""

    def __init__(self, config: Config, *, stop_when_caught_up: bool = False) -> None:
        self.config = config
        use_asyncpg_uuids()
        self.worker = Worker(config, stop_when_caught_up=stop_when_caught_up)
        self.metrics = self.worker.metrics
        self.http: Listener | None = None  # the control API
        self.probes: Listener | None = None  # /health, /ready, /metrics
        self.registry: ConfluentRegistry | None = None
        self.decoder: Decoder | None = None

    @property
    def applied_events(self) -> int:
        """Events committed or dead-lettered so far."""
        return self.worker.applied_events

    def stop(self) -> None:
        """Stop the worker (see Worker.stop); `run` then closes everything and returns."""
        self.worker.stop()

    async def run(self) -> int:
        """Consume and apply until stopped (or caught up); return the process exit code.

        A failure that ends the run (FatalError, or anything unforeseen) is counted in
        cdc_errors_total{kind="fatal"} and, with CDC_PUSHGATEWAY__URL, pushed as the time of
        this exit before it is raised: the process leaves next, before any scrape."""
        try:
            async with contextlib.AsyncExitStack() as stack:
                await self.worker.consume(await self._open(stack))
            return 0
        except Exception as exc:
            await self._report_fatal(exc)
            raise

    async def _open(self, stack: contextlib.AsyncExitStack) -> AIOKafkaConsumer:
        """Open every resource, each one's closing pushed on `stack` as soon as it is open, and
        return the group's consumer, opened last (the stack closes them in reverse: the Kafka
        consumer, reconciliation, the DLQ producer, housekeeping, HTTP, the writer, registry,
        Cassandra, the Vault lease's renewal, pools, the login, and last the tracer, which
        flushes the spans of all that)."""
        stack.enter_context(tracing(self.config.tracing, tracing_instance()))
        config, login = await stack.enter_async_context(secrets_for(self.config))
        masking = masking_policy(config.masking)  # a malformed rule stops the start here
        pg = config.postgres
        auth = Authenticator(config.api, config.api.jwt_secret)
        await auth.start()  # a JWKS that cannot be read stops the start here

        async def pool(size: int, name: str) -> asyncpg.Pool:
            try:
                opened = await open_pool(pg, login, size=size, application_name=name)
            except (OSError, asyncpg.PostgresError, asyncpg.InterfaceError) as exc:
                raise postgres_unreachable(pg, exc) from exc
            stack.push_async_callback(opened.close)
            return opened

        # The writer's connection, the worker's pool and the API's, each its own: a burst of
        # API requests or a long housekeeping round never holds up a batch (nor the reverse).
        api_pool = BoundedPool(
            await pool(pg.api_pool_size, "cdc-sink-api"), pg.api_acquire_timeout_s, "HTTP API"
        )
        worker_pool = await pool(pg.pool_size, "cdc-sink")
        writer_pool = await pool(1, "cdc-sink")
        # Read at each scrape: they follow every renewal and new user (0 without a lease).
        self.metrics.postgres_login_expiry.set_function(
            lambda: login.lease.expires_at_unix() if login.lease else 0.0
        )
        self.metrics.postgres_login_lease.set_function(
            lambda: login.lease.duration_s if login.lease else 0.0
        )
        _background(stack, login.keep_valid())
        await self._check_migrations(worker_pool)

        kept = config.schema_registry.max_unknown_ids
        if config.schema_registry.url:
            self.registry = ConfluentRegistry.from_config(config.schema_registry)
        self.decoder = Decoder(self.registry or NoRegistry(), max_refused_ids=kept)
        system_schema = None
        if config.cassandra.contact_points:
            system_schema = CassandraSystemSchema(
                functools.partial(cassandra.connect, config.cassandra)
            )
            stack.push_async_callback(system_schema.close)
        if self.registry is not None:
            stack.push_async_callback(self.registry.close)
        catalog = Catalog(
            worker_pool, pg.schema, config.sink.table_name_format, system_schema, masking
        )
        dlq = DlqProducer(
            config.kafka.bootstrap_servers,
            config.dlq.topic,
            partitions=config.dlq.topic_partitions,
            replication_factor=config.dlq.topic_replication_factor,
            client_id=f"{config.kafka.client_id}-dlq",
            security=client_security(config.kafka),
        )
        self.worker.use(
            pool=worker_pool,
            writer_pool=writer_pool,
            login=login,
            decoder=self.decoder,
            catalog=catalog,
            dlq=dlq,
        )
        assert self.worker.applier is not None
        stack.push_async_callback(self.worker.applier.release_writer)
        await self.worker.applier.open_writer()

        recon = ReconciliationRuntime(
            config,
            api_pool,
            self.metrics.registry,
            self.worker.worker_id,
            login,
            erasure_suppressed=self.metrics.erasure_suppressed,
        )
        if config.http.enabled:
            await self._serve(stack, config, auth, api_pool, worker_pool, dlq, self.decoder, recon)
        _background(stack, housekeeping(worker_pool, catalog, config, self.metrics))
        try:
            await dlq.start()
        except KafkaError as exc:
            raise unreachable(config.kafka, "DLQ producer", exc) from exc
        stack.push_async_callback(stop_client, "dlq_producer", dlq.stop)
        recon.start()  # the reconciliation scheduler, if CDC_RECONCILIATION__ENABLED
        stack.push_async_callback(recon.close)
        return await _open_consumer(stack, config.kafka)

    async def _serve(
        self,
        stack: contextlib.AsyncExitStack,
        config: Config,
        auth: Authenticator,
        api_pool: BoundedPool,
        worker_pool: asyncpg.Pool,
        dlq: DlqProducer,
        decoder: Decoder,
        recon: ReconciliationRuntime,
    ) -> None:
        """Start both listeners (probes and metrics; the control API), each stopped when the
        stack closes, and follow the resume requests other pods record."""
        api = config.api
        probes_app = new_app("cdc-sink probes", api)
        probes_app.include_router(probe_routes(self.metrics, self.worker.readiness))
        resumes = ResumeRequests()
        control = new_app("cdc-sink control API", api)
        control.include_router(dlq_routes(api_pool, dlq, self.worker.resume, resumes, auth))
        control.include_router(reconciliation_routes(recon, auth))
        control.include_router(
            gdpr_routes(
                api_pool,
                auth,
                config.postgres.schema,
                config.gdpr.hash_key,
                decoder,
                mismatch_key,
            )
        )
        self.probes = Listener(probes_app, name="probes", limits=api)
        self.http = Listener(control, name="api", limits=api)
        for listener, host, port, setting in (
            (self.probes, config.http.host, config.http.port, "CDC_HTTP__HOST/PORT"),
            (self.http, api.host, api.port, "CDC_API__HOST/PORT"),
        ):
            await listener.start(host, port, setting)
            stack.push_async_callback(listener.stop)
            log.info(
                "http_listening",
                listener=listener.name,
                host=host,
                port=listener.port,
                authentication=auth.enabled if listener is self.http else False,
            )
        interval = config.dlq.resume_poll_seconds
        _background(stack, resumes.follow(worker_pool, self.worker.resume, interval))

    async def _check_migrations(self, pool: asyncpg.Pool) -> None:
        schema = self.config.postgres.schema
        async with pool.acquire() as conn:
            if self.config.sink.migrate_on_start:
                applied = await migrate(conn, schema)
                if applied:
                    log.info("migrations_applied", versions=applied)
                return
            try:
                todo = await pending(conn, schema)
            except asyncpg.PostgresError as exc:
                raise FatalError(
                    f"cannot read the applied migrations in schema {schema!r} "
                    f"({exc.sqlstate} {type(exc).__name__}: {exc})",
                    stage="migrate",
                ) from exc
            if todo:
                raise FatalError(
                    f"migrations {', '.join(todo)} are not applied: run `python -m cdc_sink "
                    "migrate` or set CDC_SINK__MIGRATE_ON_START=true",
                    stage="migrate",
                )

    async def _report_fatal(self, exc: Exception) -> None:
        stage = getattr(exc, "stage", None) or "unexpected"
        self.metrics.errors.labels(stage, "fatal").inc()
        url = self.config.pushgateway.url
        if not url:
            return
        push = asyncio.to_thread(
            push_fatal_exit,
            url,
            stage,
            instance=socket.gethostname(),
            consumer_group=self.config.kafka.group_id,
            timeout_s=FATAL_PUSH_TIMEOUT_S,
        )
        try:
            await asyncio.wait_for(push, FATAL_PUSH_TIMEOUT_S + 1)
        except Exception as failed:  # noqa: BLE001 - the exit goes on; its log line remains
            log.warning("fatal_push_failed", url=url, error=f"{type(failed).__name__}: {failed}")


async def _open_consumer(stack: contextlib.AsyncExitStack, cfg: KafkaConfig) -> AIOKafkaConsumer:
    """Start the group's consumer (auto-commit off: the offsets live in PostgreSQL); the stack
    stops it, which leaves the group."""
    compression.install(cfg.max_inflated_batch_bytes)
    consumer = AIOKafkaConsumer(
        bootstrap_servers=cfg.bootstrap_servers,
        group_id=cfg.group_id,
        client_id=cfg.client_id,
        enable_auto_commit=False,
        auto_offset_reset=cfg.auto_offset_reset,
        session_timeout_ms=cfg.session_timeout_ms,
        max_poll_interval_ms=cfg.max_poll_interval_ms,
        fetch_max_bytes=cfg.fetch_max_bytes,
        max_partition_fetch_bytes=cfg.max_partition_fetch_bytes,
        fetch_min_bytes=cfg.fetch_min_bytes,
        fetch_max_wait_ms=cfg.fetch_max_wait_ms,
        metadata_max_age_ms=30_000,
        **client_security(cfg),
    )
    try:
        await consumer.start()
    except KafkaError as exc:
        await stop_client("consumer", consumer.stop)
        raise unreachable(cfg, "consumer", exc) from exc
    stack.push_async_callback(stop_client, "consumer", consumer.stop)
    return consumer


async def stop_client(name: str, stop: Callable[[], Awaitable[None]]) -> None:
    """Close a Kafka client, giving up after KAFKA_CLOSE_TIMEOUT_S (nothing is lost: the
    offsets are in PostgreSQL, and the group notices a member gone at session timeout)."""
    task = asyncio.ensure_future(stop())
    done, _ = await asyncio.wait({task}, timeout=KAFKA_CLOSE_TIMEOUT_S)
    if done:
        task.result()
        return
    # Not awaited after cancel(): a close that does not yield to cancellation promptly
    # must not hold the shutdown either.
    task.cancel()
    task.add_done_callback(lambda t: t.cancelled() or t.exception())
    log.warning("kafka_close_timeout", client=name, timeout_s=KAFKA_CLOSE_TIMEOUT_S)


def _background(stack: contextlib.AsyncExitStack, work: Awaitable[Any]) -> None:
    """Run `work` until the stack closes, then cancel it."""
    task = asyncio.ensure_future(work)

    async def cancel() -> None:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task

    stack.push_async_callback(cancel)


class NoRegistry:
    """The registry of a sink configured without one: every Avro record is a DecodeError."""

    async def schema_by_id(self, schema_id: int) -> str:
        raise DecodeError(
            f"Avro record with schema id {schema_id} but no CDC_SCHEMA_REGISTRY__URL configured"
        )
