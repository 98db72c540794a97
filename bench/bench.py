"""``./run.sh bench``: our proxy side by side with its peers, in one run, on loopback.

Targets: ``direct`` (client to upstream, the physical limit), ``mitmdump`` (bare mitmdump in
reverse mode, no addons, SSE streamed with ``stream_large_bodies=1``: our engine's limit),
``reference`` (OpenAI's Rust ``codex responses-api-proxy`` from ``@openai/codex``), ``ours``,
``ours+dumps``, ``ours+bridge``, ``ours-x2`` (``--workers 2``; the issue's "ours x2") and
``gateway`` (gateway mode on SQLite, every request metered; its 1 000-stream run also counts
the usage rows written). Figures per target: requests/s and
p50/p99 latency at 1 and 32 connections (wrk), an 8 MB request body (median of 3), time to
first SSE event and per-event lag (arrival minus the upstream's schedule) for one 50-event
stream and for 1 000 concurrent ones (success count, wall time, peak RSS of the target's
process tree), and idle RSS. Ratios against bare mitmdump and direct are computed within the
same run; absolute numbers on a shared machine are noise. Output: a markdown table (stdout and
``bench/results/latest.md``) and JSON (``bench/results/latest.json``).
"""

from __future__ import annotations

import argparse
import asyncio
import http.client
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from addons.web import free_port
from bench.targets import (
    RESULTS,
    RssSampler,
    Target,
    start_target,
    tree_cpu_s,
    tree_rss_mb,
    wait_listening,
)
from bench.upstreams import EVENTS, INTERVAL_MS, NginxUpstream

WRK_SCRIPT = """
wrk.method = "POST"
wrk.body = '{"model":"bench","input":"hello"}'
wrk.headers["Content-Type"] = "application/json"
done = function(summary, latency, requests)
  local e = summary.errors
  io.write(string.format(
    'WRKJSON {"requests":%d,"duration_us":%d,"errors":%d,"non2xx":%d,"p50_us":%d,"p99_us":%d}\\n',
    summary.requests, summary.duration, e.connect + e.read + e.write + e.timeout, e.status,
    latency:percentile(50), latency:percentile(99)))
end
"""


def usage_rows(database: str) -> int:
    """Rows in a gateway's usage ledger."""
    import sqlalchemy as sa

    engine = sa.create_engine(database)
    try:
        with engine.connect() as conn:
            return int(conn.execute(sa.text("SELECT count(*) FROM usage")).scalar_one())
    finally:
        engine.dispose()


def wrk_script(path: Path, headers: dict[str, str]) -> Path:
    """The wrk POST script with extra request ``headers``."""
    lines = "".join(f'wrk.headers["{k}"] = "{v}"\n' for k, v in headers.items())
    path.write_text(
        WRK_SCRIPT.replace('wrk.headers["Content-Type"]', lines + 'wrk.headers["Content-Type"]', 1)
    )
    return path


def run_wrk(port: int, connections: int, seconds: int, script: Path) -> dict[str, Any]:
    """One wrk run (POST of a small JSON body): requests/s, p50/p99 latency (ms), errors."""
    threads = 1 if connections == 1 else 2
    out = subprocess.run(
        [
            "wrk",
            f"-t{threads}",
            f"-c{connections}",
            f"-d{seconds}s",
            "--timeout",
            "10s",
            "-s",
            str(script),
            f"http://127.0.0.1:{port}/v1/responses",
        ],
        capture_output=True,
        text=True,
        timeout=seconds + 60,
    ).stdout
    line = next((ln for ln in out.splitlines() if ln.startswith("WRKJSON ")), None)
    if line is None:
        raise RuntimeError(f"wrk printed no result:\n{out}")
    r = json.loads(line[len("WRKJSON ") :])
    return {
        "rps": round(r["requests"] / (r["duration_us"] / 1e6), 1),
        "p50_ms": round(r["p50_us"] / 1000, 2),
        "p99_ms": round(r["p99_us"] / 1000, 2),
        "errors": r["errors"] + r["non2xx"],
    }


