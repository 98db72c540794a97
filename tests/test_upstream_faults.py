"""Upstream faults: the client always learns of the failure, the log says what happened, and
the dump pair is written with an "error" field and the partial body."""

from __future__ import annotations

import http.client
import json
import socket
import time

import pytest

from tests.conftest import open_stream, wait_for

pytestmark = pytest.mark.e2e


def stream_until_failure(proxy, timeout: float = 30) -> tuple[int, bytes, bool]:
    """POST a streaming request; returns (status, bytes received, truncated?)."""
    conn, resp = open_stream(proxy.port, timeout=timeout)
    got = b""
    truncated = False
    try:
        while chunk := resp.read1(65536):
            got += chunk
    except http.client.IncompleteRead as e:
        got += e.partial
        truncated = True
    except (ConnectionError, http.client.HTTPException):
        truncated = True
    else:
        truncated = (
            not resp.isclosed() or not got.endswith(b"\n\n") or b"response.completed" not in got
        )
    conn.close()
    return resp.status, got, truncated


def response_dump(proxy) -> dict:
    wait_for(lambda: len(proxy.dump_files()) == 2, 30, "the dump pair")
    path = next(p for p in proxy.dump_files() if p.name.endswith("-response.json"))
    return json.loads(path.read_text())


@pytest.mark.parametrize("fault", ["reset", "truncate"])
def test_stream_broken_by_upstream(upstream, start_proxy, fault):
    upstream.fault = fault
    proxy = start_proxy(upstream.url)
    status, got, truncated = stream_until_failure(proxy)
    assert status == 200
    assert truncated, "the client must see the truncation, not a clean end"
    assert got.count(b"event: ") == 2
    doc = response_dump(proxy)
    assert doc["error"]
    assert doc["body"].count("event: ") == 2
    assert proxy.shutdown() == 0
    lines = [ln for ln in proxy.output().splitlines() if "upstream exchange failed" in ln]
    assert len(lines) == 1 and "after 200 headers" in lines[0]


def test_stall_after_headers_hits_the_idle_timeout(upstream, start_proxy):
    upstream.fault = "stall"
    proxy = start_proxy(upstream.url, "--set", "tcp_timeout=2")
    started = time.monotonic()
    status, _got, truncated = stream_until_failure(proxy, timeout=60)
    assert status == 200 and truncated
    assert time.monotonic() - started < 30
    doc = response_dump(proxy)
    assert doc["error"] and doc["body"].count("event: ") == 2


def make_tls_upstream(tmp_path, upstream):
    """Serve the stand-in over HTTPS with a leaf for 127.0.0.1 from a throwaway CA."""
    import ipaddress
    import ssl

    from cryptography import x509
    from cryptography.hazmat.primitives import serialization
    from mitmproxy import certs

    store = certs.CertStore.from_store(tmp_path / "ca", "testca", 2048)
    entry = store.get_cert("127.0.0.1", [x509.IPAddress(ipaddress.ip_address("127.0.0.1"))])
    cert_file, key_file = tmp_path / "leaf.pem", tmp_path / "leaf.key"
    cert_file.write_bytes(entry.cert.to_pem())
    key_file.write_bytes(
        entry.privatekey.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.TraditionalOpenSSL,
            serialization.NoEncryption(),
        )
    )
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    context.load_cert_chain(cert_file, key_file)
    upstream.ssl_context = context
    upstream.start()
    return tmp_path / "ca" / "testca-ca-cert.pem"


def test_untrusted_upstream_certificate_is_502(tmp_path, start_proxy):
    from tests.fake_upstream import FakeUpstream

    upstream = FakeUpstream()
    make_tls_upstream(tmp_path, upstream)
    try:
        proxy = start_proxy(upstream.url)
        status, _, body = proxy.post_json({"model": "m"})
        assert status == 502
        assert b"certificate" in body.lower()
        assert upstream.requests == []
        assert "certificate" in json.dumps(response_dump(proxy)).lower()
        assert proxy.shutdown() == 0
    finally:
        upstream.stop()


def test_trusted_ca_file_makes_tls_upstream_work(tmp_path, start_proxy):
    from tests.fake_upstream import FakeUpstream

    upstream = FakeUpstream()
    ca = make_tls_upstream(tmp_path, upstream)
    try:
        proxy = start_proxy(upstream.url, "--set", f"ssl_verify_upstream_trusted_ca={ca}")
        status, _, body = proxy.post_json({"model": "m", "stream": True})
        assert status == 200 and b"response.completed" in body
        assert len(upstream.requests) == 1
        assert proxy.shutdown() == 0  # close the kept-alive TLS connection first
    finally:
        upstream.stop()


def test_connect_timeout_is_502_naming_the_cause(start_proxy):
    # A listener whose accept queue is full: the kernel drops further SYNs on loopback, so a
    # connect hangs exactly like one into a black hole.
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(0)
    port = listener.getsockname()[1]
    fillers = []
    try:
        for _ in range(3):
            s = socket.socket()
            s.setblocking(False)
            s.connect_ex(("127.0.0.1", port))
            fillers.append(s)
        proxy = start_proxy(
            f"http://127.0.0.1:{port}/v1/responses", "--set", "codex_connect_timeout_ms=1000"
        )
        started = time.monotonic()
        status, _, body = proxy.post_json({"model": "m"})
        assert status == 502
        assert b"connect timeout" in body
        assert time.monotonic() - started < 20
    finally:
        for s in fillers:
            s.close()
        listener.close()
