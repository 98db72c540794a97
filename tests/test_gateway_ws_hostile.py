"""A hostile member on the gateway's sockets (issue 30), against the real gateway process: a
permessage-deflate bomb (with the offer removed, the default, and with deflate allowed), a
large message in fragments, a socket that never reads, a flood of junk messages. Each with
the process tree's peak RSS (``VmHWM``) and a bystander member's latency measured against a
baseline taken in the same test; memory, close codes, error events and ledger rows asserted,
latencies printed (``pytest -s``), as in tests/test_faults.py. Plus units of the bounds.
"""

from __future__ import annotations

import json
import socket
import sqlite3
import struct
import threading
import time
import zlib
from collections.abc import Iterator
from contextlib import contextmanager

import pytest
import wsproto
import wsproto.events
from wsproto.extensions import PerMessageDeflate
from wsproto.frame_protocol import CloseReason

from addons.gateway_mode.socket_bounds import BURST_S, BoundedDeflate, MessageBucket
from tests.conftest import wait_for
from tests.gateway_harness import OPERATOR, bearer
from tests.test_faults import RSS_BOUND_MIB, TreeMemory, latencies, summary
from tests.test_gateway_codex import refused

MIB = 1024 * 1024
MODEL = "gpt-5.5"
CREATE = json.dumps({"type": "response.create", "model": MODEL, "input": "hi"}).encode()
STREAM = {"model": MODEL, "stream": True, "input": "hi"}


# -- a raw member socket ---------------------------------------------------------------------


def frame(payload: bytes, opcode: int = 0x1, fin: bool = True, rsv1: bool = False) -> bytes:
    """A client frame, masked with the all-zero key (legal, and the payload stays as is)."""
    head = bytes([(0x80 if fin else 0) | (0x40 if rsv1 else 0) | opcode])
    n = len(payload)
    if n < 126:
        head += bytes([0x80 | n])
    elif n < 1 << 16:
        head += bytes([0x80 | 126]) + struct.pack("!H", n)
    else:
        head += bytes([0x80 | 127]) + struct.pack("!Q", n)
    return head + b"\0\0\0\0" + payload


class RawSocket:
    """A member's WebSocket to the gateway on a plain TCP socket: ``wsproto`` for the upgrade
    and for reading what the gateway sends, hand-made frames for sending (RSV1 set on a
    frame of our choosing, fragments, no reading at all)."""

    def __init__(
        self,
        port: int,
        key: str,
        deflate: bool = True,
        rcvbuf: int | None = None,
        target: str = "/v1/responses",
    ):
        self.sock = socket.socket()
        if rcvbuf is not None:
            self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, rcvbuf)
        self.sock.connect(("127.0.0.1", port))
        self.sock.settimeout(60)
        self.ws = wsproto.WSConnection(wsproto.ConnectionType.CLIENT)
        headers = [(k.encode(), v.encode()) for k, v in bearer(key).items()]
        offer = [PerMessageDeflate()] if deflate else []
        self.sock.sendall(
            self.ws.send(
                wsproto.events.Request(
                    host=f"127.0.0.1:{port}",
                    target=target,
                    extra_headers=headers,
                    extensions=offer,
                )
            )
        )
        self.accepted: wsproto.events.AcceptConnection | None = None
        while self.accepted is None:
            self.ws.receive_data(self.sock.recv(65536))
            for event in self.ws.events():
                assert not isinstance(event, wsproto.events.RejectConnection), event
                if isinstance(event, wsproto.events.AcceptConnection):
                    self.accepted = event
        self.texts: list[dict] = []
        self.close_code: int | None = None

    @property
    def deflate(self) -> bool:
        return bool(self.accepted and self.accepted.extensions)

    def send(self, data: bytes) -> bool:
        """Send raw bytes; ``False`` once the gateway has closed the connection."""
        try:
            self.sock.sendall(data)
            return True
        except OSError:
            return False

    def read_until_closed(self, timeout: float = 60) -> None:
        """Read text messages (parsed into ``texts``) until the close frame or EOF."""
        self.sock.settimeout(timeout)
        while self.close_code is None:
            try:
                data = self.sock.recv(65536)
            except ConnectionResetError:
                data = b""
            self.ws.receive_data(data or None)
            for event in self.ws.events():
                if isinstance(event, wsproto.events.TextMessage):
                    self.texts.append(json.loads(event.data))
                elif isinstance(event, wsproto.events.CloseConnection):
                    self.close_code = event.code
            if not data:
                break

    def close(self) -> None:
        self.sock.close()


