"""Member sockets bounded before bytes are buffered (issue 30): what one member key can make the
gateway hold, and for how long, on its WebSocket routes.

mitmproxy's WebSocket layer (``mitmproxy/proxy/layers/websocket.py``, on ``wsproto``) inflates a
``permessage-deflate`` frame in one ``zlib`` call and gathers a message's fragments in a list
until the last one; only then does ``websocket_message`` see it. A check in the hook comes too
late (measured before this module: a 1 MiB frame inflating to 1 GiB took the gateway to
2.2 GiB; 200 MiB in fragments to 499 MiB). So the bounds act inside the layer, as bytes arrive:

- :class:`BoundedWebsocketLayer` takes the place of mitmproxy's ``WebsocketLayer`` (the HTTP
  layer looks the class up in its module at each upgrade, the one seam there is). For a member
  socket it swaps the member side's ``wsproto`` connection for a :class:`BoundedSide`, which
  counts the bytes of the message being gathered (past ``codex_decode_max_mib``, the HTTP
  body's cap, or past twice that over all the member's sockets: the route's
  ``request_too_large`` error event, then close 1009), inflates with
  :class:`BoundedDeflate` (``zlib`` told how much it may produce, so the cap holds inside one
  frame too), and charges every frame and ping to its member's :class:`MessageBucket` (past
  ``codex_gateway_ws_messages_per_s``, sustained over 2 s of burst: ``rate_limited`` error
  event, then close 1008). A protocol error the member side's ``wsproto`` finds (say a
  compressed frame where none was negotiated) closes 1002 as before, and is named too.
- :class:`SocketBounds` (the addon): removes the member's ``Sec-WebSocket-Extensions`` offer
  unless ``codex_gateway_ws_deflate`` is on (the measurement behind that default is in
  docs/gateway.md, "Bounds on member sockets"), installs the layer, and watches each member
  socket's outbound backlog (bytes queued for the member that its TCP has not taken): past
  ``codex_gateway_ws_backlog_kib``, or above the transport's high-water mark (asyncio's
  64 KiB; mitmproxy then stops reading both legs) for ``codex_gateway_ws_stall_s`` seconds,
  the connection is aborted (its queued bytes dropped; a close frame would queue behind them).

Why a socket was closed goes in ``flow.metadata[CLOSED_BECAUSE]``, which the socket's
``ws_connections`` row takes as its ``close_reason``, and the refusal's name in
``flow.metadata[REFUSED_AS]``, counted in ``codex_gateway_refused_total{reason}``.
"""

from __future__ import annotations

import asyncio
import logging
import time
import zlib
from collections.abc import Callable, Iterator
from typing import Any

import wsproto
import wsproto.events
from mitmproxy import ctx, exceptions, http
from mitmproxy.proxy import events, layer
from mitmproxy.proxy.layers import websocket as ws_layer
from mitmproxy.proxy.utils import expect
from wsproto.connection import ConnectionState
from wsproto.extensions import PerMessageDeflate
from wsproto.frame_protocol import CloseReason, FrameDecoder, FrameProtocol, Opcode, RsvBits

from addons import body_decode
from addons.common import WEBSOCKET
from addons.gateway_mode.core import MEMBER, SOCKET_ROUTE
from addons.gateway_mode.socket_protocol import PROTOCOLS, RESPONSES

logger = logging.getLogger(__name__)

#: ``flow.metadata`` key: why the gateway closed a member socket (its ledger row's reason).
CLOSED_BECAUSE = "codex_gateway.socket_closed_because"
#: ``flow.metadata`` key: the refusal's name for ``codex_gateway_refused_total{reason}``
#: (``request_too_large``, ``rate_limited``, ``protocol_error``, ``not_reading``).
REFUSED_AS = "codex_gateway.socket_refused_as"
#: Seconds of messages a member may send at once above its sustained rate.
BURST_S = 2
#: A member's messages being gathered on all its sockets at once, in decode limits.
MEMBER_GATHERING = 2
#: Seconds between checks of the member sockets' outbound backlogs.
BACKLOG_CHECK_S = 0.5
#: Bytes of a member's that may wait for a hook before the gateway stops reading it (the
#: transport's read is paused; the member's TCP then fills and its sends block).
QUEUE_MAX = 64 * 1024
#: mitmproxy's own layer (the module attribute is replaced while the gateway runs).
MitmproxyLayer = ws_layer.WebsocketLayer


