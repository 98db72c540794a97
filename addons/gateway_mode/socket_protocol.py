"""What differs between the WebSocket routes the gateway meters: one small protocol object per
route, read by :mod:`addons.gateway_mode.websocket` (which does the rest the same way for
both: member auth on the upgrade, quota check before a turn goes upstream, a concurrency slot
per open turn, a ledger row per turn end, revocation, the connection's row).

- :data:`RESPONSES`: Codex's ``GET /v1/responses`` (``response.create`` opens a turn;
  ``response.completed`` / ``failed`` / ``incomplete`` or ``error`` ends it; usage from
  ``response.usage`` as in the SSE stream; the refusal is Codex's ``error`` event with a
  ``status``, busy slots a ``response.failed`` Codex waits out, and each admitted turn is
  preceded by the member's windows in a ``codex.rate_limits`` event).
- :data:`REALTIME`: the OpenAI Realtime API's ``GET /v1/realtime?model=…`` (``response.create``
  opens a turn; ``response.done`` ends it, or an ``error`` that answers the turn's client
  event before the server confirmed it with ``response.created``; usage from
  ``response.done``'s ``response.usage`` — ``input_tokens``, ``output_tokens``,
  ``total_tokens``, ``input_token_details.cached_tokens``; the model from the URL's ``model``
  and the session events; the refusal is the Realtime ``error`` event, ``{"type": "error",
  "event_id", "error": {"type", "code", "message", "param", "event_id"}}``, for busy slots
  too; no Codex-only event). Responses the server starts itself (server-side turn detection
  on audio) are turns too, checked once started (``response.created``) and metered when they
  end.
"""

from __future__ import annotations

import json
import urllib.parse
import uuid
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from mitmproxy import http

from addons.gateway_mode.windows import (
    LimitUsage,
    codex_rate_limit_headers,
    codex_rate_limits_event,
)
from addons.responses_turn import usage_of
from addons.websocket_refusal import is_websocket_upgrade

#: Query parameters a member may put on ``/v1/realtime`` (``model`` required, once).
#: ``call_id`` (joining a call by id) is not among them: a call belongs to whoever holds
#: its id on the upstream account, which every member shares.
REALTIME_QUERY = frozenset({"model", "intent"})


def error_event(status: int, type_: str, code: str, message: str, **fields: Any) -> bytes:
    """An ``error`` event for a Codex socket: ``{"type": "error", "status": status, "error":
    {"type", "code", "message", **fields}}``. With ``status`` 429 and ``type``
    ``usage_limit_reached`` plus ``resets_at`` (Unix s), Codex 0.171 ends the turn at once with
    "You've hit your usage limit. Try again at …" (measured; docs/gateway.md, "Codex's
    WebSocket transport")."""
    error = {"type": type_, "code": code, "message": message, **fields}
    return json.dumps({"type": "error", "status": status, "error": error}).encode()


def busy_event(text: str, retry_s: int) -> bytes:
    """The socket's answer to a ``response.create`` while the member's concurrency slots are
    all taken: ``response.failed`` whose ``error`` is ``rate_limit_exceeded`` with "Please try
    again in {retry_s}s." in its message, the one wording codex-rs reads a delay from
    (``sse/responses.rs`` ``try_parse_retry_after``). Measured with Codex 0.171: it waits that
    long and retries on a new socket, up to 5 times ("Reconnecting... n/5"), then falls back to
    HTTP, where the 429's ``Retry-After`` is retried again; an ``error`` event with status 429
    instead ends its turn at once ("exceeded retry limit, last status: 429")."""
    response = {
        "id": "resp_gateway_busy",
        "object": "response",
        "status": "failed",
        "error": {
            "code": "rate_limit_exceeded",
            "message": f"{text}. Please try again in {retry_s}s.",
        },
    }
    return json.dumps({"type": "response.failed", "response": response}).encode()


def realtime_error_event(
    type_: str, code: str, message: str, client_event_id: str | None = None, **fields: Any
) -> bytes:
    """A Realtime API ``error`` server event: ``{"type": "error", "event_id": "event_gw…",
    "error": {"type", "code", "message", "param": null, "event_id": <the client event it
    answers>, **fields}}`` (the shape of OpenAI's Realtime reference, ``RealtimeErrorEvent``,
    which the openai SDK parses)."""
    error = {
        "type": type_,
        "code": code,
        "message": message,
        "param": None,
        "event_id": client_event_id,
        **fields,
    }
    event_id = "event_gw" + uuid.uuid4().hex[:20]
    return json.dumps({"type": "error", "event_id": event_id, "error": error}).encode()


def _origin_form(request: http.Request) -> bool:
    return not (request.authority and not (request.is_http2 or request.is_http3))


def is_responses_upgrade(request: http.Request) -> bool:
    """Whether ``request`` is exactly ``GET /v1/responses`` (raw target, no query, origin
    form, as the allowlist's rule for POST) asking to switch to WebSocket."""
    return (
        request.data.method == b"GET"
        and request.data.path == RESPONSES_PATH.encode()
        and _origin_form(request)
        and is_websocket_upgrade(request)
    )


