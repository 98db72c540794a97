"""Issue 30: headers a lenient upstream would split are refused 400 before anything goes
upstream, and the gateway's members' port tells a member nothing about the others (``/health``
says ok or not; ``/metrics`` needs the operator's token)."""

from __future__ import annotations

import asyncio
import json
import shutil
import socket
import ssl
import subprocess
import urllib.parse
import urllib.request
from pathlib import Path

import pytest
import yaml
from mitmproxy import http
from mitmproxy.test import taddons, tflow

from addons.allowlist import Allowlist, header_refusal
from addons.common import ALLOWED, BRIDGE, REFUSED, WEBSOCKET
from addons.gateway_mode.core import GatewayCore
from addons.gateway_mode.keypool import KeyPool
from addons.gateway_mode.local_routes import LocalRoutes, read_metrics_token
from tests.conftest import ROOT, wait_for
from tests.gateway_harness import METRICS_TOKEN, OPERATOR, UPSTREAM_KEYS, Gateway, bearer
from tests.test_hostile import MALFORMED_HEADERS, raw_exchange

TOKEN = "t" * 40

# -- the header rule ---------------------------------------------------------------------


@pytest.mark.parametrize(
    ("fields", "refused"),
    [
        ([(b"x-a", b"a\rAuthorization: Bearer sk-inj")], "'x-a' has a CR, LF or NUL"),
        ([(b"x-a", b"a\r\n b")], "'x-a' has a CR, LF or NUL"),  # obs-fold, as mitmproxy joins it
        ([(b"x-a", b"a\nb")], "'x-a' has a CR, LF or NUL"),
        ([(b"x-a", b"a\x00b")], "'x-a' has a CR, LF or NUL"),
        ([(b"x a", b"b")], "not a token"),
        ([(b"x\x00a", b"b")], "not a token"),
        ([(b"", b"b")], "not a token"),
        ([(b"x:a", b"b")], "not a token"),
        ([(b"x-a", b"tab\there, obs-text \xe9, del \x7f")], None),
        ([(b"x-a", b"")], None),
        ([(b"!#$%&'*+-.^_`|~09AZaz", b"v")], None),
    ],
)
def test_header_rule(fields, refused):
    reason = header_refusal(fields)
    if refused is None:
        assert reason is None
    else:
        assert reason is not None and refused in reason
        assert b"sk-inj" not in reason.encode()


@pytest.mark.parametrize("mark", [None, BRIDGE, WEBSOCKET])
@pytest.mark.parametrize("http_version", ["HTTP/1.1", "HTTP/2.0"])
def test_allowlist_refuses_a_malformed_header_before_marking(mark, http_version):
    addon = Allowlist()
    with taddons.context(addon):
        flow = tflow.tflow()
        flow.request.http_version = http_version
        flow.request.method, flow.request.path = "POST", "/v1/responses"
        flow.request.headers.fields += ((b"x-a", b"a\rAuthorization: Bearer sk-inj"),)
        if mark:
            flow.metadata[mark] = {} if mark == BRIDGE else True
        addon.requestheaders(flow)
        assert flow.response is not None and flow.response.status_code == 400
        assert json.loads(flow.response.content)["error"]["code"] == "bad_request"
        assert ALLOWED not in flow.metadata and flow.metadata[REFUSED] == "malformed-header"


def test_a_route_refusal_stays_403_whatever_the_headers():
    addon = Allowlist()
    with taddons.context(addon):
        flow = tflow.tflow()
        flow.request.method, flow.request.path = "GET", "/v1/models"
        flow.request.headers.fields += ((b"x-a", b"a\rb"),)
        addon.requestheaders(flow)
        assert flow.response is not None and flow.response.status_code == 403


# -- the metrics token ---------------------------------------------------------------------


@pytest.mark.parametrize(
    ("content", "ok"),
    [
        (TOKEN + "\n", True),
        ("  " + TOKEN + "\r\n\n", True),
        ("a" * 64 + "==", True),
        ("short-token", False),
        ("", False),
        ("t" * 20 + " " + "t" * 20, False),
        ("t" * 40 + "\x00", False),
        ("t" * 1025, False),
    ],
)
def test_read_metrics_token(tmp_path, content, ok):
    path = tmp_path / "metrics.token"
    path.write_text(content)
    if ok:
        assert read_metrics_token(str(path)) == content.strip().encode()
    else:
        with pytest.raises(ValueError) as e:
            read_metrics_token(str(path))
        assert str(path) in str(e.value) and (not content.strip() or content not in str(e.value))