class BoundedDeflate(PerMessageDeflate):
    """``permessage-deflate`` whose inflation of one message stops at ``limit`` bytes:
    ``zlib``'s ``decompress(data, max_length)`` produces at most what is left of the limit
    plus one byte, so past it the frame is refused (:attr:`CloseReason.MESSAGE_TOO_BIG`, 1009)
    with at most ``limit + 1`` bytes inflated. The negotiated parameters are copied from the
    extension mitmproxy finalised from the upstream's answer (:meth:`bounding`)."""

    def __init__(self, limit: int) -> None:
        super().__init__()
        self.limit = limit
        #: Bytes inflated of the message being received.
        self.inflated = 0

    @classmethod
    def bounding(cls, extension: PerMessageDeflate, limit: int) -> BoundedDeflate:
        """A bounded copy of ``extension`` (its negotiated window bits and context takeover)."""
        bounded = cls(limit)
        bounded.__dict__.update(extension.__dict__)
        bounded.limit, bounded.inflated = limit, 0
        return bounded

    def frame_inbound_header(
        self,
        proto: FrameDecoder | FrameProtocol,
        opcode: Opcode,
        rsv: RsvBits,
        payload_length: int,
    ) -> CloseReason | RsvBits:
        if self._inbound_compressed is None:  # the first frame of a message
            self.inflated = 0
        return super().frame_inbound_header(proto, opcode, rsv, payload_length)

    def frame_inbound_payload_data(
        self, proto: FrameDecoder | FrameProtocol, data: bytes
    ) -> bytes | CloseReason:
        if not self._inbound_compressed or not self._inbound_is_compressible:
            return data
        assert self._decompressor is not None
        try:
            out = self._decompressor.decompress(bytes(data), self.limit - self.inflated + 1)
        except zlib.error:
            return CloseReason.INVALID_FRAME_PAYLOAD_DATA
        return self._count(out)

    def frame_inbound_complete(
        self, proto: FrameDecoder | FrameProtocol, fin: bool
    ) -> bytes | CloseReason | None:
        out = super().frame_inbound_complete(proto, fin)
        return self._count(out) if isinstance(out, bytes) else out

    def _count(self, out: bytes) -> bytes | CloseReason:
        self.inflated += len(out)
        return CloseReason.MESSAGE_TOO_BIG if self.inflated > self.limit else out


class MessageBucket:
    """What one member's sockets share: a token bucket of their frames (``rate`` a second
    sustained, up to ``rate * BURST_S`` at once; ``rate`` 0: no limit) and ``gathering``, the
    bytes of the messages being gathered on all of them (bounded by :data:`MEMBER_GATHERING`
    times the decode limit, so many sockets cannot each hold a message just under it)."""

    def __init__(self, rate: int, clock: Callable[[], float] = time.monotonic) -> None:
        self.rate = rate
        self.gathering = 0
        self.tokens = float(rate * BURST_S)
        self.clock = clock
        self.stamp = clock()

    def take(self) -> bool:
        """Charge one frame; ``False`` when the bucket is empty (the frame is over the rate)."""
        if self.rate <= 0:
            return True
        now = self.clock()
        self.tokens = min(self.rate * BURST_S, self.tokens + (now - self.stamp) * self.rate)
        self.stamp = now
        if self.tokens < 1:
            return False
        self.tokens -= 1
        return True


