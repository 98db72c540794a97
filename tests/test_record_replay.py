"""CI smoke recording and offline replay, end to end with the real Codex CLI."""

from __future__ import annotations

import json
import subprocess
import sys
import time
from array import array

import pytest

from addons import compare
from addons.replay import Exchange, chunks_of, differences, load_recording, read_timing
from tests.conftest import ROOT, TEST_KEY, wait_for
from tests.test_clients import CATALOG_MODEL, printed_codex_config, run_codex
from tests.test_leaks import UPSTREAM_COOKIES, assert_no_marker

pytestmark = pytest.mark.e2e


def final_message(stdout: bytes) -> str:
    """The last agent message of a ``codex exec --json`` run."""
    texts = []
    for line in stdout.decode(errors="replace").splitlines():
        if not line.startswith("{"):
            continue
        item = json.loads(line).get("item") or {}
        if item.get("type") == "agent_message":
            texts.append(item.get("text", ""))
    assert texts, stdout.decode(errors="replace")
    return texts[-1]


def start_replay(tmp_path, recording, *args: str) -> tuple[subprocess.Popen[bytes], int, object]:
    info = tmp_path / "replay-info.json"
    info.unlink(missing_ok=True)  # an earlier replay's
    log = open(tmp_path / "replay.log", "wb")
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "addons.replay",
            str(recording),
            "--server-info",
            str(info),
            "--http-shutdown",
            *args,
        ],
        stdin=subprocess.DEVNULL,
        stdout=log,
        stderr=subprocess.STDOUT,
        cwd=ROOT,
    )
    wait_for(lambda: info.exists() or proc.poll() is not None, 60, "replay server-info")
    assert proc.poll() is None, (tmp_path / "replay.log").read_text()
    return proc, json.loads(info.read_text())["port"], log


@pytest.mark.codex
@pytest.mark.parametrize("coding", [None, "zstd", "gzip"])
def test_record_then_replay_codex_offline(upstream, start_proxy, codex, tmp_path, coding):
    """Also with an upstream that compresses its stream: Codex 0.171 asks for zstd/gzip."""
    record = tmp_path / "recording"
    upstream.event_delay = 0.01
    upstream.compression = (coding,) if coding else ()
    upstream.set_cookies = UPSTREAM_COOKIES  # redacted in the recording; replay still works
    proxy = start_proxy(upstream.url, "--record", str(record), dumps=False)
    home, work = tmp_path / "codex-home", tmp_path / "work"
    home.mkdir()
    work.mkdir()
    (home / "config.toml").write_text(printed_codex_config(proxy, "--toml-only"))
    first = run_codex(codex, home, work)
    assert first.returncode == 0, first.stderr.decode(errors="replace")
    recorded_message = final_message(first.stdout)
    assert recorded_message == upstream.text
    assert proxy.shutdown() == 0

    # The recording: dumps, flow file, HAR, ledger, summaries; the key in none of them.
    names = {p.name for p in record.iterdir()}
    assert {
        "dumps",
        "flows.mitm",
        "session.har",
        "usage.jsonl",
        "summary.json",
        "summary.txt",
    } <= names
    for path in record.rglob("*"):
        if path.is_file():
            assert TEST_KEY.encode() not in path.read_bytes(), path
            assert path.stat().st_mode & 0o777 == 0o600, path  # flows.mitm, session.har too
    assert_no_marker({str(p): p.read_bytes() for p in record.rglob("*") if p.is_file()})
    ledger = [json.loads(x) for x in (record / "usage.jsonl").read_text().splitlines()]
    assert len(ledger) == 1 and ledger[0]["model"] == CATALOG_MODEL
    assert ledger[0]["usage"] == {
        "input": 42,
        "cached": 8,
        "cache_write": 3,
        "output": 17,
        "reasoning": 5,
        "total": 59,
    }
    assert ledger[0]["events"] > 10 and ledger[0]["status"] == 200
    assert ledger[0]["content_encoding"] == coding
    accept = upstream.requests[0].header_values("accept-encoding")
    assert accept and "zstd" in accept[0] and "gzip" in accept[0]
    response_dump = next((record / "dumps").glob("*-response.json"))
    dumped = json.loads(response_dump.read_text())
    assert "event: response.completed" in dumped["body"]
    assert dumped.get("body_decoded_from") == coding
    # Timing in decoded bytes, so replay can pace the decoded body it serves.
    assert ledger[0]["chunk_timing"][-1][1] == len(dumped["body"].encode())
    summary = json.loads((record / "summary.json").read_text())
    assert summary["totals"]["total"] == 59 and summary["totals"]["requests"] == 1
    assert "1 request(s), 0 failed" in (record / "summary.txt").read_text()
    assert "session summary" in proxy.output()

    # Offline: the upstream is gone; the replay serves the same turn.
    upstream.stop()
    rerecorded = tmp_path / "rerecorded"
    replay, port, log = start_replay(
        tmp_path, record, "--pace", "original", "--record", str(rerecorded)
    )
    try:
        home2 = tmp_path / "codex-home-2"
        home2.mkdir()
        toml = (home / "config.toml").read_text().replace(str(proxy.port), str(port))
        (home2 / "config.toml").write_text(toml)
        second = run_codex(codex, home2, work)
        assert second.returncode == 0, second.stderr.decode(errors="replace")
        assert final_message(second.stdout) == recorded_message
    finally:
        import http.client

        conn = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
        conn.request("GET", "/shutdown")
        assert conn.getresponse().status == 200
        conn.close()
        assert replay.wait(30) == 0
        log.close()
    # The gate is deterministic: the replay, re-recorded, compares equal to the recording.
    thresholds = compare.load_thresholds(compare.DEFAULT_CONFIG)
    result = compare.compare(compare.load_run(record), compare.load_run(rerecorded), thresholds)
    assert result.exit_code == 0, compare.as_text(result)
    assert [f.name for f in result.figures if f.changed and not f.timing] == []
    if coding is None:
        past_the_recording(codex, tmp_path, record, home, work, proxy.port, recorded_message)


