"""``--http-shutdown``: ``GET /shutdown`` answers 200 and stops the proxy with exit code 0."""

from __future__ import annotations

import logging

from mitmproxy import connection, ctx, http

from addons.common import ALLOWED, REFUSED, SERVER_NAME, fail_closed

logger = logging.getLogger(__name__)

SHUTDOWN_PATH = "/shutdown"


class HttpShutdown:
    """Same contract as the reference proxy's ``--http-shutdown``.

    With ``codex_http_shutdown`` on, ``GET /shutdown`` (exact target) gets ``200`` with an empty
    body and ``Connection: close``; mitmproxy then closes that client connection, and when it is
    gone (``client_disconnected``) the master shuts down, so the reply always reaches the caller
    before the process exits 0. Without the option the request falls through to the allowlist
    (403). Exists because an unprivileged agent cannot signal a root-owned proxy.
    """

    def __init__(self) -> None:
        self.enabled = False
        self._closing: set[str] = set()

    def load(self, loader) -> None:
        loader.add_option(
            "codex_http_shutdown",
            bool,
            False,
            "Enable GET /shutdown: answer 200 and exit 0 "
            "(as the reference proxy's --http-shutdown).",
        )

    def configure(self, updated: set[str]) -> None:
        if "codex_http_shutdown" in updated:
            self.enabled = ctx.options.codex_http_shutdown

    @fail_closed
    def requestheaders(self, flow: http.HTTPFlow) -> None:
        if flow.response or flow.error or not flow.live or not self.enabled:
            return
        if flow.request.data.method != b"GET" or flow.request.path != SHUTDOWN_PATH:
            return
        flow.metadata.pop(ALLOWED, None)
        flow.metadata[REFUSED] = "shutdown"
        flow.response = http.Response.make(200, b"", {"server": SERVER_NAME, "connection": "close"})
        self._closing.add(flow.client_conn.id)
        logger.info("shutdown requested over HTTP")

    def client_disconnected(self, client: connection.Client) -> None:
        if client.id in self._closing:
            self._closing.discard(client.id)
            self.shutdown()

    def shutdown(self) -> None:
        """Stop mitmproxy; a seam tests replace."""
        ctx.master.shutdown()