class BoundedSide(ws_layer.WebsocketConnection):
    """The member side of a socket (a ``wsproto`` server connection), bounded as bytes arrive
    (see the module docstring). When a bound trips, :meth:`events` yields a
    ``CloseConnection`` as if the member had closed (mitmproxy's layer then closes both legs
    and runs ``websocket_end``), and :meth:`send` puts the route's error event before the close
    frame it sends the member."""

    def __init__(
        self,
        extensions: list[Any],
        conn: Any,
        limit: int,
        bucket: MessageBucket,
        refusal: Callable[[str, str], bytes],
        note: Callable[[str, str], None],
    ) -> None:
        bounded = [
            BoundedDeflate.bounding(e, limit) if isinstance(e, PerMessageDeflate) else e
            for e in extensions
        ]
        super().__init__(wsproto.ConnectionType.SERVER, bounded, conn=conn)
        self.limit = limit
        self.bucket = bucket
        self.refusal = refusal
        self.note = note
        #: Bytes gathered of the message being received.
        self.gathered = 0
        self.tripped = False
        self._pending: bytes | None = None

    def events(self) -> Iterator[wsproto.events.Event]:  # type: ignore[override]
        if self.tripped:
            return
        for event in super().events():
            if isinstance(event, wsproto.events.Message):
                data = event.data
                size = len(data.encode() if isinstance(data, str) else data)
                self.gathered += size
                self.bucket.gathering += size
                if self.gathered > self.limit:
                    yield self._trip(
                        CloseReason.MESSAGE_TOO_BIG,
                        "request_too_large",
                        f"the message is past the gateway's limit of {self.limit} bytes "
                        "(codex_decode_max_mib); nothing was sent upstream",
                    )
                    return
                if self.bucket.gathering > MEMBER_GATHERING * self.limit:
                    yield self._trip(
                        CloseReason.MESSAGE_TOO_BIG,
                        "request_too_large",
                        f"this member key's messages being received on all its sockets are "
                        f"past {MEMBER_GATHERING * self.limit} bytes ({MEMBER_GATHERING} times "
                        "codex_decode_max_mib); nothing was sent upstream",
                    )
                    return
                if event.message_finished:
                    self._release()
                if event.frame_finished and not self.bucket.take():
                    yield self._rate_trip()
                    return
            elif isinstance(event, (wsproto.events.Ping, wsproto.events.Pong)):
                if not self.bucket.take():
                    yield self._rate_trip()
                    return
            elif isinstance(event, wsproto.events.CloseConnection):
                self._release()
                # In state OPEN no close frame came: wsproto found a protocol error here.
                if self.state is ConnectionState.OPEN:
                    if event.code == CloseReason.MESSAGE_TOO_BIG:  # BoundedDeflate's refusal
                        yield self._trip(
                            CloseReason.MESSAGE_TOO_BIG,
                            "request_too_large",
                            f"a compressed message inflates past the gateway's limit of "
                            f"{self.limit} bytes (codex_decode_max_mib); nothing was sent upstream",
                        )
                        return
                    self.note(
                        f"closed by the gateway ({event.code}): {event.reason}"[:200],
                        "protocol_error",
                    )
            yield event

    def _rate_trip(self) -> wsproto.events.CloseConnection:
        rate = self.bucket.rate
        return self._trip(
            CloseReason.POLICY_VIOLATION,
            "rate_limited",
            f"more than {rate} WebSocket frames a second from this member key "
            f"(codex_gateway_ws_messages_per_s, {rate * BURST_S} at once); socket closed",
        )

    def _release(self) -> None:
        """The message being gathered is done with (relayed, refused, or the socket closed)."""
        self.bucket.gathering -= self.gathered
        self.gathered = 0

    def _trip(self, code: CloseReason, error: str, text: str) -> wsproto.events.CloseConnection:
        self._release()
        self.tripped = True
        self._pending = self.refusal(error, text)
        self.note(f"closed by the gateway ({int(code)}): {text}"[:200], error)
        return wsproto.events.CloseConnection(code=code, reason=error)

    def send(self, event: wsproto.events.Event) -> bytes:
        if isinstance(event, wsproto.events.CloseConnection):
            self._release()  # closed from the upstream's side mid-message
        if (
            isinstance(event, wsproto.events.CloseConnection)
            and self._pending is not None
            and self.state is ConnectionState.OPEN
        ):
            pending, self._pending = self._pending, None
            return super().send(wsproto.events.TextMessage(pending.decode())) + super().send(event)
        return super().send(event)