def connection_rows(gateway) -> list[dict]:
    with sqlite3.connect(gateway.database.removeprefix("sqlite:///")) as db:
        db.row_factory = sqlite3.Row
        return [dict(r) for r in db.execute("SELECT * FROM ws_connections ORDER BY opened_ms")]


def closed_rows(gateway, n: int) -> list[dict]:
    def ready() -> bool:
        return len([r for r in connection_rows(gateway) if r["closed_ms"]]) >= n

    wait_for(ready, 20, f"{n} closed ws_connections rows")
    return [r for r in connection_rows(gateway) if r["closed_ms"]]


@contextmanager
def bystander(server, key: str) -> Iterator[tuple[list[float], list[float]]]:
    """A legitimate member's HTTP turns: ten before (the baseline), then one after another
    while the block runs. Yields ``(before, during)`` latencies (s)."""
    headers = bearer(key)

    def turn() -> int:
        return server.post_json(STREAM, headers)[0]

    before: list[float] = []
    for _ in range(10):
        started = time.monotonic()
        assert turn() == 200
        before.append(time.monotonic() - started)
    during: list[float] = []
    stop = threading.Event()
    thread = threading.Thread(target=latencies, args=(turn, stop, during))
    thread.start()
    try:
        yield before, during
    finally:
        stop.set()
        thread.join()


def deflate_bomb() -> bytes:
    """Raw deflate (permessage-deflate's framing: no zlib header, the final empty block's
    ``00 00 ff ff`` removed) of a 1 GiB ``response.create``: ~1 MB on the wire."""
    compressor = zlib.compressobj(9, zlib.DEFLATED, -15)
    head = b'{"type": "response.create", "model": "gpt-5.5", "input": "'
    parts = [compressor.compress(head)]
    chunk = b"A" * (8 * MIB)
    for _ in range(128):
        parts.append(compressor.compress(chunk))
    parts.append(compressor.compress(b'"}'))
    parts.append(compressor.flush(zlib.Z_SYNC_FLUSH))
    data = b"".join(parts)
    assert data.endswith(b"\x00\x00\xff\xff")
    return data[:-4]


@pytest.fixture(scope="module")
def bomb() -> bytes:
    return deflate_bomb()


def members(gateway) -> tuple[str, str]:
    gateway.admin("add-member", "mallory")
    gateway.admin("add-member", "bob")
    return gateway.add_key("mallory"), gateway.add_key("bob")


# -- end to end -------------------------------------------------------------------------------


@pytest.mark.e2e
def test_a_deflate_bomb_and_a_huge_fragmented_message_are_closed_before_they_are_buffered(
    gateway, upstream, bomb
):
    """Default: the member's deflate offer is removed, so the bomb's RSV1 frame is a protocol
    error (1002) and nothing is inflated; 200 MiB in 1 MiB fragments stops at the decode cap
    (32 MiB) with Codex's ``request_too_large`` error event, then 1009."""
    mallory, bob = members(gateway)
    server = gateway.serve(upstream.url, "--websockets")
    with TreeMemory(server.proc.pid) as memory, bystander(server, bob) as (before, during):
        started = time.monotonic()
        bombed = RawSocket(server.port, mallory)
        assert not bombed.deflate  # the offer went nowhere: neither leg compresses
        bombed.send(frame(bomb, rsv1=True))
        bombed.read_until_closed()
        bombed.close()
        bomb_s = time.monotonic() - started

        started = time.monotonic()
        big = RawSocket(server.port, mallory)
        fragment = b"A" * MIB
        sent = 0
        for i in range(200):
            opcode = 0x1 if i == 0 else 0x0
            if not big.send(frame(fragment, opcode, fin=i == 199)):
                break
            sent += 1
        big.read_until_closed()
        big.close()
        big_s = time.monotonic() - started
    print(
        f"\nbomb ({len(bomb)} B, RSV1): closed {bombed.close_code} after {bomb_s:.1f} s; "
        f"200 MiB in fragments: {sent} MiB sent, closed {big.close_code} after {big_s:.1f} s; "
        f"peak RSS {memory.peak_mib:.0f} MiB; bystander before {summary(before)}, "
        f"during {summary(during)}"
    )
    assert bombed.close_code == CloseReason.PROTOCOL_ERROR and bombed.texts == []
    assert big.close_code == CloseReason.MESSAGE_TOO_BIG
    assert [e["error"]["code"] for e in big.texts] == ["request_too_large"]
    assert "codex_decode_max_mib" in big.texts[0]["error"]["message"]
    assert sent < 200  # the gateway closed mid-message, not after gathering it
    assert memory.peak_mib < RSS_BOUND_MIB
    assert not [m for m in upstream.ws_messages if m.get("type") == "response.create"]
    rows = closed_rows(gateway, 2)
    reasons = [r["close_reason"] for r in rows]
    print(reasons)
    assert reasons[0].startswith("closed by the gateway (1002)")
    assert reasons[1].startswith("closed by the gateway (1009)") and "33554432" in reasons[1]
    assert all(r["client_messages"] == 0 for r in rows)
    assert refused(server, "protocol_error") == 1 and refused(server, "request_too_large") == 1
    assert server.shutdown() == 0


