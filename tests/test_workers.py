"""``--workers N``: one port, N mitmproxy processes (supervisor, SO_REUSEPORT, merged
recordings), end to end on 127.0.0.1 and in units."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
from mitmproxy import io as mitm_io

from addons.dumps import next_seq
from addons.workers import supervisor
from addons.workers.reuseport import reuseport_socket
from bench.targets import tree_pids
from tests.conftest import ROOT, TEST_KEY, wait_for
from tests.gateway_harness import UPSTREAM_KEYS, Gateway, bearer

STREAM = {"model": "gpt-5.5", "stream": True}


# -- units ------------------------------------------------------------------------------------


def test_override_sets_replaces_every_value_of_a_name() -> None:
    args = [
        "--mode",
        "reverse:http://h:1",
        "--set",
        "listen_port=0",
        "--set",
        "a=1",
        "--set",
        "a=2",
    ]
    out = supervisor.override_sets(args, {"listen_port": "5", "a": "3", "b": "4"})
    assert out == [
        "--mode",
        "reverse:http://h:1",
        "--set",
        "listen_port=5",
        "--set",
        "a=3",
        "--set",
        "b=4",
    ]
    assert supervisor.set_value(out, "a") == "3" and supervisor.set_value(out, "zz") is None


def test_a_replacement_worker_resumes_its_residue_class(tmp_path: Path) -> None:
    for name in ("000001-1-request.json", "000003-2-request.json", "000004-3-request.json"):
        (tmp_path / name).write_text("{}")
    assert next_seq(str(tmp_path), 1, 2) == 5  # 1, 3 taken: next odd is 5
    assert next_seq(str(tmp_path), 2, 2) == 6  # 4 taken
    assert next_seq(str(tmp_path), 3, 3) == 6  # 3 taken (3 mod 3 == 0 class)
    assert next_seq(str(tmp_path), 2, 3) == 2  # nothing of the class yet


def test_reuseport_sockets_share_a_port() -> None:
    first = reuseport_socket("127.0.0.1", 0)
    port = first.getsockname()[1]
    second = reuseport_socket("127.0.0.1", port, listen=True)
    third = reuseport_socket("127.0.0.1", port, listen=True)
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=5):
            pass
    finally:
        for s in (first, second, third):
            s.close()


def test_the_listener_patch_is_for_the_pinned_mitmproxy(monkeypatch) -> None:
    from mitmproxy import version
    from mitmproxy.proxy import mode_servers

    from addons.workers import reuseport

    original = mode_servers.AsyncioServerInstance.listen
    try:
        reuseport.patch_listen()
        patched = mode_servers.AsyncioServerInstance.listen
        assert patched is not original and patched._codex_reuseport
        reuseport.patch_listen()  # idempotent
        assert mode_servers.AsyncioServerInstance.listen is patched
    finally:
        mode_servers.AsyncioServerInstance.listen = original
    monkeypatch.setattr(version, "VERSION", "13.0.0")
    with pytest.raises(RuntimeError, match=r"12\.3"):
        reuseport.patch_listen()


# -- end to end -------------------------------------------------------------------------------


def post(port: int, payload: dict, headers: dict[str, str] | None = None) -> int:
    import http.client

    for attempt in range(5):  # a connection queued on a killed worker is reset: retry it
        conn = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
        try:
            conn.request(
                "POST",
                "/v1/responses",
                json.dumps(payload),
                {"content-type": "application/json", **(headers or {})},
            )
            response = conn.getresponse()
            response.read()
            return response.status
        except (ConnectionError, OSError):
            if attempt == 4:
                raise
            time.sleep(0.2)
        finally:
            conn.close()
    raise AssertionError("unreachable")


def children(pid: int) -> set[int]:
    return {p for p in tree_pids(pid) if p != pid}


def seqs(directory: Path) -> list[int]:
    return sorted({int(p.name[:6]) for p in directory.iterdir() if p.name[:6].isdigit()})


@pytest.mark.e2e
def test_two_workers_share_the_port_and_the_dump_sequence(upstream, start_proxy):
    proxy = start_proxy(upstream.url, "--workers", "2")
    info = json.loads(proxy.info_path.read_text())
    assert info["pid"] == proxy.proc.pid  # the supervisor's
    wait_for(lambda: len(children(proxy.proc.pid)) >= 2, 30, "two workers")
    for _ in range(40):
        assert post(proxy.port, STREAM) == 200
    assert proxy.shutdown() == 0
    files = proxy.dump_files()
    numbers = seqs(proxy.dump_dir)
    assert len(numbers) == 40 and len(files) == 80  # unique, and each a request/response pair
    assert {n % 2 for n in numbers} == {0, 1}, "both workers served requests"
    for n in numbers:
        pair = [f for f in files if f.name.startswith(f"{n:06d}-")]
        assert sorted(f.name.rsplit("-", 1)[1] for f in pair) == ["request.json", "response.json"]
    assert len(upstream.requests) == 40
    for request in upstream.requests:
        assert request.header_values("authorization") == [f"Bearer {TEST_KEY}"]


@pytest.mark.e2e
def test_a_killed_worker_is_replaced_while_the_other_serves(upstream, start_proxy):
    proxy = start_proxy(upstream.url, "--workers", "2")
    wait_for(lambda: len(children(proxy.proc.pid)) >= 2, 30, "two workers")
    workers = children(proxy.proc.pid)
    victim = min(workers)
    os.kill(victim, signal.SIGKILL)
    for _ in range(10):  # the survivor keeps serving meanwhile
        assert post(proxy.port, STREAM) == 200
    wait_for(lambda: len(children(proxy.proc.pid) - {victim}) >= 2, 30, "a replacement worker")
    assert victim not in children(proxy.proc.pid)
    for _ in range(20):
        assert post(proxy.port, STREAM) == 200
    assert proxy.shutdown() == 0
    assert "died with -9; starting a new one" in proxy.output()
    numbers = seqs(proxy.dump_dir)
    assert len(numbers) == 30 == len(set(numbers))


@pytest.mark.e2e
def test_sigterm_stops_every_worker_and_the_key_is_in_no_process_args_or_env(upstream, start_proxy):
    proxy = start_proxy(upstream.url, "--workers", "2")
    wait_for(lambda: len(children(proxy.proc.pid)) >= 2, 30, "two workers")
    pids = tree_pids(proxy.proc.pid)
    assert len(pids) >= 3
    for pid in pids:
        for name in ("cmdline", "environ"):
            data = Path(f"/proc/{pid}/{name}").read_bytes()
            assert data, f"/proc/{pid}/{name} is empty: the scan would prove nothing"
            assert TEST_KEY.encode() not in data, f"the key in /proc/{pid}/{name}"
    proxy.proc.send_signal(signal.SIGTERM)
    assert proxy.proc.wait(30) == 0
    for pid in pids:
        assert (
            not Path(f"/proc/{pid}").exists()
            or b"zombie" in Path(f"/proc/{pid}/status").read_bytes().lower()
        )


@pytest.mark.e2e
def test_a_recording_of_two_workers_is_one_recording(upstream, start_proxy, tmp_path):
    record = tmp_path / "rec"
    proxy = start_proxy(upstream.url, "--workers", "2", "--record", str(record), dumps=False)
    for _ in range(16):
        assert post(proxy.port, STREAM) == 200
    status, _, _ = proxy.request("GET", "/v1/models")
    assert status == 403
    assert proxy.shutdown() == 0
    names = sorted(p.name for p in record.iterdir())
    assert names == [
        "dumps",
        "flows.mitm",
        "report.html",
        "session.har",
        "summary.json",
        "summary.txt",
        "usage.jsonl",
    ]
    ledger = [json.loads(line) for line in (record / "usage.jsonl").read_text().splitlines()]
    assert len(ledger) == 16 and {r["seq"] % 2 for r in ledger} == {0, 1}
    summary = json.loads((record / "summary.json").read_text())
    assert summary["totals"]["requests"] == 16 and summary["totals"]["total"] == 16 * 59
    assert len(summary["refused"]) == 1
    with open(record / "flows.mitm", "rb") as f:
        flows = list(mitm_io.FlowReader(f).stream())
    assert sum(1 for fl in flows if fl.request.method == "POST") == 16
    har = json.loads((record / "session.har").read_text())
    assert sum(1 for e in har["log"]["entries"] if e["request"]["method"] == "POST") == 16
    assert "16" in (record / "report.html").read_text()
    # Every file of the recording is private, the merged flow file and HAR included (issue 30).
    modes = {str(p): p.stat().st_mode & 0o777 for p in record.rglob("*") if p.is_file()}
    assert modes and set(modes.values()) == {0o600}, modes


@pytest.mark.e2e
def test_replay_with_two_workers(upstream, start_proxy, tmp_path):
    record = tmp_path / "rec"
    proxy = start_proxy(upstream.url, "--record", str(record), dumps=False)
    for _ in range(6):
        assert post(proxy.port, STREAM) == 200
    assert proxy.shutdown() == 0
    info = tmp_path / "replay.json"
    replay = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "addons.replay",
            str(record),
            "--workers",
            "2",
            "--server-info",
            str(info),
            "--http-shutdown",
        ],
        cwd=ROOT,
        stdin=subprocess.DEVNULL,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        wait_for(lambda: info.exists() or replay.poll() is not None, 60, "replay info")
        port = json.loads(info.read_text())["port"]
        for _ in range(6):
            assert post(port, STREAM) == 200
        import http.client

        conn = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
        conn.request("GET", "/shutdown")
        assert conn.getresponse().status == 200
        assert replay.wait(30) == 0
    finally:
        if replay.poll() is None:
            replay.kill()


@pytest.mark.e2e
def test_gateway_with_two_workers_meters_every_request_once(upstream, tmp_path):
    gw = Gateway(tmp_path)
    gw.admin("init")
    gw.admin("add-member", "alice", "--five-hour-quota", "590")
    key = gw.add_key("alice")
    server = gw.serve(upstream.url, "--workers", "2")
    try:
        wait_for(lambda: len(children(server.proc.pid)) >= 2, 30, "two workers")
        for pid in tree_pids(server.proc.pid):
            for name in ("cmdline", "environ"):
                data = Path(f"/proc/{pid}/{name}").read_bytes()
                for secret in [*UPSTREAM_KEYS.values(), key]:
                    assert secret.encode() not in data
        from addons.gateway_mode.database import Database

        db = Database(gw.database)
        statuses: list[int] = []
        try:
            for _ in range(12):
                statuses.append(post(server.port, STREAM, bearer(key)))
                # Each worker counts the other's usage once written (the ledger flushes every
                # 250 ms): wait for it, so the quota is checked against every earlier row.
                done = statuses.count(200)
                wait_for(lambda n=done: len(db.usage_rows(0)) == n, 10, "the row in the database")
        finally:
            db.dispose()
        assert statuses[:10] == [200] * 10 and 429 in statuses[10:]
        assert server.shutdown() == 0
    finally:
        gw.stop()
    from addons.gateway_mode.database import Database

    db = Database(gw.database)
    try:
        rows = db.usage_rows(0)
    finally:
        db.dispose()
    assert len(rows) == 10 and len({r["row_id"] for r in rows}) == 10
    assert len({r["instance"] for r in rows}) == 2, "both workers served and metered"


async def test_worker_listeners_set_tcp_nodelay_on_accepted_connections() -> None:
    import asyncio

    accepted: list[socket.socket] = []

    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        accepted.append(writer.get_extra_info("socket"))
        writer.close()

    sock = reuseport_socket("127.0.0.1", 0, listen=True)
    server = await asyncio.start_server(handle, sock=sock)
    port = sock.getsockname()[1]
    try:
        _, writer = await asyncio.open_connection("127.0.0.1", port)
        for _ in range(100):
            if accepted:
                break
            await asyncio.sleep(0.01)
        assert accepted and accepted[0].getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY)
        writer.close()
    finally:
        server.close()