def big_body_seconds(
    port: int, size: int = 8 * 1024 * 1024, runs: int = 3, headers: dict[str, str] | None = None
) -> float:
    """Median seconds for POSTing an ``size``-byte JSON body through ``port``."""
    body = json.dumps({"model": "bench", "input": "x" * size}).encode()
    times = []
    for _ in range(runs):
        conn = http.client.HTTPConnection("127.0.0.1", port, timeout=120)
        started = time.perf_counter()
        conn.request(
            "POST", "/v1/responses", body, {"content-type": "application/json", **(headers or {})}
        )
        resp = conn.getresponse()
        resp.read()
        times.append(time.perf_counter() - started)
        conn.close()
        if resp.status != 200:
            raise RuntimeError(f"8 MB body got {resp.status}")
    return round(statistics.median(times), 3)


async def _one_stream(
    session: Any,
    port: int,
    bridge: bool = False,
    headers: dict[str, str] | None = None,
) -> dict[str, Any]:
    """One stream of :data:`EVENTS` events; lag = arrival - the upstream's send time.
    ``bridge``: the same stream asked through ``/v1/chat/completions`` and read back from the
    translated chunks (the send time rides in each text delta; the response.completed event
    has no chunk of its own, so a bridged stream counts ``EVENTS - 1`` deltas). The upstream
    streams to requests that accept ``text/event-stream``, as Codex's and the SDK's do."""
    started = time.time()
    lags, first = [], None
    events = EVENTS
    if bridge:
        url = f"http://127.0.0.1:{port}/v1/chat/completions"
        payload: dict[str, Any] = {
            "model": "bench",
            "stream": True,
            "messages": [{"role": "user", "content": "bench"}],
        }
    else:
        url = f"http://127.0.0.1:{port}/v1/responses"
        payload = {"model": "bench", "stream": True}
    headers = {"Accept": "text/event-stream", **(headers or {})}
    async with session.post(url, json=payload, headers=headers) as resp:
        if resp.status != 200:
            return {"ok": False}
        async for line in resp.content:
            if not line.startswith(b"data: ") or line.startswith(b"data: [DONE]"):
                continue
            now = time.time()
            data = json.loads(line[6:])
            if bridge:
                choices = data.get("choices") or [{}]
                content = (choices[0].get("delta") or {}).get("content")
                if not content:
                    continue  # the role chunk, the finish chunk
                sent = float(content.strip("[]"))
            else:
                sent = data["t"]
            if first is None:
                first = now - started
            lags.append(now - sent)
    return {"ok": len(lags) == events - (1 if bridge else 0), "first": first, "lags": lags}


def percentile(values: list[float], p: float) -> float:
    """The ``p``-th percentile (nearest rank) of ``values``; NaN for no values."""
    if not values:
        return float("nan")
    values = sorted(values)
    k = min(len(values) - 1, max(0, round(p / 100 * (len(values) - 1))))
    return values[k]


def streams(
    port: int,
    count: int,
    pid: int | None = None,
    bridge: bool = False,
    headers: dict[str, str] | None = None,
) -> dict[str, Any]:
    """``count`` concurrent SSE streams of :data:`EVENTS` events every :data:`INTERVAL_MS`:
    success count, wall time, first-event and per-event lag percentiles (ms), peak RSS (MB)."""
    import aiohttp

    async def run() -> list[dict[str, Any] | BaseException]:
        connector = aiohttp.TCPConnector(limit=0, force_close=True)
        async with aiohttp.ClientSession(
            connector=connector, timeout=aiohttp.ClientTimeout(total=600)
        ) as session:
            return await asyncio.gather(
                *(_one_stream(session, port, bridge, headers) for _ in range(count)),
                return_exceptions=True,
            )

    with RssSampler(pid) as sampler:
        started = time.perf_counter()
        results = asyncio.run(run())
        wall = time.perf_counter() - started
    ok = [r for r in results if isinstance(r, dict) and r.get("ok")]
    firsts = [r["first"] * 1000 for r in ok]
    lags = [lag * 1000 for r in ok for lag in r["lags"]]
    return {
        "ok": len(ok),
        "failed": count - len(ok),
        "wall_s": round(wall, 2),
        "first_event_p50_ms": round(percentile(firsts, 50), 2),
        "first_event_p99_ms": round(percentile(firsts, 99), 2),
        "lag_p50_ms": round(percentile(lags, 50), 2),
        "lag_p99_ms": round(percentile(lags, 99), 2),
        "peak_rss_mb": round(sampler.peak, 1) if pid else None,
    }