def realtime_query(raw_path: bytes) -> dict[str, str] | None:
    """The query of a ``/v1/realtime?…`` target as ``{name: value}`` when it is one the
    gateway serves: path exactly ``/v1/realtime``, ``model`` present once and not empty, every
    name in :data:`REALTIME_QUERY` and none twice. ``None`` otherwise."""
    path, sep, query = raw_path.partition(b"?")
    if path != REALTIME_PATH.encode() or not sep:
        return None
    try:
        pairs = urllib.parse.parse_qsl(
            query.decode("ascii"), keep_blank_values=True, strict_parsing=True
        )
    except (UnicodeDecodeError, ValueError):
        return None
    names = [name for name, _ in pairs]
    if len(set(names)) != len(names) or not set(names) <= REALTIME_QUERY:
        return None
    params = dict(pairs)
    model = params.get("model", "")
    if not model or len(model) > 200 or any(ord(c) < 0x21 or ord(c) == 0x7F for c in model):
        return None
    return params


def is_realtime_upgrade(request: http.Request) -> bool:
    """Whether ``request`` is ``GET /v1/realtime?model=…`` (origin form, see
    :func:`realtime_query`) asking to switch to WebSocket."""
    return (
        request.data.method == b"GET"
        and _origin_form(request)
        and realtime_query(request.data.path) is not None
        and is_websocket_upgrade(request)
    )


RESPONSES_PATH = "/v1/responses"
REALTIME_PATH = "/v1/realtime"


@dataclass(frozen=True)
class SocketProtocol:
    """One WebSocket route's turns on the wire; this base class is Codex's
    ``/v1/responses`` (see the module docstring), :class:`RealtimeProtocol` overrides what
    differs.

    ``name`` is the flow marker's value, ``path`` the route, ``row_route`` the ledger rows'
    ``route``, ``opens`` the client event types that open a turn (each checked against the
    member's quotas first), ``ends`` the server event types that may end one."""

    name: str
    path: str
    row_route: str
    opens: frozenset[str]
    ends: frozenset[str]

    def claims(self, request: http.Request) -> bool:
        """Whether this route serves the upgrade ``request``."""
        return is_responses_upgrade(request)

    def session_model(self, target: str) -> str | None:
        """The model the socket's session starts with, from the member's request target
        (``None``: each turn names its own)."""
        return None

    def turn_model(self, body: dict[str, Any], session_model: str | None) -> str | None:
        """The model of the turn ``body`` (a client event that opens one) asks for."""
        model = body.get("model")
        return model if isinstance(model, str) else session_model

    def server_model(self, event: dict[str, Any]) -> str | None:
        """A model the server's ``event`` names for the session from now on, if any."""
        return None

    def confirms(self, event: dict[str, Any]) -> bool:
        """Whether ``event`` says the server started the oldest open turn."""
        return False

    def response_id(self, event: dict[str, Any]) -> str | None:
        """The ``response.id`` an event carries, if any."""
        response = event.get("response")
        rid = response.get("id") if isinstance(response, dict) else None
        return rid if isinstance(rid, str) else None

    def ended(self, event: dict[str, Any], turns: Sequence[Any]) -> int | None:
        """The index in ``turns`` (the socket's open turns, oldest first: ``confirmed``,
        ``response_id``, ``client_event_id``) of the turn the server ``event`` ends, if any.
        Codex's turns end in order."""
        return 0 if turns and event.get("type") in self.ends else None

    def usage(self, event: dict[str, Any]) -> dict[str, int] | None:
        """Token usage of a turn-ending ``event``, as :func:`usage_of` gives it."""
        response = event.get("response")
        return usage_of(response) if isinstance(response, dict) else None

    def turn_status(self, event: dict[str, Any]) -> str | None:
        """The ended turn's ``response.status`` (``completed``, ``failed``…), if any."""
        response = event.get("response")
        status = response.get("status") if isinstance(response, dict) else None
        return status if isinstance(status, str) else None

    def end_status(self, event: dict[str, Any]) -> int | None:
        """The ledger row's ``status``: 200 for a response, an ``error`` event's ``status``."""
        if event.get("type") != "error":
            return 200
        status = event.get("status")
        return status if isinstance(status, int) and not isinstance(status, bool) else None

    def refusal(
        self,
        status: int,
        type_: str,
        code: str,
        message: str,
        client_event_id: str | None = None,
        **fields: Any,
    ) -> bytes:
        """The ``error`` event answering a refused client event (``status``: the HTTP status
        the same refusal has on HTTP)."""
        return error_event(status, type_, code, message, **fields)

    def quota_fields(self, usages: list[LimitUsage]) -> dict[str, Any]:
        """Extra fields of a quota refusal: Codex's rate-limit headers of the member's windows
        (codex-rs reads a wrapped error event's ``headers`` like a reply's)."""
        return {"headers": codex_rate_limit_headers(usages)}

    def busy(self, text: str, retry_s: int, client_event_id: str | None, **fields: Any) -> bytes:
        """The answer to a turn while all of the member's concurrency slots are taken:
        :func:`busy_event` (Codex waits ``retry_s`` and retries)."""
        return busy_event(text, retry_s)

    def rate_limits(self, usages: list[LimitUsage]) -> bytes | None:
        """An event sent before an admitted turn's first upstream event: the member's windows
        in Codex's ``codex.rate_limits`` event (``None`` without limits)."""
        event = codex_rate_limits_event(usages)
        return json.dumps(event).encode() if event is not None else None


