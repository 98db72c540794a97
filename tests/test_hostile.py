"""Hostile requests: whatever a local process sends, only ``POST /v1/responses`` with the key
ever reaches the (recording) upstream, and the proxy keeps serving."""

from __future__ import annotations

import http.client
import json
import socket

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tests.conftest import TEST_KEY, run_launcher_once

pytestmark = pytest.mark.e2e


class _SocketFile:
    """Lets several ``http.client.HTTPResponse`` objects read one buffered socket stream."""

    def __init__(self, fp):
        self.fp = fp

    def makefile(self, *_args, **_kwargs):
        return _KeepOpen(self.fp)


class _KeepOpen:
    """A reader whose close() leaves the shared stream open for the next response."""

    def __init__(self, fp):
        self._fp = fp

    def __getattr__(self, name):
        return getattr(self._fp, name)

    def close(self):
        pass


def raw_exchange(
    port: int, data: bytes, timeout: float = 10.0, responses: int = 1
) -> list[tuple[int, bytes]]:
    """Send raw bytes; parse up to ``responses`` replies with http.client (the library does the
    parsing). Returns ``[(status, body), ...]``; fewer when the proxy closes or goes quiet."""
    out: list[tuple[int, bytes]] = []
    with socket.create_connection(("127.0.0.1", port), timeout=timeout) as s:
        try:
            s.sendall(data)
        except OSError:
            return out
        fp = s.makefile("rb")
        try:
            for _ in range(responses):
                resp = http.client.HTTPResponse(_SocketFile(fp))  # type: ignore[arg-type]
                resp.begin()
                out.append((resp.status, resp.read()))
                if resp.will_close:
                    break
        except (OSError, http.client.HTTPException):
            pass
        finally:
            fp.close()
    return out


def assert_upstream_invariant(upstream) -> None:
    for r in upstream.requests:
        assert r.method == "POST" and r.path_qs == "/v1/responses", r
        assert r.header_values("authorization") == [f"Bearer {TEST_KEY}"], r


def still_serving(proxy) -> None:
    before = len(proxy_upstream_requests(proxy))
    assert proxy.post_json({"model": "alive"})[0] == 200
    assert len(proxy_upstream_requests(proxy)) == before + 1


def proxy_upstream_requests(proxy):
    return proxy.extra["upstream"].requests


