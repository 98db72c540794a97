"""Entry script and addons for the mitmweb front (``./run.sh web``).

The mitmweb process never holds the API key: it is a reverse proxy in front of the key-holding
proxy (a child process on loopback, see ``addons/web.py``), so nothing mitmweb shows, pushes to
the browser or saves can contain the key, even while a request is in flight. These addons make
the inspection useful: SSE bodies visible while they stream, refusals marked, a bounded number
of flows in memory, and the front's own server-info / shutdown contract.
"""

from __future__ import annotations

import collections
import logging
import time

from mitmproxy import ctx, exceptions, hooks, http

from addons.body_decode import DecodeLimitOptions
from addons.bomb_fence import BombFence
from addons.clean_stop import CleanStop
from addons.common import CHUNK_TIMING, LOCAL_REPLY_HEADER
from addons.guard import OptionGuard
from addons.redaction import HeaderRedaction
from addons.secret_memory import REDACTED
from addons.server_info import ServerInfo
from addons.shutdown import HttpShutdown
from addons.sse_events import stream_completed
from addons.sse_stream import Tee, is_event_stream
from addons.views import CodexContentviews

logger = logging.getLogger(__name__)

#: What a refusal code from the key-holding proxy means, for the flow's comment.
REFUSAL_NOTES = {
    "forbidden": "refused by the allowlist (only POST /v1/responses is forwarded)",
    "websocket_not_supported": "WebSocket upgrade refused with 426; Codex falls back to HTTP",
    "upstream_error": "the upstream could not be reached or failed",
    "dump_failed": "refused: its dump could not be written (--dump-required)",
}


#: The mark of refused flows: a plain letter (mitmproxy's character markers), which renders in
#: every browser; an emoji marker shows as an empty box without an emoji font.
REFUSAL_MARK = "X"


class LiveSse:
    """Streams SSE replies through the front and shows their body while they stream.

    Each chunk is passed on at once (``flow.response.stream``) and appended to a copy; at most
    every ``codex_web_refresh_ms`` the copy is put in the flow and an ``update`` is triggered,
    so mitmweb pushes the growing body to the browser. At the end (``response``), and also when
    the flow fails part-way (``error``: e.g. Codex closes the connection right after
    ``response.completed``, before the last chunk), the whole body received so far is put in
    the flow, so the UI never keeps a stale throttled copy.
    """

    def __init__(self) -> None:
        self.refresh_s = 0.25
        self._copies: dict[str, Tee] = {}

    def load(self, loader) -> None:
        loader.add_option(
            "codex_web_refresh_ms",
            int,
            250,
            "How often (ms) a streaming SSE body is refreshed in the mitmweb UI.",
        )

    def configure(self, updated: set[str]) -> None:
        if "codex_web_refresh_ms" in updated:
            self.refresh_s = max(10, ctx.options.codex_web_refresh_ms) / 1000

    def responseheaders(self, flow: http.HTTPFlow) -> None:
        response = flow.response
        if response is None or response.stream or not is_event_stream(response):
            return
        copy = Tee()
        self._copies[flow.id] = copy
        last = [0.0]

        def tee(chunk: bytes) -> bytes:
            copy(chunk)
            now = time.monotonic()
            if not chunk or now - last[0] >= self.refresh_s:
                last[0] = now
                self._show(flow, copy)
            return chunk

        response.stream = tee

    @staticmethod
    def _show(flow: http.HTTPFlow, copy: Tee) -> None:
        if flow.response is None:
            return
        flow.response.raw_content = copy.data
        flow.metadata[CHUNK_TIMING] = copy.timing  # for the Responses stream view
        ctx.master.addons.trigger(hooks.UpdateHook([flow]))

    def response(self, flow: http.HTTPFlow) -> None:
        # The stream's final b"" chunk already put the whole body in the flow.
        if self._copies.pop(flow.id, None) is not None and flow.response is not None:
            flow.response.stream = False

    def error(self, flow: http.HTTPFlow) -> None:
        copy = self._copies.pop(flow.id, None)
        if copy is not None and flow.response is not None:
            flow.response.stream = False
            self._show(flow, copy)


