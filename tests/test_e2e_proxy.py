"""End to end: the real launcher process on 127.0.0.1 in front of our fake upstream."""

from __future__ import annotations

import asyncio
import base64
import hashlib
import http.client
import json
import os
import re
import socket
import threading
import zlib

import aiohttp
import pytest
import zstandard

from addons.web import free_port
from tests.conftest import (
    TEST_KEY,
    ProxyProcess,
    open_stream,
    run_launcher_once,
    wait_for,
)

pytestmark = pytest.mark.e2e

AZURE_STYLE = "?api-version=2025-04-01-preview"


def read_event(resp: http.client.HTTPResponse) -> list[bytes]:
    """Read lines up to and including the blank line that ends one SSE event."""
    lines = []
    while True:
        line = resp.readline()
        if not line:
            raise AssertionError(f"stream ended inside an event: {lines!r}")
        lines.append(line)
        if line in (b"\n", b"\r\n"):
            return lines


def dump_docs(proxy: ProxyProcess) -> dict[str, dict]:
    return {p.name: json.loads(p.read_text()) for p in proxy.dump_files()}


def test_forwarding_injects_key_and_mirrors_reply(upstream, start_proxy):
    proxy = start_proxy(upstream.url + AZURE_STYLE)
    body = json.dumps({"model": "gpt-test", "input": "hi", "stream": True}).encode()
    conn = proxy.connection()
    conn.putrequest("POST", "/v1/responses", skip_host=True, skip_accept_encoding=True)
    for name, value in [
        ("Host", f"127.0.0.1:{proxy.port}"),
        ("Authorization", "Bearer client-guess"),
        ("authorization", "Bearer second"),
        ("Proxy-Authorization", "Basic eDp5"),
        ("Cookie", "a=b"),
        ("Content-Type", "application/json"),
        ("Accept", "text/event-stream"),
        ("Connection", "keep-alive, X-Hop"),
        ("X-Hop", "1"),
        ("Keep-Alive", "timeout=5"),
        ("TE", "trailers"),
        ("x-codex-turn-metadata", "meta"),
        ("session-id", "s1"),
        ("Content-Length", str(len(body))),
    ]:
        conn.putheader(name, value)
    conn.endheaders(body)
    resp = conn.getresponse()
    data = resp.read()
    conn.close()

    assert resp.status == 200
    assert resp.getheader("content-type") == "text/event-stream"
    assert b"event: response.completed" in data and data.endswith(b"\n\n")

    assert len(upstream.requests) == 1
    got = upstream.requests[0]
    assert got.method == "POST" and got.path_qs == "/v1/responses" + AZURE_STYLE
    assert got.header_values("authorization") == [f"Bearer {TEST_KEY}"]
    assert got.header_values("host") == [f"127.0.0.1:{upstream.port}"]
    for hop in ("proxy-authorization", "keep-alive", "te", "x-hop"):
        assert got.header_values(hop) == [], hop
    assert got.header_values("connection") in ([], ["keep-alive"])
    assert got.header_values("x-codex-turn-metadata") == ["meta"]
    assert got.header_values("session-id") == ["s1"]
    assert got.header_values("cookie") == ["a=b"]
    assert got.body == body
    assert proxy.shutdown() == 0


REFUSED = [
    ("GET", "/v1/responses", {}, 403),
    ("PUT", "/v1/responses", {}, 403),
    ("DELETE", "/v1/responses", {}, 403),
    ("POST", "/v1/responses?", {}, 403),
    ("POST", "/v1/responses?x=1", {}, 403),
    ("POST", "/v1/responses/", {}, 403),
    ("POST", "/V1/RESPONSES", {}, 403),
    ("POST", "/v1/responses/compact", {}, 403),
    ("POST", "/v1/chat/completions", {}, 403),
    ("POST", "/v1/%72esponses", {}, 403),
    ("POST", "//v1/responses", {}, 403),
    ("POST", "http://evil.example/v1/responses", {}, 403),
    ("GET", "/v1/models", {}, 403),
    ("GET", "/", {}, 403),
    (
        "GET",
        "/v1/responses",
        {
            "Upgrade": "websocket",
            "Connection": "Upgrade",
            "Sec-WebSocket-Key": "dGhlIHNhbXBsZSBub25jZQ==",
            "Sec-WebSocket-Version": "13",
        },
        426,
    ),
]


