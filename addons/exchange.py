"""What one Responses API exchange says, read in one place: model, service tier, usage, events,
status, outcome.

Every reader of an exchange's facts calls :func:`read_exchange` (or its halves,
:func:`read_request` and :func:`read_reply`): the recording's ledger (``addons/recorder.py``),
the gateway's request facts and usage rows (``gateway_mode/core.py``, ``gateway_mode/
accounting.py``), ``./run.sh compare`` (``addons/compare.py``, tool calls from a dump pair) and
the recorded WebSocket turns (``addons/socket_turns.py``). Before, each had its own helpers and
they disagreed at the edges (the gateway priced only ``response.completed``, the recorder any
terminal event).

A module of its own rather than more of ``addons/responses_turn.py``: that one assembles a
stream's *content* for people (text, reasoning, tool calls; the content views and the report
use it), knows nothing of bodies on the wire, and has no opinion on what a reply without a
stream means. This one decides what a whole exchange means for accounting, whatever carried
it: a request body (raw and possibly compressed, or already parsed), and a reply as an SSE
stream, a JSON body, an error status, no reply at all, or a WebSocket turn's server messages.
It sits on top of ``body_decode`` (decoding within the limits, the JSON depth limit),
``sse_events`` (the one SSE decoder) and ``responses_turn`` (the assembly).

Rules (the same for every reader): usage is the terminal event's ``response.usage``
(``response.completed``, and also ``response.incomplete`` / ``response.failed`` when they carry
it: the tokens were spent), or a JSON body's ``usage``; ``turn_status`` is the terminal event's
(``completed`` / ``incomplete`` / ``failed``) or a JSON body's ``status``; ``completed`` means
``turn_status == "completed"``; the outcome of a reply with neither is ``failed`` for an HTTP
error or no reply, ``cut`` for a stream that ended early.
"""

from __future__ import annotations

import json
import re
from collections import deque
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any, NamedTuple

from mitmproxy import http

from addons.body_decode import (
    MIB,
    STREAM_MAX_BYTES,
    BodyStream,
    DecodedBody,
    DecodeLimits,
    JsonTooDeep,
    decode_body,
    loads_json,
    original_encoding,
)
from addons.responses_turn import TERMINAL, Turn, assemble_turn, turn_of_reply, usage_of
from addons.sse_events import SseEvent, decode_sse, timeline

#: The outcomes of an exchange (:attr:`ExchangeFacts.outcome`).
OUTCOMES = ("completed", "incomplete", "failed", "cut")
#: The statuses a Responses ``response`` object reports when it is finished.
FINISHED = ("completed", "incomplete", "failed")


def _text(value: Any) -> str | None:
    return value if isinstance(value, str) else None


@dataclass(frozen=True)
class RequestFacts:
    """What a request body says: ``model`` and ``service_tier`` (``None`` when absent or not a
    string; ``priority`` is Codex's fast mode, charged 2x), the parsed ``body`` (``{}`` when it
    is no JSON object), how it ``decoded`` and ``too_deep`` (the depth error when the JSON is
    nested past :data:`addons.body_decode.MAX_JSON_DEPTH`, else ``None``)."""

    model: str | None
    service_tier: str | None
    body: dict[str, Any] = field(default_factory=dict)
    decoded: DecodedBody | None = None
    too_deep: JsonTooDeep | None = None


def request_fields(body: Any) -> RequestFacts:
    """The facts of an already parsed request body (a dump's ``body``, a WebSocket
    ``response.create`` message)."""
    body = body if isinstance(body, dict) else {}
    return RequestFacts(_text(body.get("model")), _text(body.get("service_tier")), body)


def read_request(
    raw: bytes, content_encoding: str | None, limits: DecodeLimits | None = None
) -> RequestFacts:
    """The facts of a request body as received (bytes; Codex can send zstd), decoded within
    ``limits`` (``None``: the process's) and parsed with the JSON depth limit. Never raises: a
    body past the decode limit has ``decoded.over_limit`` set and no facts, one nested too deep
    has ``too_deep`` set and no facts (the gateway refuses both, the recorder just records)."""
    if not raw:
        return RequestFacts(None, None)
    decoded = decode_body(raw, content_encoding, limits)
    body: Any = None
    too_deep = None
    if not decoded.over_limit:
        try:
            body = loads_json(decoded.data)
        except JsonTooDeep as e:
            too_deep = e
        except ValueError:
            body = None
    facts = request_fields(body)
    return RequestFacts(facts.model, facts.service_tier, facts.body, decoded, too_deep)