@pytest.mark.e2e
def test_with_deflate_allowed_the_bomb_stops_inflating_at_the_cap(gateway, upstream, bomb):
    mallory, bob = members(gateway)
    server = gateway.serve(upstream.url, "--websockets", "--set", "codex_gateway_ws_deflate=true")
    with TreeMemory(server.proc.pid) as memory, bystander(server, bob) as (before, during):
        started = time.monotonic()
        bombed = RawSocket(server.port, mallory)
        assert bombed.deflate  # negotiated with the upstream, bounded on the member side
        bombed.send(frame(bomb, rsv1=True))
        bombed.read_until_closed()
        bombed.close()
        seconds = time.monotonic() - started
    print(
        f"\nbomb with deflate on: closed {bombed.close_code} after {seconds:.1f} s; "
        f"peak RSS {memory.peak_mib:.0f} MiB; bystander before {summary(before)}, "
        f"during {summary(during)}"
    )
    assert bombed.close_code == CloseReason.MESSAGE_TOO_BIG
    assert [e["error"]["code"] for e in bombed.texts] == ["request_too_large"]
    assert memory.peak_mib < RSS_BOUND_MIB
    (row,) = closed_rows(gateway, 1)
    assert row["close_reason"].startswith("closed by the gateway (1009)")
    assert "inflates past the gateway's limit of 33554432" in row["close_reason"]
    # A well-behaved compressed turn still works.
    polite = RawSocket(server.port, mallory)
    compressor = zlib.compressobj(9, zlib.DEFLATED, -15)
    data = compressor.compress(CREATE) + compressor.flush(zlib.Z_SYNC_FLUSH)
    polite.send(frame(data[:-4], rsv1=True))
    wait_for(lambda: any(m.get("input") == "hi" for m in upstream.ws_messages), 20, "the turn")
    polite.close()
    assert server.shutdown() == 0


@pytest.mark.e2e
def test_a_socket_that_never_reads_is_dropped_with_its_memory_bounded(gateway, upstream):
    """``response.create`` messages on a socket whose client reads nothing (a 4 KiB receive
    buffer), each answered with ~1.2 MB of events: once the bytes queued for it pass
    ``codex_gateway_ws_backlog_kib``, or the gateway's writes to it have stayed paused for
    ``codex_gateway_ws_stall_s`` (3 s here), the connection is dropped (which of the two
    comes first depends on how much the kernel's buffers took). (3 000 of them at once are
    closed by the frame rate first: the flood test.)"""
    mallory, bob = members(gateway)
    upstream.text = " ".join(["w" * 200_000] * 3)  # the deltas, then the item and the response
    server = gateway.serve(upstream.url, "--websockets", "--set", "codex_gateway_ws_stall_s=3")
    with TreeMemory(server.proc.pid) as memory, bystander(server, bob) as (before, during):
        started = time.monotonic()
        mute = RawSocket(server.port, mallory, deflate=False, rcvbuf=4096)
        assert mute.send(frame(CREATE) * 50)
        (row,) = closed_rows(gateway, 1)  # waits for the drop
        seconds = time.monotonic() - started
    mute.close()
    print(
        f"\nnon-reading socket: dropped after {seconds:.1f} s ({row['close_reason']}); "
        f"upstream got {len(upstream.ws_messages)} creates; peak RSS {memory.peak_mib:.0f} MiB; "
        f"bystander before {summary(before)}, during {summary(during)}"
    )
    assert row["close_reason"].startswith("closed by the gateway: its client stopped reading")
    assert refused(server, "not_reading") == 1
    assert row["client_messages"] == 50
    assert memory.peak_mib < RSS_BOUND_MIB
    metrics = server.request("GET", "/metrics", headers=OPERATOR)[2].decode()
    assert "codex_gateway_websocket_open 0.0" in metrics
    print("upstream sockets still open:", upstream.ws_open)
    assert server.shutdown() == 0


