"""Usage accounting: one ledger row per forwarded request, written when the exchange ends, and
one ``refusals`` row per request the gateway answered itself (:func:`record_refusal`)."""

from __future__ import annotations

import asyncio
import concurrent.futures
import json
import logging
import time
import uuid
from dataclasses import dataclass
from typing import Any

from mitmproxy import http

from addons.common import CLIENT_ERROR, KEY_INJECTED, REFUSED, WEBSOCKET
from addons.exchange import UNMETERED, ExchangeFacts, Metering, Reply, meter_reply, read_reply
from addons.gateway_mode import genai
from addons.gateway_mode.core import (
    ATTEMPTS,
    MEMBER,
    REQUEST_INFO,
    ROUTE,
    UPSTREAM_KEY,
    GatewayCore,
    request_info,
    route_label,
)
from addons.gateway_mode.forward import PoolForwarder
from addons.gateway_mode.ledger import IN_FLIGHT, REFUSALS, TABLE, refusal_kind
from addons.gateway_mode.windows import MICRO
from addons.responses_turn import USAGE_KINDS

logger = logging.getLogger(__name__)

#: The flow's usage ``row_id`` (one UUID for its in-flight and its finished row).
ROW_ID = "codex_gateway.row_id"

#: ``REFUSED`` reasons that are no refusal (``/health`` and ``/metrics`` answered locally).
NOT_REFUSALS = frozenset({"local-route"})


def record_refusal(
    core: GatewayCore,
    member: dict[str, Any] | None,
    code: str,
    status: int | None,
    route: str,
    model: str | None = None,
    flow: http.HTTPFlow | None = None,
) -> None:
    """Queue the ``refusals`` row of one refusal (``member``: the flow's :data:`MEMBER`
    marker, ``None`` when no member key was accepted; ``flow``: the refused HTTP request, for
    telemetry's span). Never raises: a refusal is answered whether or not it could be
    counted."""
    genai.refusal(code, member, status, route, model, flow)  # OTLP span (when on)
    ledger = core.ledger
    if ledger is None:
        return
    try:
        ledger.add(
            {
                TABLE: REFUSALS,
                "row_id": str(uuid.uuid4()),
                "ts_ms": int(time.time() * 1000),
                "member_id": member["member_id"] if member else None,
                "team_id": member.get("team_id") if member else None,
                "key_id": member["key_id"] if member else None,
                "kind": refusal_kind(code),
                "code": code[:64],
                "status": status,
                "route": route[:64],
                "model": (model or None) and model[:200],
                "count": 1,
                "instance": core.instance,
            }
        )
        if member and member.get("team"):
            core.metrics.team_refused.labels(member["team"], refusal_kind(code)).inc()
    except Exception as e:
        logger.error("refusal row not queued (%s)", type(e).__name__)


def refusal_code(flow: http.HTTPFlow) -> str:
    """The error ``code`` of a local refusal's JSON body, else its ``REFUSED`` reason with
    ``_`` for ``-`` (``not-allowlisted``: ``not_allowlisted``)."""
    response = flow.response
    try:
        error = json.loads(response.content or b"")["error"] if response is not None else None
        code = error.get("code") if isinstance(error, dict) else None
    except (ValueError, KeyError, TypeError):
        code = None
    if isinstance(code, str) and code:
        return code
    return str(flow.metadata.get(REFUSED) or "refused").replace("-", "_")


def reply_usage(response: http.Response | None) -> Metering:
    """What an upstream reply is charged on (:func:`addons.exchange.meter_reply`): usage from
    the stream's terminal event (or a JSON body's ``usage``), whatever its compression ratio,
    the number of SSE events, the turn's status (``completed``, ``incomplete``, ``failed``;
    ``None`` when the reply has none) and why a successful reply is unmetered. Never raises."""
    if response is None:
        return Metering(None, 0, None)
    return meter_reply(Reply.of(response))


#: Threads that meter replies past the decode limit (each may take seconds: 1 GiB of gzip
#: is ~10 s of one core on a busy machine).
METER_THREADS = 2


