"""OpenTelemetry GenAI telemetry: one span and three histograms per Codex turn, over OTLP.

On only when the standard environment names an OTLP endpoint (``OTEL_EXPORTER_OTLP_ENDPOINT``,
``OTEL_EXPORTER_OTLP_TRACES_ENDPOINT`` or ``OTEL_EXPORTER_OTLP_METRICS_ENDPOINT``) and
``OTEL_SDK_DISABLED`` is not ``true``. Off, this module is all that is loaded: no SDK import,
and each hook returns at its first line. On, :mod:`addons.telemetry_otel` builds the SDK's
providers (batched export on the SDK's own threads, a bounded queue), and :func:`record` hands
a :class:`TurnRecord` to this module's telemetry thread (a bounded queue of its own), which
turns it into the span, its child spans and the histogram points off the event loop.

What feeds it: the strict proxy's :class:`Telemetry` addon (its ``response`` / ``error``
hooks, the reply read by :mod:`addons.exchange` as every reader does), and in the gateway
the accounting (one record per usage row, HTTP and socket turns alike, and per refusal:
:mod:`addons.gateway_mode.genai`). The record carries names, numbers and times only: no
header, key, token, cookie or body (the content opt-in adds message text, nothing else).
Reference: docs/telemetry.md.
"""

from __future__ import annotations

import logging
import os
import queue
import threading
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any, Protocol

from mitmproxy import http

from addons.common import BRIDGE, KEY_INJECTED, WEBSOCKET

logger = logging.getLogger(__name__)

#: The operation of every turn: the conventions' ``chat`` (the OpenAI page names ``chat`` for
#: the Chat Completions and the Responses API alike, told apart by ``openai.api.type``).
OPERATION = "chat"
#: ``openai.api.type`` of a Responses API turn and of a bridged Chat Completions request.
API_RESPONSES = "responses"
API_CHAT_COMPLETIONS = "chat_completions"
PROVIDER = "openai"
#: The ecosystem's opt-in for message content (OpenTelemetry's GenAI instrumentations).
CAPTURE_CONTENT = "OTEL_INSTRUMENTATION_GENAI_CAPTURE_MESSAGE_CONTENT"
ENDPOINTS = (
    "OTEL_EXPORTER_OTLP_ENDPOINT",
    "OTEL_EXPORTER_OTLP_TRACES_ENDPOINT",
    "OTEL_EXPORTER_OTLP_METRICS_ENDPOINT",
)
#: Protocols the installed exporter speaks; ``grpc`` only with its package installed.
HTTP_PROTOBUF = "http/protobuf"
GRPC = "grpc"
#: The GenAI metrics page's advised bucket boundaries: tokens (powers of 4) and seconds.
TOKEN_BUCKETS = (1, 4, 16, 64, 256, 1024, 4096, 16384, 65536, 262144, 1048576, 4194304,
                 16777216, 67108864)  # fmt: skip
SECONDS_BUCKETS = (0.01, 0.02, 0.04, 0.08, 0.16, 0.32, 0.64, 1.28, 2.56, 5.12, 10.24, 20.48,
                   40.96, 81.92)  # fmt: skip


@dataclass(frozen=True)
class Settings:
    """What the environment asks for: ``traces`` / ``metrics`` exported, over ``protocol``
    (``http/protobuf`` or ``grpc``), ``capture_content`` (the opt-in), and ``warning``: one
    sentence for the log when something asked for cannot be done (else ``None``)."""

    traces: bool
    metrics: bool
    protocol: str = HTTP_PROTOBUF
    capture_content: bool = False
    warning: str | None = None

    @property
    def on(self) -> bool:
        """Whether anything is exported."""
        return self.traces or self.metrics


def _true(value: str | None) -> bool:
    return (value or "").strip().lower() == "true"


def _grpc_installed() -> bool:
    import importlib.util

    try:
        return importlib.util.find_spec("opentelemetry.exporter.otlp.proto.grpc") is not None
    except ImportError:
        return False


