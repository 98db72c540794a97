"""WebSocket routes through the gateway (on by default; ``serve --no-websockets``: off):
Codex's ``GET /v1/responses`` and the OpenAI Realtime API's ``GET /v1/realtime?model=…``. What
differs between the two (which message opens a turn, which ends it, where usage is, the refusal
event's shape) is a small protocol object each, :mod:`addons.gateway_mode.socket_protocol`;
the rest below is shared.

What Codex 0.171 sends with ``supports_websockets = true`` (checked against a loopback fake,
docs/gateway.md "Codex's WebSocket transport"): ``GET /v1/responses`` with ``Upgrade:
websocket`` and its usual
headers (``session-id``, ``x-codex-turn-metadata``...; ``Authorization`` from ``env_key``), then
one JSON text message per request, ``{"type": "response.create", ...}`` with the POST body's
fields (a warm-up with ``"generate": false`` first, then each turn with
``previous_response_id``); the server answers with the SSE events' JSON, one per message.

How the gateway serves it, reusing the HTTP path for the upgrade: :class:`WebSocketRoute`
claims the upgrade (the allowlist then marks it, the strict 426 refusal leaves it alone), member
auth removes and checks the key, the pool forwarder routes it with an upstream key and Host of
the upstream, and :class:`WebSocketTurns` puts the upgrade headers back (they are hop-by-hop),
then meters the socket message by message: each ``response.create`` is checked against the
member's quotas before it goes upstream (a refused one is dropped and answered on the socket
with an ``error`` event in the shape that ends Codex's turn), each terminal event
(``response.completed`` / ``failed`` / ``incomplete``, ``error``) becomes a usage-ledger row,
a concurrency slot is held per open turn (not per idle socket), and a member key revoked
while its socket is open closes the socket within the directory refresh plus
:data:`REVOKE_CHECK_S`. Each socket is a row of the ``ws_connections`` table too (member,
keys, route, times, messages each way, turns, close reason): an open row when it opens (what
is left if the gateway is killed), its closed row when it closes, through the usage ledger.
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
import uuid
from dataclasses import dataclass, field
from typing import Any

from mitmproxy import ctx, http
from sqlalchemy.exc import SQLAlchemyError

from addons import body_decode
from addons.body_decode import DecodeLimits, JsonTooDeep, loads_json
from addons.common import WEBSOCKET, fail_closed
from addons.gateway_mode import genai
from addons.gateway_mode.accounting import TurnFacts, ledger_row, observe_row, record_refusal
from addons.gateway_mode.core import MEMBER, ROUTE, SOCKET_ROUTE, UPSTREAM_KEY, GatewayCore
from addons.gateway_mode.forward import PoolForwarder
from addons.gateway_mode.identity_auth import EXPIRED_ON_SOCKET, revoked_reason, token_expired
from addons.gateway_mode.ledger import WS_CONNECTIONS
from addons.gateway_mode.member_models import allowed_patterns, model_refusal
from addons.gateway_mode.quota import (
    CONCURRENCY_RETRY_S,
    limit_usages,
    unpriced_message,
    usage_limit_error,
)
from addons.gateway_mode.socket_bounds import CLOSED_BECAUSE, REFUSED_AS
from addons.gateway_mode.socket_protocol import (
    PROTOCOLS,
    RESPONSES,
    SocketProtocol,
    protocol_for,
)
from addons.gateway_mode.socket_protocol import busy_event as busy_event  # re-exported
from addons.gateway_mode.socket_protocol import error_event as error_event  # re-exported
from addons.gateway_mode.socket_protocol import is_responses_upgrade as is_responses_upgrade
from addons.gateway_mode.teams import TeamSlots, busy_text, refresh_marker
from addons.gateway_mode.windows import limits_of
from addons.socket_close import mark_closed_by_proxy
from addons.socket_turns import SocketTurn, end_turn, forget_taken, keeps_messages, start_turn

logger = logging.getLogger(__name__)

#: The Codex route served over WebSocket (Codex appends ``/responses`` to its ``base_url``).
WS_ROUTE = RESPONSES.path
#: The ``route`` of a Codex WebSocket turn's ledger row.
ROW_ROUTE = RESPONSES.row_route
#: Seconds between checks of open sockets against the member directory.
REVOKE_CHECK_S = 0.2
#: Turns one socket may have open at once: Codex sends the next ``response.create`` when the
#: last has ended (an upstream socket runs one response at a time); each open turn holds its
#: messages in the flow (issue 30).
MAX_OPEN_TURNS = 4
#: Server events that end a Codex turn.
TERMINAL = RESPONSES.ends


def _str_or_none(value: Any) -> str | None:
    return value[:200] if isinstance(value, str) else None


class UnreadMessage(ValueError):
    """A client message the gateway will not read. ``code`` names the refusal for an
    ``error`` event (``None``: dropped without an answer)."""

    def __init__(self, code: str | None, message: str) -> None:
        super().__init__(message)
        self.code = code


def read_client_message(content: bytes, is_text: bool, limits: DecodeLimits) -> dict[str, Any]:
    """The JSON object a client message carries.

    Raises:
        UnreadMessage: ``request_too_large`` past ``limits.max_bytes``
            (``codex_decode_max_mib``, the HTTP body's 413) and ``json_too_deep`` past
            :data:`addons.body_decode.MAX_JSON_DEPTH` (the HTTP body's 400): a request the
            gateway will not read, answered so the client does not wait for a turn that
            never starts. Code ``None`` for a binary message or text that is no JSON object:
            no request at all (Codex sends JSON text only), dropped unanswered.
    """
    if not is_text:
        raise UnreadMessage(None, "binary message")
    if len(content) > limits.max_bytes:
        raise UnreadMessage(
            "request_too_large",
            f"the message ({len(content)} bytes) is past the gateway's limit of "
            f"{limits.max_bytes} bytes (codex_decode_max_mib); nothing was sent upstream",
        )
    try:
        body = loads_json(content)
    except JsonTooDeep as e:
        raise UnreadMessage(
            "json_too_deep", f"the message is {e} (the gateway's limit); nothing was sent upstream"
        ) from None
    except ValueError:
        body = None
    if not isinstance(body, dict):
        raise UnreadMessage(None, "not a JSON object")
    return body


@dataclass
class Turn:
    """One ``response.create`` in flight on a socket."""

    model: str | None
    service_tier: str | None
    started: float
    lease_slot: str | None = None
    first_event: float | None = None
    events: int = 0
    #: The turn as the dumps and the recording see it (``addons/socket_turns.py``).
    log: SocketTurn | None = None
    #: The server said it started this turn (Realtime ``response.created``).
    confirmed: bool = False
    #: The ``event_id`` of the client event that opened it (Realtime errors name it).
    client_event_id: str | None = None
    #: The server's id of its response, once started (Realtime ``response.done`` names it).
    response_id: str | None = None
    #: Codex's warm-up (``"generate": false``): a row marked ``warmup``, not counted a turn.
    warmup: bool = False
    #: The model the ending event's ``response`` names (telemetry's ``gen_ai.response.model``).
    response_model: str | None = None


@dataclass
class Socket:
    """An open member socket: its flow and its turns in order, its route's protocol, the
    session's model (Realtime), and what its ``ws_connections`` row counts."""

    flow: http.HTTPFlow
    turns: list[Turn] = field(default_factory=list)
    closing: bool = False
    number: int = 0
    protocol: SocketProtocol = RESPONSES
    model: str | None = None
    opened: float = field(default_factory=time.time)
    row_id: str = field(default_factory=lambda: str(uuid.uuid4()))
    client_messages: int = 0
    upstream_messages: int = 0
    turns_opened: int = 0
    #: Why the gateway closed it (revocation), for its row; else the close code says.
    close_reason: str | None = None


class WebSocketRoute:
    """Claims ``GET /v1/responses`` and ``GET /v1/realtime?model=…`` WebSocket upgrades while
    ``codex_gateway_websockets`` is on (the default; placed before the allowlist and the 426
    refusal, which then let it through; the route's protocol name goes in ``SOCKET_ROUTE``);
    otherwise the strict refusal answers 426 (``/v1/responses``) or the allowlist 403."""

    def __init__(self) -> None:
        self.enabled = True  # the option's default

    def load(self, loader) -> None:
        loader.add_option(
            "codex_gateway_websockets",
            bool,
            True,
            "Serve Codex's WebSocket transport (GET /v1/responses with Upgrade: websocket; "
            "Codex's default) and the Realtime API (GET /v1/realtime?model=...) to members: "
            "metered and capped per response.create. Off: upgrades get 426 (/v1/responses) "
            "or 403.",
        )

    def configure(self, updated: set[str]) -> None:
        if "codex_gateway_websockets" in updated:
            self.enabled = bool(ctx.options.codex_gateway_websockets)

    @fail_closed
    def requestheaders(self, flow: http.HTTPFlow) -> None:
        if flow.response or flow.error or not flow.live or not self.enabled:
            return
        protocol = protocol_for(flow.request)
        if protocol is not None:
            flow.metadata[WEBSOCKET] = True
            flow.metadata[SOCKET_ROUTE] = protocol.name


class WebSocketTurns:
    """Meters and caps member sockets (see the module docstring). Placed after the pool
    forwarder: its ``requestheaders`` restores the upgrade headers the forwarder stripped."""

    def __init__(self, core: GatewayCore, forwarder: PoolForwarder) -> None:
        self.core = core
        self.forwarder = forwarder
        self.sockets: dict[str, Socket] = {}
        self._watch: asyncio.Task[None] | None = None
        self._slots = 0
        #: Checks of server-started responses in progress (a reference keeps each alive).
        self._checks: set[asyncio.Task[None]] = set()

    @fail_closed
    def requestheaders(self, flow: http.HTTPFlow) -> None:
        if flow.response or flow.error or not flow.live or WEBSOCKET not in flow.metadata:
            return
        headers = flow.request.headers
        headers["connection"] = "Upgrade"
        headers["upgrade"] = "websocket"

    def running(self) -> None:
        if self._watch is None:
            self._watch = asyncio.get_running_loop().create_task(self._watch_revocations())

    def done(self) -> None:
        if self._watch is not None:
            self._watch.cancel()
            self._watch = None
        for socket in list(self.sockets.values()):
            socket.close_reason = socket.close_reason or "gateway stopped with the socket open"
            self._end(socket, "gateway stopped with the socket open")

    def websocket_start(self, flow: http.HTTPFlow) -> None:
        if WEBSOCKET not in flow.metadata or MEMBER not in flow.metadata:
            return
        member = flow.metadata[MEMBER]["member"]
        self.core.metrics.ws_connections.labels(member).inc()
        self.core.metrics.ws_open.inc()
        protocol = PROTOCOLS.get(str(flow.metadata.get(SOCKET_ROUTE)), RESPONSES)
        target = str(flow.metadata.get(ROUTE) or flow.request.path)  # the member's, with query
        socket = Socket(flow, protocol=protocol, model=protocol.session_model(target))
        self.sockets[flow.id] = socket
        self._connection_row(socket, closed=False)

    async def websocket_message(self, flow: http.HTTPFlow) -> None:
        """Fails closed itself: ``fail_closed`` would kill the flow, which does not stop a
        WebSocket message; a client message whose check raised is dropped instead."""
        if flow.websocket is None or not flow.websocket.messages:
            return
        message = flow.websocket.messages[-1]
        socket = self.sockets.get(flow.id)
        if socket is None:
            if WEBSOCKET in flow.metadata and message.from_client:
                message.drop()  # a socket we do not meter carries nothing upstream
            return
        try:
            await self._message(socket, message)
        except Exception as e:
            logger.error("websocket_message failed (%s); failing closed", type(e).__name__)
            if message.from_client and not message.injected:
                message.drop()
                self.core.metrics.refused.labels("internal_error").inc()
                self._inject(
                    flow,
                    socket.protocol.refusal(
                        500, "codex_gateway", "gateway_internal_error", "internal error"
                    ),
                )

    async def _message(self, socket: Socket, message: Any) -> None:
        flow = socket.flow
        member = flow.metadata[MEMBER]
        self.core.metrics.ws_messages.labels(
            member["member"], "client" if message.from_client else "server"
        ).inc()
        if message.injected:
            return
        if message.from_client:
            socket.client_messages += 1
        else:
            socket.upstream_messages += 1
        if message.from_client:
            try:
                body = read_client_message(message.content, message.is_text, body_decode.LIMITS)
            except UnreadMessage as e:
                # Nothing unread goes upstream; a request hears why (dropped unanswered, it
                # would leave Codex waiting for its idle timeout).
                message.drop()
                if e.code is not None:
                    self._refuse(
                        socket, message, None, 400, "invalid_request_error", e.code, str(e),
                        e.code,
                    )  # fmt: skip
                return
            if body.get("type") in socket.protocol.opens:
                await self._admit(socket, message, body)
            return
        try:
            event = loads_json(message.content) if message.is_text else None
        except ValueError:
            event = None
        if isinstance(event, dict):
            self._server_event(socket, event)

    def websocket_end(self, flow: http.HTTPFlow) -> None:
        socket = self.sockets.get(flow.id)
        if socket is not None:
            code = flow.websocket.close_code if flow.websocket is not None else None
            socket.close_reason = socket.close_reason or flow.metadata.get(CLOSED_BECAUSE)
            if REFUSED_AS in flow.metadata:
                self.core.metrics.refused.labels(str(flow.metadata[REFUSED_AS])).inc()
            if socket.close_reason is None and flow.websocket is not None:
                by = {True: " by the client", False: " by the upstream", None: ""}[
                    flow.websocket.closed_by_client
                ]
                socket.close_reason = f"closed{by} ({code})"
            self._end(socket, f"socket closed ({code}) before the turn ended")

    # -- turns --------------------------------------------------------------------------

    async def _admit(self, socket: Socket, message: Any, body: dict[str, Any]) -> None:
        """Let a ``response.create`` go upstream, or drop it and answer on the socket (in the
        route's ``error`` event shape). A member with a credit quota asking for a model the
        rate card cannot price is refused ``unpriced_model``, as on HTTP (403 there)."""
        core = self.core
        member = socket.flow.metadata[MEMBER]
        event_id = body.get("event_id") if isinstance(body.get("event_id"), str) else None
        entry = core.directory.by_key_id(member["key_id"])
        if entry is None:
            message.drop()
            code, text = core.directory.refusal(member["key_id"])
            if code == "invalid_member_key":  # revoked, or an identity removed
                code, text = revoked_reason(member["key_id"], text)
            self._close(socket, code, text)
            return
        if token_expired(member):  # an identity token's socket: renewed on a new one
            message.drop()
            self._close(socket, "invalid_identity_token", EXPIRED_ON_SOCKET, status=401)
            return
        if not core.database_ok or core.db is None:
            self._refuse(
                socket, message, event_id, 503, "codex_gateway", "usage_ledger_unavailable",
                "the gateway cannot reach its database to check quotas and record usage; "
                "try again shortly", "database_unavailable",
            )  # fmt: skip
            return
        if len(socket.turns) >= MAX_OPEN_TURNS:
            self._refuse(
                socket, message, event_id, 400, "invalid_request_error", "too_many_open_turns",
                f"{len(socket.turns)} responses are already in progress on this socket (the "
                f"gateway's limit is {MAX_OPEN_TURNS}); send the next when one has ended",
                "open_turns",
            )  # fmt: skip
            return
        model = socket.protocol.turn_model(body, socket.model)
        denied = model_refusal(entry, model)  # as on HTTP (member_models.ModelGate)
        if denied is not None:
            self._refuse(
                socket, message, event_id, 400, "invalid_request_error", "model_not_allowed",
                denied, "model_not_allowed", model=model, allowed=allowed_patterns(entry, model),
            )  # fmt: skip
            return
        tier = body.get("service_tier") if isinstance(body.get("service_tier"), str) else None
        limits = limits_of(entry)
        slots = entry["max_concurrent"]
        slot: str | None = None
        refresh_marker(member, entry)  # this turn's row names the team it is spent under
        team = TeamSlots.of(entry)
        team_active: int | None = None
        try:
            # The slot first, then the usage, as on HTTP (quota.py): every turn or request
            # that gave its slot back before this one took it has its row in the database by
            # now, so the usage read below counts it (the overshoot bound, docs/gateway.md).
            # One lease: a slot of the member and, in a team, one of its team's.
            lease, active, team_active = await core.acquire_slots(member["member_id"], slots, team)
            if lease is not None:
                self._slots += 1
                slot = f"{socket.flow.id}:ws{self._slots}"
                core.leases[slot] = lease
            usages = (
                await core.run_db(limit_usages, core, member["member_id"], limits) if limits else []
            )
        except SQLAlchemyError as e:
            logger.error("quota check failed: database error (%s)", type(e).__name__)
            if slot is not None:
                core.release_lease(slot, after_rows=False)
            if core.ledger is not None:
                core.ledger.healthy = False
            self._refuse(
                socket, message, event_id, 503, "codex_gateway", "usage_ledger_unavailable",
                "the gateway cannot reach its database; try again shortly",
                "database_unavailable",
            )  # fmt: skip
            return
        zero = {"input": 0, "cached": 0, "output": 0, "total": 0}
        if any(limit.kind == "credits" for limit in limits) and (
            core.card.charge(model, zero, None) is None
        ):
            if slot is not None:
                await core.give_back_lease(slot)  # nothing was spent: at once
            core.metrics.unpriced.labels(str(model or "")[:64]).inc()
            self._refuse(
                socket, message, event_id, 400, "invalid_request_error", "unpriced_model",
                unpriced_message(model, member["member"], core.card), "unpriced_model",
                model=model,
            )  # fmt: skip
            return
        refusal = usage_limit_error(member["member"], usages)
        if refusal is not None:
            if slot is not None:
                await core.give_back_lease(slot)  # nothing was spent: at once
            _, text, fields = refusal
            # ``headers``: the windows, as on an HTTP 429 (codex-rs reads a wrapped error
            # event's headers like a reply's).
            self._refuse(
                socket, message, event_id, 429, "usage_limit_reached", "quota_exceeded", text,
                "quota", **socket.protocol.quota_fields(usages), **fields,
            )  # fmt: skip
            return
        if team is not None and slot is None and team_active is not None:
            self._busy(socket, message, member, event_id, team.slots, team_active, team)
            return
        if (slots or team is not None) and slot is None:  # after the refusals, as on HTTP
            self._busy(socket, message, member, event_id, slots, active)
            return
        turn = Turn(
            model, tier, time.time(), client_event_id=event_id, warmup=body.get("generate") is False
        )
        turn.lease_slot = slot
        socket.turns.append(turn)
        socket.turns_opened += 0 if turn.warmup else 1
        turn.log = start_turn(socket.flow, socket.protocol.row_route, message)
        core.metrics.in_flight.inc()
        # Over a socket Codex reads its windows from this event, not from the 101's headers
        # (codex-rs responses_websocket.rs): sent before the upstream's first event.
        limits_event = socket.protocol.rate_limits(usages)
        if limits_event is not None:
            self._inject(socket.flow, limits_event)

    def _busy(
        self,
        socket: Socket,
        message: Any,
        member: dict[str, Any],
        event_id: str | None,
        slots: int,
        active: int,
        team: TeamSlots | None = None,
    ) -> None:
        """Drop a ``response.create`` of a member whose concurrency slots (or, with ``team``,
        its team's) are all taken and answer the route's busy event (Codex waits
        :data:`CONCURRENCY_RETRY_S` and resends)."""
        message.drop()
        self.core.metrics.refused.labels("concurrency").inc()
        record_refusal(self.core, member, "concurrency_limit", 429, socket.protocol.row_route)
        text = (
            f"member {member['member']!r} already has {active} requests in "
            f"flight (max_concurrent {slots})"
        )
        extra = {}
        if team is not None:
            text, extra = busy_text(member["member"], team, active), {"team": team.name}
        self._inject(
            socket.flow,
            socket.protocol.busy(
                text,
                CONCURRENCY_RETRY_S,
                event_id,
                limit="max_concurrent",
                used=active,
                allowed=slots,
                **extra,
            ),
        )

    def _refuse(
        self,
        socket: Socket,
        message: Any,
        event_id: str | None,
        status: int,
        type_: str,
        code: str,
        text: str,
        reason: str,
        **fields: Any,
    ) -> None:
        message.drop()
        self.core.metrics.refused.labels(reason).inc()
        record_refusal(
            self.core,
            socket.flow.metadata[MEMBER],
            code,
            status,
            socket.protocol.row_route,
            fields.get("model") if isinstance(fields.get("model"), str) else None,
        )
        self._inject(
            socket.flow,
            socket.protocol.refusal(status, type_, code, text, event_id, **fields),
        )

    def _server_event(self, socket: Socket, event: dict[str, Any]) -> None:
        protocol = socket.protocol
        model = protocol.server_model(event)
        if model is not None:
            socket.model = model
        if protocol.confirms(event):
            started = next((t for t in socket.turns if not t.confirmed), None)
            if started is None:
                started = self._started_by_server(socket, event)
            started.confirmed = True
            started.response_id = protocol.response_id(event)
        if not socket.turns:
            return
        turn = socket.turns[0]
        turn.events += 1
        if turn.first_event is None:
            turn.first_event = time.time()
        index = protocol.ended(event, socket.turns)
        if index is None:
            return
        turn = socket.turns.pop(index)
        response = event.get("response")
        if isinstance(response, dict):  # for telemetry's span
            turn.response_model = _str_or_none(response.get("model"))
            turn.response_id = turn.response_id or _str_or_none(response.get("id"))
        error = None
        if event.get("type") == "error":
            detail = event.get("error")
            detail = detail if isinstance(detail, dict) else {}
            error = f"error event: {str(detail.get('code') or detail.get('type'))[:100]}"
        self._row(
            socket,
            turn,
            protocol.end_status(event),
            protocol.usage(event),
            protocol.turn_status(event),
            error,
        )
        if not keeps_messages():
            forget_taken(socket.flow, [t.log for t in socket.turns if t.log is not None])

    def _started_by_server(self, socket: Socket, event: dict[str, Any]) -> Turn:
        """A response the server started itself (Realtime turn detection on audio): a turn
        metered when it ends like the others, and checked now, as nothing of the client's
        asked for it (:meth:`_check_started`)."""
        turn = Turn(socket.model, None, time.time())
        socket.turns.append(turn)
        socket.turns_opened += 1
        self.core.metrics.in_flight.inc()
        response = event.get("response")
        response_id = response.get("id") if isinstance(response, dict) else None
        if isinstance(response_id, str):
            check = asyncio.get_running_loop().create_task(
                self._check_started(socket, socket.model, response_id)
            )
            self._checks.add(check)
            check.add_done_callback(self._checks.discard)
        return turn

    def _row(
        self,
        socket: Socket,
        turn: Turn,
        status: int | None,
        usage: dict[str, int] | None,
        turn_status: Any,
        error: str | None,
    ) -> None:
        core = self.core
        end_turn(
            socket.flow,
            turn.log,
            status,
            error,
            model=turn.model,
            usage=usage,
            turn_status=turn_status if isinstance(turn_status, str) else None,
        )
        self._release(turn)
        core.metrics.in_flight.dec()
        member = socket.flow.metadata[MEMBER]
        row = ledger_row(
            core,
            member,
            TurnFacts(
                model=turn.model,
                service_tier=turn.service_tier,
                route=socket.protocol.row_route,
                status=status,
                usage=usage,
                events=turn.events,
                turn_status=turn_status if isinstance(turn_status, str) else None,
                error=error,
                started=turn.started,
                ended=time.time(),
                ttfb_ms=(
                    max(0, int((turn.first_event - turn.started) * 1000))
                    if turn.first_event is not None
                    else None
                ),
                upstream_key=socket.flow.metadata.get(UPSTREAM_KEY),
                warmup=turn.warmup,
            ),
        )
        if core.ledger is None:
            logger.error("usage row lost: the gateway's database is closed")
            return
        core.ledger.add(row)
        observe_row(core, member["member"], row)
        genai.socket_turn(  # gen_ai_* histograms, OTLP span
            core,
            socket.flow,
            row,
            usage,
            turn_status if isinstance(turn_status, str) else None,
            turn.started,
            turn.first_event,
            turn.response_id,
            realtime=socket.protocol.name == "realtime",
            response_model=turn.response_model,
        )

    def _release(self, turn: Turn) -> None:
        if turn.lease_slot is None:
            return
        self.core.release_lease(turn.lease_slot)
        turn.lease_slot = None

    def _end(self, socket: Socket, error: str) -> None:
        """The socket is gone: rows for turns still open, the upstream key given back."""
        self.sockets.pop(socket.flow.id, None)
        for turn in socket.turns:
            self._row(socket, turn, None, None, None, error)
        socket.turns.clear()
        self.forwarder.finished(socket.flow)
        self.core.metrics.ws_open.dec()
        self._connection_row(socket, closed=True)

    def _connection_row(self, socket: Socket, closed: bool) -> None:
        """Queue the socket's ``ws_connections`` row: its open row (no ``closed_ms`` /
        ``duration_ms``), or its closed row, which replaces it (same ``row_id``)."""
        ledger = self.core.ledger
        if ledger is None:
            logger.error("connection row lost: the gateway's database is closed")
            return
        member = socket.flow.metadata[MEMBER]
        now = time.time()
        ledger.add(
            {
                "table": WS_CONNECTIONS,
                "row_id": socket.row_id,
                "member_id": member["member_id"],
                "key_id": member["key_id"],
                "upstream_key": socket.flow.metadata.get(UPSTREAM_KEY),
                "route": socket.protocol.row_route,
                "model": socket.model,
                "opened_ms": int(socket.opened * 1000),
                "closed_ms": int(now * 1000) if closed else None,
                "duration_ms": max(0, int((now - socket.opened) * 1000)) if closed else None,
                "client_messages": socket.client_messages,
                "upstream_messages": socket.upstream_messages,
                "turns": socket.turns_opened,
                "close_reason": (socket.close_reason or "")[:200] or None if closed else None,
                "instance": self.core.instance,
            }
        )

    # -- closing ------------------------------------------------------------------------

    def _inject(self, flow: http.HTTPFlow, data: bytes, to_client: bool = True) -> None:
        ctx.master.commands.call("inject.websocket", flow, to_client, data, True)

    async def _check_started(self, socket: Socket, model: str | None, response_id: str) -> None:
        """A response the server started itself, checked once it has started: when the
        member is over a limit (or has a credit quota and the model is unpriced), it is
        cancelled upstream (``response.cancel``; its ``response.done`` still brings the usage
        so far) and the member is told why with the route's error event. Never raises."""
        try:
            core = self.core
            member = socket.flow.metadata[MEMBER]
            entry = core.directory.by_key_id(member["key_id"])
            limits = limits_of(entry) if entry is not None else []
            if not limits or core.db is None:
                return  # no limits; a revoked key is closed by the watcher
            usages = await core.run_db(limit_usages, core, member["member_id"], limits)
            refusal = usage_limit_error(member["member"], usages)
            zero = {"input": 0, "cached": 0, "output": 0, "total": 0}
            if refusal is not None:
                type_, code, text, fields = "usage_limit_reached", "quota_exceeded", *refusal[1:]
            elif any(limit.kind == "credits" for limit in limits) and (
                core.card.charge(model, zero, None) is None
            ):
                type_, code, fields = "invalid_request_error", "unpriced_model", {"model": model}
                text = f"model {model!r} has no entry in the gateway's rate card, and member "
                text += f"{member['member']!r} has a credit quota"
            else:
                return
            if socket.flow.id not in self.sockets:
                return
            core.metrics.refused.labels("quota" if refusal else "unpriced_model").inc()
            record_refusal(core, member, code, 429, socket.protocol.row_route, model)
            cancel = {"type": "response.cancel", "response_id": response_id}
            self._inject(socket.flow, json.dumps(cancel).encode(), to_client=False)
            self._inject(socket.flow, socket.protocol.refusal(429, type_, code, text, **fields))
        except Exception as e:
            logger.error("check of a server-started response failed (%s)", type(e).__name__)

    def _close(self, socket: Socket, code: str, text: str, status: int = 400) -> None:
        """Tell the member why, then close its socket (the upstream side follows)."""
        if socket.closing:
            return
        socket.closing = True
        socket.close_reason = text
        mark_closed_by_proxy(socket.flow, text)  # the flow log names it, not "abnormal"
        self.core.metrics.refused.labels(code).inc()
        record_refusal(
            self.core, socket.flow.metadata[MEMBER], code, status, socket.protocol.row_route
        )
        # 400: Codex ends the turn at once and shows the event (401 is retried, measured).
        self._inject(
            socket.flow, socket.protocol.refusal(status, "invalid_request_error", code, text)
        )
        asyncio.get_running_loop().call_later(0.05, self._drop_connection, socket.flow)

    @staticmethod
    def _drop_connection(flow: http.HTTPFlow) -> None:
        """Close the client connection of ``flow``: the WebSocket layer then closes the upstream
        side and ``websocket_end`` runs. mitmproxy has no public command for this; its proxy
        server's connection handler (``close_connection``) is the seam."""
        server = ctx.master.addons.get("proxyserver")
        handler = server.connections.get(flow.client_conn.id) if server is not None else None
        if handler is not None:
            handler.close_connection(flow.client_conn)

    async def _watch_revocations(self) -> None:
        while True:
            await asyncio.sleep(REVOKE_CHECK_S)
            try:
                self._close_revoked()
            except Exception as e:  # never let the watcher die
                logger.error("revocation check failed (%s)", type(e).__name__)

    def _close_revoked(self) -> None:
        """Close every open socket whose member key left the directory. (A function of its
        own: the watcher's frame keeps no reference to a socket, so a closed socket's flow and
        its messages are freed, not held until the next socket opens.)"""
        for socket in list(self.sockets.values()):
            key_id = socket.flow.metadata[MEMBER]["key_id"]
            if self.core.directory.by_key_id(key_id) is None:
                code, text = self.core.directory.refusal(key_id)
                expired = code == "expired_member_key"
                logger.info("member key %s %s: closing its socket", key_id,
                            "expired" if expired else "revoked")  # fmt: skip
                self._close(socket, *((code, text) if expired else revoked_reason(key_id)))
