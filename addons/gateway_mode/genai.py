"""The gateway's turns as OpenTelemetry GenAI telemetry (:mod:`addons.telemetry`).

Fed by the accounting, from what it already read (the usage row, the reply's
:class:`addons.exchange.Metering`): :func:`http_turn` for a forwarded HTTP request (Responses,
compact, the chat bridge), :func:`socket_turn` for a turn on a WebSocket (Codex's
``/v1/responses`` socket, the Realtime API), :func:`refusal` for a request the gateway
answered itself. Each observes the ``gen_ai_client_*`` histograms of ``/metrics``
(:mod:`addons.gateway_mode.genai_metrics`; refusals excepted) and, when the OTLP export is
on, records the turn's span: the member as ``user.id``, the team, credits, the upstream key's
*name*, the refusal kind, and child spans for member auth, the concurrency slot (a member
with ``max_concurrent``), the quota check and the upstream call, timed by the
:class:`PhaseMark` addons and :func:`mark_phase`.
"""

from __future__ import annotations

import logging
import time
from typing import Any

from mitmproxy import http

from addons import telemetry
from addons.common import BRIDGE
from addons.exchange import Metering
from addons.gateway_mode.core import MEMBER, ROUTE, UPSTREAM_KEY, GatewayCore
from addons.gateway_mode.ledger import refusal_kind
from addons.gateway_mode.windows import MICRO
from addons.telemetry import (
    API_CHAT_COMPLETIONS,
    API_RESPONSES,
    OPERATION,
    Phase,
    TurnRecord,
    error_type,
    trace_carrier,
    upstream_address,
)

logger = logging.getLogger(__name__)

#: ``flow.metadata`` key: ``{phase mark name: Unix seconds}`` (:class:`PhaseMark`).
PHASES = "codex_telemetry.phases"
AUTHENTICATED = "authenticated"
ADMITTED = "admitted"
#: Stamped by ``QuotaGate`` once a member with ``max_concurrent`` holds a concurrency slot.
LEASED = "leased"


def mark_phase(flow: http.HTTPFlow, name: str) -> None:
    """Stamp ``name`` now in ``flow``'s phase marks (nothing when the OTLP export is off)."""
    if telemetry.active():
        flow.metadata.setdefault(PHASES, {})[name] = time.time()


class PhaseMark:
    """Stamps when a member request got past a point of the addon chain, for the span's
    child spans: ``authenticated`` after ``MemberAuth`` (its ``requestheaders``),
    ``admitted`` after ``QuotaGate`` (its ``request``, which waits for a concurrency slot).
    Nothing when the OTLP export is off."""

    def __init__(self, name: str) -> None:
        self.name = name

    def requestheaders(self, flow: http.HTTPFlow) -> None:
        if self.name == AUTHENTICATED and telemetry.active():
            flow.metadata.setdefault(PHASES, {})[self.name] = time.time()

    def request(self, flow: http.HTTPFlow) -> None:
        if self.name == ADMITTED and telemetry.active() and flow.response is None:
            flow.metadata.setdefault(PHASES, {})[self.name] = time.time()


def _usage_of_row(row: dict[str, Any], metered: bool) -> dict[str, int] | None:
    if not metered and not row.get("total_tokens"):
        return None
    return {
        kind: int(row.get(f"{kind}_tokens") or 0)
        for kind in ("input", "cached", "output", "reasoning")
    }


def _member_facts(turn: TurnRecord, member: dict[str, Any] | None, row: dict[str, Any] | None):
    if member:
        turn.member = str(member.get("member") or "") or None
        team = member.get("team")  # set by the teams feature when present
        if isinstance(team, str) and team:
            turn.team = team
        elif isinstance(team, dict) and team.get("name"):
            turn.team = str(team["name"])
    if row is not None and row.get("credits_micro") is not None:
        turn.credits = row["credits_micro"] / MICRO


def _phases(flow: http.HTTPFlow, ended: float) -> list[Phase]:
    marks = flow.metadata.get(PHASES) or {}
    request = flow.request
    out = []
    authenticated, admitted = marks.get(AUTHENTICATED), marks.get(ADMITTED)
    if authenticated:
        out.append(Phase("member auth", request.timestamp_start, authenticated))
    if admitted:
        since = max(authenticated or request.timestamp_start, request.timestamp_end or 0)
        leased = marks.get(LEASED)
        if leased and leased <= admitted:
            out.append(Phase("concurrency slot", min(since, leased), leased))
            since = max(since, leased)
        out.append(Phase("quota check", min(since, admitted), admitted))
        out.append(Phase("upstream", admitted, max(admitted, ended)))
    return out