def settings_from_env(environ: Mapping[str, str]) -> Settings:
    """:class:`Settings` from OpenTelemetry's standard variables (the SDK reads the endpoint,
    headers, timeout, resource and batch sizes itself). Traces are exported when the general
    or the traces endpoint is set, metrics when the general or the metrics endpoint is;
    ``OTEL_SDK_DISABLED=true`` turns both off. A protocol the installed exporters do not speak
    (``grpc`` without ``opentelemetry-exporter-otlp-proto-grpc``, ``http/json``) turns export
    off with a warning rather than sending to a collector that would not understand it."""
    off = Settings(False, False)
    if _true(environ.get("OTEL_SDK_DISABLED")):
        return off
    general = bool(environ.get("OTEL_EXPORTER_OTLP_ENDPOINT", "").strip())
    traces = general or bool(environ.get("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT", "").strip())
    metrics = general or bool(environ.get("OTEL_EXPORTER_OTLP_METRICS_ENDPOINT", "").strip())
    if not (traces or metrics):
        return off
    protocols = {
        (environ.get(name) or environ.get("OTEL_EXPORTER_OTLP_PROTOCOL") or HTTP_PROTOBUF)
        .strip()
        .lower()
        for name, wanted in (
            ("OTEL_EXPORTER_OTLP_TRACES_PROTOCOL", traces),
            ("OTEL_EXPORTER_OTLP_METRICS_PROTOCOL", metrics),
        )
        if wanted
    }
    if len(protocols) != 1:
        return Settings(
            False,
            False,
            warning="OpenTelemetry export is off: traces and metrics ask for "
            f"different OTLP protocols ({', '.join(sorted(protocols))}); use one",
        )
    protocol = protocols.pop()
    if protocol == GRPC and not _grpc_installed():
        return Settings(
            False,
            False,
            warning="OpenTelemetry export is off: OTEL_EXPORTER_OTLP_PROTOCOL=grpc needs the "
            "opentelemetry-exporter-otlp-proto-grpc package, which is not installed (install "
            "it, or point the endpoint at the collector's OTLP/HTTP port with http/protobuf)",
        )
    if protocol not in (HTTP_PROTOBUF, GRPC):
        return Settings(
            False,
            False,
            warning=f"OpenTelemetry export is off: OTLP protocol {protocol!r} is not supported "
            "(use http/protobuf, or grpc with opentelemetry-exporter-otlp-proto-grpc)",
        )
    return Settings(traces, metrics, protocol, _true(environ.get(CAPTURE_CONTENT)))


@dataclass
class Phase:
    """A child span of a turn: ``name``, Unix seconds ``start`` / ``end``, attributes."""

    name: str
    start: float
    end: float
    attributes: dict[str, Any] = field(default_factory=dict)


@dataclass
class TurnRecord:
    """What one turn's span and metric points are made of. Times in Unix seconds;
    ``first_chunk``: when its first streamed chunk came (``None``: not streamed or none);
    ``usage`` as :func:`addons.responses_turn.usage_of` gives it; ``carrier``: the incoming
    W3C trace headers (``traceparent``, ``tracestate``) only; ``member`` / ``team`` /
    ``credits`` / ``refusal_kind`` / ``upstream_key``: the gateway's (an upstream key *name*);
    ``content``: ``(input messages, output messages)`` JSON texts, only with the opt-in."""

    request_model: str | None
    started: float
    ended: float
    api_type: str | None = API_RESPONSES
    response_model: str | None = None
    response_id: str | None = None
    finish_reasons: tuple[str, ...] = ()
    usage: dict[str, int] | None = None
    server_address: str | None = None
    server_port: int | None = None
    error_type: str | None = None
    service_tier: str | None = None
    first_chunk: float | None = None
    carrier: dict[str, str] = field(default_factory=dict)
    route: str | None = None
    member: str | None = None
    team: str | None = None
    credits: float | None = None
    refusal_kind: str | None = None
    upstream_key: str | None = None
    phases: list[Phase] = field(default_factory=list)
    content: tuple[str, str] | None = None


class Sink(Protocol):
    """What :mod:`addons.telemetry_otel` provides (a test may stand in for it)."""

    settings: Settings

    def emit(self, turn: TurnRecord) -> None:
        """The turn's span and points (never raises)."""

    def shutdown(self) -> None:
        """Flush within a bounded time and stop the export threads."""


