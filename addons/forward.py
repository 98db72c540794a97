"""Forwarding: route allowlisted flows to the upstream URL with the injected key."""

from __future__ import annotations

import functools
import logging
from dataclasses import dataclass

from mitmproxy import ctx, exceptions, http
from mitmproxy.net.http import url as mitm_url
from mitmproxy.utils.strutils import always_str

from addons import keyholder, workload_identity
from addons.common import ALLOWED, KEY_INJECTED, REFUSED, fail_closed, json_response
from addons.hardening import HardeningError, harden_process

logger = logging.getLogger(__name__)

DEFAULT_UPSTREAM_URL = "https://api.openai.com/v1/responses"

#: Hop-by-hop request headers (RFC 9110 7.6.1 plus the usual legacy ones). The reference proxy
#: forwards these; we do not. ``Transfer-Encoding`` is framing that mitmproxy re-does itself.
HOP_BY_HOP = frozenset(
    {
        "connection",
        "keep-alive",
        "proxy-connection",
        "proxy-authorization",
        "proxy-authenticate",
        "te",
        "trailer",
        "upgrade",
    }
)
#: Headers the client must never choose: the credential, and the Host we set from the upstream.
CLIENT_CREDENTIALS = frozenset({"authorization", "proxy-authorization"})


@dataclass(frozen=True)
class Upstream:
    """A parsed ``--upstream-url``: ``url`` is used verbatim (query included, e.g. Azure's
    ``?api-version=``); ``host_header`` is ``host[:port]`` with the port only when not the
    scheme's default (same as the reference proxy)."""

    url: str
    scheme: str
    host: str
    port: int
    host_header: str


def parse_upstream_url(value: str) -> Upstream:
    """Parse and validate an absolute ``http``/``https`` upstream URL.

    Raises:
        ValueError: for a relative URL, another scheme, a missing host, userinfo
            (credentials belong on stdin, not in argv) or a fragment.
    """
    if "#" in value:
        raise ValueError("the upstream URL must not contain a fragment")
    try:
        scheme_b, host_b, port, _path = mitm_url.parse(value)
    except ValueError as e:
        raise ValueError(f"not an absolute URL: {e}") from None
    scheme, host = scheme_b.decode(), host_b.decode()
    if scheme not in ("http", "https"):
        raise ValueError(f"unsupported scheme {scheme!r} (http or https)")
    if not host:
        raise ValueError("the upstream URL has no host")
    if "@" in value.split("://", 1)[1].split("/", 1)[0]:
        raise ValueError("the upstream URL must not carry credentials")
    host_for_header = f"[{host}]" if ":" in host else host
    return Upstream(
        url=value,
        scheme=scheme,
        host=host,
        port=port,
        host_header=mitm_url.hostport(scheme, host_for_header, port),
    )


_HOP_BY_HOP_B = frozenset(name.encode() for name in HOP_BY_HOP)
#: :data:`CLIENT_CREDENTIALS` as lower-case field names, for :func:`drop_headers`.
CLIENT_CREDENTIAL_FIELDS = frozenset(name.encode() for name in CLIENT_CREDENTIALS)
#: Never removed because ``Connection`` names them: framing and Host are mitmproxy's to redo.
_KEPT_B = frozenset({b"transfer-encoding", b"content-length", b"host"})


def drop_headers(headers: http.Headers, names: frozenset[bytes]) -> None:
    """Remove every field whose lower-cased name is in ``names`` (lower-case bytes), in place
    and in one pass (``Headers.pop`` scans the fields twice per name)."""
    fields = headers.fields
    kept = tuple(field for field in fields if field[0].lower() not in names)
    if len(kept) != len(fields):
        headers.fields = kept


def strip_hop_by_hop(headers: http.Headers, also: frozenset[bytes] = frozenset()) -> None:
    """Remove hop-by-hop headers, including those named in ``Connection``, and the names in
    ``also`` (lower-case bytes), in place."""
    named = {
        token.strip().lower().encode("latin-1", "replace")
        for value in headers.get_all("connection")
        for token in value.split(",")
        if token.strip()
    }
    drop_headers(headers, _HOP_BY_HOP_B | also | (named - _KEPT_B))


@functools.lru_cache(maxsize=64)
def _url_parts(url: str) -> tuple[bytes, str, int, bytes]:
    """``(scheme, host, port, path)`` of an absolute URL, as ``Request.url``'s setter stores
    them (parsed once per URL: the parse costs more than the rest of the routing)."""
    scheme, host, port, path = mitm_url.parse(url)
    return scheme, always_str(host, "idna", "strict"), port, path


def route_to_upstream(request: http.Request, url: str, host_header: str) -> None:
    """Prepare an allowlisted request for the upstream, in place: hop-by-hop headers and every
    client credential removed, ``url`` (used exactly, query included) and Host set.

    Same result as ``request.url = url`` followed by ``request.host_header = host_header``
    (Host, and the HTTP/2 authority, end up as ``host_header``), with the URL parsed once."""
    strip_hop_by_hop(request.headers, CLIENT_CREDENTIAL_FIELDS)
    data = request.data
    data.scheme, data.host, data.port, data.path = _url_parts(url)
    request.host_header = host_header


