"""Turns on a WebSocket as request/reply pairs, for the dumps, the recording and replay.

Codex's WebSocket transport (``serve --websockets``, ``addons/gateway_mode/websocket.py``)
carries many turns on one flow: a ``response.create`` message from the client, then the
server's events (the SSE events' JSON, one per message) up to a terminal one. mitmproxy sees one
flow (the upgrade) and its messages; the dumps, ``usage.jsonl``, ``report.html``, ``./run.sh
compare`` and replay read exchanges. This module turns a socket's turn into one:

- :class:`SocketTurn`: the turn (its route, the ``response.create`` message, start and end,
  status and error, the server's event messages with their times).
- Two custom mitmproxy events, ``socket_turn_start(flow, turn)`` and ``socket_turn_end(flow,
  turn)`` (:class:`SocketTurnStartHook`, :class:`SocketTurnEndHook`), that the socket's metering
  triggers through :func:`start_turn` and :func:`end_turn`; ``DumpWriter`` writes a dump pair
  (request file at the start, response file at the end) and ``Recorder`` a ledger line, as for
  an HTTP turn. The transport code stays one call at each end of a turn.
- :func:`sse_text`: the events as the SSE dump shows them (``event:`` and ``data:`` lines), so a
  socket turn's response file reads, views and replays like an HTTP one's.

The messages stay in the flow (mitmproxy keeps them; ``-w`` flow files hold them, after the
header redaction); nothing here holds a key (the upgrade's credentials are headers, and the
dumps redact those).
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any

from mitmproxy import ctx, http
from mitmproxy.hooks import Hook

from addons.exchange import ExchangeFacts, Reply, read_exchange
from addons.sse_events import SseEvent

#: ``flow.metadata``: how many of the flow's WebSocket messages earlier turns have taken.
TAKEN = "codex_socket.taken"


@dataclass
class SocketTurn:
    """One turn on a socket. ``request``: the client's ``response.create`` message (bytes);
    ``started`` / ``ended``: Unix seconds (the message's arrival, the terminal event's or the
    socket's end); ``status``: the HTTP status the turn stands for (200, an ``error`` event's
    status, ``None`` when the socket closed mid-turn); ``events``: the server's messages as
    ``(Unix seconds, bytes)``, filled in at the end; ``seq``: the dump sequence number
    (set by ``DumpWriter`` at the start when dumping)."""

    route: str
    request: bytes
    started: float
    message_index: int
    ended: float | None = None
    status: int | None = None
    error: str | None = None
    events: list[tuple[float, bytes]] = field(default_factory=list)
    seq: int | None = None
    #: The socket's metering's own reading of the turn, for routes whose events the Responses
    #: reader does not know (Realtime's ``response.done``): used where that reader finds none.
    model: str | None = None
    usage: dict[str, int] | None = None
    turn_status: str | None = None
    _timeline: list[tuple[int, SseEvent]] | None = field(default=None, repr=False)

    def timeline(self) -> list[tuple[int, SseEvent]]:
        """The events as ``(ms since the turn started, event)``, for
        :func:`addons.exchange.read_exchange`; parsed once, when the turn has ended (the dumps
        and the recording both ask)."""
        if self._timeline is not None:
            return self._timeline
        out = []
        for ts, data in self.events:
            text = data.decode("utf-8", "replace")
            out.append((max(0, int((ts - self.started) * 1000)), SseEvent("message", text)))
        if self.ended is not None:
            self._timeline = out
        return out

    def facts(self) -> ExchangeFacts:
        """What the turn says (model, tier, usage, events, status, timing), by the one reader."""
        reply = Reply(self.status, "text/event-stream", events=self.timeline())
        facts = read_exchange(self.request, reply if self.status is not None else None)
        facts.model = facts.model or self.model
        facts.usage = facts.usage or self.usage
        facts.turn_status = facts.turn_status or self.turn_status
        return facts

    def chunk_timing(self) -> list[list[int]]:
        """``[[ms since the turn started, bytes of :func:`sse_text` so far], ...]``, one entry
        per event: the ledger's chunk timing, which replay paces by."""
        out, size = [], 0
        for ms, ev in self.timeline():
            size += len(_sse_event(ev).encode())
            out.append([ms, size])
        return out


@dataclass
class SocketTurnStartHook(Hook):
    """A turn started on a WebSocket flow (its ``response.create`` went upstream)."""

    flow: http.HTTPFlow
    turn: SocketTurn


@dataclass
class SocketTurnEndHook(Hook):
    """A turn on a WebSocket flow ended: a terminal event, or the socket closed mid-turn."""

    flow: http.HTTPFlow
    turn: SocketTurn


