"""WebSocket refusal: answer 426 so Codex falls back to plain HTTP at once."""

from __future__ import annotations

import logging

from mitmproxy import http

from addons.allowlist import DEFAULT_ROUTE
from addons.common import ALLOWED, REFUSED, WEBSOCKET, fail_closed, json_response

logger = logging.getLogger(__name__)


def is_websocket_upgrade(request: http.Request) -> bool:
    """Whether the request asks to switch to WebSocket (``Upgrade: websocket``, any case)."""
    return any(
        token.strip().lower() == "websocket"
        for value in request.headers.get_all("upgrade")
        for token in value.split(",")
    )


class WebSocketRefusal:
    """Answers ``426 Upgrade Required`` to a WebSocket upgrade for ``/v1/responses``.

    Codex (with ``supports_websockets = true``) first tries ``GET /v1/responses`` with
    ``Upgrade: websocket``. On 426 it falls back to HTTP at once; on 403 it retries for ~6 s
    (verified, see CODEX.md). No WebSocket is ever opened upstream: the reply is local, made in
    ``requestheaders``. Upgrades to other paths are left to the allowlist (403). An upgrade a
    mode has accepted (``flow.metadata[WEBSOCKET]``, only the gateway with ``--websockets``)
    is left alone.
    """

    @fail_closed
    def requestheaders(self, flow: http.HTTPFlow) -> None:
        if flow.response or flow.error or not flow.live or WEBSOCKET in flow.metadata:
            return
        request = flow.request
        if request.path.split("?", 1)[0] != DEFAULT_ROUTE or not is_websocket_upgrade(request):
            return
        flow.metadata.pop(ALLOWED, None)
        flow.metadata[REFUSED] = "websocket"
        logger.info("refused WebSocket upgrade for %s with 426", DEFAULT_ROUTE)
        flow.response = json_response(
            426,
            "websocket_not_supported",
            "WebSockets are not supported by this proxy; use HTTP "
            "(set supports_websockets = false for this provider in Codex's config.toml)",
        )