def test_read_metrics_token_missing_file(tmp_path):
    with pytest.raises(ValueError, match="cannot read the metrics token"):
        read_metrics_token(str(tmp_path / "absent"))


def local_get(addon: LocalRoutes, path: str, authorization: str | None = None) -> http.HTTPFlow:
    flow = tflow.tflow()
    flow.request.method, flow.request.path = "GET", path
    if authorization is not None:
        flow.request.headers["authorization"] = authorization
    asyncio.run(addon.requestheaders(flow))
    assert "authorization" not in flow.request.headers  # read, then gone from the flow
    return flow


@pytest.fixture
def core():
    core = GatewayCore()
    core.pool = KeyPool()  # no key: not ok (and the process-wide pool left alone)
    return core


def test_local_routes_without_a_token(core):
    addon = LocalRoutes(core)
    with taddons.context(addon):
        health = local_get(addon, "/health", f"Bearer {TOKEN}")
        assert health.response is not None
        assert json.loads(health.response.content) == {"ok": False}
        assert health.response.status_code == 503
        metrics = local_get(addon, "/metrics", f"Bearer {TOKEN}")
        assert metrics.response is not None and metrics.response.status_code == 404
        assert b"codex_gateway_" not in metrics.response.content


def test_local_routes_with_a_token(core, tmp_path):
    (tmp_path / "t").write_text(TOKEN)
    addon = LocalRoutes(core)
    with taddons.context(addon) as tctx:
        tctx.configure(addon, codex_gateway_metrics_token_file=str(tmp_path / "t"))
        for wrong in (None, f"Bearer {TOKEN[:-1]}x", f"bearer {TOKEN}", TOKEN, f"Basic {TOKEN}"):
            flow = local_get(addon, "/metrics", wrong)
            assert flow.response is not None and flow.response.status_code == 401, wrong
            assert b"codex_gateway_" not in flow.response.content
            health = local_get(addon, "/health", wrong)
            assert health.response is not None
            assert json.loads(health.response.content) == {"ok": False}
        twice = tflow.tflow()
        twice.request.method, twice.request.path = "GET", "/metrics"
        twice.request.headers.fields += ((b"authorization", f"Bearer {TOKEN}".encode()),) * 2
        asyncio.run(addon.requestheaders(twice))
        assert twice.response is not None and twice.response.status_code == 401
        flow = local_get(addon, "/metrics", f"Bearer {TOKEN}")
        assert flow.response is not None and flow.response.status_code == 200
        assert b"codex_gateway_in_flight" in flow.response.content
        health = local_get(addon, "/health", f"Bearer {TOKEN}")
        assert health.response is not None
        assert set(json.loads(health.response.content)) > {"ok", "database", "upstream_keys"}


# -- the real gateway ----------------------------------------------------------------------


def member_request(key: str, line: bytes, head: bytes) -> bytes:
    """``head`` (request line and headers, CRLF-ended) with the member's key and ``line``."""
    return (
        head
        + b"Host: x\r\nUser-Agent: codex_exec/0.171.0 (t)\r\n"
        + f"Authorization: Bearer {key}\r\n".encode()
        + line
        + b"\r\n\r\n"
    )


