"""The one SSE decoder: wire bytes (compressed or not) to Server-Sent Events, chunk by chunk.

Every place that reads an SSE body goes through here: the recording's usage ledger, replay, the
mitmweb front's "stream complete" mark, and what later modes add (content views, the Chat
Completions bridge, gateway accounting). It undoes ``Content-Encoding`` with
:class:`addons.body_decode.BodyDecoder` (Codex 0.171 asks for ``zstd,gzip``, so an upstream may
compress its stream), decodes UTF-8 incrementally, and splits events by the WHATWG rules that
matter for the Responses API. It never sits on the wire path: the proxy streams the raw bytes
through untouched, and this runs on the copy.
"""

from __future__ import annotations

import codecs
import re
from dataclasses import dataclass
from functools import cached_property
from typing import Any

from mitmproxy import http

from addons.body_decode import BodyDecoder, loads_json
from addons.sse_stream import is_event_stream

_EOL = re.compile(r"\r\n|\r|\n")


@dataclass
class SseEvent:
    """One event: ``event`` (the ``event:`` field, ``"message"`` when absent), ``data`` (its
    ``data:`` lines joined with ``\\n``), ``complete`` (``False`` for an event cut off by the end
    of the stream, with no blank line after it)."""

    event: str
    data: str
    complete: bool = True

    @cached_property
    def payload(self) -> Any:
        """``data`` parsed as JSON, or ``None`` when it is not JSON."""
        try:
            return loads_json(self.data)
        except ValueError:  # not JSON, or nested too deep
            return None

    @property
    def type(self) -> str:
        """The Responses API event type: the payload's ``"type"``, else the ``event`` name."""
        payload = self.payload
        if isinstance(payload, dict) and isinstance(payload.get("type"), str):
            return payload["type"]
        return self.event


class SseParser:
    """Splits decoded body bytes into :class:`SseEvent`\\ s as they arrive.

    Rules (WHATWG "event stream interpretation", the parts the Responses API uses): lines end
    in CR, LF or CRLF (also when split across chunks); a leading BOM is dropped; ``:`` lines are
    comments; ``field: value`` with one optional space after the colon; several ``data`` lines
    join with ``\\n``; a blank line dispatches the event; an event without data is dropped.
    Unlike a browser, :meth:`finish` also returns an event cut off by the end of the stream
    (marked ``complete=False``), so a partial stream shows what arrived.
    """

    def __init__(self) -> None:
        self._utf8 = codecs.getincrementaldecoder("utf-8")(errors="replace")
        self._pending = ""
        self._started = False
        self._name = ""
        self._data: list[str] = []

    def feed(self, data: bytes) -> list[SseEvent]:
        """Events completed by the next decoded chunk."""
        return self._lines(self._utf8.decode(data), final=False)

    def finish(self) -> list[SseEvent]:
        """Events left at the end of the body (the last one possibly cut off)."""
        events = self._lines(self._utf8.decode(b"", final=True), final=True)
        if self._data:
            events.append(SseEvent(self._name or "message", "\n".join(self._data), False))
        self._name, self._data = "", []
        return events

    def _lines(self, text: str, final: bool) -> list[SseEvent]:
        buf = self._pending + text
        if not self._started and buf:
            self._started = True
            buf = buf.removeprefix("\ufeff")
        events: list[SseEvent] = []
        start = 0
        for m in _EOL.finditer(buf):
            if m.group() == "\r" and m.end() == len(buf) and not final:
                break  # maybe the first half of a CRLF split across chunks
            self._line(buf[start : m.start()], events)
            start = m.end()
        rest = buf[start:]
        if final and rest:
            self._line(rest, events)
            rest = ""
        self._pending = rest
        return events

    def _line(self, line: str, events: list[SseEvent]) -> None:
        if not line:
            if self._data:
                events.append(SseEvent(self._name or "message", "\n".join(self._data)))
            self._name, self._data = "", []
            return
        if line.startswith(":"):
            return
        key, _, value = line.partition(":")
        value = value.removeprefix(" ")
        if key == "event":
            self._name = value
        elif key == "data":
            self._data.append(value)


