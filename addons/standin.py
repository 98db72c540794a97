"""A local stand-in for the OpenAI Responses API, for ``codex-proxy demo`` and the tests (which
import it through ``tests/fake_upstream.py``, where it is named ``FakeUpstream``), and alone:
``codex-proxy standin [--port N] [--server-info FILE]`` (:func:`main`).

An aiohttp server on 127.0.0.1 (ephemeral port) in a background thread. It records every
request it gets and answers ``POST .../responses`` with a realistic Responses SSE stream (or a
JSON response object when the request does not ask for ``"stream": true``). Tests steer it
through attributes: ``status``, ``error_body``, ``events``, ``event_delay``, ``gate``.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import socket
import struct
import threading
import time
import zlib
from dataclasses import dataclass, field
from typing import Any

import aiohttp
from aiohttp import web
from multidict import CIMultiDict

from addons.aio_server import ThreadedServer

DEFAULT_TEXT = "Hello from the local Responses stand-in! Each word is its own SSE event."


@dataclass
class RecordedRequest:
    """What reached the upstream: ``headers`` keep order, case and duplicates."""

    method: str
    path_qs: str
    headers: list[tuple[str, str]]
    body: bytes
    received_at: float = field(default_factory=time.monotonic)

    def header_values(self, name: str) -> list[str]:
        return [v for k, v in self.headers if k.lower() == name.lower()]


# One creation time per process: tests that build the same stand-in stream twice and compare the
# two must not fail when a second ticks between the builds.
CREATED_AT = int(time.time())


def usage_block() -> dict[str, Any]:
    """The usage of every stand-in reply (59 tokens: 42 in, 8 of them cached, 17 out)."""
    return {
        "input_tokens": 42,
        "input_tokens_details": {"cached_tokens": 8, "cache_write_tokens": 3},
        "output_tokens": 17,
        "output_tokens_details": {"reasoning_tokens": 5},
        "total_tokens": 59,
    }


def response_object(
    response_id: str, model: str, text: str, status: str = "completed"
) -> dict[str, Any]:
    """A Responses ``response`` object as the API returns it: one assistant message of
    ``text`` and :func:`usage_block` when ``status`` is ``completed``, else no output."""
    done = status == "completed"
    return {
        "id": response_id,
        "object": "response",
        "created_at": CREATED_AT,
        "status": status,
        "model": model,
        "output": [
            {
                "id": "msg_" + response_id,
                "type": "message",
                "role": "assistant",
                "status": "completed",
                "content": [{"type": "output_text", "text": text, "annotations": []}],
            }
        ]
        if done
        else [],
        "usage": usage_block() if done else None,
    }


def responses_sse_events(
    text: str = DEFAULT_TEXT, model: str = "test-model", response_id: str = "resp_standin"
) -> list[tuple[str, dict[str, Any]]]:
    """A realistic Responses API event sequence for an assistant message saying ``text``:
    created, in_progress, output_item.added, content_part.added, one output_text.delta per
    word, output_text.done, content_part.done, output_item.done, completed (with usage)."""
    item_id = "msg_" + response_id
    seq = iter(range(1_000_000))
    events: list[tuple[str, dict[str, Any]]] = []

    def add(kind: str, **payload: Any) -> None:
        events.append((kind, {"type": kind, "sequence_number": next(seq), **payload}))

    add("response.created", response=response_object(response_id, model, "", "in_progress"))
    add("response.in_progress", response=response_object(response_id, model, "", "in_progress"))
    item = {
        "id": item_id,
        "type": "message",
        "role": "assistant",
        "status": "in_progress",
        "content": [],
    }
    add("response.output_item.added", output_index=0, item=item)
    add(
        "response.content_part.added",
        item_id=item_id,
        output_index=0,
        content_index=0,
        part={"type": "output_text", "text": "", "annotations": []},
    )
    words = text.split(" ")
    for i, word in enumerate(words):
        delta = word if i == 0 else " " + word
        add(
            "response.output_text.delta",
            item_id=item_id,
            output_index=0,
            content_index=0,
            delta=delta,
            logprobs=[],
        )
    add(
        "response.output_text.done",
        item_id=item_id,
        output_index=0,
        content_index=0,
        text=text,
        logprobs=[],
    )
    part = {"type": "output_text", "text": text, "annotations": []}
    add("response.content_part.done", item_id=item_id, output_index=0, content_index=0, part=part)
    done_item = {
        "id": item_id,
        "type": "message",
        "role": "assistant",
        "status": "completed",
        "content": [part],
    }
    add("response.output_item.done", output_index=0, item=done_item)
    add("response.completed", response=response_object(response_id, model, text))
    return events


def realtime_usage() -> dict[str, Any]:
    """The usage of every stand-in Realtime response (59 tokens: 42 in, 8 of them cached, 17
    out; all text), in ``response.done``'s ``response.usage`` shape."""
    return {
        "total_tokens": 59,
        "input_tokens": 42,
        "output_tokens": 17,
        "input_token_details": {
            "cached_tokens": 8,
            "text_tokens": 42,
            "audio_tokens": 0,
            "image_tokens": 0,
            "cached_tokens_details": {"text_tokens": 8, "audio_tokens": 0, "image_tokens": 0},
        },
        "output_token_details": {"text_tokens": 17, "audio_tokens": 0},
    }


