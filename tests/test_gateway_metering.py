"""Every reply is metered (issue 30): the usage of a reply is read whatever its compression
ratio, or its ledger row says why it could not be (``error`` starting ``unmetered:``, counted in
``/metrics``); no reply leaves a silent 200 with 0 tokens; through the chat bridge the row
matches what the client got.

Unit cases for :func:`addons.exchange.meter_reply` and :class:`addons.body_decode.BodyStream`,
then the real gateway against an upstream serving decompression bombs (gzip and zstd, as
several members / frames of one small compressed block: a megabyte on the wire, hundreds of
MiB to a GiB decoded).
"""

from __future__ import annotations

import gzip
import http.client
import http.server
import json
import sqlite3
import sys
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest

from addons.body_decode import MIB, BodyStream, decode_body
from addons.exchange import UNMETERED, Reply, meter_reply
from tests.conftest import wait_for
from tests.fake_upstream import encode_event, responses_sse_events
from tests.gateway_harness import OPERATOR, Gateway, bearer
from tests.test_faults import RSS_BOUND_MIB, TreeMemory

if sys.version_info >= (3, 14):
    from compression import zstd
else:
    from backports import zstd

USAGE = {
    "input_tokens": 42,
    "input_tokens_details": {"cached_tokens": 8},
    "output_tokens": 17,
    "output_tokens_details": {"reasoning_tokens": 5},
    "total_tokens": 59,
}
FILLER_EVENT = encode_event(
    "response.output_text.delta",
    {"type": "response.output_text.delta", "delta": "a" * 4000},
)


def compressed(coding: str, data: bytes) -> bytes:
    """``data`` as one gzip member or one zstd frame."""
    return gzip.compress(data, 6) if coding == "gzip" else zstd.compress(data)


