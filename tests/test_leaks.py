"""Leak scan: a session of accepted, refused, failing and streamed requests under mitmproxy's
most verbose logging, with a flow file and HAR; the key must occur nowhere."""

from __future__ import annotations

import json
import threading
from pathlib import Path

import pytest
from mitmproxy import io as mitm_io

from bench.bench import tree_pids as proc_tree
from tests.conftest import TEST_KEY, open_stream, wait_for

pytestmark = pytest.mark.e2e


def test_key_appears_nowhere(upstream, start_proxy, tmp_path):
    flows_file, har_file = tmp_path / "flows.mitm", tmp_path / "session.har"
    proxy = start_proxy(
        upstream.url,
        "--set",
        "termlog_verbosity=debug",
        "--set",
        "flow_detail=4",
        "--set",
        f"save_stream_file={flows_file}",
        "--set",
        f"hardump={har_file}",
    )
    key = TEST_KEY.encode()
    # /proc views of every process of the proxy, while it runs.
    for pid in proc_tree(proxy.proc.pid):
        for name in ("cmdline", "environ"):
            assert key not in Path(f"/proc/{pid}/{name}").read_bytes(), (pid, name)

    assert proxy.post_json({"model": "m"})[0] == 200  # accepted, JSON
    assert proxy.post_json({"model": "m", "stream": True})[0] == 200  # accepted, SSE
    assert proxy.request("GET", "/v1/models")[0] == 403  # refused
    assert proxy.request("POST", "/v1/responses?x")[0] == 403
    assert proxy.request("GET", "/v1/responses", headers={"Upgrade": "websocket"})[0] == 426
    upstream.status = 500
    assert proxy.post_json({"model": "m"})[0] == 500  # failing upstream
    upstream.status = 200
    # Client leaves mid-stream.
    upstream.gate = threading.Event()
    conn, resp = open_stream(proxy.port)
    resp.readline()
    conn.close()
    upstream.gate.set()
    wait_for(lambda: len(proxy.dump_files()) == 8, 20, "four dump pairs")
    # Upstream gone: a connection error after the key was injected.
    upstream.stop()
    assert proxy.post_json({"model": "m"})[0] == 502
    assert proxy.shutdown() == 0

    # What was sent upstream did carry the key, unchanged.
    assert all(
        r.header_values("authorization") == [f"Bearer {TEST_KEY}"]
        for r in upstream.requests
        if r.path_qs.startswith("/v1/responses")
    )
    places = {
        "stdout": proxy.stdout_path.read_bytes(),
        "stderr": proxy.stderr_path.read_bytes(),
        "flow file": flows_file.read_bytes(),
        "har": har_file.read_bytes(),
    }
    for f in proxy.dump_files():
        places[f.name] = f.read_bytes()
    for name, data in places.items():
        assert data or name == "stderr", f"{name} is empty: the scan would prove nothing"
        assert key not in data, f"key found in {name}"
        assert TEST_KEY[8:30].encode() not in data, f"part of the key found in {name}"
    # The verbose log printed request headers: the injected one shows as redacted.
    assert b"[REDACTED]" in places["stdout"]
    # The flow file holds the forwarded flows with the header redacted, not removed.
    with open(flows_file, "rb") as f:
        flows = list(mitm_io.FlowReader(f).stream())
    forwarded = [
        fl
        for fl in flows
        if fl.request.host == "127.0.0.1"
        and fl.request.port == upstream.port
        and fl.request.method == "POST"
        and fl.request.path == "/v1/responses"
    ]
    assert len(forwarded) >= 5
    for fl in forwarded:
        assert fl.request.headers.get_all("authorization") == ["[REDACTED]"]
    har = json.loads(places["har"])
    assert har["log"]["entries"]