def past_the_recording(codex, tmp_path, record, home, work, port, message) -> None:
    """Issue 29: one more Codex turn than the recording holds. The replay answers it so that
    Codex stops at once (one request, no retries), Codex prints the reason, the replay's
    report names it, and compare counts one failed turn added (it was six)."""
    again = tmp_path / "past"
    replay, replay_port, log = start_replay(tmp_path, record, "--record", str(again))
    try:
        home3 = tmp_path / "codex-home-3"
        home3.mkdir()
        toml = (home / "config.toml").read_text().replace(str(port), str(replay_port))
        (home3 / "config.toml").write_text(toml)
        served = run_codex(codex, home3, work)
        assert served.returncode == 0 and final_message(served.stdout) == message
        past = run_codex(codex, home3, work, "And now?")
        assert past.returncode == 1
        printed = past.stdout.decode(errors="replace") + past.stderr.decode(errors="replace")
        assert "past the recording, which has only 1 exchange(s)" in printed, printed
        assert "Reconnecting" not in printed, printed
    finally:
        import http.client

        try:
            conn = http.client.HTTPConnection("127.0.0.1", replay_port, timeout=30)
            conn.request("GET", "/shutdown")
            assert conn.getresponse().status == 200
            conn.close()
            assert replay.wait(30) == 0
        finally:
            if replay.poll() is None:
                replay.kill()
                replay.wait(30)
            log.close()
    report = json.loads((again / "replay.json").read_text())
    assert report["served"] == 1 and report["refused"] == 1, report  # one request: no retry
    assert report["reasons"][0]["code"] == "replay_past_recording"
    assert (again / "replay.json").stat().st_mode & 0o777 == 0o600
    assert (
        "replay_past_recording: request 2: past the recording"
        in (tmp_path / "replay.log").read_text()
    )
    thresholds = compare.load_thresholds(compare.DEFAULT_CONFIG)
    result = compare.compare(compare.load_run(record), compare.load_run(again), thresholds)
    figures = {f.name: f for f in result.figures}
    assert figures["turns added"].new == 1 and figures["turns failed"].new == 1
    assert figures["requests"].new == 2 and "retries" not in figures


def test_replay_mismatch_is_400_saying_what_differed(upstream, start_proxy, tmp_path):
    record = tmp_path / "recording"
    proxy = start_proxy(upstream.url, "--record", str(record), dumps=False)
    assert proxy.post_json({"model": "gpt-a", "input": "hi", "stream": True})[0] == 200
    assert proxy.shutdown() == 0
    replay, port, log = start_replay(tmp_path, record)
    try:
        import http.client

        def post(payload):
            conn = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
            conn.request(
                "POST", "/v1/responses", json.dumps(payload), {"content-type": "application/json"}
            )
            resp = conn.getresponse()
            out = resp.status, resp.read()
            conn.close()
            return out

        # A decompression bomb is read within the decode limits (issue 20): a mismatch.
        import gzip as gzip_module

        conn = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
        bomb = gzip_module.compress(bytes(1024 * 1024), 9) * 512  # 512 MiB in ~540 KB
        conn.request("POST", "/v1/responses", bomb, {"content-encoding": "gzip"})
        resp = conn.getresponse()
        assert resp.status == 400 and b"replay_mismatch" in resp.read()
        conn.close()
        status, body = post({"model": "gpt-b", "input": "hi", "stream": True})
        assert status == 400
        message = json.loads(body)["error"]["message"]
        assert "model: recorded 'gpt-a', got 'gpt-b'" in message
        started = time.monotonic()
        status, body = post({"model": "gpt-a", "input": "other text", "stream": True})
        assert status == 200 and b"response.completed" in body
        assert time.monotonic() - started < 10
        status, body = post({"model": "gpt-a", "input": "hi", "stream": True})
        assert status == 400 and json.loads(body)["error"]["code"] == "replay_past_recording"
        assert "request 4: past the recording, which has only 1 exchange(s)" in body.decode()
    finally:
        replay.terminate()
        replay.wait(30)
        log.close()
    # The replay's report at exit: what it served, and each refusal's reason.
    report = (tmp_path / "replay.log").read_text()
    assert "replay: served 1 of 1 recorded exchange(s)" in report
    assert "3 request(s) refused (400: Codex stops at once)" in report
    assert "replay_mismatch: request 2 differs from recorded exchange" in report
    assert "replay_past_recording: request 4: past the recording" in report


