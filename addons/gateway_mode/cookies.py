"""The gateway forwards no cookies, in either direction."""

from __future__ import annotations

from mitmproxy import http

from addons.common import fail_closed
from addons.gateway_mode.core import MEMBER
from addons.routing import drop_headers

REQUEST_COOKIES = frozenset({b"cookie", b"cookie2"})
RESPONSE_COOKIES = frozenset({b"set-cookie", b"set-cookie2"})


class NoCookies:
    """Drops ``Cookie`` from member requests (``requestheaders``) and ``Set-Cookie`` from
    upstream replies (``responseheaders``, before anything reaches the client).

    A cookie from one member's client must not ride along to the team's upstream account, and
    an upstream's cookie (e.g. a CDN's) must not be handed to every member. (The Rust
    codex-gateway forwards them.) Unlike the strict proxy, which mirrors the upstream
    byte for byte, the gateway is the team's one client of the upstream.
    """

    @fail_closed
    def requestheaders(self, flow: http.HTTPFlow) -> None:
        if flow.response or flow.error or not flow.live or MEMBER not in flow.metadata:
            return
        drop_headers(flow.request.headers, REQUEST_COOKIES)

    @fail_closed
    def responseheaders(self, flow: http.HTTPFlow) -> None:
        if flow.response is None or MEMBER not in flow.metadata:
            return
        drop_headers(flow.response.headers, RESPONSE_COOKIES)