class BoundedWebsocketLayer(MitmproxyLayer):
    """mitmproxy's WebSocket layer with a :class:`BoundedSide` on the member side of a member
    socket (``MEMBER`` and ``WEBSOCKET`` marks); any other flow is relayed as mitmproxy does.
    ``bounds`` is the installing :class:`SocketBounds` (its limits and member buckets)."""

    bounds: SocketBounds | None = None
    #: Whether this layer has stopped reading the member (:meth:`_throttle`).
    throttled = False

    @expect(events.Start)
    def start(self, event: events.Event) -> layer.CommandGenerator[None]:
        yield from MitmproxyLayer.start(self, event)
        bounds, flow = self.bounds, self.flow
        if bounds is None or WEBSOCKET not in flow.metadata or MEMBER not in flow.metadata:
            return
        protocol = PROTOCOLS.get(str(flow.metadata.get(SOCKET_ROUTE)), RESPONSES)

        def refusal(code: str, text: str) -> bytes:
            return protocol.refusal(400, "invalid_request_error", code, text)

        def note(reason: str, refused_as: str) -> None:
            flow.metadata.setdefault(CLOSED_BECAUSE, reason)
            flow.metadata.setdefault(REFUSED_AS, refused_as)

        old = self.client_ws
        self.client_ws = BoundedSide(
            old._proto.extensions,
            old.conn,
            body_decode.LIMITS.max_bytes,
            bounds.bucket(flow.metadata[MEMBER]["member_id"]),
            refusal,
            note,
        )

    _handle_event = start

    def handle_event(self, event: events.Event) -> layer.CommandGenerator[None]:
        yield from super().handle_event(event)
        if self.bounds is not None and isinstance(self.client_ws, BoundedSide):
            self._throttle(self.bounds)

    def _throttle(self, bounds: SocketBounds) -> None:
        """Stop reading the member while more than :data:`QUEUE_MAX` of its bytes wait for a
        hook (mitmproxy reads on and queues them, :class:`mitmproxy.proxy.layer.Layer`'s
        paused-event queue, with no bound); read again once half of that is left."""
        queued = 0
        if self._paused:
            client = self.context.client
            for queued_event in self._paused_event_queue:
                if isinstance(queued_event, events.DataReceived) and (
                    queued_event.connection is client
                ):
                    queued += len(queued_event.data)
        if queued > QUEUE_MAX:
            self.throttled = True
            bounds.reading(self.flow, False)
        elif self.throttled and queued <= QUEUE_MAX // 2:
            self.throttled = False
            bounds.reading(self.flow, True)


def client_transport(flow: http.HTTPFlow) -> asyncio.Transport | None:
    """The TCP transport of ``flow``'s client connection, ``None`` once it is closing or
    gone. mitmproxy has no public view of its transports; its proxy server's connection
    handler (``transports[conn].writer``) is the seam."""
    server = ctx.master.addons.get("proxyserver")
    handler = server.connections.get(flow.client_conn.id) if server is not None else None
    io = handler.transports.get(flow.client_conn) if handler is not None else None
    transport = getattr(io.writer, "transport", None) if io is not None else None
    if not isinstance(transport, asyncio.Transport) or transport.is_closing():
        return None
    return transport


def outbound_backlog(flow: http.HTTPFlow) -> tuple[int, int, asyncio.Transport] | None:
    """``(bytes queued, high-water mark, transport)`` of the connection to ``flow``'s client
    (:func:`client_transport`), ``None`` once it is gone."""
    transport = client_transport(flow)
    if transport is None:
        return None
    return transport.get_write_buffer_size(), transport.get_write_buffer_limits()[1], transport


#: The numeric options and their least value.
BOUND_OPTIONS = {
    "codex_gateway_ws_messages_per_s": 0,
    "codex_gateway_ws_backlog_kib": 64,
    "codex_gateway_ws_stall_s": 1,
}