@pytest.mark.e2e
@pytest.mark.parametrize("target", ["/v1/responses", "/v1/realtime?model=gpt-realtime"])
def test_a_flood_of_junk_closes_the_flooding_socket_and_spares_the_bystander(
    gateway, upstream, target
):
    """20 000 junk frames at once, on Codex's route and on the Realtime API's (whose error
    event has its own shape: the same ``error.code``)."""
    mallory, bob = members(gateway)
    server = gateway.serve(upstream.url, "--websockets")
    junk = frame(b"junk")
    with TreeMemory(server.proc.pid) as memory, bystander(server, bob) as (before, during):
        flood = RawSocket(server.port, mallory, deflate=False, target=target)
        started = time.monotonic()
        flood.send(junk * 20_000)
        flood.read_until_closed()
        flood.close()
        seconds = time.monotonic() - started
    errors = [e for e in flood.texts if e["type"] == "error"]  # Realtime: session.created too
    print(
        f"\nflood of 20000 junk frames on {target}: closed {flood.close_code} after "
        f"{seconds:.2f} s with {errors}; peak RSS {memory.peak_mib:.0f} MiB; "
        f"bystander before {summary(before)}, during {summary(during)}"
    )
    assert flood.close_code == CloseReason.POLICY_VIOLATION
    assert [e["error"]["code"] for e in errors] == ["rate_limited"]
    assert "codex_gateway_ws_messages_per_s" in errors[0]["error"]["message"]
    assert ("event_id" in errors[0]) is target.startswith("/v1/realtime")  # the route's shape
    assert memory.peak_mib < RSS_BOUND_MIB
    (row,) = closed_rows(gateway, 1)
    assert row["close_reason"].startswith("closed by the gateway (1008)")
    assert refused(server, "rate_limited") == 1
    # The burst and the rate while it lasted reached the hooks; the rest never did.
    assert row["client_messages"] <= 50 * (BURST_S + seconds) + 1
    # The same member's next socket works: the bucket refills at the rate.
    again = RawSocket(server.port, mallory, deflate=False, target=target)
    again.send(frame(CREATE))
    wait_for(
        lambda: any(m.get("type") == "response.create" for m in upstream.ws_messages),
        20,
        "the turn",
    )
    again.close()
    assert server.shutdown() == 0


# -- units ------------------------------------------------------------------------------------


def test_bounded_deflate_stops_at_its_limit_plus_one_byte():
    class Proto:
        client = False

    compressor = zlib.compressobj(9, zlib.DEFLATED, -15)
    wire = compressor.compress(bytes(10 * MIB)) + compressor.flush(zlib.Z_SYNC_FLUSH)
    ext = BoundedDeflate(MIB)
    ext.finalize("permessage-deflate")
    from wsproto.frame_protocol import Opcode, RsvBits

    ext.frame_inbound_header(Proto(), Opcode.TEXT, RsvBits(True, False, False), len(wire))
    out = ext.frame_inbound_payload_data(Proto(), wire)
    assert out is CloseReason.MESSAGE_TOO_BIG and ext.inflated == MIB + 1
    # Under the limit: the message inflates whole, and the next message starts at 0.
    ext = BoundedDeflate(16 * MIB)
    ext.finalize("permessage-deflate")
    ext.frame_inbound_header(Proto(), Opcode.TEXT, RsvBits(True, False, False), len(wire))
    out = ext.frame_inbound_payload_data(Proto(), wire[:-4])
    tail = ext.frame_inbound_complete(Proto(), True)
    assert isinstance(out, bytes) and isinstance(tail, bytes) and len(out + tail) == 10 * MIB
    ext.frame_inbound_header(Proto(), Opcode.TEXT, RsvBits(True, False, False), 10)
    assert ext.inflated == 0


