"""The upstream of ``./run.sh bench --sessions``: a Responses API that answers every turn with a
streamed tool call, over HTTP (SSE) and over Codex's WebSocket transport, on one port.

nginx (the upstream of the rest of the benchmark) serves no WebSocket, so this one is aiohttp,
run as its own process (``python -m bench.session_upstream``; it prints ``{"port": N}`` when it
listens): its CPU never counts as the gateway's, whose CPU the session benchmark reads from
``/proc`` per turn. It is on the path of every target alike, direct ones included, so a
latency difference between a target and ``direct`` is the target's own.

- ``POST /v1/responses`` (any body with ``"stream": true``) -> ``text/event-stream``: the events
  of :func:`tool_call_events`, the first at once, the others ``gap_ms`` apart (as a model
  streams them: each event then reaches the gateway on its own, over HTTP as over a socket;
  sent back to back, an HTTP stream's events would be read several at a time).
- ``GET /v1/responses`` with ``Upgrade: websocket`` -> a socket; each text message
  ``{"type": "response.create", ...}`` is answered with the same events, one JSON message each;
  a warm-up (``"generate": false``) gets ``response.created`` + ``response.completed`` without
  output or usage, as OpenAI answers Codex's (docs/gateway.md, "Codex's WebSocket transport").

As OpenAI's, every response object echoes the request's ``tools`` (``response.created``,
``in_progress`` and ``completed`` carry them), and ``response.completed`` carries ``usage``:
``input_tokens`` = the conversation's JSON bytes / 4 (HTTP: the body; WebSocket: everything the
socket has carried so far, since the server holds the conversation), ``cached_tokens`` = the
previous turn's input tokens on the same connection, 64 output tokens.
"""

from __future__ import annotations

import asyncio
import json
import sys
import threading
from typing import Any

from aiohttp import WSMsgType, web

#: The model of every reply (in the shipped rate card, so the gateway prices each turn).
MODEL = "gpt-5.5"
#: Output tokens of every turn.
OUTPUT_TOKENS = 64


def response_object(
    response_id: str,
    status: str,
    tools: Any,
    output: list[dict[str, Any]],
    usage: dict[str, Any] | None,
    previous: str | None,
) -> dict[str, Any]:
    """A Responses ``response`` object as the API returns it (the request's tools echoed)."""
    return {
        "id": response_id,
        "object": "response",
        "created_at": 1_800_000_000,
        "status": status,
        "model": MODEL,
        "output": output,
        "parallel_tool_calls": False,
        "previous_response_id": previous,
        "reasoning": {"effort": "medium", "summary": None},
        "store": False,
        "text": {"format": {"type": "text"}, "verbosity": "low"},
        "tool_choice": "auto",
        "tools": tools if isinstance(tools, list) else [],
        "usage": usage,
    }


