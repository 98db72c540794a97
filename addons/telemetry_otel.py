"""The OpenTelemetry SDK side of :mod:`addons.telemetry`, imported only when export is on.

One :class:`OtelSink` per process (each ``--workers`` worker has its own, with its own
``service.instance.id``): a ``TracerProvider`` with a ``BatchSpanProcessor`` and a
``MeterProvider`` with a ``PeriodicExportingMetricReader``, both exporting OTLP over HTTP
(protobuf) or gRPC, configured by the SDK from the standard variables. :meth:`OtelSink.emit`
runs on :mod:`addons.telemetry`'s thread, export on the SDK's own threads: a turn costs the
event loop one queue put; a collector that is down or slow fills a bounded queue
(``OTEL_BSP_MAX_QUEUE_SIZE``, 2048 spans; the oldest are dropped) and never holds a
request. Stopping waits at most :data:`SHUTDOWN_S` for the last export.

Names are the semantic conventions' constants (``opentelemetry-semantic-conventions``
0.66's ``_incubating``, which marks the GenAI ones as moved to the GenAI conventions
repository: same names, still the ones emitted); bucket boundaries are the GenAI metrics
page's advice, given to the SDK as the instruments' advisory.
"""

from __future__ import annotations

import importlib.metadata
import logging
import os
import socket
import threading
import time
import uuid
from collections.abc import Mapping
from typing import Any

from opentelemetry import trace
from opentelemetry.sdk.metrics import MeterProvider
from opentelemetry.sdk.metrics.export import PeriodicExportingMetricReader
from opentelemetry.sdk.resources import SERVICE_INSTANCE_ID, SERVICE_NAME, SERVICE_VERSION, Resource
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import BatchSpanProcessor
from opentelemetry.semconv._incubating.attributes import gen_ai_attributes as ga
from opentelemetry.semconv._incubating.attributes import openai_attributes as oa
from opentelemetry.semconv._incubating.attributes import user_attributes as ua
from opentelemetry.semconv._incubating.metrics import gen_ai_metrics as gm
from opentelemetry.semconv.attributes import error_attributes as ea
from opentelemetry.semconv.attributes import server_attributes as sa
from opentelemetry.trace import SpanKind, Status, StatusCode
from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator

from addons.telemetry import (
    GRPC,
    OPERATION,
    PROVIDER,
    SECONDS_BUCKETS,
    TOKEN_BUCKETS,
    Settings,
    TurnRecord,
)

logger = logging.getLogger(__name__)

#: Longest a stop waits for the last export (a collector that is down must not hold it).
SHUTDOWN_S = 3.0
#: The SDK's own warnings (export failures) reach our log at most once per this many seconds.
SDK_LOG_EVERY_S = 60.0

# Our extensions, where the conventions are silent (docs/telemetry.md lists them).
CODEX_CREDITS = "codex.credits"
CODEX_TEAM = "codex.team"
CODEX_REFUSAL_KIND = "codex.refusal.kind"
CODEX_UPSTREAM_KEY = "codex.upstream_key.name"
CODEX_ROUTE = "codex.route"


class _SdkLogRelay(logging.Handler):
    """The SDK's loggers (``opentelemetry.*``) go through here instead of the proxy's log:
    a warning or error at most once per :data:`SDK_LOG_EVERY_S`, one line, no traceback (an
    unreachable collector would otherwise log every batch, with a traceback for some)."""

    def __init__(self) -> None:
        super().__init__(logging.WARNING)
        self._last = 0.0
        self._dropped = 0

    def emit(self, record: logging.LogRecord) -> None:
        now = time.monotonic()
        if now - self._last < SDK_LOG_EVERY_S and self._last:
            self._dropped += 1
            return
        self._last = now
        try:
            message = record.getMessage().splitlines()[0][:300]
        except Exception:
            message = record.msg if isinstance(record.msg, str) else "?"
        more = f" (+{self._dropped} more since)" if self._dropped else ""
        self._dropped = 0
        logger.warning("OpenTelemetry export: %s%s", message, more)


def _relay_sdk_logs() -> None:
    sdk = logging.getLogger("opentelemetry")
    if not any(isinstance(h, _SdkLogRelay) for h in sdk.handlers):
        sdk.addHandler(_SdkLogRelay())
    sdk.propagate = False


