"""Streaming: send ``text/event-stream`` replies to the client chunk by chunk, never buffered."""

from __future__ import annotations

import logging
import time

from mitmproxy import http

from addons.common import ALLOWED, CHUNK_TIMING, fail_closed

logger = logging.getLogger(__name__)


def is_event_stream(response: http.Response) -> bool:
    """Whether the response's media type is ``text/event-stream`` (parameters ignored)."""
    ctype = response.headers.get("content-type", "")
    return ctype.split(";", 1)[0].strip().lower() == "text/event-stream"


class Tee:
    """A ``flow.response.stream`` callable: passes each chunk on unchanged and keeps a copy.

    mitmproxy calls it with every chunk as it arrives from upstream and once with ``b""`` at the
    end; whatever it returns is sent to the client at once. ``data`` holds the raw (still
    content-encoded) bytes seen so far, so a dump or flow file gets the body even when the
    client or the upstream goes away mid-stream.
    """

    def __init__(self) -> None:
        self._parts: list[bytes] = []
        self.size = 0
        self.started = time.monotonic()
        #: ``[ms since the response headers, body length after this chunk]`` per chunk.
        self.timing: list[list[int]] = []

    def __call__(self, chunk: bytes) -> bytes:
        if chunk:
            self._parts.append(chunk)
            self.size += len(chunk)
            self.timing.append([int((time.monotonic() - self.started) * 1000), self.size])
        return chunk

    @property
    def chunks(self) -> int:
        """How many non-empty chunks went through."""
        return len(self.timing)

    @property
    def data(self) -> bytes:
        """Everything seen so far (one join: chunks are kept as they came, not re-copied)."""
        if len(self._parts) > 1:
            self._parts = [b"".join(self._parts)]
        return self._parts[0] if self._parts else b""


def restore_teed_body(flow: http.HTTPFlow, tee: Tee) -> None:
    """After a streamed reply (``response`` / ``error``): stop streaming and put the teed raw
    bytes back in the flow, which mitmproxy does not keep for a streamed body."""
    if flow.response is not None:
        flow.response.stream = False
        flow.response.raw_content = tee.data


class SseStreaming:
    """Streams SSE replies of allowlisted flows event by event and keeps their bodies.

    Without ``flow.response.stream`` mitmproxy buffers the whole body before sending it, which
    would hold every Codex token until the turn ends. In ``responseheaders`` this addon sets a
    :class:`Tee`; in ``response`` / ``error`` it puts the teed bytes back into the flow (the
    streamed body is otherwise gone), so the dump writer, ``-w`` flow files and mitmweb see the
    body, partial on error. Non-SSE replies stay buffered (small JSON), as mitmproxy does.
    """

    def __init__(self) -> None:
        self._tees: dict[str, Tee] = {}

    @fail_closed
    def responseheaders(self, flow: http.HTTPFlow) -> None:
        if flow.response is None or flow.metadata.get(ALLOWED) is not True:
            return
        if flow.response.stream or not is_event_stream(flow.response):
            return
        tee = Tee()
        self._tees[flow.id] = tee
        flow.response.stream = tee

    def response(self, flow: http.HTTPFlow) -> None:
        self._restore(flow)

    def error(self, flow: http.HTTPFlow) -> None:
        self._restore(flow)

    def _restore(self, flow: http.HTTPFlow) -> None:
        tee = self._tees.pop(flow.id, None)
        if tee is None or flow.response is None:
            return
        restore_teed_body(flow, tee)
        flow.metadata[CHUNK_TIMING] = tee.timing
