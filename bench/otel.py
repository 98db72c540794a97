"""``./run.sh bench --otel``: what the OpenTelemetry export costs (issue 33).

The strict proxy and the gateway, each started twice in front of the session benchmark's
upstream (:mod:`bench.session_upstream`: a streamed tool call with its usage): without an
OTLP endpoint, and with ``OTEL_EXPORTER_OTLP_ENDPOINT`` pointing at a loopback receiver in
this process (it answers 200 to every export, so the proxy's side is all that is measured:
building the span and the points, protobuf encoding and the HTTP export on the SDK's
threads). Per target: N sequential streamed ``POST /v1/responses`` on one connection, the
proxy process tree's CPU (``/proc/<pid>/task/*/schedstat``, as :mod:`bench.sessions` reads
it) per request, median of interleaved rounds, and the export's share: CPU per request with
the endpoint minus without. The exporters flush every 100 ms (spans) and 500 ms (metrics)
here, more often than the SDK's defaults (5 s, 60 s), so the figure is an upper bound.
"""

from __future__ import annotations

import http.client
import json
import os
import statistics
import subprocess
import sys
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

BASES = ("ours", "gateway")


class _Receiver:
    """A loopback OTLP/HTTP sink: 200 to every POST, the bytes counted."""

    def __init__(self) -> None:
        self.bytes = 0
        receiver = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                receiver.bytes += len(self.rfile.read(int(self.headers["content-length"] or 0)))
                self.send_response(200)
                self.send_header("content-length", "0")
                self.end_headers()

            def log_message(self, *args: Any) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    @property
    def endpoint(self) -> str:
        return f"http://127.0.0.1:{self.server.server_address[1]}"


def _requests(port: int, n: int, headers: dict[str, str]) -> None:
    body = json.dumps({"model": "gpt-5.5", "stream": True, "input": "bench"})
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=60)
    try:
        for _ in range(n):
            conn.request(
                "POST",
                "/v1/responses",
                body,
                {"content-type": "application/json", "user-agent": "codex_exec/0.171.0", **headers},
            )
            reply = conn.getresponse()
            data = reply.read()
            if reply.status != 200 or b"response.completed" not in data:
                raise RuntimeError(f"request failed: {reply.status}")
    finally:
        conn.close()


def run_otel(requests: int, repeat: int, out: Path, tmp: Path) -> dict[str, Any]:
    """The whole measurement; writes ``otel.json`` / ``otel.md`` into ``out`` and returns the
    JSON document. Raises RuntimeError when a target fails."""
    from addons.web import free_port
    from bench.sessions import CpuClock
    from bench.targets import Target, start_target, wait_listening

    receiver = _Receiver()
    up_port = free_port()
    upstream = subprocess.Popen(
        [sys.executable, "-m", "bench.session_upstream", str(up_port), "0"],
        stdin=subprocess.PIPE,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        cwd=Path(__file__).resolve().parent.parent,
    )
    targets: dict[str, Target] = {}
    otel_env = {
        "OTEL_EXPORTER_OTLP_ENDPOINT": receiver.endpoint,
        "OTEL_BSP_SCHEDULE_DELAY": "100",
        "OTEL_METRIC_EXPORT_INTERVAL": "500",
    }
    cpu: dict[str, list[float]] = {}
    try:
        wait_listening(up_port, upstream)
        for base in BASES:
            for otel in (False, True):
                name = base + ("+otel" if otel else "")
                saved = dict(os.environ)
                if otel:
                    os.environ.update(otel_env)
                try:
                    (tmp / name).mkdir()
                    targets[name] = start_target(base, up_port, tmp / name)
                finally:
                    os.environ.clear()
                    os.environ.update(saved)
                cpu[name] = []
        for rnd in range(repeat):
            names = list(targets)
            order = names[rnd % len(names) :] + names[: rnd % len(names)]
            for name in order:
                target = targets[name]
                assert target.proc is not None
                headers = target.extra.get("headers") or {}
                _requests(target.port, 5, headers)  # warm: connections, caches
                clock = CpuClock(target.proc.pid)
                before = clock.ms()
                _requests(target.port, requests, headers)
                time.sleep(0.6)  # the batch and metric exports of these requests
                after = clock.ms()
                if before is not None and after is not None:
                    cpu[name].append((after - before) / requests)
                print(f"  round {rnd + 1}: {name}", flush=True)
    finally:
        for target in targets.values():
            target.stop()
        if upstream.poll() is None:
            upstream.terminate()
            upstream.wait(10)
        receiver.server.shutdown()
    results: dict[str, Any] = {
        name: {"cpu_ms_per_request": round(statistics.median(v), 3) if v else None, "runs": v}
        for name, v in cpu.items()
    }
    for base in BASES:
        off, on = results[base]["cpu_ms_per_request"], results[base + "+otel"]["cpu_ms_per_request"]
        results[base + "+otel"]["added_ms"] = (
            round(on - off, 3) if on is not None and off is not None else None
        )
    meta = {
        "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
        "cpus": os.cpu_count(),
        "requests": requests,
        "repeat": repeat,
        "exported_bytes": receiver.bytes,
    }
    doc = {"meta": meta, "results": results}
    out.mkdir(parents=True, exist_ok=True)
    (out / "otel.json").write_text(json.dumps(doc, indent=2) + "\n")
    (out / "otel.md").write_text(markdown(doc))
    return doc


def markdown(doc: dict[str, Any]) -> str:
    """The results as a markdown table."""
    meta, results = doc["meta"], doc["results"]

    def fmt(v: Any) -> str:
        return "n/a" if v is None else f"{v:.3f}"

    lines = [
        "| target | CPU ms per request | added by the export, ms |",
        "|---|---|---|",
        *(
            f"| {name} | {fmt(r['cpu_ms_per_request'])} | {fmt(r.get('added_ms'))} |"
            for name, r in results.items()
        ),
        "",
        f"{meta['date']}, {meta['cpus']} cores, {meta['requests']} sequential streamed requests "
        f"per run, medians of {meta['repeat']} interleaved rounds, "
        f"{meta['exported_bytes']} bytes exported; `./run.sh bench --otel`.",
    ]
    return "\n".join(lines) + "\n"
