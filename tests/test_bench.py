"""The benchmark still runs end to end (tiny settings; no timing is asserted, by design)."""

import json
import os
import shutil
import subprocess
import sys

import pytest

from bench.upstreams import ECHO_MODULE, nginx_binary
from tests.conftest import ROOT

pytestmark = pytest.mark.e2e


def test_benchmark_smoke_run(tmp_path):
    missing = [
        name
        for name, present in (
            ("wrk", shutil.which("wrk") is not None),
            ("nginx", nginx_binary() is not None),
            ("libnginx-mod-http-echo", ECHO_MODULE.exists()),
        )
        if not present
    ]
    if missing:
        if os.environ.get("CI"):
            pytest.fail(f"{', '.join(missing)} missing in CI: ./run.sh test installs them")
        pytest.skip(f"{', '.join(missing)} not installed (./run.sh test installs them)")
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "bench.bench",
            "--seconds",
            "1",
            "--streams",
            "20",
            "--repeat",
            "1",
            "--targets",
            "direct,mitmdump,ours+dumps,ours+bridge,ours-x2,gateway",
            "--out",
            str(tmp_path),
        ],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-2000:]
    data = json.loads((tmp_path / "latest.json").read_text())
    results = data["results"]
    assert set(results) == {"direct", "mitmdump", "ours+dumps", "ours+bridge", "ours-x2", "gateway"}
    for name, r in results.items():
        assert r["wrk_c32"]["rps"] > 0 and r["wrk_c32"]["errors"] == 0, name
        assert r["sse_many"]["ok"] == 20 and r["sse_many"]["failed"] == 0, name
    assert results["ours+dumps"]["ratios"]["rps_c32_vs_mitmdump"] is not None
    # The targets' own CPU per request is measured from their process trees.
    assert results["gateway"]["wrk_c32"]["cpu_ms_per_req"] > 0
    assert results["direct"]["wrk_c32"]["cpu_ms_per_req"] is None
    assert results["gateway"]["ratios"]["cpu_c32_vs_mitmdump"] is not None
    # The gateway metered every one of the concurrent streams.
    assert results["gateway"]["sse_many"]["usage_rows"] == 20
    assert "| req/s, 32 conns |" in (tmp_path / "latest.md").read_text()
    assert results["ours+bridge"]["sse_1"]["ok"] == 1  # the chat-bridge stream was read back


def test_session_benchmark_runs_codexs_session_on_every_target(tmp_path):
    """``--sessions`` with 3 turns and 1 round: the output's shape and sane counts (no timing
    is asserted): every target ran every turn, the HTTP request grows with the conversation
    while a socket turn carries only the new items, the proxies' CPU was read and direct has
    none, and the gateway metered every turn (and the socket's warm-up)."""
    turns = 3
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "bench.bench",
            "--sessions",
            "--turns",
            str(turns),
            "--repeat",
            "1",
            "--out",
            str(tmp_path),
        ],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-2000:]
    doc = json.loads((tmp_path / "sessions.json").read_text())
    results = doc["results"]
    assert set(results) == {
        "direct-http",
        "direct-ws",
        "mitmdump-http",
        "mitmdump-ws",
        "gateway-http",
        "gateway-ws",
    }
    for name, r in results.items():
        rounds = doc["rounds"][name]
        assert len(rounds) == 1, name
        numbers = [t["turn"] for t in rounds[0]]
        assert numbers == ([0] if name.endswith("-ws") else []) + list(range(1, turns + 1)), name
        for t in rounds[0]:  # a warm-up is answered created + completed; a turn streams a call
            assert t["first_event_ms"] > 0 and t["events"] >= (2 if t["turn"] == 0 else 5), name
        payload = r["per_turn"]["payload_bytes"]
        wire = r["per_turn"]["wire_bytes"]
        assert len(payload) == len(wire) == turns, name
        if name.endswith("-http"):
            # The whole conversation every time: ~40 KB, then growing by each call and output.
            assert 30_000 < payload[0] < 50_000, name
            assert payload[0] < payload[1] < payload[2], name
            # head + body on the wire
            assert all(w >= p for w, p in zip(wire, payload, strict=True)), name
        else:
            assert all(p < 25_000 for p in payload), name  # the new items only
            if name == "gateway-ws":
                # The gateway's members' side negotiates no permessage-deflate (issue 30:
                # docs/gateway.md, "Bounds on member sockets"): the frames' headers on top.
                assert all(p < w < p + 512 for w, p in zip(wire, payload, strict=True)), name
            else:  # deflated frames
                assert all(0 < w < p for w, p in zip(wire, payload, strict=True)), name
            assert r["setup"]["payload_bytes"] > 15_000, name  # the warm-up's instructions
        cpu = r["per_turn"]["cpu_ms"]
        if name.startswith("direct"):
            assert cpu == [None] * turns and r["session_total"]["cpu_ms"] is None, name
        else:
            assert all(c is not None and c > 0 for c in cpu), name
    assert results["gateway-http"]["usage_rows"] == turns
    assert results["gateway-ws"]["usage_rows"] == turns + 1  # the warm-up is a row too
    goals = doc["goals"]
    assert goals["ws_cpu_vs_http_cpu_last_turn"] > 0
    assert goals["ws_first_event_p50_added_ms"] is not None
    assert 0 < goals["ws_bytes_vs_http_bytes_session"] < 1
    table = (tmp_path / "sessions.md").read_text()
    assert "| CPU of the proxy process, ms, turn 3 |" in table
    assert "WebSocket turn / HTTP turn at turn 3" in table


def test_otel_benchmark_measures_both_modes_with_and_without_an_endpoint(tmp_path):
    """``--otel`` with 5 requests and 1 round: every target's CPU per request was read, the
    ``+otel`` targets exported something to the bench's receiver, and each names what the
    export added (no timing is asserted)."""
    result = subprocess.run(
        [sys.executable, "-m", "bench.bench", "--otel", "--requests", "5", "--repeat", "1",
         "--out", str(tmp_path)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=300,
    )  # fmt: skip
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-2000:]
    doc = json.loads((tmp_path / "otel.json").read_text())
    results = doc["results"]
    assert set(results) == {"ours", "ours+otel", "gateway", "gateway+otel"}
    assert all(r["cpu_ms_per_request"] > 0 for r in results.values())
    assert results["ours+otel"]["added_ms"] is not None
    assert doc["meta"]["exported_bytes"] > 0
    assert "| gateway+otel |" in (tmp_path / "otel.md").read_text()