def test_the_message_bucket_allows_its_burst_then_its_rate():
    now = [0.0]
    bucket = MessageBucket(10, clock=lambda: now[0])
    assert all(bucket.take() for _ in range(10 * BURST_S))
    assert not bucket.take()
    now[0] += 0.5
    assert sum(bucket.take() for _ in range(10)) == 5
    assert all(MessageBucket(0).take() for _ in range(1000))


async def test_overlapping_turns_hold_only_the_open_ones_messages_and_at_most_four():
    """A client that sends the next ``response.create`` before the last turn ended kept every
    message on its flow (nothing was dropped while a turn was open); now an ended turn's
    messages go even while others are open, and a socket has at most four open turns."""
    from mitmproxy.test import taddons

    from addons.gateway_mode.websocket import MAX_OPEN_TURNS
    from tests.fake_upstream import response_object
    from tests.test_gateway_ws import _say, _turns, _ws_flow

    core, turns, _ = _turns()
    sent: list[bytes] = []
    turns._inject = lambda flow, data: sent.append(data)  # type: ignore[method-assign]
    with taddons.context(turns):
        flow = _ws_flow()
        turns.websocket_start(flow)
        await _say(turns, flow, True, {"type": "response.create", "model": MODEL})
        left = []
        for n in range(1, 6):
            await _say(turns, flow, True, {"type": "response.create", "model": MODEL})
            await _say(turns, flow, False, {"type": "response.output_text.delta", "delta": "x"})
            done = response_object(f"resp_{n}", MODEL, "x")
            await _say(turns, flow, False, {"type": "response.completed", "response": done})
            left.append(len(flow.websocket.messages))
        # Always one turn open (the next create came first): what it has not taken stays, and
        # the latest message, which mitmproxy's Dumper reads after the gateway's hook.
        assert left == [1] * 5
        assert len(turns.sockets[flow.id].turns) == 1
        for _ in range(MAX_OPEN_TURNS):
            await _say(turns, flow, True, {"type": "response.create", "model": MODEL})
        assert len(turns.sockets[flow.id].turns) == MAX_OPEN_TURNS
        assert [json.loads(d)["error"]["code"] for d in sent] == ["too_many_open_turns"]
        assert flow.websocket.messages[-1].dropped
        turns.websocket_end(flow)
    rows_ = [r for r in core.ledger.rows if "table" not in r]  # type: ignore[union-attr]
    assert [r["total_tokens"] for r in rows_[:5]] == [59] * 5


# -- what Codex sends with and without permessage-deflate ------------------------------------


class CountingRelay:
    """A TCP relay on 127.0.0.1 that counts the bytes each way (Codex → relay → gateway)."""

    def __init__(self, target_port: int) -> None:
        self.target = target_port
        self.up = 0
        self.down = 0
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.port = self.listener.getsockname()[1]
        self._lock = threading.Lock()
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        while True:
            try:
                client, _ = self.listener.accept()
            except OSError:
                return
            server = socket.create_connection(("127.0.0.1", self.target))
            threading.Thread(target=self._pipe, args=(client, server, True), daemon=True).start()
            threading.Thread(target=self._pipe, args=(server, client, False), daemon=True).start()

    def _pipe(self, src: socket.socket, dst: socket.socket, up: bool) -> None:
        try:
            while data := src.recv(65536):
                with self._lock:
                    if up:
                        self.up += len(data)
                    else:
                        self.down += len(data)
                dst.sendall(data)
        except OSError:
            pass
        finally:
            for s in (src, dst):
                try:
                    s.shutdown(socket.SHUT_RDWR)
                except OSError:
                    pass

    def close(self) -> None:
        self.listener.close()