_sink: Sink | None = None
_lock = threading.Lock()
_owners = 0
#: Turns waiting for the telemetry thread (bounded: past it, turns are dropped, counted).
QUEUE_TURNS = 4096
_jobs: queue.Queue[Callable[[], None] | None] = queue.Queue(QUEUE_TURNS)
_worker: threading.Thread | None = None
_dropped = 0


def active() -> bool:
    """Whether telemetry is on in this process (one attribute read: hooks call it first)."""
    return _sink is not None


def capture_content() -> bool:
    """Whether the content opt-in is on (and telemetry with it)."""
    return _sink is not None and _sink.settings.capture_content


def submit(job: Callable[[], None]) -> None:
    """Run ``job`` on the telemetry thread (inline when there is none: tests with a stand-in
    sink). The queue is bounded: when the thread falls :data:`QUEUE_TURNS` behind, the turn
    is dropped (one warning per 1000), never waited for. Never raises."""
    global _dropped
    if _worker is None:
        _run(job)
        return
    try:
        _jobs.put_nowait(job)
    except queue.Full:
        _dropped += 1
        if _dropped % 1000 == 1:
            logger.warning("OpenTelemetry: %d turns dropped (the exporter falls behind)", _dropped)


def _run(job: Callable[[], None]) -> None:
    try:
        job()
    except Exception as e:
        logger.warning("OpenTelemetry: a turn was not recorded (%s)", type(e).__name__)


def _work() -> None:
    while (job := _jobs.get()) is not None:
        _run(job)


def record(turn: TurnRecord, prepare: Callable[[TurnRecord], None] | None = None) -> None:
    """Hand ``turn`` to the exporter on the telemetry thread (nothing when off): building
    its span and points costs the event loop nothing. ``prepare``: run on the thread first
    (what is costly to read, e.g. the opt-in's message content). Never raises."""
    sink = _sink
    if sink is None:
        return

    def job() -> None:
        if prepare is not None:
            prepare(turn)
        sink.emit(turn)

    submit(job)


def start(service_name: str, environ: Mapping[str, str] | None = None) -> bool:
    """Turn telemetry on for this process when the environment asks for it (idempotent; each
    caller pairs it with :func:`stop`): the SDK's exporters and the telemetry thread that
    reads replies and builds spans off the event loop. ``service_name``: the default
    ``service.name`` when neither ``OTEL_SERVICE_NAME`` nor ``OTEL_RESOURCE_ATTRIBUTES`` names
    one. Returns whether it is on. A failure to build the exporter is one warning, and
    telemetry stays off."""
    global _sink, _owners, _worker
    environ = os.environ if environ is None else environ
    with _lock:
        _owners += 1
        if _sink is not None:
            return True
        settings = settings_from_env(environ)
        if settings.warning:
            logger.warning(settings.warning)
        if not settings.on:
            return False
        try:
            from addons.telemetry_otel import OtelSink

            _sink = OtelSink(settings, service_name, environ)
        except Exception as e:
            logger.warning(
                "OpenTelemetry export is off: the exporter failed to start (%s: %s)",
                type(e).__name__,
                e,
            )
            return False
        _worker = threading.Thread(target=_work, name="otel-turns", daemon=True)
        _worker.start()
        logger.info(
            "OpenTelemetry: exporting %s over OTLP (%s)%s",
            " and ".join(
                n for n, on in (("traces", settings.traces), ("metrics", settings.metrics)) if on
            ),
            settings.protocol,
            "; message content captured" if settings.capture_content else "",
        )
        return True


def stop() -> None:
    """The last :func:`start` caller gone: the queued turns recorded, what the SDK holds
    flushed (both bounded in time), and everything stopped."""
    global _sink, _owners, _worker
    with _lock:
        _owners = max(0, _owners - 1)
        sink, worker = _sink, _worker
        if _owners or sink is None:
            return
        _sink = _worker = None
    if worker is not None:
        try:
            _jobs.put(None, timeout=1)
        except queue.Full:
            pass
        worker.join(2)
    try:
        sink.shutdown()
    except Exception as e:
        logger.warning("OpenTelemetry: shutdown failed (%s)", type(e).__name__)


