"""Codex's own language on every reply to a member: its rate-limit headers carry the member's
gateway windows, and local refusals use the statuses Codex acts on.

What Codex 0.171 does with a reply from a custom provider (measured against loopback fakes,
docs/gateway.md "What a member sees in Codex"):

- ``x-codex-primary-*`` / ``x-codex-secondary-*`` / ``x-codex-credits-*`` headers on any reply
  are recorded in the session's ``rate_limits`` (what its ``/status`` and status line read).
- ``400``: the turn ends at once (one request), and Codex prints the body.
- ``401``, ``403``, ``404``, ``405``, ``413``: retried 5 times (about 8 s, six requests), then
  ``unexpected status 403 Forbidden: <error.message>``.
- ``429`` with ``error.type = usage_limit_reached``: the turn ends at once with "You've hit
  your usage limit. Try again at <resets_at>." (the quota check's shape); any other ``429``
  is retried after its ``Retry-After``; ``5xx`` is retried (30 requests over five rounds).
"""

from __future__ import annotations

import logging

from mitmproxy import http
from sqlalchemy.exc import SQLAlchemyError

from addons.common import LOCAL_REPLY_HEADER, REFUSED, WEBSOCKET, fail_closed
from addons.gateway_mode.codex_filter import looks_like_codex
from addons.gateway_mode.core import MEMBER, GatewayCore
from addons.gateway_mode.forward import NO_KEY_UNTIL_RESTART
from addons.gateway_mode.oidc import IDENTITY_REFUSAL
from addons.gateway_mode.quota import CODEX_LIMITS, codex_limits
from addons.gateway_mode.windows import limits_of

logger = logging.getLogger(__name__)

#: Refusal statuses Codex retries although nothing will change (a bad key, a route that is
#: not allowed, a model the rate card cannot price, a body past the decode limit): answered
#: 400 to Codex instead.
PERMANENT_STATUSES = frozenset({401, 403, 404, 405, 413})
#: Headers OpenAI's backend sends about *its* account's limits (the operator's): never
#: passed to a member, whose own windows replace them.
CODEX_HEADER_PREFIX = "x-codex-"


def for_codex(request: http.Request) -> bool:
    """Whether the request comes from Codex, judged by headers alone (its User-Agent, or its
    session/turn headers; :func:`addons.gateway_mode.codex_filter.looks_like_codex`)."""
    return looks_like_codex(request, None)


def falls_back_to_http(request: http.Request) -> bool:
    """Whether a WebSocket upgrade comes from Codex's Responses WebSocket client, which
    announces its protocol (``openai-beta: responses_websockets=<date>``) and, answered 426,
    sends the turn over HTTP at once (measured with Codex 0.171; CODEX.md)."""
    return "responses_websockets" in request.headers.get("openai-beta", "")


def strip_upstream_codex_headers(response: http.Response) -> None:
    """Remove every ``x-codex-*`` header but our own local-reply marker."""
    for name in {n.lower() for n in response.headers.keys()}:
        if name.startswith(CODEX_HEADER_PREFIX) and name != LOCAL_REPLY_HEADER:
            del response.headers[name]


class CodexReplies:
    """Shapes what a member's Codex receives (after every refusing addon and the forwarder).

    - A local refusal Codex would retry in vain (:data:`PERMANENT_STATUSES`, and the 503 of
      an upstream key pool disabled until restart) is answered 400 when the request comes
      from Codex, so the turn ends at once with the refusal's JSON (code and message) on
      screen; other clients keep the HTTP status (401, 403, 503...). A refused upgrade from
      Codex's WebSocket client (:func:`falls_back_to_http`) is answered 426 instead: Codex
      then sends the turn over HTTP at once and gets that 400 (docs/gateway.md, "Codex's
      WebSocket transport").
    - Every reply to a member with limits carries the member's windows in Codex's
      rate-limit headers (read by the quota check; for a refusal that came before it, read
      here); upstream ``x-codex-*`` headers are removed first.
    """

    def __init__(self, core: GatewayCore) -> None:
        self.core = core

    @fail_closed
    def requestheaders(self, flow: http.HTTPFlow) -> None:
        self._permanent_to_400(flow)

    @fail_closed
    async def request(self, flow: http.HTTPFlow) -> None:
        self._permanent_to_400(flow)
        if flow.response is not None and REFUSED in flow.metadata:
            await self._read_limits(flow)

    @fail_closed
    def responseheaders(self, flow: http.HTTPFlow) -> None:
        self._headers(flow)

    @fail_closed
    def response(self, flow: http.HTTPFlow) -> None:
        self._permanent_to_400(flow)  # the forwarder's refusal of a failed handshake
        self._headers(flow)

    @staticmethod
    def _permanent_to_400(flow: http.HTTPFlow) -> None:
        response = flow.response
        if (
            response is not None
            and REFUSED in flow.metadata
            and flow.metadata[REFUSED] != IDENTITY_REFUSAL  # 401: Codex renews its token
            and (
                response.status_code in PERMANENT_STATUSES
                or flow.metadata[REFUSED] == NO_KEY_UNTIL_RESTART
            )
            and for_codex(flow.request)
        ):
            if WEBSOCKET in flow.metadata and falls_back_to_http(flow.request):
                # A refused upgrade's body reaches Codex's screen only now and then (its
                # WebSocket client reads what came with the head: "" or "Unknown error" is
                # what the member saw); with 426 it posts the turn over HTTP at once, and
                # that refusal's 400 shows the cause (measured, Codex 0.171).
                response.status_code = 426
                response.reason = "Upgrade Required"
                return
            response.status_code = 400
            response.reason = "Bad Request"

    async def _read_limits(self, flow: http.HTTPFlow) -> None:
        """The member's windows for a refusal made before the quota check read them."""
        core = self.core
        member = flow.metadata.get(MEMBER)
        if member is None or CODEX_LIMITS in flow.metadata or not core.database_ok:
            return
        entry = core.directory.by_key_id(member["key_id"])
        limits = limits_of(entry) if entry is not None else []
        if not limits:
            return
        try:
            flow.metadata[CODEX_LIMITS] = await core.run_db(
                codex_limits, core, member["member_id"], limits
            )
        except SQLAlchemyError as e:  # the refusal goes out without the windows
            logger.warning("member windows unread: database error (%s)", type(e).__name__)

    @staticmethod
    def _headers(flow: http.HTTPFlow) -> None:
        response = flow.response
        if response is None:
            return
        strip_upstream_codex_headers(response)
        limits = flow.metadata.get(CODEX_LIMITS)
        if MEMBER in flow.metadata and isinstance(limits, dict):
            response.headers.update(limits)
