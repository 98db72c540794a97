"""``./run.sh replay DIR``: serve a recorded session offline (no key, no network).

The same proxy (same flags, server-info line, allowlist, dumps) runs in front of a local replay
upstream that answers each ``POST /v1/responses`` with the recorded reply of the next exchange,
in order. The incoming request must match the recorded one in model, stream flag and shape (its
top-level fields, the types and roles of its input items, the names of its tools); volatile
values (ids, cache keys, timestamps, prompt text) are ignored. A request that does not match, or
one too many, gets ``409`` with a JSON error saying what differed. SSE replies are streamed chunk
by chunk, at the recorded pace (``--pace original``) or as fast as possible (``--pace fast``).

A gateway recording of Codex's WebSocket transport replays to HTTP: each turn recorded on a
socket (a dump pair with ``"transport": "websocket"``) answers the ``POST /v1/responses`` of the
same conversation (:func:`socket_differences`); the socket's warm-up (``generate: false``) and
the upgrade itself are left out, as an HTTP client sends neither.
"""

from __future__ import annotations

import argparse
import asyncio
import io
import json
import secrets
import sys
import threading
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from addons.body_decode import decode_body, loads_json
from addons.redaction import REDACTED
from addons.sse_events import completed_response, parse_sse_text

#: Response headers never replayed: framing, per-connection, per-run or redacted ones.
SKIPPED_HEADERS = frozenset(
    {
        "content-length",
        "transfer-encoding",
        "connection",
        "keep-alive",
        "date",
        "server",
        "set-cookie",
        "content-encoding",
    }
)


@dataclass
class Exchange:
    """One recorded request/reply pair, from a dump pair plus the usage ledger."""

    seq: int
    request: Any
    status: int
    headers: list[tuple[str, str]]
    body: Any
    chunk_timing: list[list[int]] = field(default_factory=list)
    #: ``"websocket"``: a turn recorded on a socket (``addons/socket_turns.py``), served to
    #: an HTTP POST of the same conversation (:func:`socket_differences`).
    transport: str | None = None

    def body_bytes(self) -> bytes:
        if isinstance(self.body, str):
            return self.body.encode("utf-8")
        return json.dumps(self.body, ensure_ascii=False).encode("utf-8")

    def content_type(self) -> str:
        return next((v for k, v in self.headers if k.lower() == "content-type"), "")


@dataclass
class DumpPair:
    """One dump pair as written (``addons/dumps.py``): the request and response documents,
    ``{"method", "url", "headers", "body"}`` and ``{"status", "headers", "body"[, "error"]}``."""

    seq: int
    request: dict[str, Any]
    response: dict[str, Any]


def read_dump_pairs(directory: str | Path) -> list[DumpPair]:
    """Every complete dump pair of ``DIR/dumps/`` (or of dumps directly in ``DIR``), by
    sequence number, failed exchanges included. A request without its response file is left
    out (the proxy stopped before the exchange finished).

    Raises:
        OSError: a file cannot be read.
        ValueError: a dump file is not a JSON object (the message names it).
    """
    root = Path(directory)
    dumps = root / "dumps" if (root / "dumps").is_dir() else root
    pairs = []
    for req_path in sorted(dumps.glob("*-request.json")):
        resp_path = req_path.with_name(req_path.name.replace("-request.json", "-response.json"))
        if not resp_path.exists() or not req_path.name[:6].isdigit():
            continue
        docs = []
        for path in (req_path, resp_path):
            try:
                doc = json.loads(path.read_text(encoding="utf-8"))
            except ValueError as e:
                raise ValueError(f"{path}: not JSON ({e})") from None
            if not isinstance(doc, dict):
                raise ValueError(f"{path}: not a dump (a JSON object)")
            docs.append(doc)
        pairs.append(DumpPair(int(req_path.name[:6]), docs[0], docs[1]))
    return pairs