@dataclass
class Reply:
    """A reply as a reader holds it, for :func:`read_reply`.

    ``status``: the HTTP status (``None``: no reply at all); ``content_type``; ``body``: the
    bytes as received (content-encoded per ``content_encoding``), or a dump file's body (a
    decoded SSE string, or a parsed JSON value); ``chunk_timing``: the proxy's ``[[ms since the
    response headers, raw bytes so far], ...]`` (``addons.common.CHUNK_TIMING``), for event
    times; ``events``: an SSE stream already split into ``(ms or None, event)`` (a WebSocket
    turn's server messages), which then stands for the body.
    """

    status: int | None
    content_type: str = ""
    body: Any = b""
    content_encoding: str | None = None
    chunk_timing: Sequence[Sequence[int]] = ()
    events: Sequence[tuple[int | None, SseEvent]] | None = None

    @classmethod
    def of(
        cls, response: http.Response | None, chunk_timing: Sequence[Sequence[int]] = ()
    ) -> Reply:
        """The reply of a flow (``None``: the exchange got none)."""
        if response is None:
            return cls(None)
        return cls(
            response.status_code,
            response.headers.get("content-type", ""),
            response.raw_content or b"",
            original_encoding(response.headers.get("content-encoding")),
            chunk_timing,
        )

    @property
    def streamed(self) -> bool:
        """Whether the reply is an SSE stream (media type ``text/event-stream``)."""
        if self.events is not None:
            return True
        return self.content_type.split(";", 1)[0].strip().lower() == "text/event-stream"


@dataclass
class ExchangeFacts:
    """What an exchange says. ``events``: SSE events (0 for a JSON reply); ``usage`` as
    :func:`addons.responses_turn.usage_of` gives it; ``turn_status`` and ``completed`` by the
    module's rules; times in ms since the response headers (``None`` / empty without chunk
    timing); ``decoded_timing``: the chunk timing in decoded bytes (what a dump's body and
    replay hold); ``decode_error``: why the reply could not be decoded completely; ``turn``:
    the assembled reply (text, tool calls) for the readers that show it."""

    model: str | None = None
    service_tier: str | None = None
    status: int | None = None
    events: int = 0
    usage: dict[str, int] | None = None
    turn_status: str | None = None
    streamed: bool = False
    first_event_ms: int | None = None
    event_ms: list[int] = field(default_factory=list)
    decoded_timing: list[list[int]] = field(default_factory=list)
    content_encoding: str | None = None
    decode_error: str | None = None
    #: Decoding stopped at the decode limits: the reply was not read to its end.
    over_limit: bool = False
    turn: Turn = field(default_factory=Turn)

    @property
    def completed(self) -> bool:
        """Whether the reply finished with ``completed`` (Codex's finished turn)."""
        return self.turn_status == "completed"

    @property
    def outcome(self) -> str:
        """One of :data:`OUTCOMES` (see the module's rules)."""
        return outcome(self.turn_status, self.completed, self.status)

    @property
    def tool_calls(self) -> list[tuple[str, tuple[str, ...]]]:
        """``[(tool name, sorted argument keys)]`` of the reply's function calls (``()`` when
        the arguments are no JSON object)."""
        out = []
        for call in self.turn.calls:
            try:
                args = json.loads(call.arguments or "{}")
            except ValueError:
                args = None
            out.append((call.name or "?", tuple(sorted(args)) if isinstance(args, dict) else ()))
        return out


def outcome(turn_status: str | None, completed: bool, status: int | None) -> str:
    """``completed``, ``incomplete``, ``failed`` (a ``response.failed`` / ``error`` event, an
    HTTP error status or no reply at all) or ``cut`` (a reply that ended without a terminal
    event: upstream or client gone mid-stream). ``completed`` stands in for a reader that
    kept no ``turn_status`` (an older recording)."""
    if turn_status in OUTCOMES:
        return turn_status
    if completed:
        return "completed"
    if status is None or status >= 400:
        return "failed"
    return "cut"


