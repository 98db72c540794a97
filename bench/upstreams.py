"""Benchmark upstream: small JSON replies for request-rate runs, and SSE streams on a schedule.

``python -m bench.upstreams --info FILE`` starts it on 127.0.0.1 (ephemeral port) and writes
``{"port": N, "pid": N}`` to FILE. A ``POST /v1/responses`` whose JSON body has
``"stream": true`` gets ``bench_events`` SSE events (default 50), one every
``bench_interval_ms`` (default 20; both may also come in ``metadata``, which the Chat
Completions bridge passes through), each carrying ``"t"``: the wall-clock time (s) it was
scheduled to leave, so a client can compute per-event lag; the text delta is ``"[t]"`` too, so
the lag survives translation into Chat Completions chunks. Anything else gets a small JSON reply
(with the request body's length, for the 8 MB run).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import time

from aiohttp import web


async def handle(request: web.Request) -> web.StreamResponse:
    """Small JSON reply, or a scheduled SSE stream when the body asks ``"stream": true``."""
    raw = await request.read()
    try:
        body = json.loads(raw) if len(raw) < 65536 else {}
    except ValueError:
        body = {}
    if not (isinstance(body, dict) and body.get("stream")):
        return web.json_response(
            {
                "id": "resp_bench",
                "object": "response",
                "status": "completed",
                "received_bytes": len(raw),
            }
        )
    params = {**(body.get("metadata") or {}), **body}
    events = int(params.get("bench_events", 50))
    interval = float(params.get("bench_interval_ms", 20)) / 1000
    reply = web.StreamResponse(headers={"content-type": "text/event-stream"})
    reply.enable_chunked_encoding()
    await reply.prepare(request)
    loop = asyncio.get_running_loop()
    start_wall, start_loop = time.time(), loop.time()
    for i in range(events):
        delay = start_loop + i * interval - loop.time()
        if delay > 0:
            await asyncio.sleep(delay)
        kind = "response.completed" if i == events - 1 else "response.output_text.delta"
        t = start_wall + i * interval
        payload = {"type": kind, "i": i, "t": t, "delta": f"[{t:.6f}]"}
        await reply.write(f"event: {kind}\ndata: {json.dumps(payload)}\n\n".encode())
    await reply.write_eof()
    return reply


def main() -> None:
    """Serve until killed; the port goes to the ``--info`` file."""
    parser = argparse.ArgumentParser()
    parser.add_argument("--info", required=True)
    ns = parser.parse_args()

    async def run() -> None:
        app = web.Application(client_max_size=64 * 1024 * 1024)
        app.router.add_post("/v1/responses", handle)
        runner = web.AppRunner(app, access_log=None, auto_decompress=False)
        await runner.setup()
        await web.TCPSite(runner, "127.0.0.1", 0, backlog=4096).start()
        port = runner.addresses[0][1]
        tmp = ns.info + ".tmp"
        with open(tmp, "w") as f:
            json.dump({"port": port, "pid": os.getpid()}, f)
        os.replace(tmp, ns.info)
        await asyncio.Event().wait()

    asyncio.run(run())


if __name__ == "__main__":
    main()
