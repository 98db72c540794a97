"""Upstream routing, one home for every forwarder (the strict proxy's key injection in
:mod:`addons.forward`, the gateway's key pool in :mod:`addons.gateway_mode.forward`):

- :func:`parse_upstream_url` / :class:`Upstream`: ``--upstream-url`` checked once.
- The header rules: hop-by-hop headers (:data:`HOP_BY_HOP`, and what ``Connection`` names) and
  the client's credentials (:data:`CLIENT_CREDENTIALS`) never go upstream; :func:`drop_headers`.
- :func:`route_to_upstream`: an allowlisted request pointed at the upstream, in place.
- :class:`UpstreamRoute`: the addon that owns the ``codex_upstream_url`` option (each forwarder
  carries one as its child addon).
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

from mitmproxy import ctx, exceptions, http
from mitmproxy.net.http import url as mitm_url
from mitmproxy.utils.strutils import always_str

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


class UpstreamRoute:
    """Owns ``codex_upstream_url``: declares it, and parses it in ``configure`` (a bad URL
    stops start-up with an ``OptionsError``). :attr:`upstream` is the parsed value a forwarder
    routes to. Each forwarder holds one as its child addon (``addons``), so the option is
    declared by this one class whichever forwarder a mode runs."""

    def __init__(self) -> None:
        self.upstream: Upstream = parse_upstream_url(DEFAULT_UPSTREAM_URL)

    def load(self, loader) -> None:
        loader.add_option(
            "codex_upstream_url",
            str,
            DEFAULT_UPSTREAM_URL,
            "Absolute URL that allowlisted requests are forwarded to, used exactly as given "
            "(query included).",
        )

    def configure(self, updated: set[str]) -> None:
        if "codex_upstream_url" in updated:
            try:
                self.upstream = parse_upstream_url(ctx.options.codex_upstream_url)
            except ValueError as e:
                raise exceptions.OptionsError(f"codex_upstream_url: {e}") from e