def read_reply(reply: Reply | None) -> ExchangeFacts:
    """The reply's half of :class:`ExchangeFacts` (no model or tier). Never raises: a body
    that does not decode or parse gives what could be read."""
    facts = ExchangeFacts()
    if reply is None or reply.status is None:
        return facts
    facts.status = reply.status
    facts.streamed = reply.streamed
    facts.content_encoding = reply.content_encoding
    body = reply.body
    if reply.events is not None:
        turn = assemble_turn(reply.events)
    elif isinstance(body, bytes | bytearray) and facts.streamed:
        # Decoded chunk by chunk: the timing counts decoded bytes, which is what the dump's
        # body (and so replay) holds, compressed upstream or not.
        line = timeline(bytes(body), reply.content_encoding, [list(e) for e in reply.chunk_timing])
        turn = assemble_turn(line.events)
        facts.decoded_timing, facts.decode_error = line.decoded_timing, line.error
        facts.over_limit = line.over_limit
    elif isinstance(body, bytes | bytearray):
        decoded = decode_body(bytes(body), reply.content_encoding)
        facts.decode_error, facts.over_limit = decoded.error, decoded.over_limit
        try:
            payload = loads_json(decoded.data)
        except ValueError:  # not JSON, or nested too deep
            payload = None
        turn = turn_of_reply(payload if isinstance(payload, dict) else None)
    else:  # a dump file's body: an SSE string or a parsed JSON value
        turn = turn_of_reply(body)
    facts.turn = turn
    facts.events = turn.events
    facts.usage = turn.usage
    facts.turn_status = turn.status if turn.status in FINISHED else None
    facts.first_event_ms, facts.event_ms = turn.first_event_ms, turn.event_ms
    return facts


def read_exchange(request: RequestFacts | bytes | Any, reply: Reply | None) -> ExchangeFacts:
    """What an exchange says. ``request``: its :class:`RequestFacts` (read once, e.g. by the
    gateway before forwarding), the body bytes (plain; a compressed body goes through
    :func:`read_request` first) or a parsed body; ``reply``: see :class:`Reply`. Never
    raises."""
    if not isinstance(request, RequestFacts):
        if isinstance(request, bytes | bytearray):
            request = read_request(bytes(request), None)
        else:
            request = request_fields(request)
    facts = read_reply(reply)
    facts.model, facts.service_tier = request.model, request.service_tier
    return facts


#: What a usage row's ``error`` starts with when the reply's usage could not be read (the
#: gateway's ledger, ``usage`` and ``/metrics`` name the kind ``unmetered``).
UNMETERED = "unmetered"
#: Decoded bytes of a stream's end that :func:`meter_reply` keeps past the decode limit: the
#: terminal event (which repeats the whole response) must fit in it.
METER_TAIL_BYTES = 8 * MIB
#: Bytes a JSON reply's ``usage`` object may take (it is a few hundred).
USAGE_OBJECT_BYTES = 64 * 1024
#: A ``"usage": {`` key outside any string: inside a JSON string every ``"`` is escaped, so a
#: quote preceded by a backslash is text, not a key.
_USAGE_KEY = re.compile(rb'(?<!\\)"usage"\s*:\s*\{')
_EVENT_END = re.compile(rb"\r\n\r\n|\n\n|\r\r")


class Metering(NamedTuple):
    """What a reply is charged on: ``usage`` (as :func:`addons.responses_turn.usage_of`),
    ``events``, ``turn_status``, and ``unmetered``: why a reply that should carry usage could
    not be read for it (a sentence starting with :data:`UNMETERED`), else ``None``."""

    usage: dict[str, int] | None
    events: int
    turn_status: str | None
    unmetered: str | None = None
    #: The reply's ``response.id`` and ``response.model`` (telemetry's span), when it names them.
    response_id: str | None = None
    response_model: str | None = None


def meter_reply(
    reply: Reply, max_bytes: int = STREAM_MAX_BYTES, facts: ExchangeFacts | None = None
) -> Metering:
    """The usage of a reply, whatever its compression ratio.

    First as :func:`read_reply` reads it (within the decode limits). A reply that decodes past
    them is read again to its end, piece by piece (:class:`addons.body_decode.BodyStream`, at
    most ``max_bytes`` decoded), keeping only what holds the usage: of an SSE stream the last
    :data:`METER_TAIL_BYTES` (its terminal event), of a JSON body the first ``"usage"`` object
    (then it stops). ``unmetered`` names why no usage was found in a successful (2xx) reply:
    the decode failed, the reply decodes past ``max_bytes``, its terminal event is larger than
    the tail, or it has none. ``facts``: the reply's :func:`read_reply`, when already read.
    Never raises.
    """
    facts = read_reply(reply) if facts is None else facts
    if facts.over_limit and isinstance(reply.body, bytes | bytearray):
        if facts.streamed:
            metering = _meter_stream(bytes(reply.body), reply.content_encoding, facts, max_bytes)
        else:
            metering = _meter_json(bytes(reply.body), reply.content_encoding, facts, max_bytes)
    else:
        metering = Metering(facts.usage, facts.events, facts.turn_status, _why(facts, None))
    return metering._replace(response_id=facts.turn.response_id, response_model=facts.turn.model)