@pytest.mark.e2e
def test_gateway_refuses_malformed_headers_on_every_route(gateway, upstream):
    gateway.admin("add-member", "alice")
    key = gateway.add_key("alice")
    server = gateway.serve(upstream.url, "--websockets", "--chat-bridge")
    body = b'{"model":"gpt-5.5-codex","input":"hi","stream":true}'
    chat = b'{"model":"gpt-5.5-codex","messages":[{"role":"user","content":"hi"}]}'
    heads = {
        "responses": (
            b"POST /v1/responses HTTP/1.1\r\nContent-Type: application/json\r\n"
            + f"Content-Length: {len(body)}\r\n".encode(),
            body,
        ),
        "chat bridge": (
            b"POST /v1/chat/completions HTTP/1.1\r\nContent-Type: application/json\r\n"
            + f"Content-Length: {len(chat)}\r\n".encode(),
            chat,
        ),
        "websocket upgrade": (
            b"GET /v1/responses HTTP/1.1\r\nConnection: Upgrade\r\nUpgrade: websocket\r\n"
            b"Sec-WebSocket-Version: 13\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n",
            b"",
        ),
        "realtime upgrade": (
            b"GET /v1/realtime?model=gpt-realtime HTTP/1.1\r\nConnection: Upgrade\r\n"
            b"Upgrade: websocket\r\nSec-WebSocket-Version: 13\r\n"
            b"Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n",
            b"",
        ),
    }
    for route, (head, payload) in heads.items():
        for name, line in MALFORMED_HEADERS:
            replies = raw_exchange(server.port, member_request(key, line, head) + payload)
            assert [status for status, _ in replies] == [400], (route, name, replies)
            assert json.loads(replies[0][1])["error"]["code"] == "bad_request"
            assert upstream.requests == [], (route, name)
    # The same requests without the bad line go through: only the header was refused.
    ok = raw_exchange(server.port, member_request(key, b"X-A: a", heads["responses"][0]) + body)
    assert [status for status, _ in ok] == [200]
    assert len(upstream.requests) == 1
    assert upstream.requests[0].header_values("authorization")[0].split()[1] in (
        UPSTREAM_KEYS.values()
    )


def members_port_says(server, headers=None) -> tuple[tuple[int, bytes], tuple[int, bytes]]:
    health = server.request("GET", "/health", headers=headers)
    metrics = server.request("GET", "/metrics", headers=headers)
    return (health[0], health[2]), (metrics[0], metrics[2])


def assert_discloses_nothing(reply: bytes) -> None:
    for secret_or_name in (b"alice", b"alpha", b"beta", b"gamma", b"codex_gateway_tokens"):
        assert secret_or_name not in reply, reply


@pytest.mark.e2e
def test_members_port_without_a_metrics_token(tmp_path, upstream):
    gw = Gateway(tmp_path, metrics_token_file=None)
    gw.admin("init")
    try:
        gw.admin("add-member", "alice")
        key = gw.add_key("alice")
        server = gw.serve(upstream.url)
        assert server.post_json({"model": "gpt-5.5"}, bearer(key))[0] == 200
        # (Codex's own headers would turn the 4xx into 400: CodexReplies.)
        for headers in (None, {"authorization": f"Bearer {key}"}, OPERATOR):
            (h_status, health), (m_status, metrics) = members_port_says(server, headers)
            assert (h_status, json.loads(health)) == (200, {"ok": True})
            assert m_status == 404 and b"metrics_disabled" in metrics
            assert_discloses_nothing(health + metrics)
    finally:
        gw.stop()


@pytest.mark.e2e
def test_members_port_with_a_metrics_token_under_workers(gateway, upstream):
    gateway.admin("add-member", "alice")
    key = gateway.add_key("alice")
    server = gateway.serve(upstream.url, "--workers", "2")
    assert server.post_json({"model": "gpt-5.5"}, bearer(key))[0] == 200
    wrong = {"authorization": "Bearer " + METRICS_TOKEN[:-1] + "x"}
    # Several tries: the kernel hands each connection to either worker.
    for _ in range(4):
        for headers in (None, {"authorization": f"Bearer {key}"}, wrong):
            (h_status, health), (m_status, metrics) = members_port_says(server, headers)
            assert (h_status, json.loads(health)) == (200, {"ok": True})
            assert m_status == 401 and b"metrics_token_required" in metrics
            assert_discloses_nothing(health + metrics)
        (h_status, health), (m_status, metrics) = members_port_says(server, OPERATOR)
        assert h_status == 200 and json.loads(health)["database"] is True
        assert m_status == 200 and b"codex_gateway_in_flight" in metrics
    assert METRICS_TOKEN not in server.output()


@pytest.mark.e2e
def test_a_bad_metrics_token_file_stops_start_up(tmp_path, upstream):
    secret = "not-long-enough-but-secret"  # noqa: S105 - a fake
    (tmp_path / "metrics.token").write_text(secret)
    gw = Gateway(tmp_path, metrics_token_file="metrics.token")  # noqa: S106 - a file name
    gw.admin("init")
    try:
        with pytest.raises(AssertionError, match="not a metrics token") as e:
            gw.serve(upstream.url)
        assert secret not in str(e.value)
    finally:
        gw.stop()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def prometheus_api(port: int, path: str, **query: str) -> dict:
    url = f"http://127.0.0.1:{port}/api/v1/{path}"
    if query:
        url += "?" + urllib.parse.urlencode(query)
    with urllib.request.urlopen(url, timeout=10) as resp:  # noqa: S310 - http on loopback
        return json.loads(resp.read())