@dataclass(frozen=True)
class RealtimeProtocol(SocketProtocol):
    """The OpenAI Realtime API (see the module docstring)."""

    def claims(self, request: http.Request) -> bool:
        return is_realtime_upgrade(request)

    def session_model(self, target: str) -> str | None:
        return (realtime_query(target.encode()) or {}).get("model")

    def turn_model(self, body: dict[str, Any], session_model: str | None) -> str | None:
        return session_model  # a response.create names no model: the session's

    def server_model(self, event: dict[str, Any]) -> str | None:
        if event.get("type") not in ("session.created", "session.updated"):
            return None
        session = event.get("session")
        model = session.get("model") if isinstance(session, dict) else None
        return model[:200] if isinstance(model, str) and model else None

    def confirms(self, event: dict[str, Any]) -> bool:
        return event.get("type") == "response.created"

    def ended(self, event: dict[str, Any], turns: Sequence[Any]) -> int | None:
        """``response.done`` ends the turn of its ``response.id`` (else the oldest); an
        ``error`` ends the turn whose ``response.create`` it answers (its ``event_id``; the
        oldest not started when it names none) if the server has not started it: an error
        about a started response is followed by that response's ``response.done``."""
        kind = event.get("type")
        if kind == "response.done":
            rid = self.response_id(event)
            index = next((i for i, t in enumerate(turns) if rid and t.response_id == rid), 0)
            return index if turns else None
        if kind != "error":
            return None
        error = event.get("error")
        answers = error.get("event_id") if isinstance(error, dict) else None
        return next(
            (
                i
                for i, t in enumerate(turns)
                if not t.confirmed and (answers is None or t.client_event_id == answers)
            ),
            None,
        )

    def usage(self, event: dict[str, Any]) -> dict[str, int] | None:
        response = event.get("response")
        usage = response.get("usage") if isinstance(response, dict) else None
        if not isinstance(usage, dict):
            return None

        def num(value: Any) -> int:
            return value if isinstance(value, int) and not isinstance(value, bool) else 0

        details = usage.get("input_token_details")
        details = details if isinstance(details, dict) else {}
        return {
            "input": num(usage.get("input_tokens")),
            "cached": num(details.get("cached_tokens")),
            "cache_write": 0,
            "output": num(usage.get("output_tokens")),
            "reasoning": 0,
            "total": num(usage.get("total_tokens")),
        }

    def end_status(self, event: dict[str, Any]) -> int | None:
        return 200 if event.get("type") == "response.done" else None

    def refusal(
        self,
        status: int,
        type_: str,
        code: str,
        message: str,
        client_event_id: str | None = None,
        **fields: Any,
    ) -> bytes:
        return realtime_error_event(type_, code, message, client_event_id, **fields)

    def quota_fields(self, usages: list[LimitUsage]) -> dict[str, Any]:
        return {}  # Codex's headers mean nothing to a Realtime client

    def busy(self, text: str, retry_s: int, client_event_id: str | None, **fields: Any) -> bytes:
        return realtime_error_event(
            "codex_gateway",
            "concurrency_limit",
            f"{text}; try again in {retry_s}s",
            client_event_id,
            **fields,
        )

    def rate_limits(self, usages: list[LimitUsage]) -> bytes | None:
        return None  # a Codex-only event: a Realtime client would not know it


RESPONSES = SocketProtocol(
    name="responses",
    path=RESPONSES_PATH,
    row_route="ws:/v1/responses",
    opens=frozenset({"response.create"}),
    ends=frozenset({"response.completed", "response.failed", "response.incomplete", "error"}),
)
REALTIME = RealtimeProtocol(
    name="realtime",
    path=REALTIME_PATH,
    row_route="ws:/v1/realtime",
    opens=frozenset({"response.create"}),
    ends=frozenset({"response.done", "error"}),
)
#: Every WebSocket route the gateway serves, by marker value.
PROTOCOLS = {p.name: p for p in (RESPONSES, REALTIME)}


def protocol_for(request: http.Request) -> SocketProtocol | None:
    """The protocol serving the upgrade ``request``, ``None`` when none claims it."""
    return next((p for p in PROTOCOLS.values() if p.claims(request)), None)