def _why(facts: ExchangeFacts, error: str | None) -> str | None:
    """Why a reply without usage is unmetered (``None``: it has usage, or is no success)."""
    if facts.usage is not None or facts.status is None or not 200 <= facts.status < 300:
        return None
    if facts.turn_status in ("failed", "incomplete"):
        return None  # a turn that ended without spending is named by its status
    error = error or facts.decode_error
    if error:
        return f"{UNMETERED}: the reply could not be read ({error})"
    return f"{UNMETERED}: the reply carries no usage"


def _pieces(stream: BodyStream, raw: bytes) -> Iterator[bytes]:
    """The decoded pieces of a whole body, fed in slices of 1 MiB as received."""
    for start in range(0, len(raw), MIB):
        yield from stream.pieces(raw[start : start + MIB])
    yield from stream.end()


def _meter_stream(
    raw: bytes, encoding: str | None, facts: ExchangeFacts, max_bytes: int
) -> Metering:
    """An SSE reply past the decode limit: decoded to its end, its last bytes parsed."""
    stream = BodyStream(encoding, max_bytes)
    tail: deque[bytes] = deque()
    size = 0
    dropped = False
    for piece in _pieces(stream, raw):
        tail.append(piece)
        size += len(piece)
        while size - len(tail[0]) >= METER_TAIL_BYTES:
            size -= len(tail.popleft())
            dropped = True
    data = b"".join(tail)
    if dropped:  # the tail starts mid-event: parse from the first event boundary in it
        boundary = _EVENT_END.search(data)
        data = data[boundary.end() :] if boundary else b""
    usage, status = _terminal(decode_sse(data)[0])
    events = facts.events  # counted within the decode limit
    if usage is not None:
        return Metering(usage, events, status, None)
    why: str | None
    if stream.over_limit:
        why = f"{UNMETERED}: the reply decodes past {max_bytes // MIB} MiB, metering stopped"
    elif stream.error:
        why = f"{UNMETERED}: the reply could not be read ({stream.error})"
    elif dropped and status is None:
        why = (
            f"{UNMETERED}: the reply's last event is larger than "
            f"{METER_TAIL_BYTES // MIB} MiB (or it has no terminal event)"
        )
    else:
        why = _why(ExchangeFacts(status=facts.status, turn_status=status), None)
    return Metering(None, events, status, why)


def _terminal(events: list[SseEvent]) -> tuple[dict[str, int] | None, str | None]:
    """``(usage, status)`` of the last terminal event among ``events`` (as
    :func:`addons.responses_turn.assemble_turn` names them); ``(None, None)`` without one."""
    for ev in reversed(events):
        if ev.type in TERMINAL:
            payload = ev.payload
            response = payload.get("response") if isinstance(payload, dict) else None
            return usage_of(response), TERMINAL[ev.type]
    return None, None


def _meter_json(raw: bytes, encoding: str | None, facts: ExchangeFacts, max_bytes: int) -> Metering:
    """A JSON reply past the decode limit: its first ``"usage"`` object, read as it streams."""
    stream = BodyStream(encoding, max_bytes)
    carry = b""
    decoder = json.JSONDecoder()
    for piece in _pieces(stream, raw):
        buf = carry + piece
        carry = buf[-32:]  # a key split between two pieces
        position = 0
        while (match := _USAGE_KEY.search(buf, position)) is not None:
            start = match.end() - 1
            window = buf[start : start + USAGE_OBJECT_BYTES]
            try:
                value, _ = decoder.raw_decode(window.decode("utf-8", "replace"))
            except ValueError:
                if len(window) < USAGE_OBJECT_BYTES:
                    carry = buf[match.start() :]  # the object goes on in the next piece
                    break
                position = match.end()
                continue
            usage = usage_of({"usage": value})
            if usage is not None:
                return Metering(usage, 0, None, None)
            position = match.end()
    why: str | None
    if stream.over_limit:
        why = f"{UNMETERED}: the reply decodes past {max_bytes // MIB} MiB, metering stopped"
    else:
        why = _why(ExchangeFacts(status=facts.status), stream.error)
    return Metering(None, 0, None, why)