def load_recording(directory: str | Path) -> list[Exchange]:
    """Read ``DIR/dumps/*`` pairs (or dumps directly in ``DIR``) and ``DIR/usage.jsonl``.

    Raises:
        ValueError: when there is no complete pair to replay.
    """
    root = Path(directory)
    timing: dict[int, list[list[int]]] = {}
    ledger = root / "usage.jsonl"
    if ledger.exists():
        for line in ledger.read_text(encoding="utf-8").splitlines():
            try:
                rec = json.loads(line)
            except ValueError:
                continue
            if isinstance(rec.get("seq"), int):
                timing[rec["seq"]] = rec.get("chunk_timing") or []
    exchanges = []
    for pair in read_dump_pairs(root):
        req, resp = pair.request, pair.response
        body = resp.get("body", "")
        completed = isinstance(body, str) and completed_response(parse_sse_text(body)) is not None
        if resp.get("status") is None or (resp.get("error") and not completed):
            continue  # an exchange that failed while recording is not replayed
        transport = req.get("transport")
        if transport == "websocket" and isinstance(req.get("body"), dict):
            if req["body"].get("generate") is False:
                continue  # Codex's socket warm-up: an HTTP client sends none
        elif req.get("method") == "GET":
            continue  # a WebSocket upgrade (its turns are pairs of their own)
        exchanges.append(
            Exchange(
                seq=pair.seq,
                request=req.get("body"),
                status=int(resp["status"]),
                headers=[(h["name"], h["value"]) for h in resp.get("headers", [])],
                body=body,
                chunk_timing=timing.get(pair.seq, []),
                transport=transport if isinstance(transport, str) else None,
            )
        )
    if not exchanges:
        dumps = root / "dumps" if (root / "dumps").is_dir() else root
        raise ValueError(f"no complete request/response dump pair in {dumps}")
    return exchanges


def request_shape(body: Any) -> dict[str, Any]:
    """What must match between a recorded and a replayed request (values that vary between
    runs, such as ids, cache keys, timestamps and the prompt text, are left out)."""
    if not isinstance(body, dict):
        return {"type": type(body).__name__}
    items = body.get("input")
    if isinstance(items, list):
        input_shape: Any = [
            [it.get("type"), it.get("role")] if isinstance(it, dict) else type(it).__name__
            for it in items
        ]
    else:
        input_shape = type(items).__name__
    tools = body.get("tools")
    return {
        "model": body.get("model"),
        "stream": body.get("stream"),
        "fields": sorted(body),
        "input": input_shape,
        "tools": sorted(t.get("name") or t.get("type") or "?" for t in tools if isinstance(t, dict))
        if isinstance(tools, list)
        else None,
    }


def differences(recorded: Any, incoming: Any) -> list[str]:
    """Human-readable differences between two request shapes (empty when they match)."""
    a, b = request_shape(recorded), request_shape(incoming)
    out = []
    for key in a.keys() | b.keys():
        if a.get(key) != b.get(key):
            out.append(f"{key}: recorded {a.get(key)!r}, got {b.get(key)!r}")
    return sorted(out)


#: Fields only a WebSocket ``response.create`` carries; the HTTP POST of the same turn has none.
SOCKET_ONLY = frozenset({"type", "generate", "previous_response_id"})


def socket_differences(recorded: Any, incoming: Any) -> list[str]:
    """:func:`differences` between a turn recorded on a WebSocket and an incoming HTTP POST.
    The socket-only fields (:data:`SOCKET_ONLY`) are left out of the recorded request, and its
    input, which holds only the items new since ``previous_response_id``, must be the end of
    the POST's input (which resends the whole conversation every turn)."""
    if not isinstance(recorded, dict):
        return differences(recorded, incoming)
    a = request_shape({k: v for k, v in recorded.items() if k not in SOCKET_ONLY})
    b = request_shape(incoming)
    out = []
    for key in a.keys() | b.keys():
        ra, rb = a.get(key), b.get(key)
        if key == "input" and isinstance(ra, list) and isinstance(rb, list):
            if len(ra) > len(rb) or rb[len(rb) - len(ra) :] != ra:
                out.append(f"input: recorded on a socket (new items only) {ra!r}, got {rb!r}")
        elif ra != rb:
            out.append(f"{key}: recorded {ra!r}, got {rb!r}")
    return sorted(out)


def chunks_of(exchange: Exchange) -> list[tuple[int, bytes]]:
    """The reply body split as it arrived while recording: ``[(ms offset, bytes), ...]``.
    Falls back to one chunk per SSE event (offset 0) when no usable timing was recorded."""
    data = exchange.body_bytes()
    timing = exchange.chunk_timing
    if timing and timing[-1][1] == len(data):
        out, start = [], 0
        for offset, end in timing:
            out.append((int(offset), data[start:end]))
            start = end
        return out
    events = [e + b"\n\n" for e in data.split(b"\n\n") if e]
    return [(0, e) for e in events] or [(0, data)]