class UpstreamForwarder:
    """Routes allowlisted flows upstream and injects ``Authorization: Bearer <key>`` (or, in
    the keyless mode, the current workload identity access token: :mod:`.workload_identity`;
    while none is valid the flow is answered 503 here and nothing goes upstream).

    In ``requestheaders`` (before a streamed request head could leave, see MITMPROXY.md), for
    flows carrying the allowlist mark only: drop every client ``Authorization`` and
    ``Proxy-Authorization`` and the hop-by-hop headers, set the URL to ``codex_upstream_url``
    (its own query kept), set Host to the upstream's ``host[:port]``, and add exactly one
    ``Authorization`` with the key. Unmarked flows without a response are answered 403 here too
    (fail closed: nothing unmarked is ever forwarded). Once the request has gone
    (``responseheaders``/``error``/``done``) the injected value is replaced by ``[REDACTED]``
    in the flow object, so flow files, HAR, ``flow_detail`` output and mitmweb after that point
    never hold it. The body is never touched, so it goes upstream byte-identical (zstd too).
    """

    def __init__(self) -> None:
        self.upstream = parse_upstream_url(DEFAULT_UPSTREAM_URL)
        self._injected: dict[str, http.HTTPFlow] = {}

    def load(self, loader) -> None:
        loader.add_option(
            "codex_upstream_url",
            str,
            DEFAULT_UPSTREAM_URL,
            "Absolute URL that allowlisted requests are forwarded to, used exactly as given "
            "(query included).",
        )
        loader.add_option(
            "codex_key_file",
            str,
            "",
            "Read the API key from this file ('-' for stdin) when the launcher has not already "
            "loaded one; for plain `mitmdump -s addons/proxy.py`. Same rules as the reference.",
        )

    def configure(self, updated: set[str]) -> None:
        if "codex_upstream_url" in updated:
            try:
                self.upstream = parse_upstream_url(ctx.options.codex_upstream_url)
            except ValueError as e:
                raise exceptions.OptionsError(f"codex_upstream_url: {e}") from e
        if "codex_key_file" in updated:
            path = ctx.options.codex_key_file
            if path and not keyholder.API_KEY.is_set:
                try:
                    harden_process()
                    keyholder.load_from_path(path)
                except (keyholder.ApiKeyError, OSError, HardeningError) as e:
                    raise exceptions.OptionsError(f"codex_key_file: {e}") from None

    def running(self) -> None:
        # An error logged during start-up makes mitmdump exit 1. Until then any allowlisted
        # flow fails closed (500): header_value() raises without a key.
        if not keyholder.API_KEY.is_set and not workload_identity.IDENTITY.active:
            logger.error(
                "no API key loaded: start through the launcher (key on stdin) or set "
                "codex_key_file (a path, or - for stdin)"
            )

    @fail_closed
    def requestheaders(self, flow: http.HTTPFlow) -> None:
        if flow.response or flow.error or not flow.live:
            return
        if flow.metadata.get(ALLOWED) is not True:
            flow.metadata[REFUSED] = "not-marked"
            flow.response = json_response(
                403,
                "forbidden",
                "request was not allowlisted; this proxy only forwards POST /v1/responses",
            )
            return
        identity = workload_identity.IDENTITY
        if identity.active:
            try:
                credential = identity.header_value()
            except workload_identity.IdentityUnavailable:
                flow.metadata[REFUSED] = "workload-identity-unavailable"
                flow.request.stream = False  # a local reply and a streamed request cannot coexist
                flow.response = json_response(
                    503,
                    "workload_identity_unavailable",
                    workload_identity.MSG_UNAVAILABLE,
                    **{"retry-after": "1"},
                )
                return
        else:
            credential = keyholder.API_KEY.header_value()
        request = flow.request
        route_to_upstream(request, self.upstream.url, self.upstream.host_header)
        self._injected[flow.id] = flow
        try:
            request.headers["authorization"] = credential
            flow.metadata[KEY_INJECTED] = True
        except BaseException:
            # Fail closed without leaving the key in the flow object (fail_closed answers 500).
            self._injected.pop(flow.id, None)
            request.headers.pop("authorization", None)
            flow.metadata.pop(KEY_INJECTED, None)
            raise

    @fail_closed
    def request(self, flow: http.HTTPFlow) -> None:
        if flow.response or flow.error or not flow.live or flow.request.stream:
            return
        if flow.metadata.get(KEY_INJECTED) and "transfer-encoding" in flow.request.headers:
            # The whole body is here: send it with a Content-Length instead of re-chunking.
            del flow.request.headers["transfer-encoding"]
            flow.request.headers["content-length"] = str(len(flow.request.raw_content or b""))

    def responseheaders(self, flow: http.HTTPFlow) -> None:
        self._scrub(flow)

    def error(self, flow: http.HTTPFlow) -> None:
        self._scrub(flow)
        if flow.metadata.get(KEY_INJECTED) and flow.error is not None:
            got = (
                f"after {flow.response.status_code} headers" if flow.response else "before a reply"
            )
            logger.warning("upstream exchange failed %s: %s", got, flow.error.msg)

    def response(self, flow: http.HTTPFlow) -> None:
        self._scrub(flow)

    def done(self) -> None:
        for flow in list(self._injected.values()):
            self._scrub(flow)

    def _scrub(self, flow: http.HTTPFlow) -> None:
        if self._injected.pop(flow.id, None) is None:
            return
        headers = flow.request.headers
        value = headers.get("authorization")
        if value is not None and (
            keyholder.API_KEY.matches(value) or workload_identity.IDENTITY.matches(value)
        ):
            headers["authorization"] = keyholder.REDACTED