def resource_for(service_name: str, environ: Mapping[str, str]) -> Resource:
    """The process's resource: the SDK's (``OTEL_RESOURCE_ATTRIBUTES``, ``OTEL_SERVICE_NAME``,
    SDK and process facts), then ``service.name`` = ``service_name`` unless the environment
    names one, ``service.instance.id`` (host, pid, random: one per worker process) unless it
    names one, and ``service.version``."""
    resource = Resource.create({})
    named = bool(environ.get("OTEL_SERVICE_NAME")) or "service.name=" in environ.get(
        "OTEL_RESOURCE_ATTRIBUTES", ""
    )
    extra: dict[str, Any] = {}
    if not named:
        extra[SERVICE_NAME] = service_name
    if "service.instance.id=" not in environ.get("OTEL_RESOURCE_ATTRIBUTES", ""):
        extra[SERVICE_INSTANCE_ID] = (
            f"{socket.gethostname()[:40]}-{os.getpid()}-{uuid.uuid4().hex[:6]}"
        )
    try:
        extra[SERVICE_VERSION] = importlib.metadata.version("codex-responses-api-proxy-mitm")
    except importlib.metadata.PackageNotFoundError:
        pass
    return resource.merge(Resource(extra))


def _exporters(settings: Settings) -> tuple[Any, Any]:
    if settings.protocol == GRPC:
        from opentelemetry.exporter.otlp.proto.grpc.metric_exporter import (  # type: ignore[import-not-found]
            OTLPMetricExporter,
        )
        from opentelemetry.exporter.otlp.proto.grpc.trace_exporter import (  # type: ignore[import-not-found]
            OTLPSpanExporter,
        )
    else:
        from opentelemetry.exporter.otlp.proto.http.metric_exporter import OTLPMetricExporter
        from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter
    return (
        OTLPSpanExporter() if settings.traces else None,
        OTLPMetricExporter() if settings.metrics else None,
    )


def _ns(seconds: float) -> int:
    return int(seconds * 1e9)