def install(sink: Sink | None) -> None:
    """Put ``sink`` in place (tests: turns are then recorded inline), or remove it."""
    global _sink
    _sink = sink


def trace_carrier(headers: http.Headers) -> dict[str, str]:
    """The W3C trace headers of a request (``traceparent`` and ``tracestate``), nothing
    else: only these reach the propagator."""
    out = {}
    for name in ("traceparent", "tracestate"):
        value = headers.get(name)
        if value:
            out[name] = value[:512]
    return out


def upstream_address(flow: http.HTTPFlow) -> tuple[str | None, int | None]:
    """``server.address`` / ``server.port``: the upstream host and port the request went
    to (what the conventions ask of a client span)."""
    try:
        return flow.request.host or None, int(flow.request.port)
    except (TypeError, ValueError):
        return None, None


def error_type(status: int | None, turn_status: str | None, flow_error: bool = False) -> str | None:
    """``error.type`` of a turn: the HTTP status of an error reply (``"429"``), ``_OTHER``
    for no reply at all (the conventions' fallback), ``failed`` for a stream that ended
    ``response.failed`` / ``error``, ``cut`` for one that broke off without a terminal event;
    ``None`` for a turn that ended normally (``completed`` or ``incomplete``)."""
    if status is None:
        return "_OTHER"
    if status >= 400:
        return str(status)
    if turn_status == "failed":
        return "failed"
    if turn_status is None and flow_error:
        return "cut"
    return None


def content_of(request_body: dict[str, Any] | None, output_text: str | None) -> tuple[str, str]:
    """The opt-in's ``(gen_ai.input.messages, gen_ai.output.messages)`` JSON texts: the
    request's input items (role and text, as the report shows them) and the reply's text.
    Never headers, keys or tool arguments beyond their shown excerpt."""
    import json

    from addons.responses_turn import input_items

    items = input_items(request_body) if isinstance(request_body, dict) else []
    inputs = [
        {"role": it.role or it.kind, "parts": [{"type": "text", "content": it.text}]}
        for it in items
    ]
    outputs = (
        [{"role": "assistant", "parts": [{"type": "text", "content": output_text}]}]
        if output_text
        else []
    )
    return json.dumps(inputs, ensure_ascii=False), json.dumps(outputs, ensure_ascii=False)


class Telemetry:
    """Starts and stops this process's OpenTelemetry export (``running`` / ``done``), and in
    the strict proxy (``strict=True``) records each forwarded request as a turn: its reply
    read by :mod:`addons.exchange` on the telemetry thread (:func:`strict_record`). The gateway
    records its turns from its accounting instead (:mod:`addons.gateway_mode.genai`), so
    there this addon only owns the lifecycle."""

    def __init__(self, strict: bool = True) -> None:
        self.strict = strict
        self._started = False

    def running(self) -> None:
        if not self._started:
            self._started = True
            start("codex-proxy" if self.strict else "codex-gateway")

    def done(self) -> None:
        if self._started:
            self._started = False
            stop()

    def response(self, flow: http.HTTPFlow) -> None:
        if _sink is not None and self.strict:
            self._turn(_sink, flow)

    def error(self, flow: http.HTTPFlow) -> None:
        if _sink is not None and self.strict and flow.response is None:
            self._turn(_sink, flow)

    def _turn(self, sink: Sink, flow: http.HTTPFlow) -> None:
        if not flow.metadata.get(KEY_INJECTED) or WEBSOCKET in flow.metadata:
            return
        try:
            from addons.exchange import Reply

            reply = Reply.of(flow.response)  # the bytes as received: read on the thread
        except Exception as e:
            logger.warning("OpenTelemetry: turn %s not recorded (%s)", flow.id, type(e).__name__)
            return
        submit(lambda: strict_record(sink, flow, reply))