class UsageAccounting:
    """Writes the usage row of every forwarded member request (``response`` or ``error``,
    whichever ends it, also when Codex hangs up right after ``response.completed``; at
    shutdown for flows still open), charges it in credits with the rate card as it is now,
    updates ``/metrics``, and gives back the flow's concurrency slot and upstream key.

    Runs after the SSE tee restored the body. The row goes to the ledger's queue (no database
    work on the event loop). Row: time, member, key id, upstream key name, model, route,
    status, input / cached / cache-write / output / reasoning / total tokens, credits and the
    rate-card entry, service tier, duration, time to first byte, events, attempts, error.
    """

    def __init__(self, core: GatewayCore, forwarder: PoolForwarder) -> None:
        self.core = core
        self.forwarder = forwarder
        self._open: dict[str, http.HTTPFlow] = {}
        self._executor: concurrent.futures.ThreadPoolExecutor | None = None

    def request(self, flow: http.HTTPFlow) -> None:
        if WEBSOCKET in flow.metadata:
            return  # a socket's turns are rows of their own (gateway_mode.websocket)
        if flow.metadata.get(KEY_INJECTED) and MEMBER in flow.metadata and flow.response is None:
            self._open[flow.id] = flow
            self.core.metrics.in_flight.inc()
            # The in-flight row: what is left of this request if the gateway is killed before
            # it ends (its finished row, same row_id, replaces it).
            ledger = self.core.ledger
            if ledger is not None:
                try:
                    ledger.add(self.row(flow, IN_FLIGHT, parse=False, finished=False))
                except Exception as e:
                    logger.error("in-flight row for %s not queued (%s)", flow.id, type(e).__name__)

    def response(self, flow: http.HTTPFlow) -> Any:
        return self._finish_metered(flow)

    def error(self, flow: http.HTTPFlow) -> Any:
        return self._finish_metered(flow)

    def done(self) -> None:
        for flow in list(self._open.values()):
            self._finish(flow, "gateway stopped before the exchange ended")
        if self._executor is not None:
            self._executor.shutdown(wait=False, cancel_futures=True)
            self._executor = None

    def _finish_metered(self, flow: http.HTTPFlow) -> Any:
        """:meth:`_finish`, the reply read on the loop within the decode limits as every
        reader does; a reply that decodes past them is metered to its end off the loop (a
        bomb may take seconds: it costs one of :data:`METER_THREADS`, never the loop other
        members' streams run on), and this returns that coroutine for mitmproxy to await."""
        response = flow.response
        if flow.id in self._open and flow.websocket is None and response is not None:
            try:
                reply = Reply.of(response)
                facts = read_reply(reply)
                if facts.over_limit:
                    return self._finish_off_loop(flow, reply, facts)
                metering = meter_reply(reply, facts=facts)
            except Exception as e:  # _finish keeps what it can of the row
                logger.error("metering %s failed (%s)", flow.id, type(e).__name__)
            else:
                self._finish(flow, metering=metering)
                return None
        self._finish(flow)
        return None

    async def _finish_off_loop(
        self, flow: http.HTTPFlow, reply: Reply, facts: ExchangeFacts
    ) -> None:
        if self._executor is None:
            self._executor = concurrent.futures.ThreadPoolExecutor(
                METER_THREADS, thread_name_prefix="gateway-meter"
            )
        try:
            metering = await asyncio.get_running_loop().run_in_executor(
                self._executor, lambda: meter_reply(reply, facts=facts)
            )
        except Exception as e:  # never lose the row, nor meter a bomb on the loop
            logger.error("metering %s off the loop failed (%s)", flow.id, type(e).__name__)
            metering = Metering(None, 0, None, f"{UNMETERED}: metering failed ({type(e).__name__})")
        if flow.id in self._open:  # not written by done() meanwhile
            self._finish(flow, metering=metering)

    def _finish(
        self,
        flow: http.HTTPFlow,
        forced_error: str | None = None,
        metering: Metering | None = None,
    ) -> None:
        if flow.websocket is not None:
            return  # an open socket keeps its upstream key until websocket_end
        if self._open.pop(flow.id, None) is None:
            self._release(flow)
            self.core.metrics.requests.labels(
                route_label(flow.request.path),
                str(flow.response.status_code if flow.response else 0),
            ).inc()
            self._refusal(flow)
            return
        self.core.metrics.in_flight.dec()
        try:
            row = self.row(flow, forced_error, metering=metering)
        except Exception as e:  # never lose the row to a parsing bug: keep what we know
            logger.error("usage row for %s incomplete (%s)", flow.id, type(e).__name__)
            row = self.row(flow, f"accounting error: {type(e).__name__}", parse=False)
        ledger = self.core.ledger
        if ledger is None:
            self._release(flow)
            logger.error("usage row lost: the gateway's database is closed")
            return
        ledger.add(row)
        # After the row is queued: the slot goes back once the row is in the database, so an
        # admission anywhere that finds the slot free also finds this request's usage.
        self._release(flow)
        self._observe(flow, row)
        genai.http_turn(self.core, flow, row, metering)  # gen_ai_* histograms, OTLP span

    def _refusal(self, flow: http.HTTPFlow) -> None:
        """A request the gateway answered itself: its ``refusals`` row."""
        reason = flow.metadata.get(REFUSED)
        if (
            reason is None
            or reason in NOT_REFUSALS
            or flow.response is None
            or flow.response.status_code < 400
        ):
            return
        info = flow.metadata.get(REQUEST_INFO)
        record_refusal(
            self.core,
            flow.metadata.get(MEMBER),
            refusal_code(flow),
            flow.response.status_code,
            route_label(str(flow.metadata.get(ROUTE) or flow.request.path)),
            info.get("model") if isinstance(info, dict) else None,
            flow=flow,
        )

    def _release(self, flow: http.HTTPFlow) -> None:
        self.forwarder.finished(flow)
        self.core.release_lease(flow.id)  # once the rows queued so far are written

    def row(
        self,
        flow: http.HTTPFlow,
        forced_error: str | None = None,
        parse: bool = True,
        finished: bool = True,
        metering: Metering | None = None,
    ) -> dict[str, Any]:
        """The ledger row of a member flow (``usage`` table columns): of an ended flow, or with
        ``finished=False`` its in-flight row (no status, ``duration_ms`` null). Both carry the
        flow's one ``row_id`` (kept in ``flow.metadata``). ``metering``: the reply's, when
        already read (:func:`reply_usage`).

        ``error`` says, first found: the forced error, the flow's error, why a successful
        reply is unmetered (``unmetered: ...``); a bridged reply the client got as an error
        (:data:`addons.common.CLIENT_ERROR`) adds ``client got an error: ...`` and is
        recorded with status 502 when the upstream's was a success."""
        info = request_info(flow)
        response = flow.response
        if not parse:
            metering = Metering(None, 0, None)
        elif metering is None:
            metering = reply_usage(response)
        usage, events, turn_status = metering.usage, metering.events, metering.turn_status
        error = forced_error
        if error is None and flow.error is not None:
            error = flow.error.msg
            if usage is not None:
                error = f"after response.completed: {error}"
        if error is None and finished:
            error = metering.unmetered
        status = response.status_code if response is not None else None
        client_error = flow.metadata.get(CLIENT_ERROR)
        if finished and isinstance(client_error, str):
            error = "; ".join(e for e in (error, f"client got an error: {client_error}") if e)
            if status is not None and 200 <= status < 300:
                status = 502
        started = flow.request.timestamp_start
        ended = (
            response.timestamp_end if response and response.timestamp_end else None
        ) or time.time()
        ttfb = None
        if response is not None and flow.request.timestamp_end:
            ttfb = max(0, int((response.timestamp_start - flow.request.timestamp_end) * 1000))
        row_id = flow.metadata.get(ROW_ID)
        if not isinstance(row_id, str):
            row_id = flow.metadata[ROW_ID] = str(uuid.uuid4())
        connect_retries = self.core.connect_retries.get(flow.client_conn.id, 0)
        if finished:
            self.core.connect_retries.pop(flow.client_conn.id, None)
        return ledger_row(
            self.core,
            flow.metadata[MEMBER],
            TurnFacts(
                model=info["model"],
                service_tier=info["service_tier"],
                route=str(flow.metadata.get(ROUTE) or "/v1/responses"),
                status=status,
                usage=usage,
                priced=parse,
                events=events,
                turn_status=turn_status,
                error=error,
                started=started,
                ended=ended,
                ttfb_ms=ttfb,
                upstream_key=flow.metadata.get(UPSTREAM_KEY),
                attempts=int(flow.metadata.get(ATTEMPTS) or 1) + connect_retries,
                row_id=row_id,
                finished=finished,
            ),
        )

    def _observe(self, flow: http.HTTPFlow, row: dict[str, Any]) -> None:
        observe_row(self.core, flow.metadata[MEMBER]["member"], row)


