"""Forwarding through the upstream key pool, with retries on another key.

Why the retry path is buffered: mitmproxy streams a reply's body only from the connection
that carried the request, and an addon cannot send a flow's request again on that stream. So
the first attempt goes the normal way (streamed, event by event). When its reply is a 429,
a 5xx or a 401/403 and another key is available, nothing of it has reached the client yet
(the head is held until ``responseheaders`` returns): the gateway reads that small error
reply whole, sends the request again on another key with aiohttp, and hands the client the
final reply once complete. A reply that started streaming to the client is never retried.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field

import aiohttp
from mitmproxy import http

from addons.common import ALLOWED, KEY_INJECTED, REFUSED, WEBSOCKET, fail_closed
from addons.gateway_mode.core import (
    ATTEMPTS,
    MEMBER,
    ROUTE,
    UPSTREAM_KEY,
    GatewayCore,
    gateway_error,
    refuse,
    request_info,
)
from addons.gateway_mode.keypool import UpstreamKey
from addons.routing import Upstream, UpstreamRoute, route_to_upstream
from addons.secret_memory import REDACTED

logger = logging.getLogger(__name__)

#: Upstream statuses that move a request to another key (while nothing reached the client).
#: The refusal reason (``flow.metadata[REFUSED]``) when every upstream key is disabled until
#: restart: permanent for the member, so answered to Codex as one it stops on
#: (:class:`addons.gateway_mode.codex_replies.CodexReplies`).
NO_KEY_UNTIL_RESTART = "no-upstream-key-until-restart"
#: Handshake statuses that change the key's health (cool-down, disabled).
KEY_STATUSES = frozenset({401, 403, 429})
RETRY_STATUSES = frozenset({401, 403, 429, 500, 502, 503, 504})
#: The upstream's replies about our key itself: its body is never passed to a member.
KEY_REFUSED_STATUSES = frozenset({401, 403})
#: Sessions remembered with the keys their WebSocket handshakes failed on (oldest dropped).
MAX_AVOIDED_SESSIONS = 1000
#: Response headers not copied from an aiohttp reply (framing is mitmproxy's to redo).
_FRAMING = frozenset({"transfer-encoding", "connection", "keep-alive", "set-cookie", "set-cookie2"})


def retry_after_s(response: http.Response | None, default: float) -> float:
    """Seconds from a reply's ``Retry-After`` (delta seconds only), else ``default``; capped
    at one hour."""
    value = response.headers.get("retry-after", "") if response is not None else ""
    try:
        seconds = float(value)
    except ValueError:
        return default
    return min(max(seconds, 1.0), 3600.0) if seconds == seconds else default


def route_url(upstream_url: str, path: str) -> str:
    """The upstream URL for a gateway route: ``/v1/responses`` → ``upstream_url`` as given;
    ``/v1/responses/compact`` → its path plus ``/compact`` (the upstream's query kept, e.g.
    Azure's ``?api-version=``); ``/v1/realtime?model=…`` → its path's last segment replaced by
    ``realtime`` (``…/v1/responses`` → ``…/v1/realtime``), the upstream's query and then the
    member's (``model=…``) kept."""
    if path.startswith("/v1/realtime?"):
        base, _, upstream_query = upstream_url.partition("?")
        query = "&".join(q for q in (upstream_query, path.partition("?")[2]) if q)
        return base.rstrip("/").rsplit("/", 1)[0] + "/realtime?" + query
    suffix = path[len("/v1/responses") :] if path.startswith("/v1/responses/") else ""
    if not suffix:
        return upstream_url
    base, sep, query = upstream_url.partition("?")
    return base.rstrip("/") + suffix + sep + query


@dataclass
class Attempt:
    """One flow's use of the pool: the key in use, every key tried, and whether the current
    reply is held for a retry."""

    flow: http.HTTPFlow
    key: UpstreamKey
    tried: set[str] = field(default_factory=set)
    count: int = 1
    hold: bool = False
    #: The reply is the upstream's 401/403 about our key: read whole, never passed on.
    key_refused: bool = False


class PoolForwarder:
    """Routes member flows upstream with a key from the pool (see the module docstring).

    ``requestheaders``: member flows (allowlist mark and member mark) lose hop-by-hop headers
    and every client credential, and get the upstream URL and Host; other flows without a
    reply get 403 (fail closed). ``request``: a key is picked (the Codex session's key while
    healthy, else the least busy) and ``Authorization: Bearer <key>`` injected; no healthy
    key → 503 with ``Retry-After``. ``responseheaders``: the injected value is replaced by
    ``[REDACTED]`` in the flow object; 429 cools the key down (its ``Retry-After``, else
    ``cooldown_seconds``), 401/403 disables it until restart, and these and 5xx are retried on
    another key up to ``max_attempts``.
    """

    def __init__(self, core: GatewayCore) -> None:
        self.core = core
        self.route = UpstreamRoute()
        #: Child addons: the owner of ``codex_upstream_url``.
        self.addons = [self.route]
        self.attempts: dict[str, Attempt] = {}
        #: session -> upstream key names its WebSocket handshake failed on (see
        #: :meth:`_upgrade_failed`); cleared when an upgrade of the session succeeds.
        self.avoid: dict[str, set[str]] = {}
        self._session: aiohttp.ClientSession | None = None

    @property
    def upstream(self) -> Upstream:
        """Where member flows go (``codex_upstream_url``, parsed)."""
        return self.route.upstream

    @fail_closed
    def requestheaders(self, flow: http.HTTPFlow) -> None:
        if flow.response or flow.error or not flow.live:
            return
        if flow.metadata.get(ALLOWED) is not True or MEMBER not in flow.metadata:
            refuse(
                flow,
                flow.metadata.get(REFUSED) or "not-marked",
                gateway_error(403, "forbidden", "request was not allowlisted"),
            )
            return
        request = flow.request
        flow.metadata[ROUTE] = request.path
        route_to_upstream(
            request, route_url(self.upstream.url, request.path), self.upstream.host_header
        )

    @fail_closed
    def request(self, flow: http.HTTPFlow) -> None:
        if flow.response or flow.error or not flow.live or MEMBER not in flow.metadata:
            return
        if flow.metadata.get(ALLOWED) is not True:
            return
        session = request_info(flow)["session"]
        avoid = self.avoid.get(session, set()) if session and WEBSOCKET in flow.metadata else set()
        key = self.core.pool.pick(session, exclude=avoid)
        if key is None:
            self.avoid.pop(session or "", None)  # the next upgrade may try every key again
            self._no_key(flow)
            return
        self.attempts[flow.id] = Attempt(flow, key, {key.name})
        flow.request.headers["authorization"] = key.header_value()
        flow.metadata[KEY_INJECTED] = True
        flow.metadata[UPSTREAM_KEY] = key.name
        flow.metadata[ATTEMPTS] = 1
        # The whole body is here: frame it with a Content-Length. Also when the member sent
        # neither header (HTTP/2 needs none): mitmproxy would send the HTTP/1 head unframed and
        # the upstream would read the body as a request of the member's own making.
        headers = flow.request.headers
        if "transfer-encoding" in headers or (
            flow.request.raw_content and "content-length" not in headers
        ):
            headers.pop("transfer-encoding", None)
            headers["content-length"] = str(len(flow.request.raw_content or b""))

    def _no_key(self, flow: http.HTTPFlow) -> None:
        status = self.core.pool.status()
        if status.disabled and not (status.healthy or status.cooling):
            # Nothing comes back by itself: a retry cannot succeed before a restart, and
            # Codex would retry a 503 for about 17 minutes (measured, socket and HTTP).
            self.core.metrics.refused.labels("no_upstream_key").inc()
            refuse(
                flow,
                NO_KEY_UNTIL_RESTART,
                gateway_error(
                    503,
                    "no_upstream_key",
                    f"every upstream key of the gateway ({len(status.disabled)}) was refused "
                    "by the upstream (401/403) and is disabled until the gateway restarts; "
                    "tell the gateway's operator",
                ),
            )
            return
        wait = 30
        if status.next_ready_s is not None:
            wait = max(1, int(status.next_ready_s - time.time() + 0.999))
        self.core.metrics.refused.labels("no_upstream_key").inc()
        refuse(
            flow,
            "no-upstream-key",
            gateway_error(
                503,
                "no_upstream_key",
                f"no healthy upstream key ({len(status.cooling)} cooling, "
                f"{len(status.disabled)} disabled); try again later",
                {"retry-after": str(wait)},
            ),
        )

    @fail_closed
    def responseheaders(self, flow: http.HTTPFlow) -> None:
        self._scrub(flow)
        attempt = self.attempts.get(flow.id)
        if attempt is None or flow.response is None:
            return
        if WEBSOCKET in flow.metadata and flow.response.status_code == 101:
            self.avoid.pop(request_info(flow)["session"] or "", None)
        if self._judge(attempt, flow.response) and (
            self._can_retry(attempt)
            or (WEBSOCKET in flow.metadata and flow.response.status_code in KEY_STATUSES)
        ):
            attempt.hold = True
            flow.response.stream = False  # small error reply: read it whole, send nothing yet
        elif flow.response.status_code in KEY_REFUSED_STATUSES:
            attempt.key_refused = True
            flow.response.stream = False  # replaced in ``response``: nothing of it is sent

    def _judge(self, attempt: Attempt, response: http.Response) -> bool:
        """Update the key's health from a reply; whether the reply is worth a retry."""
        status = response.status_code
        if status == 429:
            self.core.pool.cool_down(
                attempt.key, retry_after_s(response, self.core.cooldown_s), "429 from upstream"
            )
        elif status in (401, 403):
            self.core.pool.disable(attempt.key, f"{status} from upstream")
        return status in RETRY_STATUSES

    def _can_retry(self, attempt: Attempt) -> bool:
        if attempt.count >= self.core.max_attempts:
            return False
        return bool(set(self.core.pool.status().healthy) - attempt.tried)

    @fail_closed
    async def response(self, flow: http.HTTPFlow) -> None:
        attempt = self.attempts.get(flow.id)
        if attempt is None or flow.response is None:
            return
        if attempt.hold and WEBSOCKET in flow.metadata:
            self._upgrade_failed(flow, attempt)
            return
        if attempt.hold:
            await self._retry(flow, attempt)
        if flow.response is not None and flow.response.status_code in KEY_REFUSED_STATUSES:
            self._key_refused(flow)

    def _key_refused(self, flow: http.HTTPFlow) -> None:
        """The last reply is the upstream's 401/403 about our key (the key is disabled by
        now). Its body is the upstream's words about the operator's key (OpenAI's 401 names
        the key's last characters) and never reaches a member: with a healthy key left, a
        local 503 with ``Retry-After: 0`` (the next request takes another key); without,
        :meth:`_no_key`'s answer (permanent when every key is disabled)."""
        assert flow.response is not None
        status = flow.response.status_code
        logger.warning(
            "the upstream refused key %s (%d); its reply is not passed on",
            flow.metadata.get(UPSTREAM_KEY),
            status,
        )
        if not self.core.pool.status().healthy:
            self._no_key(flow)
            return
        self.core.metrics.refused.labels("upstream_key_refused").inc()
        refuse(
            flow,
            "upstream-key-refused",
            gateway_error(
                503,
                "upstream_retry",
                f"the upstream refused the gateway's upstream key ({status}); it is disabled, "
                "retry: the next attempt uses another upstream key",
                {"retry-after": "0"},
            ),
        )

    async def _retry(self, flow: http.HTTPFlow, attempt: Attempt) -> None:
        """Send the held request again on other keys while the reply is worth a retry and
        a healthy key is left (at most ``max_attempts`` in all); the last reply stays."""
        assert flow.response is not None
        while attempt.hold:
            attempt.hold = False
            key = self.core.pool.pick(request_info(flow)["session"], exclude=attempt.tried)
            if key is None:
                return  # keep the last reply
            self.core.pool.done(attempt.key)
            cause = str(flow.response.status_code)
            attempt.key = key
            attempt.tried.add(key.name)
            attempt.count += 1
            flow.metadata[UPSTREAM_KEY] = key.name
            flow.metadata[ATTEMPTS] = attempt.count
            self.core.metrics.retries.labels(cause).inc()
            logger.info(
                "retrying on upstream key %s (attempt %d, after %s)", key.name, attempt.count, cause
            )
            reply = await self._send(flow, key)
            if reply is None:
                if self._can_retry(attempt):
                    attempt.hold = True
                continue
            flow.response = reply
            if self._judge(attempt, reply) and self._can_retry(attempt):
                attempt.hold = True

    def _upgrade_failed(self, flow: http.HTTPFlow, attempt: Attempt) -> None:
        """A WebSocket handshake failed on a key (429, 401, 403, or a 5xx while another key
        is healthy). Without another key: :meth:`_no_key`'s answer. With one: an upgrade cannot be
        sent again from here (mitmproxy owns the connection), so the member gets a local 503
        with ``Retry-After: 0`` (Codex 0.171 retries an upgrade after a 5xx within ~0.1 s, where
        the upstream's 429 ends its turn: measured), and the session's next upgrade avoids the
        key (429 cools it down and 401/403 disable it anyway; a 5xx does neither)."""
        attempt.hold = False
        assert flow.response is not None
        if not self._can_retry(attempt):
            # The only key (or the last) cooled down (429) or disabled (401/403): the member
            # hears the pool's state, as if the upgrade had come a moment later. Passed on,
            # the upstream's 429 ended Codex's turn at once ("exceeded retry limit"), where
            # the pool's 503 carries the cool-down as Retry-After, which Codex waits out; a
            # 401's body (the upstream's words about our key) never reaches a member.
            self._no_key(flow)
            return
        cause = str(flow.response.status_code)
        session = request_info(flow)["session"]
        if session:
            self.avoid.setdefault(session, set()).add(attempt.key.name)
            while len(self.avoid) > MAX_AVOIDED_SESSIONS:
                self.avoid.pop(next(iter(self.avoid)))
        self.core.metrics.retries.labels(cause).inc()
        logger.info("WebSocket handshake failed on upstream key %s (%s)", attempt.key.name, cause)
        flow.response = gateway_error(
            503,
            "upstream_retry",
            f"the upstream refused the WebSocket handshake ({cause}); retry: the next attempt "
            "uses another upstream key",
            {"retry-after": "0"},
        )

    async def _send(self, flow: http.HTTPFlow, key: UpstreamKey) -> http.Response | None:
        """One retry attempt with aiohttp; ``None`` on a connect failure (logged)."""
        if self._session is None or self._session.closed:
            self._session = aiohttp.ClientSession(
                auto_decompress=False,
                trust_env=False,
                timeout=aiohttp.ClientTimeout(total=None, sock_connect=10, sock_read=600),
            )
        headers = [
            (k, v)
            for k, v in flow.request.headers.items(multi=True)
            if k.lower() not in ("host", "authorization", "content-length")
        ]
        headers.append(("Authorization", key.header_value()))
        headers.append(("Host", self.upstream.host_header))
        started = time.time()
        try:
            async with self._session.post(
                flow.request.url,
                data=flow.request.raw_content or b"",
                headers=headers,
                allow_redirects=False,
                skip_auto_headers=("Accept-Encoding", "User-Agent", "Content-Type"),
            ) as reply:
                body = await reply.read()
                fields = [
                    (name, value)
                    for name, value in reply.raw_headers
                    if name.decode("latin-1").lower() not in _FRAMING
                ]
                response = http.Response(
                    http_version=b"HTTP/1.1",
                    status_code=reply.status,
                    reason=(reply.reason or "").encode("latin-1", "replace"),
                    headers=http.Headers(fields),
                    content=None,
                    trailers=None,
                    timestamp_start=started,
                    timestamp_end=time.time(),
                )
                response.raw_content = body
                response.headers["content-length"] = str(len(body))
                return response
        except (aiohttp.ClientError, OSError, TimeoutError) as e:
            logger.warning("upstream retry on key %s failed: %s", key.name, type(e).__name__)
            return None

    def error(self, flow: http.HTTPFlow) -> None:
        self._scrub(flow)
        if flow.metadata.get(KEY_INJECTED) and flow.error is not None and flow.response is None:
            key = flow.metadata.get(UPSTREAM_KEY)
            logger.warning(
                "upstream exchange on key %s failed before a reply: %s", key, flow.error.msg
            )

    def finished(self, flow: http.HTTPFlow) -> None:
        """Called by accounting when a flow has ended: the key is no longer in use."""
        attempt = self.attempts.pop(flow.id, None)
        if attempt is not None:
            self.core.pool.done(attempt.key)

    def done(self) -> None:
        for attempt in self.attempts.values():
            self._scrub(attempt.flow)
            self.core.pool.done(attempt.key)
        self.attempts.clear()
        if self._session is not None and not self._session.closed:
            try:
                import asyncio

                asyncio.get_running_loop().create_task(self._session.close())
            except RuntimeError:
                pass

    def _scrub(self, flow: http.HTTPFlow) -> None:
        headers = flow.request.headers
        value = headers.get("authorization")
        if value and value != REDACTED and self.core.pool.redact(value):
            headers["authorization"] = REDACTED
