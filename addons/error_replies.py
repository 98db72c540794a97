"""JSON bodies for the error replies mitmproxy itself sends (502 upstream down, 400, 413, ...)."""

from __future__ import annotations

import json
import logging

from mitmproxy import http, version
from mitmproxy.net.http import http1
from mitmproxy.proxy.layers.http import _http1

from addons.common import LOCAL_REPLY_HEADER

logger = logging.getLogger(__name__)

ERROR_CODES = {
    400: "bad_request",
    408: "request_timeout",
    413: "request_too_large",
    431: "request_headers_too_large",
    502: "upstream_error",
    504: "upstream_timeout",
}


def render_error_reply(status_code: int, message: str = "") -> bytes:
    """The raw HTTP/1 reply for a mitmproxy-generated error, with a JSON body in the OpenAI
    error shape: ``{"error": {"type": "codex_proxy", "code": ..., "message": ...}}``.

    Same signature and headers (``Server``, ``Connection: close``) as mitmproxy 12.2's
    ``_http1.make_error_response``, which renders an HTML page instead. ``message`` is
    mitmproxy's own text (e.g. "Connection refused", a TLS verification error); it never holds
    request headers, so never the key.
    """
    code = ERROR_CODES.get(status_code, "proxy_error")
    body = json.dumps(
        {
            "error": {
                "type": "codex_proxy",
                "code": code,
                "message": message or "proxy error",
            }
        },
        ensure_ascii=False,
    ).encode()
    reply = http.Response.make(
        status_code,
        body,
        http.Headers(
            [
                (b"Server", version.MITMPROXY.encode()),
                (b"Connection", b"close"),
                (b"Content-Type", b"application/json"),
                (LOCAL_REPLY_HEADER.encode(), code.encode()),
            ]
        ),
    )
    return http1.assemble_response(reply)


class JsonErrorReplies:
    """Makes mitmproxy's own error replies JSON, so Codex (and a human) can read them.

    mitmproxy answers an unreachable or failing upstream (502), a malformed request (400) or a
    body over ``body_size_limit`` (413) itself, with an HTML page, and an addon cannot replace
    that reply (setting ``flow.response`` in the ``error`` hook has no effect). This addon swaps
    the one module-level function that renders those pages, and puts it back in ``done`` (also
    on script reload). If a future mitmproxy renames it, the proxy keeps working with HTML
    pages and logs a warning; ``tests/test_e2e_proxy.py`` notices.
    """

    def __init__(self) -> None:
        self._original = None

    def load(self, loader) -> None:
        current = getattr(_http1, "make_error_response", None)
        if current is None:
            logger.warning("cannot install JSON error replies: mitmproxy changed its internals")
            return
        if current is not render_error_reply:
            self._original = current
            _http1.make_error_response = render_error_reply

    def done(self) -> None:
        if self._original is not None:
            _http1.make_error_response = self._original
            self._original = None