def test_refused_requests_never_reach_upstream(upstream, start_proxy):
    proxy = start_proxy(upstream.url, dumps=True)
    for method, target, headers, status in REFUSED:
        got, _rheaders, data = proxy.request(method, target, b"{}", headers)
        assert got == status, (method, target)
        if status == 403:
            assert json.loads(data)["error"]["code"] == "forbidden"
        assert TEST_KEY.encode() not in data
    # CONNECT as a raw request line.
    with socket.create_connection(("127.0.0.1", proxy.port), timeout=10) as s:
        s.sendall(b"CONNECT evil.example:443 HTTP/1.1\r\nHost: evil.example:443\r\n\r\n")
        # mitmproxy's reverse mode already rejects the CONNECT form (400); the allowlist's
        # http_connect hook would answer 403 otherwise. Either way nothing goes upstream.
        assert s.recv(200)[:12] in (b"HTTP/1.1 400", b"HTTP/1.1 403")
    assert upstream.requests == []
    assert proxy.dump_files() == []  # refused requests are not dumped
    # Still serving.
    status, _, _ = proxy.post_json({"model": "m", "stream": True})
    assert status == 200 and len(upstream.requests) == 1
    assert proxy.shutdown() == 0


def test_websocket_refusal_is_426(upstream, start_proxy):
    proxy = start_proxy(upstream.url)
    status, _headers, data = proxy.request(
        "GET",
        "/v1/responses",
        headers={
            "Upgrade": "websocket",
            "Connection": "Upgrade",
            "Sec-WebSocket-Version": "13",
            "Sec-WebSocket-Key": "dGhlIHNhbXBsZSBub25jZQ==",
        },
    )
    assert status == 426
    assert json.loads(data)["error"]["code"] == "websocket_not_supported"
    assert upstream.requests == []


@pytest.mark.parametrize("status", [400, 401, 429, 500, 503])
def test_status_and_error_body_are_mirrored(upstream, start_proxy, status):
    upstream.status = status
    upstream.error_body = {"error": {"message": f"upstream says {status}", "type": "t"}}
    proxy = start_proxy(upstream.url, dumps=False)
    got, headers, data = proxy.post_json({"model": "m"})
    assert got == status
    assert headers["content-type"].startswith("application/json")
    assert json.loads(data) == upstream.error_body


def test_non_streaming_json_reply_is_mirrored(upstream, start_proxy):
    proxy = start_proxy(upstream.url)
    status, _headers, data = proxy.post_json({"model": "m-json"})
    assert status == 200 and json.loads(data)["model"] == "m-json"


def test_upstream_down_gives_502_naming_the_cause(start_proxy):
    dead = f"http://127.0.0.1:{free_port()}/v1/responses"
    proxy = start_proxy(dead)
    status, headers, data = proxy.post_json({"model": "m"})
    assert status == 502
    assert headers["content-type"] == "application/json"
    error = json.loads(data)["error"]
    assert error["code"] == "upstream_error"
    assert "refused" in error["message"].lower()
    assert TEST_KEY not in data.decode(errors="replace")
    wait_for(lambda: len(proxy.dump_files()) == 2, 10, "dump pair")
    resp = dump_docs(proxy)
    doc = next(v for k, v in resp.items() if k.endswith("-response.json"))
    assert doc["status"] == 502 and doc["error"]
    assert proxy.shutdown() == 0


