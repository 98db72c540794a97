"""Upstream routing (``addons/routing.py``): the URL, the header rules, the option's owner."""

import pytest
from mitmproxy import exceptions, http
from mitmproxy.test import taddons, tflow

from addons.routing import (
    UpstreamRoute,
    parse_upstream_url,
    route_to_upstream,
    strip_hop_by_hop,
)


@pytest.mark.parametrize(
    ("url", "host_header", "port"),
    [
        ("https://api.openai.com/v1/responses", "api.openai.com", 443),
        ("http://127.0.0.1:8080/v1/responses", "127.0.0.1:8080", 8080),
        (
            "https://x.openai.azure.com/openai/responses?api-version=2025-04-01-preview",
            "x.openai.azure.com",
            443,
        ),
        ("https://example.com:8443/r", "example.com:8443", 8443),
        ("http://example.com:80/r", "example.com", 80),
        ("http://[::1]:9000/v1/responses", "[::1]:9000", 9000),
    ],
)
def test_parse_upstream_url(url, host_header, port):
    up = parse_upstream_url(url)
    assert up.url == url and up.host_header == host_header and up.port == port


@pytest.mark.parametrize(
    "url",
    [
        "/v1/responses",
        "ftp://x/y",
        "https://",
        "https://user:pw@host/v1/responses",
        "https://host/v1/responses#frag",
        "not a url",
    ],
)
def test_parse_upstream_url_rejects(url):
    with pytest.raises(ValueError):
        parse_upstream_url(url)


def test_strip_hop_by_hop_including_connection_tokens():
    h = http.Headers(
        [
            (b"Connection", b"keep-alive, X-Secret-Hop"),
            (b"Keep-Alive", b"timeout=5"),
            (b"TE", b"trailers"),
            (b"Trailer", b"x"),
            (b"Upgrade", b"h2c"),
            (b"Proxy-Connection", b"keep-alive"),
            (b"X-Secret-Hop", b"1"),
            (b"Content-Length", b"3"),
            (b"X-Keep", b"yes"),
        ]
    )
    strip_hop_by_hop(h)
    assert sorted(k.lower() for k in h.keys()) == ["content-length", "x-keep"]


def test_route_owns_and_parses_the_upstream_url():
    route = UpstreamRoute()
    with taddons.context(route) as tctx:
        assert route.upstream.url == "https://api.openai.com/v1/responses"
        tctx.configure(route, codex_upstream_url="http://[::1]:8080/r?api-version=1")
        assert (route.upstream.host, route.upstream.port) == ("::1", 8080)
        assert route.upstream.host_header == "[::1]:8080"
        with pytest.raises(exceptions.OptionsError, match="codex_upstream_url"):
            tctx.configure(route, codex_upstream_url="ftp://x/")
        assert route.upstream.port == 8080  # the bad value was rolled back


def test_route_to_upstream_drops_credentials_and_hop_by_hop_and_sets_the_url():
    request = tflow.tflow().request
    request.headers = http.Headers(
        [
            (b"Authorization", b"Bearer client"),
            (b"authorization", b"Bearer second"),
            (b"Proxy-Authorization", b"Basic x"),
            (b"Connection", b"close, x-drop"),
            (b"X-Drop", b"1"),
            (b"Content-Type", b"application/json"),
        ]
    )
    route_to_upstream(request, "https://up.example:8443/v1/r?q=1", "up.example:8443")
    assert request.url == "https://up.example:8443/v1/r?q=1"
    assert request.host_header == "up.example:8443"
    assert list(request.headers.items(multi=True)) == [
        ("Content-Type", "application/json"),
        ("Host", "up.example:8443"),
    ]