B = b"{}"
CASES = [
    (
        "absolute-form",
        b"POST http://evil.example/v1/responses HTTP/1.1\r\nHost: evil.example"
        b"\r\nContent-Length: 2\r\n\r\n{}",
        False,
    ),
    (
        "absolute-form https",
        b"POST https://evil.example:443/v1/responses HTTP/1.1\r\n"
        b"Host: x\r\nContent-Length: 2\r\n\r\n{}",
        False,
    ),
    ("connect", b"CONNECT evil.example:443 HTTP/1.1\r\nHost: evil.example:443\r\n\r\n", False),
    (
        "double slash",
        b"POST //v1/responses HTTP/1.1\r\nHost: x\r\nContent-Length: 2\r\n\r\n{}",
        False,
    ),
    (
        "dot segments",
        b"POST /v1/../v1/responses HTTP/1.1\r\nHost: x\r\nContent-Length: 2\r\n\r\n{}",
        False,
    ),
    ("percent", b"POST /v1/%72esponses HTTP/1.1\r\nHost: x\r\nContent-Length: 2\r\n\r\n{}", False),
    ("case", b"POST /V1/Responses HTTP/1.1\r\nHost: x\r\nContent-Length: 2\r\n\r\n{}", False),
    (
        "lower method",
        b"post /v1/responses HTTP/1.1\r\nHost: x\r\nContent-Length: 2\r\n\r\n{}",
        False,
    ),
    ("fragment", b"POST /v1/responses#x HTTP/1.1\r\nHost: x\r\nContent-Length: 2\r\n\r\n{}", False),
    (
        "empty query",
        b"POST /v1/responses? HTTP/1.1\r\nHost: x\r\nContent-Length: 2\r\n\r\n{}",
        False,
    ),
    ("asterisk", b"OPTIONS * HTTP/1.1\r\nHost: x\r\n\r\n", False),
    ("h2 prior knowledge", b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n" + b"\x00" * 30, False),
    (
        "CL and TE",
        b"POST /v1/responses HTTP/1.1\r\nHost: x\r\nContent-Length: 4\r\n"
        b"Transfer-Encoding: chunked\r\n\r\n0\r\n\r\nGET /v1/models HTTP/1.1\r\nHost: x\r\n\r\n",
        None,
    ),
    (
        "obfuscated TE",
        b"POST /v1/responses HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: xchunked"
        b"\r\nContent-Length: 2\r\n\r\n{}",
        None,
    ),
    (
        "TE with space",
        b"POST /v1/responses HTTP/1.1\r\nHost: x\r\nTransfer-Encoding : chunked"
        b"\r\n\r\n2\r\n{}\r\n0\r\n\r\n",
        None,
    ),
    (
        "bare CR in header",
        b"POST /v1/responses HTTP/1.1\r\nHost: x\r\nX-A: a\rb\r\nContent-Length: 2\r\n\r\n{}",
        False,
    ),
    (
        "obs-fold",
        b"POST /v1/responses HTTP/1.1\r\nHost: x\r\nX-A: a\r\n b\r\nContent-Length: 2\r\n\r\n{}",
        False,
    ),
    (
        # mitmproxy's HTTP/1 reader splits lines on LF: two real headers, the client's
        # Authorization dropped as always.
        "bare LF in header",
        b"POST /v1/responses HTTP/1.1\r\nHost: x\r\nX-A: a\nAuthorization: Bearer sk-inj"
        b"\r\nContent-Length: 2\r\n\r\n{}",
        True,
    ),
    (
        "duplicate host",
        b"POST /v1/responses HTTP/1.1\r\nHost: a\r\nHost: evil.example\r\n"
        b"Content-Length: 2\r\n\r\n{}",
        None,
    ),
    (
        "odd host",
        b"POST /v1/responses HTTP/1.1\r\nHost: evil.example:1\r\nContent-Length: 2\r\n\r\n{}",
        True,
    ),
    (
        "h2c upgrade",
        b"POST /v1/responses HTTP/1.1\r\nHost: x\r\nConnection: Upgrade, "
        b"HTTP2-Settings\r\nUpgrade: h2c\r\nHTTP2-Settings: AAMAAABkAAQAAP__\r\n"
        b"Content-Length: 2\r\n\r\n{}",
        True,
    ),
    (
        "smuggled in body",
        b"POST /v1/responses HTTP/1.1\r\nHost: x\r\nContent-Length: 36\r\n"
        b"\r\nGET /v1/models HTTP/1.1\r\nHost: x\r\n\r\n",
        True,
    ),
    (
        "huge header",
        b"POST /v1/responses HTTP/1.1\r\nHost: x\r\nX-Big: "
        + b"a" * 300_000
        + b"\r\nContent-Length: 2\r\n\r\n{}",
        None,
    ),
    ("garbage", b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03" + b"\x00" * 100, False),
]


#: Header lines a lenient upstream parser would read differently from a strict one: refused 400
#: (addons/allowlist.py: header_refusal), never forwarded.
MALFORMED_HEADERS = [
    ("bare CR injection", b"X-A: a\rAuthorization: Bearer sk-inj"),
    ("NUL", b"X-A: a\x00b"),
    ("NUL injection", b"X-A: a\x00\r\nAuthorization: Bearer sk-inj"),
    ("obs-fold injection", b"X-A: a\r\n Authorization: Bearer sk-inj"),
    ("space in name", b"X A: b"),
    ("NUL in name", b"X\x00A: b"),
    ("CR in name", b"X\rAuthorization: b"),
]


def malformed_request(line: bytes, target: bytes = b"/v1/responses") -> bytes:
    """A Codex-like ``POST`` with one extra header ``line`` (raw bytes) before the body."""
    return (
        b"POST "
        + target
        + b" HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
        + line
        + b"\r\nContent-Length: 2\r\n\r\n{}"
    )


@pytest.fixture
def hostile_proxy(upstream, start_proxy):
    proxy = start_proxy(
        upstream.url, "--set", "body_size_limit=1m", dumps=False, http_shutdown=False
    )
    proxy.extra["upstream"] = upstream
    return proxy


@pytest.mark.parametrize(("name", "data", "may_forward"), CASES, ids=[c[0] for c in CASES])
def test_hostile_request_table(hostile_proxy, upstream, name, data, may_forward):
    replies = raw_exchange(hostile_proxy.port, data)
    for _status, body in replies:
        assert TEST_KEY.encode() not in body
    if may_forward is False:
        assert upstream.requests == [], name
        assert all(400 <= status < 500 for status, _ in replies), replies
    if may_forward is True:
        assert [status for status, _ in replies] == [200], replies
        assert len(upstream.requests) == 1
    assert_upstream_invariant(upstream)
    still_serving(hostile_proxy)


@pytest.mark.parametrize(("name", "line"), MALFORMED_HEADERS, ids=[c[0] for c in MALFORMED_HEADERS])
def test_malformed_header_is_400_and_never_forwarded(hostile_proxy, upstream, name, line):
    replies = raw_exchange(hostile_proxy.port, malformed_request(line))
    assert [status for status, _ in replies] == [400], (name, replies)
    error = json.loads(replies[0][1])["error"]
    assert error["code"] == "bad_request"
    # Names: mitmproxy's own validate_inbound_headers answers first (our JSON error renderer);
    # values: ours (addons/allowlist.py).
    assert "CR, LF or NUL" in error["message"] or "invalid header name" in error["message"]
    assert b"sk-inj" not in replies[0][1]
    assert upstream.requests == []
    still_serving(hostile_proxy)


def test_malformed_header_on_the_chat_bridge_is_400(upstream, start_proxy):
    proxy = start_proxy(upstream.url, "--chat-bridge", dumps=False, http_shutdown=False)
    line = MALFORMED_HEADERS[0][1]
    replies = raw_exchange(proxy.port, malformed_request(line, b"/v1/chat/completions"))
    assert [status for status, _ in replies] == [400], replies
    assert upstream.requests == []


def test_pipelined_second_request_is_refused(hostile_proxy, upstream):
    data = (
        b"POST /v1/responses HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
        b'Content-Length: 15\r\n\r\n{"model": "p1"}'
        b"GET /v1/models HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n"
    )
    replies = raw_exchange(hostile_proxy.port, data, responses=2)
    assert [status for status, _ in replies] == [200, 403]
    assert len(upstream.requests) == 1
    assert_upstream_invariant(upstream)


def test_body_over_limit_is_413_and_not_forwarded(hostile_proxy, upstream):
    body = b"x" * (2 * 1024 * 1024)
    status, _, _ = hostile_proxy.request("POST", "/v1/responses", body)
    assert status == 413
    assert upstream.requests == []
    still_serving(hostile_proxy)


METHODS = st.sampled_from(
    [b"POST", b"GET", b"PUT", b"post", b"PATCH", b"CONNECT", b"PRI", b"POST ", b"P\x00ST"]
)
SEGMENT = st.sampled_from(
    [
        b"v1",
        b"responses",
        b"V1",
        b"..",
        b".",
        b"",
        b"%2F",
        b"%72esponses",
        b"responses?",
        b"responses#",
        b"shutdown",
        b"\xc3\xa9",
        b"responses/",
    ]
)
TARGET = st.one_of(
    st.lists(SEGMENT, min_size=1, max_size=4).map(lambda s: b"/" + b"/".join(s)),
    st.binary(max_size=40),
    st.sampled_from([b"*", b"http://evil.example/v1/responses", b"evil.example:443"]),
)
HEADER_NAME = st.sampled_from(
    [
        b"Host",
        b"Authorization",
        b"Transfer-Encoding",
        b"Content-Length",
        b"Upgrade",
        b"Connection",
        b"X-Any",
        b"Proxy-Authorization",
        b"Expect",
    ]
)
HEADER_VALUE = st.one_of(
    st.sampled_from(
        [
            b"chunked",
            b"websocket",
            b"h2c",
            b"0",
            b"5",
            b"close",
            b"evil.example",
            b"Bearer stolen",
            b"100-continue",
            b"-1",
        ]
    ),
    st.binary(max_size=20),
)


@settings(
    max_examples=120,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
@given(
    method=METHODS,
    target=TARGET,
    headers=st.lists(st.tuples(HEADER_NAME, HEADER_VALUE), max_size=5),
    body=st.binary(max_size=30),
)
def test_fuzzed_requests_never_break_the_invariant(hostile_proxy, method, target, headers, body):
    upstream = hostile_proxy.extra["upstream"]
    head = method + b" " + target + b" HTTP/1.1\r\n"
    head += b"".join(name + b": " + value + b"\r\n" for name, value in headers)
    raw_exchange(hostile_proxy.port, head + b"\r\n" + body, timeout=5)
    assert_upstream_invariant(upstream)
    assert hostile_proxy.proc.poll() is None


def test_garbage_burst_does_not_stop_serving(hostile_proxy):
    for _ in range(50):
        raw_exchange(hostile_proxy.port, b"\x00\xff garbage\r\n\r\n", timeout=5)
    still_serving(hostile_proxy)


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--set", "proxy_debug=true"], "proxy_debug is refused"),
        (["--set", "emudhra=true"], "emudhra is refused: it signs certificates with a publicly"),
        (["--set", "emudhra_old=true"], "emudhra_old is refused"),
        (["--set", "listen_host=0.0.0.0"], "not loopback"),
        (["--set", "codex_dump_dri=/tmp/x"], "unknown option(s) in --set: codex_dump_dri"),
    ],
)
def test_leaky_options_are_refused_at_start_up(tmp_path, args, message):
    proc, info = run_launcher_once(tmp_path, *args)
    assert proc.returncode == 1
    assert message in (proc.stdout + proc.stderr).decode()
    assert TEST_KEY.encode() not in proc.stdout + proc.stderr
    assert not info.exists()
