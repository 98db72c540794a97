"""Dumps under stress, 1 000 concurrent streams, and idle half-open connections (loopback,
bounded in count and time)."""

from __future__ import annotations

import asyncio
import http.client
import json
import os
import socket
import subprocess
import threading
import time

import aiohttp
import pytest

from tests.conftest import run_launcher_once

pytestmark = pytest.mark.e2e


@pytest.fixture
def tiny_tmpfs(tmp_path):
    """A 256 KiB tmpfs that fills after a handful of dumps (needs root, as CI here has)."""
    mnt = tmp_path / "tiny"
    mnt.mkdir()
    result = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", "size=256k,mode=0700", "tmpfs", str(mnt)],
        capture_output=True,
    )
    if result.returncode != 0:
        if os.environ.get("CI"):
            pytest.fail(f"cannot mount a tmpfs in CI: {result.stderr.decode()}")
        pytest.skip("mounting a tmpfs needs root")
    yield mnt
    subprocess.run(["umount", "-l", str(mnt)], check=False)


def padded_request(i: int) -> dict:
    return {"model": f"m{i}", "input": "x" * 30_000}


def test_full_disk_loses_dumps_but_forwarding_goes_on(upstream, start_proxy, tiny_tmpfs):
    proxy = start_proxy(upstream.url, "--dump-dir", str(tiny_tmpfs / "dumps"), dumps=False)
    statuses = [proxy.post_json(padded_request(i))[0] for i in range(15)]
    assert statuses == [200] * 15
    assert len(upstream.requests) == 15
    assert proxy.shutdown() == 0
    log = proxy.output()
    failures = [ln for ln in log.splitlines() if "dump: cannot write" in ln]
    assert failures, log[-2000:]
    assert "could not be written" in log
    written = [p for p in (tiny_tmpfs / "dumps").iterdir() if not p.name.startswith(".")]
    assert 0 < len(written) < 30
    for p in written:
        json.loads(p.read_text())  # what was written is whole
    leftovers = [p for p in (tiny_tmpfs / "dumps").iterdir() if p.name.startswith(".")]
    assert leftovers == []


def test_dump_required_fails_closed_on_a_full_disk(upstream, start_proxy, tiny_tmpfs):
    proxy = start_proxy(
        upstream.url, "--dump-dir", str(tiny_tmpfs / "dumps"), "--dump-required", dumps=False
    )
    statuses: list[int | str] = []
    for i in range(15):
        try:
            statuses.append(proxy.post_json(padded_request(i))[0])
        except (ConnectionError, http.client.HTTPException):
            statuses.append("killed")  # its response dump failed: the reply was cut
    assert 200 in statuses and 503 in statuses, statuses
    first_refusal = statuses.index(503)
    # Once the disk is full every request is refused, and none of those went upstream.
    assert all(s == 503 for s in statuses[first_refusal + 1 :]), statuses
    assert len(upstream.requests) == statuses.count(200) + statuses.count("killed")


async def _stream(session: aiohttp.ClientSession, base: str, i: int) -> tuple[int, list[str]]:
    async with session.post(
        base + "/v1/responses", json={"model": f"m{i}", "stream": True}
    ) as resp:
        if resp.status != 200:
            return resp.status, [(await resp.read()).decode(errors="replace")]
        kinds = [
            line[7:].strip().decode() async for line in resp.content if line.startswith(b"event: ")
        ]
        return resp.status, kinds


def test_1000_concurrent_streams(upstream, start_proxy):
    proxy = start_proxy(upstream.url, "--set", "flow_detail=0")
    n = 1000
    partial_seen: list[str] = []
    stop = threading.Event()

    def watch() -> None:
        # No partially written file may ever be visible under its final name.
        while not stop.is_set():
            for p in proxy.dump_dir.iterdir() if proxy.dump_dir.exists() else []:
                if p.name.startswith("."):
                    continue
                try:
                    json.loads(p.read_text())
                except ValueError:
                    partial_seen.append(p.name)
                except FileNotFoundError:
                    pass
            time.sleep(0.05)

    watcher = threading.Thread(target=watch, daemon=True)
    watcher.start()

    async def run() -> list[tuple[int, list[str]]]:
        connector = aiohttp.TCPConnector(limit=0, force_close=True)
        async with aiohttp.ClientSession(
            connector=connector, timeout=aiohttp.ClientTimeout(total=300)
        ) as session:
            return await asyncio.gather(*(_stream(session, proxy.base, i) for i in range(n)))

    started = time.monotonic()
    results = asyncio.run(run())
    elapsed = time.monotonic() - started
    expected_deltas = len(upstream.text.split(" "))
    failures = [
        r
        for r in results
        if r[0] != 200
        or not r[1]
        or r[1][-1] != "response.completed"
        or r[1].count("response.output_text.delta") != expected_deltas
    ]
    assert failures == [], (
        f"{len(failures)} of {n} streams failed (in {elapsed:.1f}s), e.g. {failures[0]}"
    )
    assert proxy.shutdown(timeout=120) == 0
    stop.set()
    watcher.join(10)
    assert partial_seen == []
    files = proxy.dump_files()
    assert len(files) == 2 * n
    seqs = {f.name[:6] for f in files}
    assert seqs == {f"{i:06d}" for i in range(1, n + 1)}
    pairs = {}
    for f in files:
        pairs.setdefault(f.name[:6], []).append(f.name.rsplit("-", 1)[1])
    assert all(sorted(v) == ["request.json", "response.json"] for v in pairs.values())


def test_idle_half_open_connections_do_not_block_service(upstream, start_proxy):
    proxy = start_proxy(upstream.url, dumps=False)
    idle: list[socket.socket] = []
    try:
        for i in range(300):
            s = socket.create_connection(("127.0.0.1", proxy.port), timeout=10)
            # A request head that never ends (slowloris), or nothing at all.
            if i % 2:
                s.sendall(b"POST /v1/responses HTTP/1.1\r\nHost: x\r\nX-Slow: ")
            idle.append(s)
        started = time.monotonic()
        status, _, body = proxy.post_json({"model": "m", "stream": True})
        assert status == 200 and b"response.completed" in body
        assert time.monotonic() - started < 10
        assert len(upstream.requests) == 1
    finally:
        for s in idle:
            s.close()
    assert proxy.proc.poll() is None


@pytest.mark.parametrize("kind", ["file", "unwritable-parent"])
def test_unusable_dump_dir_refuses_to_start(tmp_path, kind):

    if kind == "file":
        target = tmp_path / "a-file"
        target.write_text("x")
    else:
        target = tmp_path / "a-file-parent" / "dumps"
        (tmp_path / "a-file-parent").write_text("x")
    proc, info = run_launcher_once(tmp_path, "--dump-dir", str(target))
    assert proc.returncode == 1
    out = (proc.stdout + proc.stderr).decode()
    assert "codex_dump_dir" in out and str(target) in out
    assert not info.exists()