def strict_record(sink: Sink, flow: http.HTTPFlow, reply: Any) -> None:
    """Read a strict-proxy reply and hand its turn to ``sink`` (on the telemetry thread,
    ``sink`` the one on when the turn ended: a stop drains the queue into it): the cheap
    :func:`stream_metering` when it applies, else as every reader does
    (:func:`addons.exchange.meter_reply`, to the end of a reply past the decode limit)."""
    from addons.exchange import meter_reply, read_reply

    text = None
    capture = sink.settings.capture_content
    metering = None if capture else stream_metering(reply)
    if metering is None:
        facts = read_reply(reply)
        metering = meter_reply(reply, facts=facts)
        text = facts.turn.text
    sink.emit(strict_turn(flow, metering, text, capture))


def stream_metering(reply: Any) -> Any:
    """The :class:`addons.exchange.Metering` of a complete SSE reply read the cheap way: the
    stream split into events by the one SSE decoder, and only its terminal event parsed
    (usage, status, response id and model) instead of every delta. ``None`` when that does
    not apply (no SSE reply, no terminal event: a cut stream, or one past the decode limit),
    and the caller reads the reply as every reader does."""
    from addons.exchange import Metering
    from addons.responses_turn import TERMINAL, usage_of
    from addons.sse_events import decode_sse

    if reply.status is None or not reply.streamed or not isinstance(reply.body, bytes):
        return None
    events, error = decode_sse(reply.body, reply.content_encoding)
    if error:
        return None
    for ev in reversed(events):
        if ev.event not in TERMINAL and ev.event != "message":
            continue  # named and not terminal: no need to parse it
        kind = ev.type
        if kind not in TERMINAL:
            continue
        payload = ev.payload if isinstance(ev.payload, dict) else {}
        response = payload.get("response")
        response = response if isinstance(response, dict) else {}
        usage = usage_of(response)
        status = TERMINAL[kind]
        rid, model = response.get("id"), response.get("model")
        return Metering(
            usage,
            len(events),
            status,
            None,
            rid if isinstance(rid, str) else None,
            model if isinstance(model, str) else None,
        )
    return None


def strict_turn(
    flow: http.HTTPFlow, metering: Any, output_text: str | None, capture: bool = False
) -> TurnRecord:
    """The :class:`TurnRecord` of a strict-proxy exchange (``metering``: its
    :class:`addons.exchange.Metering`; ``capture``: add the opt-in's message content)."""
    from addons.exchange import read_request

    request = flow.request
    facts = read_request(request.raw_content or b"", request.headers.get("content-encoding"))
    response = flow.response
    status = response.status_code if response is not None else None
    ended = (response.timestamp_end if response is not None else None) or (
        flow.error.timestamp if flow.error is not None else request.timestamp_start
    )
    streamed = response is not None and "event-stream" in response.headers.get("content-type", "")
    address, port = upstream_address(flow)
    turn = TurnRecord(
        request_model=facts.model,
        started=request.timestamp_start,
        ended=ended or request.timestamp_start,
        api_type=API_CHAT_COMPLETIONS if flow.metadata.get(BRIDGE) else API_RESPONSES,
        response_model=metering.response_model,
        response_id=metering.response_id,
        finish_reasons=(metering.turn_status,) if metering.turn_status else (),
        usage=metering.usage,
        server_address=address,
        server_port=port,
        error_type=error_type(status, metering.turn_status, flow.error is not None),
        service_tier=facts.service_tier,
        first_chunk=response.timestamp_start if streamed and response is not None else None,
        carrier=trace_carrier(request.headers),
        phases=upstream_phases(flow),
    )
    if capture:
        turn.content = content_of(facts.body, output_text)
    return turn


def upstream_phases(flow: http.HTTPFlow) -> list[Phase]:
    """The ``upstream`` child span: from the request sent upstream (its end as received, or
    the upstream connection's start when later) to the reply's end."""
    request, response = flow.request, flow.response
    sent = max(
        request.timestamp_end or request.timestamp_start,
        getattr(flow.server_conn, "timestamp_start", None) or 0,
    )
    end = (response.timestamp_end if response is not None else None) or (
        flow.error.timestamp if flow.error is not None else None
    )
    if end is None or end < sent:
        return []
    attributes: dict[str, Any] = {}
    if response is not None:
        attributes["http.response.status_code"] = response.status_code
    return [Phase("upstream", sent, end, attributes)]
