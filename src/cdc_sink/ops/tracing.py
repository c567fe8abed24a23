"""OpenTelemetry traces (the worker's `cdc.batch` spans and their children, reconciliation's
`cdc.reconciliation`), exported over OTLP/HTTP. Off unless an endpoint is set; then a fixed
fraction of trace ids is sampled and exported in a background thread, which never blocks or
fails a batch: if the collector is away, spans are dropped and the exporter's warnings logged.
"""

from __future__ import annotations

import contextlib
import os
import socket
from collections.abc import Iterator

from opentelemetry import trace
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import BatchSpanProcessor
from opentelemetry.sdk.trace.sampling import ParentBased, TraceIdRatioBased

from cdc_sink import __version__
from cdc_sink.config import TracingConfig

__all__ = ["tracing", "tracing_instance"]


def tracing_instance() -> str:
    """This process's `service.instance.id`: host and process id."""
    return f"{socket.gethostname()}-{os.getpid()}"


@contextlib.contextmanager
def tracing(config: TracingConfig, instance: str) -> Iterator[None]:
    """For the life of the block, the process's tracer provider exports to `config.endpoint`
    (without an endpoint nothing is installed and every tracer stays a no-op); on leaving it,
    what is queued is flushed, within the export timeout."""
    if not config.endpoint:
        yield
        return
    # Imported here: the exporter pulls in protobuf and requests, which a worker without
    # tracing does not need to load.
    from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter

    provider = TracerProvider(
        resource=Resource.create(
            {
                "service.name": config.service_name,
                "service.version": __version__,
                "service.instance.id": instance,
            }
        ),
        sampler=ParentBased(TraceIdRatioBased(config.sample_ratio)),
    )
    exporter = OTLPSpanExporter(endpoint=config.endpoint, timeout=config.export_timeout_seconds)
    provider.add_span_processor(
        BatchSpanProcessor(exporter, export_timeout_millis=config.export_timeout_seconds * 1000)
    )
    trace.set_tracer_provider(provider)
    try:
        yield
    finally:
        provider.shutdown()