def bomb(coding: str, head: bytes, filler: bytes, mib: int, tail: bytes) -> bytes:
    """``head``, ``filler`` repeated to ``mib`` MiB, ``tail``: gzip members / zstd frames in a
    row (a body may carry several; the filler's block is compressed once and repeated)."""
    block = filler * max(1, MIB // len(filler))
    one = compressed(coding, block)
    return compressed(coding, head) + one * (mib * MIB // len(block)) + compressed(coding, tail)


def sse_bomb(coding: str, mib: int) -> bytes:
    """A Responses stream that decodes to ``mib`` MiB of deltas, then ``response.completed``
    with :data:`USAGE`."""
    events = responses_sse_events("hi", "gpt-5.5", "resp_bomb")
    head = b"".join(encode_event(kind, payload) for kind, payload in events[:-1])
    kind, last = events[-1]
    last = {**last, "response": {**last["response"], "usage": USAGE}}
    return bomb(coding, head, FILLER_EVENT, mib, encode_event(kind, last))


def json_bomb(coding: str, mib: int, usage_first: bool = True) -> bytes:
    """A Responses object of ``mib`` MiB, its ``usage`` first (as the issue's case) or last."""
    usage = b'"usage":' + json.dumps(USAGE).encode()
    head = b'{"id":"resp_j","object":"response","status":"completed",'
    head += (usage + b",") if usage_first else b""
    head += (
        b'"output":[{"type":"message","role":"assistant","content":[{"type":"output_text","text":"'
    )
    tail = b'"}]}]' + ((b"," + usage) if not usage_first else b"") + b"}"
    return bomb(coding, head, b"a" * 4096, mib, tail)


# -- unit: meter_reply and BodyStream -------------------------------------------------------


@pytest.mark.parametrize("coding", ["gzip", "zstd", "deflate", "br", "gzip, br", None])
def test_body_stream_decodes_like_the_whole_decoder_in_bounded_pieces(coding):
    from mitmproxy.net import encoding

    data = b"".join(encode_event(k, p) for k, p in responses_sse_events("x" * 3000, "m", "r"))
    raw = data
    for one in (coding or "").split(","):
        raw = encoding.encode(raw, one.strip()) if one.strip() else raw
    stream = BodyStream(coding, piece=1000)
    pieces = [p for i in range(0, len(raw), 333) for p in stream.pieces(raw[i : i + 333])]
    pieces += list(stream.end())
    assert stream.error is None
    assert b"".join(pieces) == decode_body(raw, coding).data == data
    assert max(len(p) for p in pieces) <= 1000


def test_body_stream_names_a_truncated_body_and_stops_at_its_cap():
    raw = gzip.compress(b"x" * 100_000)
    stream = BodyStream("gzip")
    list(stream.pieces(raw[:-20]))
    list(stream.end())
    assert stream.error == "gzip: the stream ends before its frame does (truncated)"
    capped = BodyStream("gzip", max_bytes=50_000, piece=10_000)
    out = b"".join(capped.pieces(raw))
    assert len(out) <= 50_000 and capped.over_limit and "decoding stopped" in (capped.error or "")


@pytest.mark.parametrize("coding", ["gzip", "zstd"])
def test_a_stream_past_the_decode_limit_is_metered_from_its_last_event(coding):
    raw = sse_bomb(coding, 64)  # 2x the 32 MiB decode limit
    assert len(raw) < MIB
    assert decode_body(raw, coding).over_limit  # every other reader stops at the limit
    metered = meter_reply(Reply(200, "text/event-stream", raw, coding))
    assert metered.usage is not None and metered.usage["total"] == 59
    assert metered.turn_status == "completed" and metered.unmetered is None


def test_a_json_reply_past_the_limit_is_metered_from_its_usage_first_or_last():
    for usage_first in (True, False):
        raw = json_bomb("gzip", 48, usage_first)
        metered = meter_reply(Reply(200, "application/json", raw, "gzip"))
        assert metered.usage is not None and metered.usage["total"] == 59, usage_first


def test_usage_quoted_inside_text_is_not_taken_for_the_reply_s():
    fake = json.dumps({"text": '"usage": {"total_tokens": 1}'}).encode()[1:-1]
    raw = bomb("gzip", b'{"output":"' + fake, b"b" * 4096, 40, b'"}')
    metered = meter_reply(Reply(200, "application/json", raw, "gzip"))
    assert metered.usage is None
    assert metered.unmetered == f"{UNMETERED}: the reply carries no usage"


@pytest.mark.parametrize(
    ("reply", "why"),
    [
        # Past even the metering cap (here 40 MiB, as 64 GiB is for a real reply).
        (
            Reply(200, "text/event-stream", sse_bomb("zstd", 64), "zstd"),
            "unmetered: the reply decodes past 40 MiB, metering stopped",
        ),
        (
            Reply(200, "text/event-stream", gzip.compress(b"data: {}\n\n")[:-8], "gzip"),
            "unmetered: the reply could not be read "
            "(gzip: the stream ends before its frame does (truncated))",
        ),
        (
            Reply(200, "text/event-stream", b"event: x\ndata: {}\n\n", None),
            "unmetered: the reply carries no usage",
        ),
        (Reply(200, "application/json", b"", None), "unmetered: the reply carries no usage"),
        (Reply(200, "application/json", b"{}", "br-not-a-coding"), None),
        # Not a success: the status names it, no usage is expected.
        (Reply(429, "application/json", b'{"error": {}}', None), None),
    ],
)
def test_why_a_reply_is_unmetered(reply, why):
    metered = meter_reply(reply, max_bytes=40 * MIB)
    assert metered.usage is None
    if reply.content_encoding == "br-not-a-coding":
        assert metered.unmetered == (
            "unmetered: the reply could not be read (unsupported content-encoding "
            "'br-not-a-coding')"
        )
    else:
        assert metered.unmetered == why


# -- the real gateway against a bomb-serving upstream ---------------------------------------


class RawUpstream:
    """An upstream that answers every POST with ``body`` as given (``content_type``,
    ``content_encoding``), and records how many it got."""

    def __init__(self) -> None:
        self.body = b""
        self.content_type = "text/event-stream"
        self.content_encoding: str | None = None
        self.requests = 0
        upstream = self

        class Handler(http.server.BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def do_POST(self) -> None:
                self.rfile.read(int(self.headers.get("content-length") or 0))
                upstream.requests += 1
                self.send_response(200)
                self.send_header("content-type", upstream.content_type)
                if upstream.content_encoding:
                    self.send_header("content-encoding", upstream.content_encoding)
                self.send_header("content-length", str(len(upstream.body)))
                self.end_headers()
                self.wfile.write(upstream.body)

            def log_message(self, *args: object) -> None:
                pass

        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.server.server_address[1]}/v1/responses"

    def __enter__(self) -> RawUpstream:
        self.thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture
def bomb_gateway(tmp_path: Path) -> Iterator[tuple[Gateway, RawUpstream, object]]:
    gw = Gateway(tmp_path)
    gw.admin("init")
    gw.admin("add-member", "eve")
    try:
        with RawUpstream() as up:
            server = gw.serve(up.url, "--chat-bridge")
            yield gw, up, server
    finally:
        gw.stop()


def rows(gw: Gateway) -> list[tuple]:
    """``(route, status, total_tokens, error)`` of every finished usage row."""
    path = gw.database.removeprefix("sqlite:///")
    with sqlite3.connect(path) as db:
        return db.execute(
            "SELECT route, status, total_tokens, error FROM usage "
            "WHERE duration_ms IS NOT NULL ORDER BY ts_ms"
        ).fetchall()


def metric(server, name: str, labels: str) -> float:
    status, _, body = server.request("GET", "/metrics", headers=OPERATOR)
    assert status == 200
    for line in body.decode().splitlines():
        if line.startswith(f"{name}{{{labels}}} "):
            return float(line.split()[-1])
    return 0.0


def post(server, key: str, path: str, payload: dict) -> tuple[int, bytes]:
    conn = http.client.HTTPConnection("127.0.0.1", server.port, timeout=120)
    try:
        conn.request(
            "POST",
            path,
            json.dumps(payload),
            {**bearer(key), "content-type": "application/json", "accept-encoding": "identity"},
        )
        resp = conn.getresponse()
        return resp.status, resp.read()
    finally:
        conn.close()


@pytest.mark.e2e
def test_bombs_from_the_upstream_are_metered_or_flagged_never_a_silent_200(bomb_gateway):
    gw, up, server = bomb_gateway
    key = gw.add_key("eve")
    cases = [
        # (body, content type, coding, stream?, expected total tokens, expected error start)
        (json_bomb("gzip", 1024), "application/json", "gzip", False, 59, None),
        (sse_bomb("gzip", 256), "text/event-stream", "gzip", True, 59, None),
        (sse_bomb("zstd", 1024), "text/event-stream", "zstd", True, 59, None),
        (
            gzip.compress(b"event: x\ndata: {}\n\n"),
            "text/event-stream",
            "gzip",
            True,
            0,
            "unmetered: the reply carries no usage",
        ),
    ]
    with TreeMemory(server.proc.pid) as memory:
        for body, ctype, coding, stream, _, _ in cases:
            up.body, up.content_type, up.content_encoding = body, ctype, coding
            payload = {"model": "gpt-5.5", "stream": stream}
            status, got = post(server, key, "/v1/responses", payload)
            assert status == 200 and got == body  # served as the upstream sent it, every byte
    # Decoded to their end (2.25 GiB in all) in bounded pieces: the gateway never held them.
    print(f"\nreply bombs metered; peak RSS of the gateway {memory.peak_mib:.0f} MiB")
    assert memory.peak_mib < RSS_BOUND_MIB
    wait_for(lambda: len(rows(gw)) == len(cases), 60, "every row")
    for row, (_, _, _, _, tokens, error) in zip(rows(gw), cases, strict=True):
        assert row[1] == 200 and row[2] == tokens and row[3] == error, row
    assert metric(server, "codex_gateway_refused_total", 'reason="unmetered"') == 1
    total = gw.usage("--member", "eve")["total"]
    assert total["total_tokens"] == 3 * 59


@pytest.mark.e2e
def test_a_bridged_bomb_is_an_error_for_the_client_and_in_its_row(bomb_gateway):
    gw, up, server = bomb_gateway
    key = gw.add_key("eve")
    up.body, up.content_type, up.content_encoding = (
        sse_bomb("gzip", 64),
        "text/event-stream",
        "gzip",
    )
    status, got = post(
        server,
        key,
        "/v1/chat/completions",
        {"model": "gpt-5.5", "stream": True, "messages": [{"role": "user", "content": "hi"}]},
    )
    # The bridge decodes within the decode limit: its client gets an error chunk, not 1 GiB.
    assert status == 200 and b'"error"' in got and b"decoding stopped at the limit" in got
    wait_for(lambda: len(rows(gw)) == 1, 60, "the bridged row")
    ((route, row_status, tokens, error),) = rows(gw)
    assert route == "/v1/chat/completions"
    # What the client got: an error, and the upstream's usage is still counted.
    assert row_status == 502 and tokens == 59
    assert error.startswith("client got an error: the upstream stream ended before"), error