def median_of(runs: list[dict[str, Any]]) -> dict[str, Any]:
    """Per-field median of repeated wrk runs (errors summed)."""
    out = {k: round(statistics.median(r[k] for r in runs), 2) for k in ("rps", "p50_ms", "p99_ms")}
    cpu = [r["cpu_ms_per_req"] for r in runs if "cpu_ms_per_req" in r]
    out["cpu_ms_per_req"] = round(statistics.median(cpu), 3) if cpu else None
    out["errors"] = sum(r["errors"] for r in runs)
    out["runs"] = len(runs)
    return out


def measure_all(targets: list[Target], ns: argparse.Namespace, script: Path) -> dict[str, Any]:
    """Every figure for every target; repeated runs are interleaved across targets (round
    robin) so that drift on a shared machine hits all of them alike."""
    time.sleep(1)
    results: dict[str, dict[str, Any]] = {
        t.name: {"notes": t.notes, "idle_rss_mb": tree_rss_mb(t.proc.pid if t.proc else None)}
        for t in targets
    }
    scripts = {
        t.name: wrk_script(script.with_name(f"post-{t.name}.lua"), t.extra["headers"])
        if t.extra.get("headers")
        else script
        for t in targets
    }
    for conns in (1, 32):
        runs: dict[str, list[dict[str, Any]]] = {t.name: [] for t in targets}
        for rnd in range(ns.repeat):
            for t in targets:
                print(f"  wrk {conns} conn(s), round {rnd + 1}: {t.name}", flush=True)
                pid = t.proc.pid if t.proc else None
                cpu_before = tree_cpu_s(pid)
                run = run_wrk(t.port, conns, ns.seconds, scripts[t.name])
                cpu_after = tree_cpu_s(pid)
                served = run["rps"] * ns.seconds
                if cpu_before is not None and cpu_after is not None and served:
                    # The target's own CPU per request: what our code adds, whatever the
                    # machine's scheduling did to the request rate.
                    run["cpu_ms_per_req"] = round((cpu_after - cpu_before) * 1000 / served, 3)
                runs[t.name].append(run)
        for t in targets:
            results[t.name][f"wrk_c{conns}"] = median_of(runs[t.name])
    bodies: dict[str, list[float]] = {t.name: [] for t in targets}
    for _ in range(ns.repeat):
        for t in targets:
            print(f"  8 MB body: {t.name}", flush=True)
            bodies[t.name].append(big_body_seconds(t.port, runs=3, headers=t.extra.get("headers")))
    for t in targets:
        results[t.name]["body_8mb_s"] = round(statistics.median(bodies[t.name]), 3)
    for t in targets:
        print(f"  one 50-event stream: {t.name}", flush=True)
        time.sleep(1)  # let background work (e.g. dump writing) settle
        results[t.name]["sse_1"] = streams(
            t.port,
            1,
            pid=t.proc.pid if t.proc else None,
            bridge=bool(t.extra.get("bridge")),
            headers=t.extra.get("headers"),
        )
    for t in targets:
        print(f"  {ns.streams} concurrent streams: {t.name}", flush=True)
        time.sleep(1)
        before = usage_rows(t.extra["database"]) if t.extra.get("database") else 0
        results[t.name]["sse_many"] = streams(
            t.port,
            ns.streams,
            pid=t.proc.pid if t.proc else None,
            bridge=bool(t.extra.get("bridge")),
            headers=t.extra.get("headers"),
        )
        if t.extra.get("database"):
            # Every stream must leave exactly one usage row (written off the event loop).
            deadline = time.monotonic() + 60
            rows = 0
            while time.monotonic() < deadline:
                rows = usage_rows(t.extra["database"]) - before
                if rows >= ns.streams:
                    break
                time.sleep(0.5)
            results[t.name]["sse_many"]["usage_rows"] = rows
    return results