@dataclass
class TurnFacts:
    """What one turn's ledger row is made of, whatever carried it (an HTTP exchange, a turn
    on a WebSocket): ``usage`` as :func:`addons.responses_turn.usage_of` gives it (``None``
    when the reply had none), times in Unix seconds, ``priced=False`` to skip the charge."""

    model: str | None
    service_tier: str | None
    route: str
    status: int | None
    usage: dict[str, int] | None
    events: int
    turn_status: str | None
    error: str | None
    started: float
    ended: float
    ttfb_ms: int | None
    upstream_key: str | None
    attempts: int = 1
    priced: bool = True
    #: The row's id (an HTTP flow's in-flight and finished rows share one); new when None.
    row_id: str | None = None
    #: False for an in-flight row: no status, duration or time to first byte yet.
    finished: bool = True
    #: A warm-up (Codex's socket ``response.create`` with ``"generate": false``).
    warmup: bool = False


def ledger_row(core: GatewayCore, member: dict[str, Any], facts: TurnFacts) -> dict[str, Any]:
    """The ``usage`` table row of one member turn: tokens from ``facts.usage``, credits from
    the rate card as it is now (``None`` when it cannot price the model, or in ``tokens``
    accounting without usage), ``response <status>`` as the error of a turn that did not
    complete. ``member`` is the flow's :data:`MEMBER` marker."""
    usage = facts.usage
    tokens = {kind: (usage or {}).get(kind, 0) for kind in USAGE_KINDS}
    if usage and not tokens["total"]:
        tokens["total"] = tokens["input"] + tokens["output"]
    charge = core.card.charge(facts.model, usage, facts.service_tier) if facts.priced else None
    if core.card.accounting == "tokens" and usage is None:
        charge = None
    error = facts.error
    if error is None and facts.turn_status and facts.turn_status != "completed":
        error = f"response {facts.turn_status}"
    return {
        "row_id": facts.row_id or str(uuid.uuid4()),
        "ts_ms": int(facts.started * 1000),
        "member_id": member["member_id"],
        "team_id": member.get("team_id"),
        "key_id": member["key_id"],
        "upstream_key": facts.upstream_key,
        "model": (facts.model or None) and facts.model[:200],
        "route": facts.route[:64],
        "status": facts.status if facts.finished else None,
        "input_tokens": tokens["input"],
        "cached_tokens": tokens["cached"],
        "cache_write_tokens": tokens["cache_write"],
        "output_tokens": tokens["output"],
        "reasoning_tokens": tokens["reasoning"],
        "total_tokens": tokens["total"],
        "credits_micro": int(charge.credits * MICRO) if charge is not None else None,
        "rate": charge.rate if charge is not None else None,
        "service_tier": (facts.service_tier or None) and facts.service_tier[:32],
        "duration_ms": max(0, int((facts.ended - facts.started) * 1000))
        if facts.finished
        else None,
        "ttfb_ms": facts.ttfb_ms if facts.finished else None,
        "events": facts.events,
        "attempts": facts.attempts,
        "error": error[:500] if error else None,
        "instance": core.instance,
        "warmup": 1 if facts.warmup else 0,
        "subject": member.get("subject"),
    }