def test_differences_ignore_volatile_values():
    a = {
        "model": "m",
        "stream": True,
        "prompt_cache_key": "abc",
        "input": [{"type": "message", "role": "user", "content": "cwd=/tmp/x"}],
        "tools": [{"type": "function", "name": "shell"}],
    }
    b = {
        **a,
        "prompt_cache_key": "def",
        "input": [{"type": "message", "role": "user", "content": "cwd=/tmp/y"}],
    }
    assert differences(a, b) == []
    c = {**a, "tools": []}
    assert differences(a, c) == ["tools: recorded ['shell'], got []"]


def test_chunks_follow_recorded_timing_or_events():
    body = "event: a\ndata: 1\n\nevent: b\ndata: 2\n\n"
    timed = Exchange(
        1, {}, 200, [("content-type", "text/event-stream")], body, [[0, 19], [40, len(body)]]
    )
    assert chunks_of(timed) == [(0, body[:19].encode()), (40, body[19:].encode())]
    # load_recording keeps a recording's timing as a flat array (16 bytes a chunk).
    timed.chunk_timing = array("q", [0, 19, 40, len(body)])
    assert chunks_of(timed) == [(0, body[:19].encode()), (40, body[19:].encode())]
    untimed = Exchange(1, {}, 200, [], body, [])
    assert [c for _, c in chunks_of(untimed)] == [
        b"event: a\ndata: 1\n\n",
        b"event: b\ndata: 2\n\n",
    ]


def test_load_recording_needs_a_pair(tmp_path):
    with pytest.raises(ValueError, match="no complete"):
        load_recording(tmp_path)


def test_replay_reads_timing_from_a_ledger_it_can_partly_read(tmp_path):
    """A line cut mid-way (the proxy was killed) or with unusable timing costs only its timing."""
    lines = [
        json.dumps({"seq": 1, "chunk_timing": [[0, 5], [9, 12]]}),
        json.dumps({"seq": 2, "chunk_timing": [[0, "x"]]}),
        '{"seq": 3, "chunk_ti',
    ]
    (tmp_path / "usage.jsonl").write_text("\n".join(lines))
    timing = read_timing(tmp_path / "usage.jsonl")
    assert {seq: list(t) for seq, t in timing.items()} == {1: [0, 5, 9, 12], 2: []}


@pytest.mark.codex
def test_compare_counts_codexs_retries_of_a_request_as_one_turn(
    upstream, start_proxy, codex, tmp_path
):
    """Issue 29: Codex 0.171 resends a request answered 409 five times; compare, reading the
    dumps of the real client's requests (re-serialised bodies, one x-client-request-id),
    folds the six into the one turn BASE had, failed, with five retries."""
    runs = {}
    for name, status in (("base", 200), ("new", 409)):
        upstream.status = status
        record = tmp_path / name
        proxy = start_proxy(upstream.url, "--record", str(record), dumps=False)
        home, work = tmp_path / f"home-{name}", tmp_path / f"work-{name}"
        home.mkdir()
        work.mkdir()
        (home / "config.toml").write_text(printed_codex_config(proxy, "--toml-only"))
        result = run_codex(codex, home, work)
        assert result.returncode == (0 if status == 200 else 1), result.stderr
        assert proxy.shutdown() == 0
        runs[name] = compare.load_run(record)
    assert [len(t.attempts) for t in runs["new"].turns] == [6]
    result = compare.compare(
        runs["base"], runs["new"], compare.load_thresholds(compare.DEFAULT_CONFIG)
    )
    figures = {f.name: f for f in result.figures}
    assert (figures["turns"].base, figures["turns"].new) == (1, 1)
    assert (figures["retries"].new, figures["requests"].new, figures["HTTP 409"].new) == (5, 6, 6)
    assert figures["turns failed"].new == 1 and figures["turns added"].new == 0
    assert [t.note for t in result.turns] == [
        "NEW: 5 retries; outcome completed → failed; tokens -100.0%"
    ]