@pytest.mark.e2e
@pytest.mark.skipif(shutil.which("prometheus") is None, reason="prometheus not installed")
def test_prometheus_scrapes_with_the_example_config(gateway, upstream, tmp_path: Path):
    """Debian's real Prometheus, configured as examples/prometheus.yml says (the target and the
    token's path changed), scrapes the members' port; the same job without the token fails."""
    gateway.admin("add-member", "alice")
    key = gateway.add_key("alice")
    server = gateway.serve(upstream.url)
    assert server.post_json({"model": "gpt-5.5"}, bearer(key))[0] == 200
    config = yaml.safe_load((ROOT / "examples" / "prometheus.yml").read_text())
    (job,) = config["scrape_configs"]
    assert job["authorization"]["type"] == "Bearer" and job["metrics_path"] == "/metrics"
    job["authorization"]["credentials_file"] = str(gateway.tmp / "metrics.token")
    job["static_configs"] = [{"targets": [f"127.0.0.1:{server.port}"]}]
    job["scrape_interval"] = "1s"
    anonymous = {k: v for k, v in job.items() if k != "authorization"}
    config["scrape_configs"].append({**anonymous, "job_name": "no-token"})
    (tmp_path / "prometheus.yml").write_text(yaml.safe_dump(config))
    port = free_port()
    log = (tmp_path / "prometheus.log").open("wb")
    proc = subprocess.Popen(
        [
            "prometheus",
            f"--config.file={tmp_path / 'prometheus.yml'}",
            f"--storage.tsdb.path={tmp_path / 'tsdb'}",
            f"--web.listen-address=127.0.0.1:{port}",
        ],
        stdout=log,
        stderr=subprocess.STDOUT,
    )
    try:

        def targets() -> dict[str, dict]:
            try:
                active = prometheus_api(port, "targets")["data"]["activeTargets"]
            except OSError:
                return {}
            return {t["labels"]["job"]: t for t in active if t["health"] != "unknown"}

        wait_for(lambda: len(targets()) == 2, 60, "both Prometheus targets scraped")
        seen = targets()
        assert seen["codex-gateway"]["health"] == "up", seen["codex-gateway"]
        assert seen["no-token"]["health"] == "down" and "401" in seen["no-token"]["lastError"]

        def alice_tokens() -> list:
            query = 'codex_gateway_tokens_total{member="alice",kind="total"}'
            return prometheus_api(port, "query", query=query)["data"]["result"]

        wait_for(lambda: bool(alice_tokens()), 30, "alice's tokens in Prometheus")
        assert alice_tokens()[0]["value"][1] == "59"
    finally:
        proc.terminate()
        proc.wait(30)
        log.close()


def h2_post(
    port: int, ca: Path | None, headers: list[tuple[bytes, bytes]], body: bytes
) -> tuple[int | None, bytes]:
    """One HTTP/2 ``POST /v1/responses`` over TLS (ALPN h2) with ``headers`` sent as given (the
    client's own validation off; ``ca`` ``None``: the server's certificate unchecked, as a
    hostile client would). Returns the reply's status (``None`` when the stream is reset
    or the connection closed without one) and body."""
    import h2.config
    import h2.connection
    import h2.events

    context = ssl.create_default_context(cafile=str(ca) if ca else None)
    if ca is None:
        context.check_hostname, context.verify_mode = False, ssl.CERT_NONE
    context.set_alpn_protocols(["h2"])
    with (
        socket.create_connection(("127.0.0.1", port), timeout=20) as raw,
        context.wrap_socket(raw, server_hostname="127.0.0.1") as sock,
    ):
        assert sock.selected_alpn_protocol() == "h2"
        conn = h2.connection.H2Connection(
            h2.config.H2Configuration(
                client_side=True, validate_outbound_headers=False, normalize_outbound_headers=False
            )
        )
        conn.initiate_connection()
        pseudo = [
            (b":method", b"POST"),
            (b":path", b"/v1/responses"),
            (b":scheme", b"https"),
            (b":authority", b"127.0.0.1"),
        ]
        conn.send_headers(1, pseudo + headers)
        conn.send_data(1, body, end_stream=True)
        sock.sendall(conn.data_to_send())
        status, reply = None, b""
        while True:
            try:
                data = sock.recv(65536)
            except (OSError, ssl.SSLError):
                return status, reply
            if not data:
                return status, reply
            for event in conn.receive_data(data):
                if isinstance(event, h2.events.ResponseReceived):
                    status = int(dict(event.headers)[b":status"])
                if isinstance(event, h2.events.DataReceived):
                    reply += event.data
                    conn.acknowledge_received_data(event.flow_controlled_length, 1)
                end = (h2.events.StreamEnded, h2.events.StreamReset, h2.events.ConnectionTerminated)
                if isinstance(event, end):
                    return status, reply
            sock.sendall(conn.data_to_send())