@pytest.mark.e2e
@pytest.mark.codex
def test_what_codex_sends_over_the_socket_with_and_without_deflate(
    gateway, upstream, codex, tmp_path
):
    """The measurement behind ``codex_gateway_ws_deflate``'s default (docs/gateway.md,
    "Bounds on member sockets"): one Codex turn (warm-up + turn) over the socket, the bytes
    on the wire each way, with the member's offer removed (default) and passed through. Codex
    works either way; the numbers are printed."""
    from tests.test_gateway_ws import codex_home, run_codex

    gateway.admin("add-member", "alice")
    key = gateway.add_key("alice")
    measured = {}
    for deflate in (False, True):
        server = gateway.serve(
            upstream.url,
            "--websockets",
            "--set",
            f"codex_gateway_ws_deflate={str(deflate).lower()}",
        )
        relay = CountingRelay(server.port)
        home, work = codex_home(tmp_path, server, name=f"home-{deflate}")
        toml = (home / "config.toml").read_text()
        (home / "config.toml").write_text(toml.replace(f":{server.port}/", f":{relay.port}/"))
        upgrades = len(upstream.requests)
        code, out = run_codex(codex, home, work, key)
        assert code == 0, out
        assert upstream.text in out and "Falling back" not in out
        offered = [
            r.header_values("sec-websocket-extensions") for r in upstream.requests[upgrades:]
        ]
        assert all(bool(o) is deflate for o in offered), offered  # the offer passed, or not
        sizes = [len(json.dumps(m)) for m in upstream.ws_messages if m.get("ws_connection")]
        measured[deflate] = (relay.up, relay.down)
        relay.close()
        assert server.shutdown() == 0
        upstream.ws_messages.clear()
        print(
            f"\ndeflate {'on' if deflate else 'off'}: Codex → gateway {relay.up} B, "
            f"gateway → Codex {relay.down} B; the client messages' JSON: {sizes} B"
        )
    assert measured[True][0] < measured[False][0]  # compression did shrink what Codex sent


def test_the_bounds_options_are_checked_and_the_offer_removed_unless_deflate_is_on():
    from mitmproxy import exceptions
    from mitmproxy.test import taddons, tflow

    from addons.common import WEBSOCKET
    from addons.gateway_mode.socket_bounds import SocketBounds

    bounds = SocketBounds()
    with taddons.context(bounds) as tctx:
        for name, value in [
            ("codex_gateway_ws_backlog_kib", 63),
            ("codex_gateway_ws_stall_s", 0),
            ("codex_gateway_ws_messages_per_s", -1),
        ]:
            with pytest.raises(exceptions.OptionsError, match=name):
                tctx.configure(bounds, **{name: value})
        flow = tflow.tflow()
        flow.metadata[WEBSOCKET] = True
        flow.request.headers["sec-websocket-extensions"] = "permessage-deflate"
        bounds.requestheaders(flow)
        assert "sec-websocket-extensions" not in flow.request.headers
        tctx.configure(bounds, codex_gateway_ws_deflate=True)
        flow.request.headers["sec-websocket-extensions"] = "permessage-deflate"
        bounds.requestheaders(flow)
        assert flow.request.headers["sec-websocket-extensions"] == "permessage-deflate"


def test_a_members_sockets_together_gather_at_most_twice_the_limit():
    """Each socket may gather a message up to the limit; all of a member's sockets together
    twice that (so many sockets cannot each hold a message just under it). A refused side
    answers with the error event before its close frame; a finished or closed message gives
    its bytes back."""
    from addons.gateway_mode.socket_bounds import BoundedSide

    bucket = MessageBucket(0)
    notes: list[tuple[str, str]] = []

    def side() -> BoundedSide:
        def refusal(code: str, text: str) -> bytes:
            return json.dumps({"type": "error", "error": {"code": code}}).encode()

        return BoundedSide([], object(), 1000, bucket, refusal, lambda *n: notes.append(n))

    def feed(ws: BoundedSide, data: bytes) -> list:
        ws.receive_data(data)
        return list(ws.events())

    a, b, c = side(), side(), side()
    assert [e.message_finished for e in feed(a, frame(b"x" * 900, fin=False))] == [False]
    assert len(feed(b, frame(b"y" * 900, fin=False))) == 1 and bucket.gathering == 1800
    (closed,) = feed(c, frame(b"z" * 300))
    assert isinstance(closed, wsproto.events.CloseConnection) and closed.code == 1009
    assert notes[-1][1] == "request_too_large" and "2000 bytes" in notes[-1][0]
    sent = c.send(closed)
    assert b'"request_too_large"' in sent and sent.index(b"request_too_large") < len(sent) - 4
    assert bucket.gathering == 1800  # c's 300 given back
    feed(a, frame(b"x", opcode=0x0))  # a's message finished
    assert bucket.gathering == 900
    b.receive_data(None)  # b's client went away mid-message
    assert [type(e) for e in b.events()] == [wsproto.events.CloseConnection]
    assert bucket.gathering == 0
    # One socket alone past the limit: the same error event, then 1009.
    (closed,) = feed(side(), frame(b"w" * 1001))
    assert closed.code == 1009 and "limit of 1000 bytes" in notes[-1][0]