def realtime_response_events(response_id: str, text: str) -> list[dict[str, Any]]:
    """The Realtime server events of one text response: ``response.created``, one
    ``response.output_text.delta``, ``response.done`` (status ``completed``, with
    :func:`realtime_usage`)."""

    def response(status: str, output: list[Any], usage: Any) -> dict[str, Any]:
        return {
            "id": response_id,
            "object": "realtime.response",
            "status": status,
            "output": output,
            "output_modalities": ["text"],
            "conversation_id": "conv_standin",
            "usage": usage,
        }

    item_id = "item_" + response_id
    item = {
        "id": item_id,
        "object": "realtime.item",
        "type": "message",
        "role": "assistant",
        "status": "completed",
        "content": [{"type": "output_text", "text": text}],
    }
    return [
        {
            "type": "response.created",
            "event_id": "event_c" + response_id,
            "response": response("in_progress", [], None),
        },
        {
            "type": "response.output_text.delta",
            "event_id": "event_d" + response_id,
            "response_id": response_id,
            "item_id": item_id,
            "output_index": 0,
            "content_index": 0,
            "delta": text,
        },
        {
            "type": "response.done",
            "event_id": "event_e" + response_id,
            "response": response("completed", [item], realtime_usage()),
        },
    ]


def encode_event(kind: str, payload: dict[str, Any]) -> bytes:
    """One SSE event on the wire: ``event: kind``, ``data: <JSON>`` and the blank line."""
    return f"event: {kind}\ndata: {json.dumps(payload)}\n\n".encode()


class StreamCompressor:
    """Compresses an SSE stream event by event: each event's bytes are flushed at once (zstd
    ``FLUSH_BLOCK``, zlib ``Z_SYNC_FLUSH``), so a decoder can show it before the next one is
    sent; :meth:`end` closes the zstd frame / gzip member."""

    def __init__(self, coding: str) -> None:
        self.coding = coding
        if coding == "zstd":
            import zstandard  # a test dependency: the demo never compresses

            self._zstd = zstandard.ZstdCompressor().compressobj()
            self._block = zstandard.COMPRESSOBJ_FLUSH_BLOCK
        elif coding == "gzip":
            self._zlib = zlib.compressobj(wbits=16 + zlib.MAX_WBITS)
        else:
            raise ValueError(f"unsupported coding {coding!r}")

    @classmethod
    def negotiate(cls, offered: tuple[str, ...], accept_encoding: str) -> StreamCompressor | None:
        """The first of ``offered`` that ``accept_encoding`` names (q-values ignored)."""
        accepted = {part.split(";")[0].strip().lower() for part in accept_encoding.split(",")}
        coding = next((c for c in offered if c in accepted), None)
        return cls(coding) if coding else None

    def event(self, data: bytes) -> bytes:
        if self.coding == "zstd":
            return self._zstd.compress(data) + self._zstd.flush(self._block)
        return self._zlib.compress(data) + self._zlib.flush(zlib.Z_SYNC_FLUSH)

    def end(self) -> bytes:
        return self._zstd.flush() if self.coding == "zstd" else self._zlib.flush()


