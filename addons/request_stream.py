"""Request streaming: large request bodies go upstream as they arrive, not buffered first."""

from __future__ import annotations

import logging

from mitmproxy import ctx, exceptions, http

from addons.common import ALLOWED, BRIDGE, fail_closed
from addons.sse_stream import Tee

logger = logging.getLogger(__name__)


class RequestStreaming:
    """Streams allowlisted request bodies larger than ``codex_stream_requests_over`` bytes (or
    of unknown size) to the upstream chunk by chunk, keeping a copy for dumps and flow files.

    mitmproxy otherwise reads the whole body before sending anything, which for a multi-MB Codex
    context doubles the time to the upstream and the memory held. The key is injected in
    ``requestheaders``, before a streamed head can leave (see MITMPROXY.md). With
    ``codex_dump_required`` bodies are never streamed: the request dump must be on disk before
    anything is sent. In ``request`` (end of body) the copy is put back into the flow.
    """

    def __init__(self) -> None:
        self.threshold = 65536
        self._tees: dict[str, Tee] = {}

    def load(self, loader) -> None:
        loader.add_option(
            "codex_stream_requests_over",
            int,
            65536,
            "Stream request bodies larger than this many bytes (or chunked) to the upstream "
            "as they arrive; -1 never streams.",
        )

    def configure(self, updated: set[str]) -> None:
        if "codex_stream_requests_over" in updated:
            value = ctx.options.codex_stream_requests_over
            if value < -1:
                raise exceptions.OptionsError("codex_stream_requests_over must be >= -1")
            self.threshold = value

    @fail_closed
    def requestheaders(self, flow: http.HTTPFlow) -> None:
        if flow.response or flow.error or not flow.live or self.threshold < 0:
            return
        if flow.metadata.get(ALLOWED) is not True or flow.request.stream:
            return
        if BRIDGE in flow.metadata:
            return  # the bridge translates the whole body before it goes upstream
        if getattr(ctx.options, "codex_dump_required", False):
            return
        headers = flow.request.headers
        length = headers.get("content-length")
        if length is not None:
            try:
                if int(length) <= self.threshold:
                    return
            except ValueError:
                return  # malformed: mitmproxy refuses it anyway
        elif "chunked" not in headers.get("transfer-encoding", "").lower():
            return
        tee = Tee()
        self._tees[flow.id] = tee
        flow.request.stream = tee

    def request(self, flow: http.HTTPFlow) -> None:
        self._restore(flow)

    def error(self, flow: http.HTTPFlow) -> None:
        self._restore(flow)

    def _restore(self, flow: http.HTTPFlow) -> None:
        tee = self._tees.pop(flow.id, None)
        if tee is not None and flow.request.raw_content is None:
            flow.request.raw_content = tee.data