def http_turn(
    core: GatewayCore, flow: http.HTTPFlow, row: dict[str, Any], metering: Metering | None
) -> None:
    """A forwarded HTTP request's usage row: ``/metrics`` histograms and its span. Never
    raises."""
    try:
        request, response = flow.request, flow.response
        member = flow.metadata.get(MEMBER) or {}
        started = request.timestamp_start
        ended = (response.timestamp_end if response is not None else None) or time.time()
        streamed = response is not None and "event-stream" in response.headers.get(
            "content-type", ""
        )
        first_chunk = response.timestamp_start if streamed and response is not None else None
        usage = _usage_of_row(row, metering is not None and metering.usage is not None)
        core.metrics.genai.observe(
            OPERATION,
            row.get("model"),
            str(member.get("member") or ""),
            usage,
            ended - started,
            first_chunk - started if first_chunk is not None else None,
        )
        if not telemetry.active():
            return
        turn_status = metering.turn_status if metering is not None else None
        address, port = upstream_address(flow)
        turn = TurnRecord(
            request_model=row.get("model"),
            started=started,
            ended=ended,
            api_type=API_CHAT_COMPLETIONS if flow.metadata.get(BRIDGE) else API_RESPONSES,
            response_model=(metering.response_model if metering else None),
            response_id=(metering.response_id if metering else None),
            finish_reasons=(turn_status,) if turn_status else (),
            usage=usage,
            server_address=address,
            server_port=port,
            error_type=error_type(row.get("status"), turn_status, flow.error is not None),
            service_tier=row.get("service_tier"),
            first_chunk=first_chunk,
            carrier=trace_carrier(request.headers),
            route=str(flow.metadata.get(ROUTE) or row.get("route") or ""),
            upstream_key=flow.metadata.get(UPSTREAM_KEY),
            phases=_phases(flow, ended),
        )
        if turn.upstream_key and turn.phases:
            turn.phases[-1].attributes["codex.attempts"] = int(row.get("attempts") or 1)
        _member_facts(turn, member, row)
        if telemetry.capture_content():
            telemetry.record(turn, _content_reader(flow))
        else:
            telemetry.record(turn)
    except Exception as e:
        logger.warning("OpenTelemetry: turn %s not observed (%s)", flow.id, type(e).__name__)


def _content_reader(flow: http.HTTPFlow):
    """The opt-in's message content of an HTTP turn: the bytes taken now, read again on the
    telemetry thread (only with the opt-in) into the turn's ``content``."""
    from addons.exchange import Reply, read_reply, read_request

    raw, encoding = flow.request.raw_content or b"", flow.request.headers.get("content-encoding")
    reply = Reply.of(flow.response) if flow.response is not None else None

    def fill(turn: TurnRecord) -> None:
        request = read_request(raw, encoding)
        text = read_reply(reply).turn.text if reply is not None else None
        turn.content = telemetry.content_of(request.body, text)

    return fill


def socket_turn(
    core: GatewayCore,
    flow: http.HTTPFlow,
    row: dict[str, Any],
    usage: dict[str, int] | None,
    turn_status: str | None,
    started: float,
    first_event: float | None,
    response_id: str | None,
    realtime: bool,
    response_model: str | None = None,
) -> None:
    """A turn on a member socket (``flow``: the socket's; ``row``: its usage row): the
    ``/metrics`` histograms and its span, a child of the handshake's ``traceparent`` when it
    had one. Never raises."""
    try:
        member = flow.metadata.get(MEMBER) or {}
        ended = time.time()
        if row.get("warmup"):
            return  # Codex's warm-up is no model call
        core.metrics.genai.observe(
            OPERATION,
            row.get("model"),
            str(member.get("member") or ""),
            usage,
            ended - started,
            first_event - started if first_event is not None else None,
        )
        if not telemetry.active():
            return
        address, port = upstream_address(flow)
        turn = TurnRecord(
            request_model=row.get("model"),
            started=started,
            ended=ended,
            api_type=None if realtime else API_RESPONSES,
            response_model=response_model,
            response_id=response_id,
            finish_reasons=(turn_status,) if turn_status else (),
            usage=usage,
            server_address=address,
            server_port=port,
            error_type=error_type(row.get("status"), turn_status, row.get("error") is not None),
            service_tier=row.get("service_tier"),
            first_chunk=first_event,
            carrier=trace_carrier(flow.request.headers),
            route=str(row.get("route") or ""),
            upstream_key=flow.metadata.get(UPSTREAM_KEY),
        )
        _member_facts(turn, member, row)
        telemetry.record(turn)
    except Exception as e:
        logger.warning("OpenTelemetry: socket turn not observed (%s)", type(e).__name__)


def refusal(
    code: str,
    member: dict[str, Any] | None,
    status: int | None,
    route: str,
    model: str | None,
    flow: http.HTTPFlow | None = None,
) -> None:
    """A request (or socket turn) the gateway answered itself, as its refusals row says: a
    span with ``error.type`` (the status) and ``codex.refusal.kind``. With the HTTP
    ``flow``: its timing and its caller's ``traceparent``; without (a socket's refusal), a
    span of the moment. Never raises."""
    if not telemetry.active():
        return
    try:
        now = time.time()
        started = ended = now
        carrier: dict[str, str] = {}
        phases: list[Phase] = []
        if flow is not None:
            response = flow.response
            started = flow.request.timestamp_start
            ended = (response.timestamp_end if response is not None else None) or now
            carrier = trace_carrier(flow.request.headers)
            phases = _phases(flow, ended)[:1]
        turn = TurnRecord(
            request_model=model,
            started=started,
            ended=ended,
            api_type=(
                API_CHAT_COMPLETIONS if flow is not None and flow.metadata.get(BRIDGE) else None
            )
            or (API_RESPONSES if "responses" in route else None),
            error_type=str(status) if status is not None else "_OTHER",
            carrier=carrier,
            route=route[:64],
            refusal_kind=refusal_kind(code),
            phases=phases,
        )
        _member_facts(turn, member, None)
        telemetry.record(turn)
    except Exception as e:
        logger.warning("OpenTelemetry: a refusal was not recorded (%s)", type(e).__name__)