def compress_stream(parts: list[bytes], coding: str, finish: bool = True) -> bytes:
    """``parts`` compressed as :class:`StreamCompressor` sends them (``finish=False``: cut
    before the end of the zstd frame / gzip member)."""
    compressor = StreamCompressor(coding)
    return b"".join(compressor.event(p) for p in parts) + (compressor.end() if finish else b"")


class ResponsesStandIn:
    """The stand-in server. ``start()`` returns the port; ``url`` is its ``/v1/responses``.

    Attributes a test may set before a request:
        status: HTTP status of the reply (non-2xx replies carry ``error_body`` as JSON).
        events: SSE events to send (default: :func:`responses_sse_events` for the model asked).
        event_delay: seconds between events.
        gate: when set, after the first event wait (at most ``gate_timeout`` s) until the gate
            is set before sending the rest; ``gate_timed_out`` tells whether it ran out.
        text: the assistant text of the default stream.
        fault: after ``fault_after`` events, ``"reset"`` (abort the connection, RST),
            ``"truncate"`` (close without the final chunk) or ``"stall"`` (go silent).
        responder: ``f(request body) -> events`` choosing each stream's events (a tool round
            trip answers a call first, then text); overrides ``events``.
        json_reply: ``f(request body) -> response object`` for non-streamed requests.
        set_cookies: ``Set-Cookie`` values added to every reply (as api.openai.com's edge sets
            ``__cf_bm`` / ``_cfuvid``), one header each.
        compression: codings the stream may be compressed with, in order of preference
            (``"zstd"``, ``"gzip"``); the first one the request's ``Accept-Encoding`` names is
            used, flushed after every event as a real server must for SSE. ``()``: never.
        reply_headers: headers added to every streamed reply (as OpenAI's backend adds its
            ``x-codex-*`` rate-limit headers about the account).
        key_status: ``{upstream key: status}``: requests carrying ``Bearer <key>`` get that
            status (JSON error, with ``Retry-After: key_retry_after`` on a 429), as a rate
            limited or revoked OpenAI key would; other keys are served normally.

    WebSocket (``GET .../responses`` with ``Upgrade: websocket``, as OpenAI serves Codex):
    each text message ``{"type": "response.create", ...}`` is answered with the same events as
    the SSE stream, one JSON text message each (a warm-up with ``"generate": false`` gets
    ``response.created`` + ``response.completed`` without output or usage). The upgrade is
    recorded in ``requests``; the client's messages in ``ws_messages`` (parsed JSON, with the
    connection's number in ``ws_connection``); ``ws_open`` counts open sockets.
        ws_reply: ``f(message) -> events | None`` overrides the events for a message.
        ws_close_after: close each socket after this many ``response.create`` messages, with
            close code ``ws_close_code`` (OpenAI closes a socket after 60 minutes).
        ``gate`` holds a socket's turn after its first event too (not a warm-up's).

    Realtime (``GET .../realtime?model=…`` with ``Upgrade: websocket``, the OpenAI Realtime
    API): ``session.created`` (the URL's model) on connect; ``session.update`` →
    ``session.updated``; ``conversation.item.create`` → ``conversation.item.added``;
    ``response.create`` → :func:`realtime_response_events` (``gate`` holds it after
    ``response.created``); ``input_audio_buffer.commit`` → the same, unasked (as server-side
    turn detection starts a response). Recorded like the other socket: the upgrade in
    ``requests``, the client's events in ``ws_messages``, ``ws_open`` / ``ws_connections``.
    """

    def __init__(self) -> None:
        self.requests: list[RecordedRequest] = []
        self.status = 200
        self.error_body: dict[str, Any] = {"error": {"message": "stand-in error", "type": "x"}}
        self.events: list[tuple[str, dict[str, Any]]] | None = None
        self.event_delay = 0.0
        self.text = DEFAULT_TEXT
        self.gate: threading.Event | None = None
        self.gate_timeout = 10.0
        self.gate_timed_out: bool | None = None
        self.fault: str | None = None
        #: Set as soon as a request head arrives (before its body is read).
        self.headers_seen = threading.Event()
        self.fault_after = 2
        self.compression: tuple[str, ...] = ()
        self.set_cookies: list[str] = []
        self.responder: Any = None
        self.json_reply: Any = None
        self.headers_delay = 0.0
        self.ssl_context: Any = None
        self.key_status: dict[str, int] = {}
        self.reply_headers: dict[str, str] = {}
        self.key_retry_after = "7"
        self.ws_messages: list[dict[str, Any]] = []
        self.ws_reply: Any = None
        self.ws_close_after: int | None = None
        self.ws_close_code = 1000
        self.ws_open = 0
        self.ws_connections = 0
        self.port = 0
        self._server: ThreadedServer | None = None
        self._counter = 0
        self._lock = threading.Lock()

    @property
    def url(self) -> str:
        scheme = "https" if self.ssl_context is not None else "http"
        return f"{scheme}://127.0.0.1:{self.port}/v1/responses"

    async def _handle(self, request: web.Request) -> web.StreamResponse:
        self.headers_seen.set()
        if request.method == "GET" and request.headers.get("upgrade", "").lower() == "websocket":
            if request.path.endswith("/realtime"):
                return await self._realtime(request)
            return await self._websocket(request)
        body = await request.read()
        self.requests.append(
            RecordedRequest(
                request.method,
                request.path_qs,
                [(k.decode("latin-1"), v.decode("latin-1")) for k, v in request.raw_headers],
                body,
            )
        )
        if request.method != "POST" or not request.path.endswith(
            ("/responses", "/responses/compact")
        ):
            return web.json_response({"error": {"message": "not found"}}, status=404)
        cookies = CIMultiDict(("Set-Cookie", c) for c in self.set_cookies)
        token = request.headers.get("authorization", "").removeprefix("Bearer ")
        if token in self.key_status:
            status = self.key_status[token]
            if status == 429:
                cookies["Retry-After"] = self.key_retry_after
            return web.json_response(self.error_body, status=status, headers=cookies)
        if self.status >= 300:
            return web.json_response(self.error_body, status=self.status, headers=cookies)
        try:
            parsed = json.loads(body or b"{}")
        except ValueError:
            parsed = {}
        model = str(parsed.get("model", "test-model")) if isinstance(parsed, dict) else "x"
        with self._lock:
            self._counter += 1
            response_id = f"resp_standin_{self._counter}"
        if not (isinstance(parsed, dict) and parsed.get("stream")):
            reply = (
                self.json_reply(parsed)
                if self.json_reply
                else response_object(response_id, model, self.text)
            )
            return web.json_response(reply, headers=cookies)
        if self.responder is not None:
            events = self.responder(parsed)
        else:
            events = self.events or responses_sse_events(self.text, model, response_id)
        if self.headers_delay:
            await asyncio.sleep(self.headers_delay)
        headers = CIMultiDict(
            {
                "content-type": "text/event-stream",
                "cache-control": "no-cache",
                "x-request-id": "req_" + response_id,
            }
        )
        headers.extend(cookies)
        headers.update(self.reply_headers)
        compressor = StreamCompressor.negotiate(
            self.compression, request.headers.get("accept-encoding", "")
        )
        if compressor is not None:
            headers["content-encoding"] = compressor.coding
        reply = web.StreamResponse(status=self.status, headers=headers)
        reply.enable_chunked_encoding()
        await reply.prepare(request)
        for i, (kind, payload) in enumerate(events):
            if self.fault and i == self.fault_after:
                transport = request.transport
                if self.fault == "stall":
                    await asyncio.sleep(3600)
                if transport is not None:
                    if self.fault == "reset":
                        sock = transport.get_extra_info("socket")
                        if sock is not None:
                            sock.setsockopt(
                                socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0)
                            )
                        transport.abort()
                    else:
                        transport.close()
                return reply
            if i and self.event_delay:
                await asyncio.sleep(self.event_delay)
            data = encode_event(kind, payload)
            await reply.write(compressor.event(data) if compressor else data)
            if i == 0 and self.gate is not None:
                gate = self.gate
                opened = await asyncio.get_running_loop().run_in_executor(
                    None, gate.wait, self.gate_timeout
                )
                self.gate_timed_out = not opened
        if compressor is not None:
            await reply.write(compressor.end())
        await reply.write_eof()
        return reply

    def _next_id(self) -> str:
        with self._lock:
            self._counter += 1
            return f"resp_standin_{self._counter}"

    def _upgrade_refusal(self, request: web.Request) -> web.Response | None:
        """Record a WebSocket upgrade in ``requests`` and answer it as an HTTP request would be
        (``key_status`` for its key, else ``status``; 429 with ``Retry-After``), or ``None``
        to accept it."""
        self.requests.append(
            RecordedRequest(
                request.method,
                request.path_qs,
                [(k.decode("latin-1"), v.decode("latin-1")) for k, v in request.raw_headers],
                b"",
            )
        )
        token = request.headers.get("authorization", "").removeprefix("Bearer ")
        if token not in self.key_status and self.status < 300:
            return None
        status = self.key_status.get(token, self.status)
        retry = {"Retry-After": self.key_retry_after} if status == 429 else None
        return web.json_response(self.error_body, status=status, headers=retry)

    def _received(self, msg: aiohttp.WSMessage, number: int) -> dict[str, Any] | None:
        """A client's text message on socket ``number``, parsed (``{"unparsed": text}`` when it
        is no JSON object) and kept in ``ws_messages``; ``None`` for any other frame."""
        if msg.type != aiohttp.WSMsgType.TEXT:
            return None
        try:
            parsed = json.loads(msg.data)
        except ValueError:
            parsed = {"unparsed": msg.data}
        if not isinstance(parsed, dict):
            parsed = {"unparsed": msg.data}
        self.ws_messages.append({**parsed, "ws_connection": number})
        return parsed

    async def _websocket(self, request: web.Request) -> web.StreamResponse:
        """The WebSocket transport (see the class docstring)."""
        refused = self._upgrade_refusal(request)
        if refused is not None:
            return refused
        ws = web.WebSocketResponse()
        ws.headers.update(self.reply_headers)
        await ws.prepare(request)
        self.ws_connections += 1
        number = self.ws_connections
        self.ws_open += 1
        creates = 0
        try:
            async for msg in ws:
                parsed = self._received(msg, number)
                if parsed is None:
                    continue
                if parsed.get("type") != "response.create":
                    continue
                creates += 1
                for i, (_, payload) in enumerate(self._ws_events(parsed)):
                    await ws.send_str(json.dumps(payload))
                    if i == 0 and self.gate is not None and parsed.get("generate") is not False:
                        gate = self.gate
                        opened = await asyncio.get_running_loop().run_in_executor(
                            None, gate.wait, self.gate_timeout
                        )
                        self.gate_timed_out = not opened
                if self.ws_close_after is not None and creates >= self.ws_close_after:
                    await ws.close(code=self.ws_close_code)
                    break
        finally:
            self.ws_open -= 1
        return ws

    async def _realtime(self, request: web.Request) -> web.StreamResponse:
        """The Realtime API (see the class docstring)."""
        refused = self._upgrade_refusal(request)
        if refused is not None:
            return refused
        ws = web.WebSocketResponse()
        await ws.prepare(request)
        self.ws_connections += 1
        number = self.ws_connections
        self.ws_open += 1
        session = {
            "id": f"sess_standin_{number}",
            "object": "realtime.session",
            "type": "realtime",
            "model": request.query.get("model", "gpt-realtime"),
            "output_modalities": ["audio"],
            "instructions": "",
        }
        try:
            await ws.send_str(
                json.dumps({"type": "session.created", "event_id": "event_s", "session": session})
            )
            async for msg in ws:
                parsed = self._received(msg, number)
                if parsed is None:
                    continue
                kind = parsed.get("type")
                if kind == "session.update" and isinstance(parsed.get("session"), dict):
                    session.update(
                        {k: v for k, v in parsed["session"].items() if k not in ("id", "model")}
                    )
                    await ws.send_str(json.dumps({"type": "session.updated", "session": session}))
                elif kind == "conversation.item.create":
                    item = {**(parsed.get("item") or {}), "id": f"item_{self._next_id()}"}
                    added = {"type": "conversation.item.added", "previous_item_id": None}
                    await ws.send_str(json.dumps({**added, "item": item}))
                elif kind in ("response.create", "input_audio_buffer.commit"):
                    # A committed audio buffer starts a response by itself, as the server's
                    # turn detection does: no response.create asks for it.
                    events = realtime_response_events(self._next_id(), self.text)
                    for i, event in enumerate(events):
                        if ws.closed:
                            break  # closed while the gate held the response
                        await ws.send_str(json.dumps(event))
                        if i == 0 and self.gate is not None:
                            gate = self.gate
                            opened = await asyncio.get_running_loop().run_in_executor(
                                None, gate.wait, self.gate_timeout
                            )
                            self.gate_timed_out = not opened
        finally:
            self.ws_open -= 1
        return ws

    def _ws_events(self, message: dict[str, Any]) -> list[tuple[str, dict[str, Any]]]:
        if self.ws_reply is not None:
            events = self.ws_reply(message)
            if events is not None:
                return events
        model = str(message.get("model", "test-model"))
        response_id = self._next_id()
        if message.get("generate") is False:
            done = {**response_object(response_id, model, ""), "output": [], "usage": None}
            return [
                ("response.created", {"type": "response.created", "response": done}),
                ("response.completed", {"type": "response.completed", "response": done}),
            ]
        if self.responder is not None:
            return self.responder(message)
        return self.events or responses_sse_events(self.text, model, response_id)

    def start(self) -> int:
        app = web.Application(client_max_size=64 * 1024 * 1024)
        app.router.add_route("*", "/{tail:.*}", self._handle)
        # auto_decompress off: record request bodies exactly as they arrived (zstd too).
        self._server = ThreadedServer(
            app,
            "fake-upstream",
            port=self.port,
            ssl_context=self.ssl_context,
            auto_decompress=False,
        )
        self.port = self._server.start()
        return self.port

    def stop(self) -> None:
        if self._server is not None:
            self._server.stop()
            self._server = None

    def __enter__(self) -> ResponsesStandIn:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()