class ReplayUpstream:
    """The replay server: aiohttp on 127.0.0.1 (ephemeral port) in a background thread."""

    def __init__(self, exchanges: list[Exchange], pace: str = "fast") -> None:
        self.exchanges = exchanges
        self.pace = pace
        self.next_index = 0
        self.port = 0
        self._lock = threading.Lock()
        self._server: Any = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}/v1/responses"

    async def _handle(self, request: Any) -> Any:
        from aiohttp import web

        raw = await request.read()
        # Decoded here, within the decode limits (the server's own decompression is off: it
        # has no bound on what a bomb expands to).
        decoded = decode_body(raw, request.headers.get("content-encoding"))
        try:
            incoming = loads_json(decoded.data or b"null")
        except ValueError:  # not JSON, or nested too deep
            incoming = decoded.data.decode("utf-8", "replace")
        if decoded.error:
            incoming = f"(request body not readable: {decoded.error})"
        with self._lock:
            index = self.next_index
            if index >= len(self.exchanges):
                return self._error(
                    web,
                    f"request {index + 1}: the recording has only "
                    f"{len(self.exchanges)} exchange(s)",
                )
            exchange = self.exchanges[index]
            compare = socket_differences if exchange.transport == "websocket" else differences
            diffs = compare(exchange.request, incoming)
            if diffs:
                return self._error(
                    web,
                    f"request {index + 1} differs from recorded exchange "
                    f"{exchange.seq:06d}: " + "; ".join(diffs),
                )
            self.next_index += 1
        headers = {
            k: v for k, v in exchange.headers if k.lower() not in SKIPPED_HEADERS and v != REDACTED
        }
        if not exchange.content_type().startswith("text/event-stream"):
            return web.Response(status=exchange.status, body=exchange.body_bytes(), headers=headers)
        reply = web.StreamResponse(status=exchange.status, headers=headers)
        reply.enable_chunked_encoding()
        await reply.prepare(request)
        loop = asyncio.get_running_loop()
        started = loop.time()
        for offset, chunk in chunks_of(exchange):
            if self.pace == "original":
                delay = started + offset / 1000 - loop.time()
                if delay > 0:
                    await asyncio.sleep(delay)
            await reply.write(chunk)
        await reply.write_eof()
        return reply

    @staticmethod
    def _error(web: Any, message: str) -> Any:
        return web.json_response(
            {"error": {"type": "codex_proxy", "code": "replay_mismatch", "message": message}},
            status=409,
        )

    def start(self) -> int:
        from aiohttp import web

        from addons.aio_server import ThreadedServer

        app = web.Application(client_max_size=256 * 1024 * 1024)
        app.router.add_route("POST", "/v1/responses", self._handle)
        self._server = ThreadedServer(app, "replay-upstream", auto_decompress=False)
        self.port = self._server.start()
        return self.port

    def stop(self) -> None:
        if self._server is not None:
            self._server.stop()
            self._server = None


def main(argv: Sequence[str] | None = None) -> int:
    """``replay DIR [--pace original|fast] [proxy flags...]``; returns the exit code."""
    from addons.invocation import prog

    parser = argparse.ArgumentParser(
        prog=prog("replay"),
        description="Serve a recorded session offline on the proxy's CLI/server-info contract. "
        "Other flags (--port, --server-info, --http-shutdown, --dump-dir, --record, --set) go to "
        "the proxy; --record NEW re-records the replay (for "
        f"{prog('compare')}).",
    )
    parser.add_argument("recording", help="a --record directory (or a --dump-dir)")
    parser.add_argument(
        "--pace",
        choices=["original", "fast"],
        default="fast",
        help="stream SSE at the recorded pace or as fast as possible",
    )
    ns, proxy_args = parser.parse_known_args(argv)
    if "--upstream-url" in proxy_args:
        parser.exit(2, f"{parser.prog}: error: --upstream-url makes no sense here\n")
    if "--github-oidc" in proxy_args:  # a keyless workflow's flags, copied to its replay step
        parser.exit(2, f"{parser.prog}: error: a replay needs no credential: drop --github-oidc\n")
    try:
        exchanges = load_recording(ns.recording)
    except (OSError, ValueError) as e:
        parser.exit(2, f"{parser.prog}: error: {e}\n")
    upstream = ReplayUpstream(exchanges, ns.pace)
    upstream.start()
    sys.stderr.write(
        f"replaying {len(exchanges)} exchange(s) from {ns.recording} ({ns.pace} pace)\n"
    )
    # No real key: the proxy needs one to inject, and only our local replay upstream sees it.
    dummy = io.BytesIO(("replay-" + secrets.token_hex(16) + "\n").encode())
    from addons import cli

    try:
        return cli.main([*proxy_args, "--upstream-url", upstream.url], stdin=dummy)
    finally:
        upstream.stop()


if __name__ == "__main__":
    sys.exit(main())