def test_server_info_line_and_pid(upstream, start_proxy):
    proxy = start_proxy(upstream.url)
    text = proxy.info_path.read_text()
    assert re.fullmatch(r'\{"port":\d+,"pid":\d+\}\n', text)
    info = json.loads(text)
    assert info["pid"] == proxy.proc.pid and info["port"] == proxy.port
    assert proxy.shutdown() == 0


def test_fixed_port(upstream, start_proxy):
    port = free_port()
    proxy = start_proxy(upstream.url, "--port", str(port))
    assert proxy.port == port
    assert proxy.post_json({"model": "m"})[0] == 200


def test_shutdown_without_flag_is_403_and_keeps_serving(upstream, start_proxy):
    proxy = start_proxy(upstream.url, http_shutdown=False)
    status, _, _ = proxy.request("GET", "/shutdown")
    assert status == 403
    assert proxy.proc.poll() is None
    assert proxy.post_json({"model": "m"})[0] == 200
    proxy.proc.terminate()
    assert proxy.proc.wait(15) == 0


@pytest.mark.parametrize(
    ("stdin", "message"),
    [
        (b"", "API key must be provided via stdin"),
        (b"bad key!\n", "may only contain"),
        (b"a" * 1017 + b"\n", "too large"),
    ],
)
def test_key_errors_exit_1_and_nothing_listens(tmp_path, stdin, message):
    proc, info = run_launcher_once(tmp_path, stdin=stdin)
    assert proc.returncode == 1
    lines = proc.stderr.decode().splitlines()
    assert len(lines) == 1 and lines[0].startswith("Error: ") and message in lines[0]
    assert not info.exists()


def test_dump_pair_shape_and_redaction(upstream, start_proxy):
    proxy = start_proxy(upstream.url)
    payload = {"model": "gpt-dump", "input": "héllo", "stream": True}
    status, _, data = proxy.post_json(
        payload, {"Authorization": "Bearer client-secret", "Cookie": "c=1", "x-api-key": "k"}
    )
    assert status == 200
    assert proxy.shutdown() == 0
    files = proxy.dump_files()
    assert [f.name[:6] for f in files] == ["000001", "000001"]
    req_file, resp_file = files
    assert re.fullmatch(r"000001-\d{13}-request\.json", req_file.name)
    assert resp_file.name == req_file.name.replace("request", "response")
    assert oct(proxy.dump_dir.stat().st_mode & 0o777) == "0o700"
    req, resp = json.loads(req_file.read_text()), json.loads(resp_file.read_text())
    assert req["method"] == "POST" and req["url"] == "/v1/responses"
    assert req["body"] == payload
    headers = {h["name"].lower(): h["value"] for h in req["headers"]}
    assert headers["authorization"] == "[REDACTED]" and headers["cookie"] == "[REDACTED]"
    assert headers["x-api-key"] == "[REDACTED]"
    assert headers["host"] == f"127.0.0.1:{proxy.port}"  # as the client sent it
    assert resp["status"] == 200
    assert resp["body"] == data.decode()
    assert "event: response.completed" in resp["body"]
    assert req_file.read_text().endswith("}\n") and "héllo" in req_file.read_text()
    for f in files:
        assert oct(f.stat().st_mode & 0o777) == "0o600"
        assert TEST_KEY not in f.read_text() and "client-secret" not in f.read_text()


def test_8mb_body_arrives_intact(upstream, start_proxy):
    proxy = start_proxy(upstream.url, dumps=False)
    blob = os.urandom(6 * 1024 * 1024).hex()[: 8 * 1024 * 1024]
    body = json.dumps({"model": "m", "input": blob}).encode()
    assert len(body) > 8 * 1024 * 1024
    status, _, _ = proxy.request(
        "POST", "/v1/responses", body, {"content-type": "application/json"}
    )
    assert status == 200
    assert hashlib.sha256(upstream.requests[0].body).digest() == hashlib.sha256(body).digest()


