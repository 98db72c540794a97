"""``./run.sh replay DIR``: serve a recorded session offline (no key, no network).

The same proxy (same flags, server-info line, allowlist, dumps) runs in front of a local replay
upstream that answers each ``POST /v1/responses`` with the recorded reply of the next exchange,
in order. The incoming request must match the recorded one in model, stream flag and shape (its
top-level fields, the types and roles of its input items, the names of its tools); volatile
values (ids, cache keys, timestamps, prompt text) are ignored. A request that does not match, or
one past the recording, gets ``400`` (:data:`REFUSAL_STATUS`: Codex stops at once) with a JSON
error saying why, and the reason goes into the replay's report at exit (stderr, and
``replay.json`` in a re-recording). The recording is read within
:data:`addons.recording_files.LIMITS`, and no reply body is held in memory between requests.
SSE replies are streamed chunk by chunk, at the recorded pace (``--pace original``) or as fast
as possible (``--pace fast``).

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
import os
import secrets
import sys
import threading
from array import array
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from addons.body_decode import decode_body, loads_json
from addons.recording_files import LIMITS, ReadLimits, check_stream, dump_names, ledger_lines
from addons.recording_files import read_document as read_json_file
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
    #: ``[[ms, bytes so far], ...]``, or the same flat (``array("q")``: :func:`read_timing`).
    chunk_timing: Sequence[Sequence[int]] | array[int] = field(default_factory=list)
    #: ``"websocket"``: a turn recorded on a socket (``addons/socket_turns.py``), served to
    #: an HTTP POST of the same conversation (:func:`socket_differences`).
    transport: str | None = None
    #: The dump pair it is read from when served (:func:`load_recording` keeps no bodies).
    source: tuple[Path, Path] | None = None

    def body_bytes(self) -> bytes:
        if isinstance(self.body, str):
            return self.body.encode("utf-8")
        return json.dumps(self.body, ensure_ascii=False).encode("utf-8")

    def content_type(self) -> str:
        return next((v for k, v in self.headers if k.lower() == "content-type"), "")


@dataclass
class DumpPair:
    """One dump pair as written (``addons/dumps.py``): the request and response documents,
    ``{"method", "url", "headers", "body"}`` and ``{"status", "headers", "body"[, "error"]}``;
    ``paths``: the two files."""

    seq: int
    request: dict[str, Any]
    response: dict[str, Any]
    paths: tuple[Path, Path] | None = None


def dump_dir_of(directory: str | Path) -> Path:
    """``DIR/dumps`` of a recording, or ``DIR`` itself when it holds the dumps directly."""
    root = Path(directory)
    return root / "dumps" if (root / "dumps").is_dir() else root


def read_pair(seq: int, paths: tuple[Path, Path], limits: ReadLimits = LIMITS) -> DumpPair:
    """The dump pair in ``paths`` (request file, response file), each read within ``limits``.

    Raises:
        OSError: a file cannot be read.
        ValueError: a dump file is not a JSON object (the message names it);
            :class:`addons.recording_files.TooLarge`: over a read limit.
    """
    docs = []
    for path in paths:
        doc = read_json_file(path, limits)
        if not isinstance(doc, dict):
            raise ValueError(f"{path}: not a dump (a JSON object)")
        if isinstance(doc.get("body"), str):
            check_stream(doc["body"], str(path), limits)
        docs.append(doc)
    return DumpPair(seq, docs[0], docs[1], paths)


def iter_dump_pairs(
    directory: str | Path, limits: ReadLimits = LIMITS, wanted: set[int] | None = None
) -> Iterator[DumpPair]:
    """Each complete dump pair of ``DIR/dumps/`` (or of dumps directly in ``DIR``), by
    sequence number, failed exchanges included, read one pair at a time within ``limits``
    (``wanted``: only these sequence numbers). A request without its response file is left
    out (the proxy stopped before the exchange finished).

    Raises:
        OSError: a file cannot be read.
        ValueError: a dump file is not a JSON object (the message names it);
            :class:`addons.recording_files.TooLarge`: over a read limit.
    """
    for seq, request, response in dump_names(dump_dir_of(directory), limits, wanted):
        yield read_pair(seq, (request, response), limits)


def read_dump_pairs(directory: str | Path, limits: ReadLimits = LIMITS) -> list[DumpPair]:
    """Every complete dump pair, as :func:`iter_dump_pairs` reads them (all held at once)."""
    return list(iter_dump_pairs(directory, limits))


def read_timing(ledger: Path, limits: ReadLimits = LIMITS) -> dict[int, array[int]]:
    """``{sequence number: chunk timing}`` from a recording's ``usage.jsonl``, each as a flat
    ``array`` ``[ms, bytes, ms, bytes, ...]`` (16 bytes a chunk, where a list of lists costs
    ~120), read within ``limits``. A line that is no ledger line is skipped (a replay serves a
    ledger cut mid-line); a chunk timing that is no list of int pairs reads as none.

    Raises:
        OSError: the ledger cannot be read.
        :class:`addons.recording_files.TooLarge`: over a read limit.
    """
    timing: dict[int, array[int]] = {}
    if not os.path.lexists(ledger):
        return timing
    for _number, line in ledger_lines(ledger, limits):
        try:
            rec = loads_json(line)
        except ValueError:
            continue
        if not isinstance(rec, dict) or not isinstance(rec.get("seq"), int):
            continue
        flat: array[int] = array("q")
        try:
            for pair in rec.get("chunk_timing") or []:
                offset, end = pair
                flat.extend((int(offset), int(end)))
        except (TypeError, ValueError, OverflowError):
            flat = array("q")  # no usable timing: served one chunk per event
        timing[rec["seq"]] = flat
    return timing


def _exchange_of(
    pair: DumpPair, timing: Sequence[Sequence[int]] | array[int] = ()
) -> Exchange | None:
    """The exchange a replay serves for ``pair``, or ``None`` when it serves none (a failed
    exchange, Codex's socket warm-up, a WebSocket upgrade)."""
    req, resp = pair.request, pair.response
    body = resp.get("body", "")
    completed = isinstance(body, str) and completed_response(parse_sse_text(body)) is not None
    status = resp.get("status")
    if not isinstance(status, int) or (resp.get("error") and not completed):
        return None  # an exchange that failed while recording is not replayed
    transport = req.get("transport")
    if transport == "websocket" and isinstance(req.get("body"), dict):
        if req["body"].get("generate") is False:
            return None  # Codex's socket warm-up: an HTTP client sends none
    elif req.get("method") == "GET":
        return None  # a WebSocket upgrade (its turns are pairs of their own)
    headers = resp.get("headers")
    return Exchange(
        seq=pair.seq,
        request=req.get("body"),
        status=status,
        headers=[
            (str(h.get("name", "")), str(h.get("value", "")))
            for h in headers
            if isinstance(h, dict)
        ]
        if isinstance(headers, list)
        else [],
        body=body,
        chunk_timing=timing,
        transport=transport if isinstance(transport, str) else None,
        source=pair.paths,
    )


def load_recording(directory: str | Path, limits: ReadLimits = LIMITS) -> list[Exchange]:
    """The exchanges a replay serves, from ``DIR/dumps/*`` pairs (or dumps directly in
    ``DIR``) and ``DIR/usage.jsonl``'s chunk timing, every file read within ``limits``. Each
    pair is read once here to check it and then let go: an exchange holds its dump files'
    paths, and is read again when served (:meth:`ReplayUpstream.served`), so memory does not
    grow with the recording.

    Raises:
        OSError: a file cannot be read.
        ValueError: when there is no complete pair to replay, a dump file is not a JSON
            object; :class:`addons.recording_files.TooLarge`: over a read limit.
    """
    root = Path(directory)
    timing = read_timing(root / "usage.jsonl", limits)
    exchanges = []
    for pair in iter_dump_pairs(root, limits):
        exchange = _exchange_of(pair, timing.get(pair.seq, array("q")))
        if exchange is not None:
            exchange.request, exchange.headers, exchange.body = None, [], ""
            exchanges.append(exchange)
    if not exchanges:
        raise ValueError(f"no complete request/response dump pair in {dump_dir_of(root)}")
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


def _timing_pairs(timing: Sequence[Sequence[int]] | array[int]) -> list[tuple[int, int]]:
    """``[(ms, bytes so far), ...]`` of a chunk timing, as a list of pairs or a flat array."""
    if isinstance(timing, array):
        return list(zip(timing[::2], timing[1::2], strict=True))
    return [(int(offset), int(end)) for offset, end in timing]


def chunks_of(exchange: Exchange) -> list[tuple[int, bytes]]:
    """The reply body split as it arrived while recording: ``[(ms offset, bytes), ...]``.
    Falls back to one chunk per SSE event (offset 0) when no usable timing was recorded."""
    data = exchange.body_bytes()
    timing = _timing_pairs(exchange.chunk_timing)
    if timing and timing[-1][1] == len(data):
        out, start = [], 0
        for offset, end in timing:
            out.append((offset, data[start:end]))
            start = end
        return out
    events = [e + b"\n\n" for e in data.split(b"\n\n") if e]
    return [(0, e) for e in events] or [(0, data)]


#: The status of a request the replay cannot answer from the recording (one past its end, or
#: one that differs from the recorded one). Codex 0.171 gives up on a 400 at once (one request,
#: ``ERROR: {"error": …}`` with the message below, exit 1); a 409, 404 or 422 it retries five
#: times (docs/gateway.md, "Statuses Codex gives up on").
REFUSAL_STATUS = 400
#: Refused requests a replay's report lists one by one (the rest are counted).
REPORTED_REFUSALS = 100


@dataclass
class ReplayReport:
    """What a replay did, for its report at exit (:meth:`text`, :meth:`as_json`): exchanges
    recorded and served, and every request refused with its reason."""

    recording: str
    exchanges: int
    served: int = 0
    refused: int = 0
    reasons: list[dict[str, Any]] = field(default_factory=list)

    def refuse(self, request: int, code: str, message: str) -> None:
        self.refused += 1
        if len(self.reasons) < REPORTED_REFUSALS:
            self.reasons.append({"request": request, "code": code, "message": message})

    def as_json(self) -> dict[str, Any]:
        """``{"recording", "exchanges", "served", "refused", "status", "reasons": [{"request",
        "code", "message"}]}`` (``replay.json`` beside a re-recording)."""
        return {
            "recording": self.recording,
            "exchanges": self.exchanges,
            "served": self.served,
            "refused": self.refused,
            "status": REFUSAL_STATUS,
            "reasons": self.reasons,
        }

    def text(self) -> str:
        """A few lines for stderr: served of recorded, then each refusal's reason."""
        lines = [
            f"replay: served {self.served} of {self.exchanges} recorded exchange(s) from "
            f"{self.recording}; {self.refused} request(s) refused"
        ]
        if self.refused:
            lines[0] += f" ({REFUSAL_STATUS}: Codex stops at once)"
        lines += [f"  {r['code']}: {r['message']}" for r in self.reasons]
        if self.refused > len(self.reasons):
            lines.append(f"  ... and {self.refused - len(self.reasons)} more")
        return "\n".join(lines) + "\n"


class ReplayUpstream:
    """The replay server: aiohttp on 127.0.0.1 (ephemeral port) in a background thread."""

    def __init__(
        self,
        exchanges: list[Exchange],
        pace: str = "fast",
        limits: ReadLimits = LIMITS,
        recording: str = "",
    ) -> None:
        self.exchanges = exchanges
        self.pace = pace
        self.limits = limits
        self.next_index = 0
        self.port = 0
        self.report = ReplayReport(recording, len(exchanges))
        self._lock = threading.Lock()
        self._server: Any = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}/v1/responses"

    def served(self, exchange: Exchange) -> Exchange:
        """``exchange`` with its request and reply, read from its dump pair again when it
        holds only the paths (:func:`load_recording`). Raises ``OSError`` / ``ValueError``."""
        if exchange.source is None or exchange.request is not None:
            return exchange
        loaded = _exchange_of(read_pair(exchange.seq, exchange.source, self.limits))
        if loaded is None:
            raise ValueError("no longer a replayable exchange")
        loaded.chunk_timing = exchange.chunk_timing
        return loaded

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
            number = index + self.report.refused + 1
            if index >= len(self.exchanges):
                return self._refuse(
                    web,
                    number,
                    "replay_past_recording",
                    f"request {number}: past the recording, which has only "
                    f"{len(self.exchanges)} exchange(s), all served",
                )
            try:
                exchange = self.served(self.exchanges[index])
            except (OSError, ValueError) as e:
                return self._refuse(
                    web,
                    number,
                    "replay_unreadable",
                    f"request {number}: recorded exchange {self.exchanges[index].seq:06d} "
                    f"cannot be read: {e}",
                )
            compare = socket_differences if exchange.transport == "websocket" else differences
            diffs = compare(exchange.request, incoming)
            if diffs:
                return self._refuse(
                    web,
                    number,
                    "replay_mismatch",
                    f"request {number} differs from recorded exchange "
                    f"{exchange.seq:06d}: " + "; ".join(diffs),
                )
            self.next_index += 1
            self.report.served += 1
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

    def _refuse(self, web: Any, number: int, code: str, message: str) -> Any:
        """The answer to a request the recording cannot serve: :data:`REFUSAL_STATUS` with an
        OpenAI-style error (Codex prints it and stops), kept for the report."""
        self.report.refuse(number, code, message)
        return web.json_response(
            {"error": {"type": "codex_proxy", "code": code, "message": message}},
            status=REFUSAL_STATUS,
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
    upstream = ReplayUpstream(exchanges, ns.pace, recording=ns.recording)
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
        write_report(upstream.report, record_dir(proxy_args))


def record_dir(proxy_args: Iterable[str]) -> str | None:
    """The ``--record DIR`` among the proxy's flags (``None``: not re-recording)."""
    found = argparse.ArgumentParser(add_help=False)
    found.add_argument("--record")
    return found.parse_known_args(list(proxy_args))[0].record


def write_report(report: ReplayReport, record: str | None) -> None:
    """The replay's report: on stderr, and as ``replay.json`` (mode 0600) in the re-recording
    ``record`` when there is one (a failure to write it is said on stderr)."""
    sys.stderr.write(report.text())
    if record and os.path.isdir(record):
        from addons.dumps import write_file_atomically

        data = json.dumps(report.as_json(), indent=2, ensure_ascii=False) + "\n"
        try:
            write_file_atomically(record, "replay.json", data.encode())
        except OSError as e:
            sys.stderr.write(f"replay: cannot write replay.json: {e}\n")


if __name__ == "__main__":
    sys.exit(main())