class SocketBounds:
    """The bounds on member sockets (see the module docstring): options, the offer removed,
    the layer installed while the gateway runs, and the backlog watch. Placed before
    :class:`~addons.gateway_mode.websocket.WebSocketTurns`."""

    def __init__(self) -> None:
        self.deflate = False
        self.rate = 50
        self.backlog = 1024 * 1024
        self.stall_s = 30
        self.buckets: dict[str, MessageBucket] = {}
        #: Open member sockets: flow id → (flow, when its writes were first seen paused).
        self.flows: dict[str, tuple[http.HTTPFlow, float | None]] = {}
        self._watch: asyncio.Task[None] | None = None
        self._replaced: type[MitmproxyLayer] | None = None

    def load(self, loader) -> None:
        loader.add_option(
            "codex_gateway_ws_deflate",
            bool,
            False,
            "Let member sockets negotiate permessage-deflate (the member's offer goes upstream; "
            "inflation stops at codex_decode_max_mib). Off: the offer is removed, neither leg "
            "compresses, and a compressed frame from a member closes its socket (1002).",
        )
        loader.add_option(
            "codex_gateway_ws_messages_per_s",
            int,
            50,
            "WebSocket frames (and pings) a member key may send a second over all its sockets, "
            f"with {BURST_S} s worth at once; the socket that goes past it gets an error event "
            "and is closed (1008). 0: no limit.",
        )
        loader.add_option(
            "codex_gateway_ws_backlog_kib",
            int,
            1024,
            "KiB queued for a member socket that its client has not read, past which the "
            "connection is dropped.",
        )
        loader.add_option(
            "codex_gateway_ws_stall_s",
            int,
            30,
            "Seconds a member socket may keep the gateway's writes to it paused (its client "
            "not reading) before the connection is dropped.",
        )

    def configure(self, updated: set[str]) -> None:
        for name, least in BOUND_OPTIONS.items():
            if name in updated and getattr(ctx.options, name) < least:
                raise exceptions.OptionsError(f"{name} must be at least {least}")
        self.deflate = bool(ctx.options.codex_gateway_ws_deflate)
        self.rate = int(ctx.options.codex_gateway_ws_messages_per_s)
        self.backlog = int(ctx.options.codex_gateway_ws_backlog_kib) * 1024
        self.stall_s = int(ctx.options.codex_gateway_ws_stall_s)
        if "codex_gateway_ws_messages_per_s" in updated:
            self.buckets.clear()

    def running(self) -> None:
        if self._replaced is None:
            self._replaced = ws_layer.WebsocketLayer
            BoundedWebsocketLayer.bounds = self
            ws_layer.WebsocketLayer = BoundedWebsocketLayer  # type: ignore[misc]
        if self._watch is None:
            self._watch = asyncio.get_running_loop().create_task(self._watch_backlogs())

    def done(self) -> None:
        if self._watch is not None:
            self._watch.cancel()
            self._watch = None
        if self._replaced is not None:
            ws_layer.WebsocketLayer = self._replaced  # type: ignore[misc]
            BoundedWebsocketLayer.bounds = None
            self._replaced = None

    def bucket(self, member_id: str) -> MessageBucket:
        """The frame bucket of member ``member_id`` (one per member, over all its sockets)."""
        bucket = self.buckets.get(member_id)
        if bucket is None:
            bucket = self.buckets[member_id] = MessageBucket(self.rate)
        return bucket

    def reading(self, flow: http.HTTPFlow, on: bool) -> None:
        """Resume (``on``) or pause reading ``flow``'s member connection."""
        transport = client_transport(flow)
        if transport is None:
            return
        if on and not transport.is_reading():
            transport.resume_reading()
        elif not on and transport.is_reading():
            transport.pause_reading()

    def requestheaders(self, flow: http.HTTPFlow) -> None:
        if flow.response or flow.error or not flow.live or WEBSOCKET not in flow.metadata:
            return
        if not self.deflate:
            flow.request.headers.pop("sec-websocket-extensions", None)

    def websocket_start(self, flow: http.HTTPFlow) -> None:
        if WEBSOCKET in flow.metadata and MEMBER in flow.metadata:
            self.flows[flow.id] = (flow, None)

    def websocket_message(self, flow: http.HTTPFlow) -> None:
        if flow.id in self.flows:
            self._check(flow.id, time.monotonic())

    def websocket_end(self, flow: http.HTTPFlow) -> None:
        self.flows.pop(flow.id, None)

    async def _watch_backlogs(self) -> None:
        while True:
            await asyncio.sleep(BACKLOG_CHECK_S)
            try:
                now = time.monotonic()
                for flow_id in list(self.flows):
                    self._check(flow_id, now)
            except Exception as e:  # never let the watcher die
                logger.error("backlog check failed (%s)", type(e).__name__)

    def _check(self, flow_id: str, now: float) -> None:
        """Drop the connection of socket ``flow_id`` when its backlog is past the bound, or its
        writes have stayed paused for ``stall_s``."""
        flow, paused_since = self.flows[flow_id]
        state = outbound_backlog(flow)
        if state is None:
            return
        queued, high, transport = state
        reason = None
        if queued > self.backlog:
            reason = f"its client stopped reading: {queued} bytes queued, past {self.backlog}"
        elif queued > high:
            if paused_since is None:
                self.flows[flow_id] = (flow, now)
            elif now - paused_since >= self.stall_s:
                reason = f"its client stopped reading: {queued} bytes queued for {self.stall_s} s"
        elif paused_since is not None:
            self.flows[flow_id] = (flow, None)
        if reason is not None:
            self.flows.pop(flow_id, None)
            flow.metadata.setdefault(CLOSED_BECAUSE, f"closed by the gateway: {reason}")
            flow.metadata.setdefault(REFUSED_AS, "not_reading")
            logger.info("member socket dropped: %s", reason)
            transport.abort()  # close() would wait for the client to read what is queued