class FlowNotes:
    """Marks what the key-holding proxy did with each flow, for the person looking at mitmweb.

    Refusals (403 allowlist, 426 WebSocket, local errors) carry the ``x-codex-proxy-error``
    header: the flow is marked with :data:`REFUSAL_MARK` and gets a comment saying why.
    Forwarded flows show the ``Authorization`` header the key-holding proxy injected upstream
    as ``[REDACTED]`` (this process never had the value), and their comment names the real
    upstream URL (``codex_web_upstream_url``; the flow's own URL stays the inner hop's, so
    mitmweb's "Replay" still goes through the key-holding proxy).
    """

    def __init__(self) -> None:
        self.upstream_url = ""

    def load(self, loader) -> None:
        loader.add_option(
            "codex_web_upstream_url",
            str,
            "",
            "The key-holding proxy's upstream URL, named in forwarded flows' comments "
            "(set by ./run.sh web).",
        )

    def configure(self, updated: set[str]) -> None:
        if "codex_web_upstream_url" in updated:
            self.upstream_url = ctx.options.codex_web_upstream_url

    def responseheaders(self, flow: http.HTTPFlow) -> None:
        response = flow.response
        if response is None:
            return
        code = response.headers.get(LOCAL_REPLY_HEADER)
        if code:
            flow.marked = REFUSAL_MARK
            flow.comment = REFUSAL_NOTES.get(code, f"answered by the proxy itself ({code})")
        elif flow.request.method == "POST":
            flow.request.headers["authorization"] = REDACTED
            where = f" to {self.upstream_url}" if self.upstream_url else " upstream"
            flow.comment = f"forwarded{where}; the key-holding proxy injected Authorization"

    def error(self, flow: http.HTTPFlow) -> None:
        if flow.error is None:
            return
        response = flow.response
        if response is not None and stream_completed(response):
            # Codex often hangs up right after response.completed, before the last chunk.
            flow.comment = f"stream complete (response.completed received); then: {flow.error.msg}"
        else:
            flow.comment = f"failed: {flow.error.msg}"


class FlowCap:
    """Keeps at most ``codex_web_max_flows`` flows in mitmweb's memory (oldest finished flows
    dropped first), so a long Codex session does not grow without bound. 0 means no limit."""

    def __init__(self) -> None:
        self.max_flows = 1000
        self._seen: collections.deque[http.HTTPFlow] = collections.deque()

    def load(self, loader) -> None:
        loader.add_option(
            "codex_web_max_flows",
            int,
            1000,
            "Most flows kept in the mitmweb UI; the oldest are dropped first (0: no limit).",
        )

    def configure(self, updated: set[str]) -> None:
        if "codex_web_max_flows" in updated:
            if ctx.options.codex_web_max_flows < 0:
                raise exceptions.OptionsError("codex_web_max_flows must be >= 0")
            self.max_flows = ctx.options.codex_web_max_flows

    def requestheaders(self, flow: http.HTTPFlow) -> None:
        self._seen.append(flow)

    def response(self, flow: http.HTTPFlow) -> None:
        self._trim()

    def error(self, flow: http.HTTPFlow) -> None:
        self._trim()

    def _trim(self) -> None:
        view = ctx.master.addons.get("view")
        if view is None or not self.max_flows:
            return
        drop: list[http.HTTPFlow] = []
        excess = view.store_count() - self.max_flows
        kept: collections.deque[http.HTTPFlow] = collections.deque()
        while self._seen and excess > len(drop):
            oldest = self._seen.popleft()
            (kept if oldest.live else drop).append(oldest)
        self._seen.extendleft(reversed(kept))
        if drop:
            view.remove(drop)


# LiveSse before FlowNotes: on error, the whole streamed body is in the flow before the note.
# HeaderRedaction after LiveSse: it wraps LiveSse's stream, so the head is redacted before the
# first refresh pushes the flow to the browser.
addons = [
    OptionGuard(),
    DecodeLimitOptions(),
    CodexContentviews(),
    ServerInfo(),
    HttpShutdown(),
    LiveSse(),
    HeaderRedaction(),
    FlowNotes(),
    FlowCap(),
    BombFence(),  # a bomb that went through is shown as received, never decoded whole
    CleanStop(),  # last: one line on SIGINT/SIGTERM, open connections closed at shutdown
]
