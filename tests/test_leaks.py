"""Leak scan: a session of accepted, refused, failing and streamed requests under mitmproxy's
most verbose logging, with a flow file and HAR; the key must occur nowhere."""

from __future__ import annotations

import json
import subprocess
import threading
from pathlib import Path

import pytest
from mitmproxy import io as mitm_io

from bench.targets import tree_pids as proc_tree
from tests.conftest import (
    ROOT,
    TEST_KEY,
    ProxyProcess,
    open_stream,
    plain_mitmdump_command,
    wait_for,
)

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


CLIENT_COOKIE = "session=CLIENTCOOKIE_MARKER_7f3a"
CLIENT_API_KEY = "CLIENTAPIKEY_MARKER_91bc"
UPSTREAM_COOKIES = [
    "__cf_bm=CFBM_MARKER_55d1; path=/; HttpOnly; Secure",
    "_cfuvid=CFUVID_MARKER_a0e2; path=/; HttpOnly",
]
MARKERS = [b"CLIENTCOOKIE_MARKER", b"CLIENTAPIKEY_MARKER", b"CFBM_MARKER", b"CFUVID_MARKER"]
SECRET_HEADERS = {"Cookie": CLIENT_COOKIE, "X-Api-Key": CLIENT_API_KEY}


def start_plain_mitmdump(tmp_path: Path, upstream_url: str, *sets: str) -> ProxyProcess:
    """``mitmdump -s addons/proxy.py`` as docs/proxy.md shows it, key on stdin, ``-w`` flow file."""
    info, out, err = tmp_path / "md-info.json", tmp_path / "md-out.log", tmp_path / "md-err.log"
    cmd = plain_mitmdump_command(
        "proxy.py",
        upstream_url,
        info,
        ["codex_key_file=-", f"codex_dump_dir={tmp_path / 'plain-dumps'}", *sets],
        "-w",
        str(tmp_path / "plain.mitm"),
    )
    with open(out, "wb") as fo, open(err, "wb") as fe:
        proc = subprocess.Popen(cmd, stdin=subprocess.PIPE, stdout=fo, stderr=fe, cwd=ROOT)
    assert proc.stdin is not None
    proc.stdin.write(TEST_KEY.encode() + b"\n")
    proc.stdin.close()
    handle = ProxyProcess(proc, 0, info, out, err, tmp_path / "plain-dumps", True)
    wait_for(lambda: info.exists() or proc.poll() is not None, 60, "mitmdump's server-info")
    assert proc.poll() is None, handle.output()
    handle.port = json.loads(info.read_text())["port"]
    return handle


def secret_session(proxy: ProxyProcess, upstream) -> list[list[str]]:
    """Accepted JSON and SSE, refused, failing upstream and a client gone mid-stream, each with
    the client's Cookie and X-Api-Key, against an upstream that sets two cookies. Returns the
    Set-Cookie values each complete reply brought the client."""
    upstream.set_cookies = UPSTREAM_COOKIES
    got = []

    def post(payload: dict) -> int:
        status, _, _ = proxy.post_json(payload, SECRET_HEADERS)
        return status

    for payload in ({"model": "m"}, {"model": "m", "stream": True}):
        conn = proxy.connection()
        conn.request("POST", "/v1/responses", json.dumps(payload), SECRET_HEADERS)
        resp = conn.getresponse()
        assert resp.status == 200 and b"resp_standin" in resp.read()
        got.append([v for k, v in resp.getheaders() if k.lower() == "set-cookie"])
        conn.close()
    assert proxy.request("GET", "/v1/models", headers=SECRET_HEADERS)[0] == 403
    upstream.status = 500
    assert post({"model": "m"}) == 500
    upstream.status = 200
    upstream.gate = threading.Event()
    conn = proxy.connection()
    conn.request(
        "POST", "/v1/responses", json.dumps({"model": "m", "stream": True}), SECRET_HEADERS
    )
    conn.getresponse().readline()
    conn.close()
    upstream.gate.set()
    wait_for(lambda: len(proxy.dump_files()) == 8, 20, "four dump pairs")
    assert proxy.shutdown() == 0
    # The wire is unchanged both ways.
    posts = [r for r in upstream.requests if r.method == "POST"]
    assert len(posts) == 4
    for r in posts:
        assert r.header_values("cookie") == [CLIENT_COOKIE]
        assert r.header_values("x-api-key") == [CLIENT_API_KEY]
    return got


def assert_no_marker(places: dict[str, bytes]) -> None:
    for name, data in places.items():
        assert data or "err" in name, f"{name} is empty: the scan would prove nothing"
        for marker in MARKERS:
            assert marker not in data, f"{marker.decode()} found in {name}"


def test_cookies_and_api_key_headers_in_no_recording_file(upstream, start_proxy, tmp_path):
    record = tmp_path / "rec"
    proxy = start_proxy(
        upstream.url, "--record", str(record), "--set", "flow_detail=4", dumps=False
    )
    proxy.dump_dir = record / "dumps"
    got = secret_session(proxy, upstream)
    assert got == [[c for c in UPSTREAM_COOKIES]] * 2  # the client got both cookies, unchanged
    places = {str(p.relative_to(record)): p.read_bytes() for p in record.rglob("*") if p.is_file()}
    assert {"flows.mitm", "session.har", "usage.jsonl", "summary.json"} <= places.keys()
    places["flow_detail=4 stdout"] = proxy.stdout_path.read_bytes()
    places["stderr"] = proxy.stderr_path.read_bytes()
    assert_no_marker(places)
    # Redacted, not removed: a reader of the flow file still sees which headers there were.
    with open(record / "flows.mitm", "rb") as f:
        flows = [fl for fl in mitm_io.FlowReader(f).stream() if fl.request.method == "POST"]
    assert len(flows) == 4
    for fl in flows:
        assert fl.request.headers.get_all("cookie") == ["[REDACTED]"]
        assert fl.request.headers.get_all("x-api-key") == ["[REDACTED]"]
    assert any(fl.response and fl.response.headers.get_all("set-cookie") for fl in flows)
    for fl in flows:
        if fl.response is not None:
            assert set(fl.response.headers.get_all("set-cookie")) <= {"[REDACTED]"}
    har = json.loads(places["session.har"])
    assert len(har["log"]["entries"]) >= 5
    assert b"flow_detail" not in places["summary.json"]


def test_plain_mitmdump_w_and_hardump_hold_no_cookie(upstream, tmp_path):
    har = tmp_path / "plain.har"
    proxy = start_plain_mitmdump(tmp_path, upstream.url, f"hardump={har}", "flow_detail=4")
    try:
        got = secret_session(proxy, upstream)
    finally:
        proxy.stop()
    assert got == [[c for c in UPSTREAM_COOKIES]] * 2
    places = {
        "-w flow file": (tmp_path / "plain.mitm").read_bytes(),
        "hardump": har.read_bytes(),
        "flow_detail=4 stdout": proxy.stdout_path.read_bytes(),
        "stderr": proxy.stderr_path.read_bytes(),
    }
    for p in proxy.dump_files():
        places[p.name] = p.read_bytes()
    assert_no_marker(places)
    assert TEST_KEY.encode() not in b"".join(places.values())