def build_parser() -> argparse.ArgumentParser:
    """``standin``'s command line."""
    from addons.invocation import prog
    from addons.launch import port_number

    parser = argparse.ArgumentParser(
        prog=prog("standin"),
        description="Run the local Responses stand-in alone on 127.0.0.1 (no key, no network): "
        "POST /v1/responses answers a canned SSE stream (or a JSON response), WebSocket and "
        "Realtime too. Point a proxy at it with --upstream-url URL (any key on stdin); "
        "Ctrl-C or SIGTERM stops it.",
    )
    parser.add_argument("--port", type=port_number, default=0, help="port (default: ephemeral)")
    parser.add_argument(
        "--server-info",
        metavar="FILE",
        help='once listening, write {"port":N,"pid":N,"url":URL} to FILE (as the proxy does)',
    )
    parser.add_argument(
        "--event-delay", type=float, default=0.0, metavar="S", help="seconds between SSE events"
    )
    return parser


def main(argv: list[str] | None = None) -> int:
    """``standin``: serve until SIGINT/SIGTERM; prints where it listens (and how to point the
    proxy there) on stdout. Returns 0."""
    import os
    import signal

    from addons.invocation import command

    ns = build_parser().parse_args(argv)
    up = ResponsesStandIn()
    up.port = ns.port
    up.event_delay = ns.event_delay
    up.start()
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    if ns.server_info:
        line = json.dumps({"port": up.port, "pid": os.getpid(), "url": up.url})
        tmp = f"{ns.server_info}.tmp"
        with open(tmp, "w", encoding="utf-8") as f:
            f.write(line + "\n")
        os.replace(tmp, ns.server_info)
    print(f"Responses stand-in listening at {up.url}", flush=True)
    print(
        f"  a proxy in front of it: echo sk-any | {command()} --upstream-url {up.url}",
        flush=True,
    )
    try:
        stop.wait()
    except KeyboardInterrupt:
        pass
    finally:
        up.stop()
    return 0


if __name__ == "__main__":
    main()