class SseDecoder:
    """Wire chunks of an SSE body (as the proxy tees them, still content-encoded) to events.

    ``feed(raw) -> [SseEvent, ...]``, then ``finish()``. :attr:`error` is the body decoder's
    (``None``, or e.g. ``"zstd: the stream ends before its frame does (truncated)"``); events
    decoded before a problem are still returned.
    """

    def __init__(self, content_encoding: str | None = None) -> None:
        self._body = BodyDecoder(content_encoding)
        self._parser = SseParser()
        #: Decoded body bytes so far.
        self.decoded = 0

    @property
    def error(self) -> str | None:
        """Why the body could not be decoded completely, or ``None``."""
        return self._body.error

    @property
    def over_limit(self) -> bool:
        """Whether decoding stopped at the decode limits (the rest of the body is unread)."""
        return self._body.over_limit

    def feed(self, raw: bytes) -> list[SseEvent]:
        """Events completed by the next raw chunk."""
        data = self._body.feed(raw)
        self.decoded += len(data)
        return self._parser.feed(data)

    def finish(self) -> list[SseEvent]:
        """Events left at the end of the body."""
        data = self._body.finish()
        self.decoded += len(data)
        return self._parser.feed(data) + self._parser.finish()


def decode_sse(
    raw: bytes, content_encoding: str | None = None
) -> tuple[list[SseEvent], str | None]:
    """A whole (or cut-off) raw SSE body to ``(events, decode error or None)``."""
    decoder = SseDecoder(content_encoding)
    events = decoder.feed(raw) + decoder.finish()
    return events, decoder.error


def parse_sse_text(text: str) -> list[SseEvent]:
    """Events of an already decoded SSE body (e.g. a dump file's ``body`` string)."""
    return decode_sse(text.encode("utf-8"))[0]


def completed_response(events: list[SseEvent]) -> dict[str, Any] | None:
    """The ``response`` object of the stream's ``response.completed`` event, or ``None`` when
    the stream has none (Codex treats such a stream as failed, CODEX.md). The last one wins."""
    for ev in reversed(events):
        if ev.type == "response.completed" and isinstance(ev.payload, dict):
            response = ev.payload.get("response")
            return response if isinstance(response, dict) else {}
    return None


def stream_completed(response: http.Response) -> bool:
    """Whether a (possibly cut-off, possibly compressed) SSE reply in a flow holds a
    ``response.completed`` event. Codex often hangs up right after it (CODEX.md)."""
    if not is_event_stream(response) or not response.raw_content:
        return False
    events, _ = decode_sse(response.raw_content, response.headers.get("content-encoding"))
    return completed_response(events) is not None


@dataclass
class Timeline:
    """An SSE body replayed against its chunk timing: ``events`` as ``(ms, SseEvent)`` (the
    arrival of the chunk that completed each event, ms since the response headers; ``None``
    without chunk timing),
    ``decoded_timing`` as ``[[ms, decoded body bytes so far], ...]`` per chunk (the raw timing's
    shape, in decoded bytes, which is what a dump's body and replay hold), ``error``, and
    ``over_limit`` (decoding stopped at the decode limits)."""

    events: list[tuple[int | None, SseEvent]]
    decoded_timing: list[list[int]]
    error: str | None
    over_limit: bool = False


def timeline(raw: bytes, content_encoding: str | None, chunk_timing: list[list[int]]) -> Timeline:
    """Decode ``raw`` chunk by chunk as it arrived. ``chunk_timing`` is the proxy's
    ``[[ms since response headers, raw bytes so far], ...]`` (``addons.common.CHUNK_TIMING``);
    bytes beyond its last entry count as arriving at the last entry's time; without timing,
    every event's time is ``None``."""
    decoder = SseDecoder(content_encoding)
    events: list[tuple[int | None, SseEvent]] = []
    decoded_timing: list[list[int]] = []
    start = 0
    ms: int | None = None
    for entry in chunk_timing:
        ms, end = int(entry[0]), int(entry[1])
        events += [(ms, ev) for ev in decoder.feed(raw[start:end])]
        start = max(start, end)
        decoded_timing.append([ms, decoder.decoded])
    before = decoder.decoded
    events += [(ms, ev) for ev in decoder.feed(raw[start:]) + decoder.finish()]
    if decoder.decoded != before and decoded_timing:
        decoded_timing[-1][1] = decoder.decoded
    return Timeline(events, decoded_timing, decoder.error, decoder.over_limit)