def tool_call_events(
    response_id: str,
    turn: int,
    tools: Any,
    input_tokens: int,
    cached_tokens: int,
    previous: str | None = None,
    fragments: int = 8,
) -> list[dict[str, Any]]:
    """One turn that calls ``exec_command`` once: created, in_progress, the function call's
    item added, ``fragments`` argument deltas, arguments done, item done, completed (with
    usage). Returns the events' JSON objects in order; the call's ``call_id`` is
    ``call_<turn>``."""
    arguments = json.dumps({"cmd": f"sed -n '{turn * 40},{turn * 40 + 80}p' src/module_{turn}.py"})
    item = {
        "id": f"fc_{response_id}",
        "type": "function_call",
        "status": "in_progress",
        "call_id": f"call_{turn}",
        "name": "exec_command",
        "arguments": "",
    }
    done = {**item, "status": "completed", "arguments": arguments}
    usage = {
        "input_tokens": input_tokens,
        "input_tokens_details": {"cached_tokens": cached_tokens},
        "output_tokens": OUTPUT_TOKENS,
        "output_tokens_details": {"reasoning_tokens": 16},
        "total_tokens": input_tokens + OUTPUT_TOKENS,
    }
    events: list[dict[str, Any]] = []

    def add(kind: str, **payload: Any) -> None:
        events.append({"type": kind, "sequence_number": len(events), **payload})

    running = response_object(response_id, "in_progress", tools, [], None, previous)
    add("response.created", response=running)
    add("response.in_progress", response=running)
    add("response.output_item.added", output_index=0, item=item)
    step = max(1, -(-len(arguments) // fragments))
    for i in range(0, len(arguments), step):
        add(
            "response.function_call_arguments.delta",
            item_id=item["id"],
            output_index=0,
            delta=arguments[i : i + step],
        )
    add(
        "response.function_call_arguments.done",
        item_id=item["id"],
        output_index=0,
        arguments=arguments,
    )
    add("response.output_item.done", output_index=0, item=done)
    completed = response_object(response_id, "completed", tools, [done], usage, previous)
    add("response.completed", response=completed)
    return events


def warm_up_events(response_id: str, tools: Any) -> list[dict[str, Any]]:
    """The answer to a ``generate: false`` warm-up: created + completed, no output, no usage."""
    done = response_object(response_id, "completed", tools, [], None, None)
    return [
        {"type": "response.created", "sequence_number": 0, "response": done},
        {"type": "response.completed", "sequence_number": 1, "response": done},
    ]


class SessionUpstream:
    """The aiohttp application (see the module docstring); ``app()`` builds it."""

    def __init__(self, gap_ms: int = 0) -> None:
        self._counter = 0
        self.gap = gap_ms / 1000

    def _next_id(self) -> str:
        self._counter += 1
        return f"resp_bench_{self._counter}"

    def app(self) -> web.Application:
        app = web.Application(client_max_size=64 * 1024 * 1024)
        app.router.add_route("*", "/v1/responses", self._handle)
        return app

    async def _handle(self, request: web.Request) -> web.StreamResponse:
        if request.method == "GET" and request.headers.get("upgrade", "").lower() == "websocket":
            return await self._socket(request)
        if request.method != "POST":
            return web.json_response({"error": {"message": "not found"}}, status=404)
        body = await request.read()
        try:
            parsed = json.loads(body)
        except ValueError:
            return web.json_response({"error": {"message": "bad JSON"}}, status=400)
        turn = sum(
            1
            for item in parsed.get("input") or []
            if isinstance(item, dict) and item.get("type") == "function_call_output"
        )
        input_tokens = len(body) // 4
        events = tool_call_events(self._next_id(), turn + 1, parsed.get("tools"), input_tokens, 0)
        reply = web.StreamResponse(
            status=200, headers={"content-type": "text/event-stream", "cache-control": "no-cache"}
        )
        reply.enable_chunked_encoding()
        await reply.prepare(request)
        for i, event in enumerate(events):
            if i and self.gap:
                await asyncio.sleep(self.gap)
            await reply.write(f"event: {event['type']}\ndata: {json.dumps(event)}\n\n".encode())
        await reply.write_eof()
        return reply

    async def _socket(self, request: web.Request) -> web.StreamResponse:
        ws = web.WebSocketResponse(max_msg_size=64 * 1024 * 1024)
        await ws.prepare(request)
        carried = 0  # JSON bytes of the conversation this socket has carried
        cached = 0
        turn = 0
        async for msg in ws:
            if msg.type != WSMsgType.TEXT:
                continue
            carried += len(msg.data)
            try:
                parsed = json.loads(msg.data)
            except ValueError:
                continue
            if not isinstance(parsed, dict) or parsed.get("type") != "response.create":
                continue
            response_id = self._next_id()
            if parsed.get("generate") is False:
                events = warm_up_events(response_id, parsed.get("tools"))
            else:
                turn += 1
                events = tool_call_events(
                    response_id,
                    turn,
                    parsed.get("tools"),
                    carried // 4,
                    cached,
                    parsed.get("previous_response_id"),
                )
                cached = carried // 4
            for i, event in enumerate(events):
                if i and self.gap:
                    await asyncio.sleep(self.gap)
                await ws.send_str(json.dumps(event))
        return ws


def main(argv: list[str] | None = None) -> None:
    """``python -m bench.session_upstream PORT [GAP_MS]``: serve on 127.0.0.1:PORT until stdin
    closes or the process is signalled; prints ``{"port": PORT}`` once listening."""
    args = sys.argv[1:] if argv is None else argv
    port = int(args[0])
    gap_ms = int(args[1]) if len(args) > 1 else 0

    async def serve() -> None:
        runner = web.AppRunner(SessionUpstream(gap_ms).app(), access_log=None)
        await runner.setup()
        site = web.TCPSite(runner, "127.0.0.1", port)
        await site.start()
        print(json.dumps({"port": port}), flush=True)
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        threading.Thread(
            target=lambda: (sys.stdin.read(), loop.call_soon_threadsafe(stop.set)), daemon=True
        ).start()
        await stop.wait()
        await runner.cleanup()

    asyncio.run(serve())


if __name__ == "__main__":
    main()