def ratio(a: float | None, b: float | None) -> float | None:
    """``a / b`` rounded, or ``None`` when either is missing or ``b`` is zero."""
    if a is None or b is None or not b:
        return None
    return round(a / b, 2)


def _get(result: dict[str, Any] | None, *path: str) -> float | None:
    value: Any = result
    for key in path:
        if not isinstance(value, dict):
            return None
        value = value.get(key)
    return value if isinstance(value, (int, float)) else None


def _minus(a: float | None, b: float | None) -> float | None:
    return None if a is None or b is None else round(a - b, 2)


def add_ratios(results: dict[str, dict[str, Any]]) -> None:
    """Ratios against bare mitmdump and differences against direct, from the same run."""
    bare, direct, ours = results.get("mitmdump"), results.get("direct"), results.get("ours")
    for r in results.values():
        r["ratios"] = {
            "rps_c1_vs_mitmdump": ratio(_get(r, "wrk_c1", "rps"), _get(bare, "wrk_c1", "rps")),
            "rps_c32_vs_mitmdump": ratio(_get(r, "wrk_c32", "rps"), _get(bare, "wrk_c32", "rps")),
            "rps_c32_vs_direct": ratio(_get(r, "wrk_c32", "rps"), _get(direct, "wrk_c32", "rps")),
            "body_8mb_vs_mitmdump": ratio(_get(r, "body_8mb_s"), _get(bare, "body_8mb_s")),
            "first_event_p99_minus_direct_ms": _minus(
                _get(r, "sse_1", "first_event_p99_ms"), _get(direct, "sse_1", "first_event_p99_ms")
            ),
            "lag_p99_minus_direct_ms": _minus(
                _get(r, "sse_1", "lag_p99_ms"), _get(direct, "sse_1", "lag_p99_ms")
            ),
            "many_lag_p99_minus_direct_ms": _minus(
                _get(r, "sse_many", "lag_p99_ms"), _get(direct, "sse_many", "lag_p99_ms")
            ),
            # The bridge's own cost: the same stream, translated, against untranslated.
            "lag_p99_minus_ours_ms": _minus(
                _get(r, "sse_1", "lag_p99_ms"), _get(ours, "sse_1", "lag_p99_ms")
            ),
            # The gateway's own cost (auth, quota check, key pool, ledger) over the strict proxy.
            "p50_c1_minus_ours_ms": _minus(
                _get(r, "wrk_c1", "p50_ms"), _get(ours, "wrk_c1", "p50_ms")
            ),
            "rps_c32_vs_ours": ratio(_get(r, "wrk_c32", "rps"), _get(ours, "wrk_c32", "rps")),
            "cpu_c32_vs_ours": ratio(
                _get(r, "wrk_c32", "cpu_ms_per_req"), _get(ours, "wrk_c32", "cpu_ms_per_req")
            ),
            "cpu_c32_vs_mitmdump": ratio(
                _get(r, "wrk_c32", "cpu_ms_per_req"), _get(bare, "wrk_c32", "cpu_ms_per_req")
            ),
            # --workers: the same 1 000 streams against one worker.
            "many_first_p99_vs_ours": ratio(
                _get(r, "sse_many", "first_event_p99_ms"),
                _get(ours, "sse_many", "first_event_p99_ms"),
            ),
            "many_lag_p99_vs_ours": ratio(
                _get(r, "sse_many", "lag_p99_ms"), _get(ours, "sse_many", "lag_p99_ms")
            ),
            "many_first_p99_vs_mitmdump": ratio(
                _get(r, "sse_many", "first_event_p99_ms"),
                _get(bare, "sse_many", "first_event_p99_ms"),
            ),
        }