def start_turn(flow: http.HTTPFlow, route: str, message: Any) -> SocketTurn:
    """Announce a turn that ``message`` (the flow's latest WebSocket message, the client's
    ``response.create``) starts on ``route`` (the ledger's route, e.g. ``ws:/v1/responses``)
    to every addon (``socket_turn_start``). Returns the turn to pass to :func:`end_turn`."""
    messages = flow.websocket.messages if flow.websocket is not None else []
    index = next((i for i in range(len(messages) - 1, -1, -1) if messages[i] is message), -1)
    turn = SocketTurn(route, bytes(message.content), message.timestamp, index)
    ctx.master.addons.trigger(SocketTurnStartHook(flow, turn))
    return turn


def end_turn(
    flow: http.HTTPFlow,
    turn: SocketTurn | None,
    status: int | None,
    error: str | None,
    *,
    model: str | None = None,
    usage: dict[str, int] | None = None,
    turn_status: str | None = None,
) -> None:
    """End ``turn`` (``None``: a turn that was never announced, nothing to do): collect the
    server's messages since its ``response.create`` that no earlier turn took (text, not
    injected by us, not dropped) and announce it (``socket_turn_end``). ``model``, ``usage``
    (as :func:`addons.responses_turn.usage_of` gives it) and ``turn_status``: the metering's
    reading, kept for :meth:`SocketTurn.facts`."""
    if turn is None or turn.ended is not None:
        return
    messages = flow.websocket.messages if flow.websocket is not None else []
    taken = flow.metadata.get(TAKEN)
    start = max(turn.message_index + 1, taken if isinstance(taken, int) else 0)
    for message in messages[start:]:
        if message.from_client or message.injected or message.dropped or not message.is_text:
            continue
        turn.events.append((message.timestamp, bytes(message.content)))
    flow.metadata[TAKEN] = len(messages)
    turn.ended = max(time.time(), turn.started)
    turn.status, turn.error = status, error
    turn.model, turn.usage, turn.turn_status = model, usage, turn_status
    ctx.master.addons.trigger(SocketTurnEndHook(flow, turn))


def keeps_messages() -> bool:
    """Whether something of this process reads a WebSocket flow's messages after its turns
    have ended: a flow file (``save_stream_file``, ``--record``), a HAR (``hardump``) or an
    interactive front (mitmweb's ``web_port``, the console's ``console_layout``)."""
    options = ctx.options
    return bool(
        getattr(options, "save_stream_file", "")
        or getattr(options, "hardump", "")
        or "web_port" in options
        or "console_layout" in options
    )


def forget_taken(flow: http.HTTPFlow, open_turns: list[SocketTurn]) -> int:
    """Drop the WebSocket messages no open turn needs: those ended turns have taken (all of
    them when ``open_turns`` is empty), but the latest; the open turns' ``message_index`` and
    the flow's ``TAKEN`` count move down by as many (:func:`end_turn` reads from the later of
    the two, so an open turn still collects the same events). So a socket open for an hour
    holds its open turns' messages, not every message since it opened (a 400-event reply is
    ~160 KB), even when its turns overlap (a client sending the next ``response.create``
    before the last one ended). The ended turns' dumps and recording lines already have
    theirs. For a flow whose messages nothing reads later (:func:`keeps_messages`: flow files
    keep them all).

    The latest message stays: it is the one whose ``websocket_message`` hooks are running
    (mitmproxy appends each message before its hooks), and the addons after the caller read it
    as ``flow.websocket.messages[-1]`` (mitmproxy's ``Dumper``, which runs after every script
    addon, logged ``Addon error: list index out of range`` on every ended turn when it was
    gone). Returns how many were dropped."""
    if flow.websocket is None:
        return 0
    messages = flow.websocket.messages
    taken = flow.metadata.get(TAKEN)
    taken = (
        len(messages)
        if not open_turns
        else min(taken if isinstance(taken, int) else 0, len(messages))
    )
    drop = min(taken, len(messages) - 1)
    if drop <= 0:
        return 0
    del messages[:drop]
    flow.metadata[TAKEN] = taken - drop
    for turn in open_turns:
        turn.message_index -= drop
    return drop


def _sse_event(event: SseEvent) -> str:
    data = "\n".join(f"data: {line}" for line in event.data.split("\n"))
    return f"event: {event.type}\n{data}\n\n"


def sse_text(turn: SocketTurn) -> str:
    """The turn's server events as an SSE body (``event: <type>``, ``data: <the message>``,
    a blank line), as the SSE dump of an HTTP turn shows them."""
    return "".join(_sse_event(ev) for _, ev in turn.timeline())