def observe_row(core: GatewayCore, member: str, row: dict[str, Any]) -> None:
    """``/metrics`` for a written ledger row of ``member`` (its name)."""
    m = core.metrics
    m.requests.labels(row["route"], str(row["status"] or 0)).inc()
    if (row["error"] or "").startswith(UNMETERED):
        m.refused.labels(UNMETERED).inc()  # served, but its usage could not be read
    for kind in USAGE_KINDS:
        amount = row[f"{kind}_tokens"]
        if amount:
            m.tokens.labels(member, kind).inc(amount)
    if row["credits_micro"]:
        m.credits.labels(member, (row["model"] or "")[:64]).inc(row["credits_micro"] / MICRO)
    elif row["credits_micro"] is None and not core.card.prices(row["model"]):
        m.unpriced.labels((row["model"] or "")[:64]).inc()
    team = core.team_names.get(row.get("team_id") or -1)
    if team is not None:  # the team's series (the member's above are unchanged)
        for kind in USAGE_KINDS:
            if row[f"{kind}_tokens"]:
                m.team_tokens.labels(team, kind).inc(row[f"{kind}_tokens"])
        if row["credits_micro"]:
            m.team_credits.labels(team).inc(row["credits_micro"] / MICRO)
    m.duration.labels(row["route"]).observe(row["duration_ms"] / 1000)
    if row["ttfb_ms"] is not None:
        m.ttfb.labels(row["route"]).observe(row["ttfb_ms"] / 1000)