def test_zstd_body_forwarded_byte_identical_and_decoded_in_dump(upstream, start_proxy):
    proxy = start_proxy(upstream.url)
    payload = {"model": "m", "input": "compressed " * 100}
    raw = zstandard.ZstdCompressor().compress(json.dumps(payload).encode())
    status, _, _ = proxy.request(
        "POST",
        "/v1/responses",
        raw,
        {"content-type": "application/json", "content-encoding": "zstd"},
    )
    # The stand-in cannot parse zstd: it answers JSON. What matters is the bytes it got.
    assert status == 200
    assert upstream.requests[0].body == raw
    assert upstream.requests[0].header_values("content-encoding") == ["zstd"]
    assert proxy.shutdown() == 0
    req = next(v for k, v in dump_docs(proxy).items() if k.endswith("-request.json"))
    assert req["body"] == payload


def test_sse_is_not_buffered(upstream, start_proxy):
    """The upstream sends event 0, then waits until the client has it before sending the
    rest. A proxy that buffers (like the reference's 8 KB buffer) delivers event 0 only when
    the gate times out, which this test detects."""
    upstream.gate = threading.Event()
    upstream.gate_timeout = 15
    proxy = start_proxy(upstream.url)
    conn, resp = open_stream(proxy.port, timeout=60)
    first = read_event(resp)
    assert first[0] == b"event: response.created\n"
    upstream.gate.set()  # the client has event 0: let the upstream go on
    rest = resp.read()
    conn.close()
    assert upstream.gate_timed_out is False
    assert b"event: response.completed" in rest


def decompressor(coding: str):
    """An incremental decoder independent of ours: ``decompress(bytes) -> bytes``."""
    if coding == "zstd":
        return zstandard.ZstdDecompressor().decompressobj()
    return zlib.decompressobj(16 + zlib.MAX_WBITS)


@pytest.mark.parametrize("coding", ["zstd", "gzip"])
def test_compressed_sse_is_not_buffered_and_dumped_decoded(upstream, start_proxy, coding):
    """Codex 0.171 asks for ``Accept-Encoding: zstd,gzip``; an upstream that compresses and
    flushes per event reaches the client event by event (the proxy passes the bytes through),
    and the dump shows the decoded stream, marked with its coding."""
    upstream.compression = ("zstd", "gzip")
    upstream.gate = threading.Event()
    upstream.gate_timeout = 15
    proxy = start_proxy(upstream.url)
    conn, resp = open_stream(proxy.port, headers={"accept-encoding": coding})
    assert resp.getheader("content-encoding") == coding
    assert upstream.requests[0].header_values("accept-encoding") == [coding]
    decoder, text = decompressor(coding), b""
    while b"\n\n" not in text:
        chunk = resp.read1(65536)
        assert chunk, "stream ended before the first event"
        text += decoder.decompress(chunk)
    assert text.startswith(b"event: response.created\n")
    upstream.gate.set()  # the client has decoded event 0: let the upstream go on
    rest = resp.read()
    conn.close()
    text += decoder.decompress(rest)
    assert upstream.gate_timed_out is False
    assert b"event: response.completed" in text
    assert proxy.shutdown() == 0
    doc = next(v for k, v in dump_docs(proxy).items() if k.endswith("-response.json"))
    assert doc["body"] == text.decode()
    assert doc["body_decoded_from"] == coding and "body_decode_error" not in doc
    assert {(h["name"].lower(), h["value"]) for h in doc["headers"]} >= {
        ("content-encoding", coding)
    }


def test_truncated_zstd_stream_dump_keeps_raw_bytes(upstream, start_proxy):
    upstream.compression = ("zstd",)
    upstream.fault, upstream.fault_after = "truncate", 3
    proxy = start_proxy(upstream.url)
    conn, resp = open_stream(proxy.port, headers={"accept-encoding": "zstd"})
    with pytest.raises(http.client.IncompleteRead) as cut:
        resp.read()
    conn.close()
    wait_for(lambda: len(proxy.dump_files()) == 2, 20, "the dump pair")
    assert proxy.shutdown() == 0
    doc = dump_docs(proxy)[proxy.dump_files()[-1].name]
    assert doc["body"].startswith("event: response.created") and doc["body"].count("event:") == 3
    assert doc["body_decode_error"].startswith("zstd: the stream ends")
    assert base64.b64decode(doc["body_raw_base64"]) == cut.value.partial
    assert "error" in doc