def markdown(results: dict[str, dict[str, Any]], meta: dict[str, Any]) -> str:
    """The results as a markdown table (one column per target)."""

    def fmt(v: Any) -> str:
        return "n/a" if v is None else str(v)

    rows = [
        ("req/s, 1 conn", lambda r: r["wrk_c1"]["rps"]),
        ("p50 / p99 ms, 1 conn", lambda r: f"{r['wrk_c1']['p50_ms']} / {r['wrk_c1']['p99_ms']}"),
        ("req/s, 32 conns", lambda r: r["wrk_c32"]["rps"]),
        (
            "p50 / p99 ms, 32 conns",
            lambda r: f"{r['wrk_c32']['p50_ms']} / {r['wrk_c32']['p99_ms']}",
        ),
        ("req/s 32 conns vs bare mitmdump", lambda r: r["ratios"]["rps_c32_vs_mitmdump"]),
        ("req/s 32 conns vs direct", lambda r: r["ratios"]["rps_c32_vs_direct"]),
        ("req/s 32 conns vs ours", lambda r: r["ratios"]["rps_c32_vs_ours"]),
        ("p50 1 conn - ours, ms", lambda r: r["ratios"]["p50_c1_minus_ours_ms"]),
        ("CPU ms per request, 32 conns", lambda r: r["wrk_c32"]["cpu_ms_per_req"]),
        ("CPU per request vs bare mitmdump", lambda r: r["ratios"]["cpu_c32_vs_mitmdump"]),
        ("CPU per request vs ours", lambda r: r["ratios"]["cpu_c32_vs_ours"]),
        ("8 MB body, s", lambda r: r["body_8mb_s"]),
        ("8 MB body vs bare mitmdump", lambda r: r["ratios"]["body_8mb_vs_mitmdump"]),
        ("1 stream: first event, ms", lambda r: r["sse_1"]["first_event_p50_ms"]),
        (
            "1 stream: lag p50 / p99, ms",
            lambda r: f"{r['sse_1']['lag_p50_ms']} / {r['sse_1']['lag_p99_ms']}",
        ),
        ("1 stream: lag p99 - direct, ms", lambda r: r["ratios"]["lag_p99_minus_direct_ms"]),
        ("1 stream: lag p99 - ours, ms", lambda r: r["ratios"]["lag_p99_minus_ours_ms"]),
        (
            f"{meta['streams']} streams: ok / failed",
            lambda r: f"{r['sse_many']['ok']} / {r['sse_many']['failed']}",
        ),
        (f"{meta['streams']} streams: wall s", lambda r: r["sse_many"]["wall_s"]),
        (
            f"{meta['streams']} streams: usage rows",
            lambda r: r["sse_many"].get("usage_rows", "-"),
        ),
        (
            f"{meta['streams']} streams: first event p99, ms",
            lambda r: r["sse_many"]["first_event_p99_ms"],
        ),
        (f"{meta['streams']} streams: lag p99, ms", lambda r: r["sse_many"]["lag_p99_ms"]),
        (
            f"{meta['streams']} streams: first event p99 vs ours",
            lambda r: r["ratios"]["many_first_p99_vs_ours"],
        ),
        (
            f"{meta['streams']} streams: first event p99 vs bare mitmdump",
            lambda r: r["ratios"]["many_first_p99_vs_mitmdump"],
        ),
        (
            f"{meta['streams']} streams: lag p99 vs ours",
            lambda r: r["ratios"]["many_lag_p99_vs_ours"],
        ),
        (
            f"{meta['streams']} streams: lag p99 - direct, ms",
            lambda r: r["ratios"]["many_lag_p99_minus_direct_ms"],
        ),
        (f"{meta['streams']} streams: peak RSS MB", lambda r: r["sse_many"]["peak_rss_mb"]),
        ("idle RSS MB", lambda r: r["idle_rss_mb"]),
    ]
    names = list(results)
    lines = [f"| | {' | '.join(names)} |", "|---|" + "---|" * len(names)]
    for label, get in rows:
        lines.append(f"| {label} | " + " | ".join(fmt(get(results[n])) for n in names) + " |")
    lines.append("")
    lines.append(
        f"{meta['date']}, {meta['cpus']} cores, wrk {meta['seconds']} s per run, "
        f"medians of {meta['repeat']} interleaved rounds, streams of {EVENTS} events every "
        f"{INTERVAL_MS} ms from nginx; `./run.sh bench`."
    )
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    """Command line of ``./run.sh bench``; returns the exit code."""
    parser = argparse.ArgumentParser(prog="run.sh bench", description=__doc__)
    parser.add_argument("--seconds", type=int, default=5, help="wrk duration per run")
    parser.add_argument("--streams", type=int, default=1000, help="concurrent streams")
    parser.add_argument("--repeat", type=int, default=5, help="rounds of each wrk/8 MB run")
    parser.add_argument("--out", type=Path, default=RESULTS, help="where latest.md/.json go")
    parser.add_argument(
        "--targets", default="direct,mitmdump,reference,ours,ours-x2,ours+dumps,ours+bridge,gateway"
    )
    parser.add_argument(
        "--sessions",
        action="store_true",
        help="instead: Codex's tool-call session over HTTP and WebSocket, direct and through the "
        "gateway (bench/sessions.py; sessions.md/.json in --out)",
    )
    parser.add_argument("--turns", type=int, default=30, help="turns per session (--sessions)")
    parser.add_argument(
        "--otel",
        action="store_true",
        help="instead: CPU per request of the strict proxy and the gateway with and without an "
        "OTLP endpoint (bench/otel.py; otel.md/.json in --out)",
    )
    parser.add_argument("--requests", type=int, default=200, help="requests per run (--otel)")
    ns = parser.parse_args(argv)
    if ns.otel:
        from bench.otel import markdown as otel_markdown
        from bench.otel import run_otel

        with tempfile.TemporaryDirectory(prefix="codex-proxy-otel-") as tmpdir:
            doc = run_otel(ns.requests, ns.repeat, ns.out, Path(tmpdir))
        print()
        print(otel_markdown(doc))
        return 0
    if ns.sessions:
        from bench.sessions import THINK_S, run_sessions
        from bench.sessions import markdown as sessions_markdown

        ns.out.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryDirectory(prefix="codex-proxy-sessions-") as tmpdir:
            doc = run_sessions(ns.turns, ns.repeat, THINK_S, ns.out, Path(tmpdir))
        print()
        print(sessions_markdown(doc))
        return 0
    if shutil.which("wrk") is None:
        parser.exit(2, "run.sh bench: wrk is missing (./run.sh bench installs it)\n")
    ns.out.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="codex-proxy-bench-") as tmpdir:
        tmp = Path(tmpdir)
        script = tmp / "post.lua"
        script.write_text(WRK_SCRIPT)
        upstream = NginxUpstream(tmp / "nginx", free_port())
        targets: list[Target] = []
        try:
            up_port = upstream.start()
            wait_listening(up_port, upstream.proc)
            for name in ns.targets.split(","):
                print(f"starting {name}", flush=True)
                targets.append(start_target(name, up_port, tmp))
            results = measure_all(targets, ns, script)
        finally:
            for target in targets:
                target.stop()
            upstream.stop()
    add_ratios(results)
    meta = {
        "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
        "cpus": os.cpu_count(),
        "seconds": ns.seconds,
        "streams": ns.streams,
        "repeat": ns.repeat,
    }
    (ns.out / "latest.json").write_text(
        json.dumps({"meta": meta, "results": results}, indent=2) + "\n"
    )
    table = markdown(results, meta)
    (ns.out / "latest.md").write_text(table)
    print()
    print(table)
    return 0


if __name__ == "__main__":
    sys.exit(main())
