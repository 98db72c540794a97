"""Allowlist: only ``POST /v1/responses`` goes upstream; everything else is refused locally.

A request that may go upstream must also carry headers every HTTP parser reads the same way
(:func:`header_refusal`): else 400, before the key is injected.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Iterable, Sequence

from mitmproxy import ctx, exceptions, http

from addons.common import (
    ALLOWED,
    BRIDGE,
    LOCAL_ROUTE,
    REFUSED,
    WEBSOCKET,
    fail_closed,
    json_response,
)

logger = logging.getLogger(__name__)

#: The one route the reference proxy forwards.
DEFAULT_ROUTE = "/v1/responses"


def parse_routes(routes: Sequence[str]) -> frozenset[str]:
    """Validate extra allowlisted request targets (e.g. ``/v1/responses/compact``).

    Each must be an origin-form path: starts with ``/``, no ``//``, no query (``?``), fragment
    (``#``), ``%`` escape, dot segment, whitespace or control character.

    Raises:
        ValueError: naming the offending entry.
    """
    out = {DEFAULT_ROUTE}
    for route in routes:
        bad = (
            not route.startswith("/")
            or "//" in route
            or any(c in route for c in "?#%\\")
            or any(seg in (".", "..") for seg in route.split("/"))
            or any(ord(c) <= 0x20 or ord(c) == 0x7F for c in route)
        )
        if bad:
            raise ValueError(f"not a plain origin-form path: {route!r}")
        out.add(route)
    return frozenset(out)


#: RFC 9110 section 5.1: a field name is a ``token``.
_TOKEN = re.compile(rb"[!#$%&'*+\-.^_`|~0-9A-Za-z]+")
#: RFC 9110 section 5.5: CR, LF and NUL are never valid in a field value (RFC 9113 section 8.2.1
#: says the same for HTTP/2); an upstream parser that splits on a bare CR would read a line of
#: the client's choosing.
_LINE_BREAKERS = re.compile(rb"[\r\n\x00]")


def header_refusal(fields: Iterable[tuple[bytes, bytes]]) -> str | None:
    """Why a request's header ``fields`` (raw ``(name, value)`` byte pairs, as
    ``request.headers.fields``) may not go upstream, or ``None`` when they may.

    Refused: a name that is not an RFC 9110 token (e.g. holding a space, colon, CR or NUL) and a
    value holding CR, LF or NUL: a bare CR (``X: a\\rAuthorization: Bearer ...``), which
    mitmproxy's HTTP/1 reader keeps inside the value, a NUL, and an obsolete line folding
    (``X: a\\r\\n b``), which it joins with a CRLF. mitmproxy's ``validate_inbound_headers``
    (on by default) already refuses such names over HTTP/1, and h2 such values over HTTP/2; this
    check holds when that option is off. The reason names the header, never its value (which
    could hold a secret of the client's).
    """
    for name, value in fields:
        if not _TOKEN.fullmatch(name):
            return "a header name is not a token (RFC 9110)"
        if _LINE_BREAKERS.search(value):
            shown = name.decode("ascii")
            return f"header {shown!r} has a CR, LF or NUL in its value"
    return None


def refusal_reason(request: http.Request, routes: frozenset[str]) -> str | None:
    """Why ``request`` may not go upstream, or ``None`` when it may.

    Allowed exactly: method ``POST`` (case-sensitive, RFC 9110), an origin-form target (no
    absolute-form ``http://host/...`` over HTTP/1) whose raw bytes equal one of ``routes``: no
    query string (not even an empty ``?``), no trailing slash, no case variant, no escapes.
    Same rule as the reference proxy's ``method == POST && url == "/v1/responses"``.
    """
    raw_method = request.data.method
    if raw_method != b"POST":
        return f"method {raw_method.decode('ascii', 'replace')!r} is not allowed"
    if request.authority and not (request.is_http2 or request.is_http3):
        return "absolute-form request targets are not allowed"
    if request.data.path.decode("utf-8", "surrogateescape") not in routes:
        return "path is not allowed"
    return None


class Allowlist:
    """Answers 403 (small JSON body) to anything but ``POST /v1/responses``; marks the rest.

    Cases: other methods, paths, any query string (even ``?``), trailing slash, case variants,
    absolute-form targets and ``CONNECT`` are refused in ``requestheaders`` / ``http_connect``,
    so nothing is ever sent upstream for them. Allowed flows get ``flow.metadata[ALLOWED]``;
    the forwarder injects the key only into flows with that mark (fail closed otherwise).
    Extra routes come from the ``codex_extra_routes`` option (off by default); with
    ``--chat-bridge``, ``POST /v1/chat/completions`` too, claimed by ``addons.bridge`` under
    this same exact-target rule. A request on an allowed route (the bridge's and the gateway's
    WebSocket routes included) whose headers :func:`header_refusal` refuses gets 400
    ``bad_request`` instead: it is never marked, so never gets the key nor goes upstream.
    """

    def __init__(self) -> None:
        self.routes: frozenset[str] = frozenset({DEFAULT_ROUTE})

    def load(self, loader) -> None:
        loader.add_option(
            "codex_extra_routes",
            Sequence[str],
            [],
            """
            Extra request targets to forward besides POST /v1/responses, e.g.
            /v1/responses/compact. Exact origin-form paths only; still POST only.
            """,
        )

    def configure(self, updated: set[str]) -> None:
        if "codex_extra_routes" in updated:
            try:
                self.routes = parse_routes(ctx.options.codex_extra_routes)
            except ValueError as e:
                raise exceptions.OptionsError(f"codex_extra_routes: {e}") from e

    @fail_closed
    def http_connect(self, flow: http.HTTPFlow) -> None:
        if flow.response:
            return
        self._refuse(flow, "CONNECT is not allowed")

    @fail_closed
    def requestheaders(self, flow: http.HTTPFlow) -> None:
        if flow.response or flow.error or not flow.live:
            return
        reason = refusal_reason(flow.request, self.routes)
        # The bridge and the gateway's WebSocket route checked their route the same way; a
        # mode's local route (LOCAL_ROUTE) goes on to member auth and is answered locally.
        claimed = BRIDGE in flow.metadata or WEBSOCKET in flow.metadata
        if reason is not None and not claimed and LOCAL_ROUTE not in flow.metadata:
            self._refuse(flow, reason)
            return
        bad_header = header_refusal(flow.request.headers.fields)
        if bad_header is not None:
            flow.metadata.pop(ALLOWED, None)
            flow.metadata[REFUSED] = "malformed-header"
            logger.info("refused %s %r: %s", flow.request.method, flow.request.path, bad_header)
            flow.request.stream = False  # a local reply and a streamed request cannot coexist
            flow.response = json_response(400, "bad_request", bad_header)
            return
        flow.metadata[ALLOWED] = True

    @staticmethod
    def _refuse(flow: http.HTTPFlow, reason: str) -> None:
        flow.metadata.pop(ALLOWED, None)
        flow.metadata[REFUSED] = "not-allowlisted"
        logger.info("refused %s %r: %s", flow.request.method, flow.request.path, reason)
        flow.response = json_response(
            403, "forbidden", f"{reason}; this proxy only forwards POST /v1/responses"
        )