@pytest.mark.e2e
@pytest.mark.parametrize("validate", [True, False], ids=["h2-validates", "h2-validation-off"])
def test_gateway_over_http2_never_forwards_a_malformed_header(tmp_path, upstream, validate):
    from tests.identity_fakes import make_ca_and_leaf

    ca, _ = make_ca_and_leaf(tmp_path)
    pem = tmp_path / "gateway.pem"
    pem.write_bytes((tmp_path / "leaf.key").read_bytes() + (tmp_path / "leaf.pem").read_bytes())
    gw = Gateway(tmp_path, mitmproxy={"certs": [f"*={pem}"]})
    gw.admin("init")
    try:
        gw.admin("add-member", "alice")
        key = gw.add_key("alice")
        server = gw.serve(
            upstream.url, "--set", f"validate_inbound_headers={str(validate).lower()}"
        )
        member = [
            (b"authorization", f"Bearer {key}".encode()),
            (b"user-agent", b"codex_exec/0.171.0 (t)"),
            (b"content-type", b"application/json"),
        ]
        body = b'{"model":"gpt-5.5","input":"hi"}'
        member.append((b"content-length", str(len(body)).encode()))
        for value in (b"a\rauthorization: Bearer sk-inj", b"a\x00b", b"a\r\n b"):
            status, reply = h2_post(server.port, ca, [*member, (b"x-a", value)], body)
            # Refused by h2 itself (no reply) or, with its validation off, by ours (400).
            assert status == (None if validate else 400), (value, reply)
            assert validate or b"CR, LF or NUL" in reply
            assert upstream.requests == []
        status, reply = h2_post(server.port, ca, [*member, (b"x-a", b"a")], body)
        assert status == 200, reply
        assert len(upstream.requests) == 1
        # HTTP/2 needs no Content-Length; the HTTP/1 upstream does, or it reads the body as a
        # second request of the member's making (request smuggling past the allowlist).
        smuggled = b'{"model":"gpt-5.5"}GET /v1/files HTTP/1.1\r\nHost: x\r\n\r\n'
        unframed = [h for h in member if h[0] != b"content-length"]
        status, reply = h2_post(server.port, ca, unframed, smuggled)
        wait_for(lambda: len(upstream.requests) >= 2, 10, "the unframed request upstream")
        assert [r.body for r in upstream.requests[1:]] == [smuggled], reply
    finally:
        gw.stop()


@pytest.mark.e2e
def test_strict_proxy_frames_an_http2_body_sent_without_content_length(upstream, start_proxy):
    """mitmproxy answers TLS on the strict proxy's port too (its own CA), so a local process can
    speak HTTP/2 to it. A body without Content-Length must reach the upstream framed, whole:
    unframed, the upstream would read it as a request of the client's making on the
    key-holding connection."""
    proxy = start_proxy(upstream.url, dumps=False, http_shutdown=False)
    smuggled = b'{"model":"m"}GET /v1/files HTTP/1.1\r\nHost: x\r\nX-Pad: '
    status, reply = h2_post(proxy.port, None, [(b"content-type", b"application/json")], smuggled)
    assert status == 200, reply
    wait_for(lambda: len(upstream.requests) >= 1, 10, "the request upstream")
    assert [(r.method, r.path_qs, r.body) for r in upstream.requests] == [
        ("POST", "/v1/responses", smuggled)
    ]
    assert proxy.post_json({"model": "alive"})[0] == 200
    assert [r.path_qs for r in upstream.requests] == ["/v1/responses"] * 2