def test_client_gone_mid_stream_still_writes_dump(upstream, start_proxy):
    upstream.gate = threading.Event()
    proxy = start_proxy(upstream.url)
    conn, resp = open_stream(proxy.port, timeout=30)
    read_event(resp)
    conn.sock.shutdown(socket.SHUT_RDWR)
    conn.close()
    upstream.gate.set()
    wait_for(lambda: len(proxy.dump_files()) == 2, 20, "dump pair after client disconnect")
    doc = next(v for k, v in dump_docs(proxy).items() if k.endswith("-response.json"))
    assert doc["status"] == 200
    assert doc["body"].startswith("event: response.created")
    assert "error" in doc
    assert proxy.shutdown() == 0


async def _stream_once(session: aiohttp.ClientSession, base: str, i: int) -> list[str]:
    events = []
    async with session.post(
        base + "/v1/responses", json={"model": f"m{i}", "stream": True}
    ) as resp:
        assert resp.status == 200
        async for line in resp.content:
            if line.startswith(b"event: "):
                events.append(line[7:].strip().decode())
    return events


def test_40_concurrent_streams_complete_and_are_dumped(upstream, start_proxy):
    upstream.event_delay = 0.005
    proxy = start_proxy(upstream.url)

    async def run() -> list[list[str]]:
        async with aiohttp.ClientSession(
            connector=aiohttp.TCPConnector(limit=0), timeout=aiohttp.ClientTimeout(total=120)
        ) as session:
            return await asyncio.gather(*(_stream_once(session, proxy.base, i) for i in range(40)))

    results = asyncio.run(run())
    for events in results:
        assert events[0] == "response.created" and events[-1] == "response.completed"
        assert events.count("response.output_text.delta") == len(upstream.text.split(" "))
    assert proxy.shutdown() == 0
    files = proxy.dump_files()
    assert len(files) == 80
    seqs = sorted({f.name[:6] for f in files})
    assert seqs == [f"{n:06d}" for n in range(1, 41)]
    for f in files:
        doc = json.loads(f.read_text())
        if f.name.endswith("-response.json"):
            assert "response.completed" in doc["body"] and "error" not in doc


def test_large_request_body_is_streamed_upstream(upstream, start_proxy):
    """The upstream sees the request head while the client is still sending the body; a proxy
    that buffers the body first would only forward it once the body is complete."""
    proxy = start_proxy(upstream.url, dumps=True)
    body = json.dumps({"model": "m", "input": "y" * 1_000_000}).encode()
    with socket.create_connection(("127.0.0.1", proxy.port), timeout=30) as s:
        s.sendall(
            b"POST /v1/responses HTTP/1.1\r\nHost: x\r\nContent-Type: application/json"
            b"\r\nContent-Length: " + str(len(body)).encode() + b"\r\n\r\n"
        )
        s.sendall(body[:200_000])
        assert upstream.headers_seen.wait(15), "the upstream saw nothing before the body ended"
        s.sendall(body[200_000:])
        reply = s.makefile("rb")
        assert reply.readline().startswith(b"HTTP/1.1 200")
    wait_for(lambda: len(upstream.requests) == 1, 10, "the request upstream")
    assert upstream.requests[0].body == body
    assert upstream.requests[0].header_values("authorization") == [f"Bearer {TEST_KEY}"]
    assert proxy.shutdown() == 0
    req = next(v for k, v in dump_docs(proxy).items() if k.endswith("-request.json"))
    assert req["body"] == json.loads(body)  # the streamed body still reaches the dump