class OtelSink:
    """This process's providers and instruments; :meth:`emit` records one turn."""

    def __init__(self, settings: Settings, service_name: str, environ: Mapping[str, str]) -> None:
        _relay_sdk_logs()
        self.settings = settings
        resource = resource_for(service_name, environ)
        spans, metrics = _exporters(settings)
        self.tracer_provider: TracerProvider | None = None
        self.meter_provider: MeterProvider | None = None
        self.propagator = TraceContextTextMapPropagator()
        if spans is not None:
            self.tracer_provider = TracerProvider(resource=resource, shutdown_on_exit=False)
            self.tracer_provider.add_span_processor(BatchSpanProcessor(spans))
            self.tracer = self.tracer_provider.get_tracer("codex-proxy")
        if metrics is not None:
            self.meter_provider = MeterProvider(
                resource=resource,
                metric_readers=[PeriodicExportingMetricReader(metrics)],
                shutdown_on_exit=False,
            )
            meter = self.meter_provider.get_meter("codex-proxy")
            self.token_usage = meter.create_histogram(
                gm.GEN_AI_CLIENT_TOKEN_USAGE,
                unit="{token}",
                description="Number of input and output tokens used.",
                explicit_bucket_boundaries_advisory=TOKEN_BUCKETS,
            )
            self.duration = meter.create_histogram(
                gm.GEN_AI_CLIENT_OPERATION_DURATION,
                unit="s",
                description="GenAI operation duration.",
                explicit_bucket_boundaries_advisory=SECONDS_BUCKETS,
            )
            self.first_chunk = meter.create_histogram(
                gm.GEN_AI_CLIENT_OPERATION_TIME_TO_FIRST_CHUNK,
                unit="s",
                description="Time to receive the first chunk, from when the request came in.",
                explicit_bucket_boundaries_advisory=SECONDS_BUCKETS,
            )

    def emit(self, turn: TurnRecord) -> None:
        """The turn's span (with its child spans) and its histogram points."""
        if self.tracer_provider is not None:
            self._span(turn)
        if self.meter_provider is not None:
            self._points(turn)

    def _metric_attributes(self, turn: TurnRecord) -> dict[str, Any]:
        attrs: dict[str, Any] = {
            ga.GEN_AI_OPERATION_NAME: OPERATION,
            ga.GEN_AI_PROVIDER_NAME: PROVIDER,
        }
        if turn.request_model:
            attrs[ga.GEN_AI_REQUEST_MODEL] = turn.request_model
        if turn.response_model:
            attrs[ga.GEN_AI_RESPONSE_MODEL] = turn.response_model
        if turn.server_address:
            attrs[sa.SERVER_ADDRESS] = turn.server_address
        if turn.server_port:
            attrs[sa.SERVER_PORT] = turn.server_port
        if turn.member:
            attrs[ua.USER_ID] = turn.member
        return attrs

    def _points(self, turn: TurnRecord) -> None:
        attrs = self._metric_attributes(turn)
        duration_attrs = dict(attrs)
        if turn.error_type:
            duration_attrs[ea.ERROR_TYPE] = turn.error_type
        self.duration.record(max(0.0, turn.ended - turn.started), duration_attrs)
        if turn.first_chunk is not None:
            self.first_chunk.record(max(0.0, turn.first_chunk - turn.started), attrs)
        if turn.usage is not None:
            for kind, key in (("input", "input"), ("output", "output")):
                self.token_usage.record(
                    turn.usage.get(key, 0), {**attrs, ga.GEN_AI_TOKEN_TYPE: kind}
                )

    def _span(self, turn: TurnRecord) -> None:
        attrs = self._metric_attributes(turn)
        name = f"{OPERATION} {turn.request_model}" if turn.request_model else OPERATION
        if turn.api_type:
            attrs[oa.OPENAI_API_TYPE] = turn.api_type
        if turn.service_tier:
            attrs[oa.OPENAI_REQUEST_SERVICE_TIER] = turn.service_tier
        if turn.response_id:
            attrs[ga.GEN_AI_RESPONSE_ID] = turn.response_id
        if turn.finish_reasons:
            attrs[ga.GEN_AI_RESPONSE_FINISH_REASONS] = list(turn.finish_reasons)
        if turn.usage is not None:
            attrs[ga.GEN_AI_USAGE_INPUT_TOKENS] = turn.usage.get("input", 0)
            attrs[ga.GEN_AI_USAGE_OUTPUT_TOKENS] = turn.usage.get("output", 0)
            attrs[ga.GEN_AI_USAGE_CACHE_READ_INPUT_TOKENS] = turn.usage.get("cached", 0)
            if turn.usage.get("reasoning"):
                attrs[ga.GEN_AI_USAGE_REASONING_OUTPUT_TOKENS] = turn.usage["reasoning"]
        if turn.first_chunk is not None:
            attrs[ga.GEN_AI_RESPONSE_TIME_TO_FIRST_CHUNK] = max(
                0.0, turn.first_chunk - turn.started
            )
        if turn.error_type:
            attrs[ea.ERROR_TYPE] = turn.error_type
        for key, value in (
            (CODEX_TEAM, turn.team),
            (CODEX_CREDITS, turn.credits),
            (CODEX_REFUSAL_KIND, turn.refusal_kind),
            (CODEX_UPSTREAM_KEY, turn.upstream_key),
            (CODEX_ROUTE, turn.route),
        ):
            if value is not None:
                attrs[key] = value
        if turn.content is not None:
            attrs[ga.GEN_AI_INPUT_MESSAGES], attrs[ga.GEN_AI_OUTPUT_MESSAGES] = turn.content
        parent = self.propagator.extract(turn.carrier) if turn.carrier else None
        span = self.tracer.start_span(
            name, context=parent, kind=SpanKind.CLIENT, attributes=attrs,
            start_time=_ns(turn.started),
        )  # fmt: skip
        if turn.error_type:
            span.set_status(Status(StatusCode.ERROR))
        context = trace.set_span_in_context(span)
        for phase in turn.phases:
            child = self.tracer.start_span(
                phase.name, context=context, kind=SpanKind.INTERNAL,
                attributes=phase.attributes, start_time=_ns(phase.start),
            )  # fmt: skip
            child.end(end_time=_ns(max(phase.start, phase.end)))
        span.end(end_time=_ns(max(turn.started, turn.ended)))

    def shutdown(self) -> None:
        """Flush and stop both providers, giving up after :data:`SHUTDOWN_S` (the export
        threads are daemons: a collector that does not answer cannot hold the exit)."""
        providers = [p for p in (self.tracer_provider, self.meter_provider) if p is not None]

        def stop() -> None:
            for provider in providers:
                try:
                    provider.shutdown()
                except Exception as e:
                    logger.warning("OpenTelemetry: shutdown failed (%s)", type(e).__name__)

        thread = threading.Thread(target=stop, name="otel-shutdown", daemon=True)
        thread.start()
        thread.join(SHUTDOWN_S)
