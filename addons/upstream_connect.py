"""Upstream connect: a timeout (mitmproxy has none) and a clear cause when it fails."""

from __future__ import annotations

import asyncio
import logging
import os
import time

from mitmproxy import ctx, exceptions
from mitmproxy.proxy import server_hooks

logger = logging.getLogger(__name__)


class UpstreamConnect:
    """Fails a server connection whose TCP handshake takes longer than ``codex_connect_timeout_ms``.

    mitmproxy opens server connections with a bare ``asyncio.open_connection`` and no timeout;
    only the client-side inactivity watchdog (``tcp_timeout``) ends the wait, and then the client
    gets no HTTP reply at all. In the ``server_connect`` hook this addon first tries the same
    address with a bounded handshake; if that times out it sets ``server.error``, which makes
    mitmproxy refuse the connection and answer the client 502 naming the cause. The probe costs
    one extra handshake per new upstream connection (connections are kept alive and reused);
    after a successful probe the same address is not probed again for ``PROBE_CACHE_S`` seconds,
    so a burst of new connections (1 000 Codex agents starting) costs one probe, not 1 000:
    connects that arrive while a probe of their address is under way wait for its outcome
    instead of probing again (a py-spy profile at 1 000 concurrent streams showed 3.7 % of the
    samples in a herd of simultaneous probes before this).
    Other connect errors (refused, unreachable, DNS) are reported the same way with the plain
    cause, e.g. ``cannot connect to upstream api.openai.com:443: Connection refused``.
    """

    #: Seconds a successful probe vouches for its address.
    PROBE_CACHE_S = 2.0

    def __init__(self) -> None:
        self.timeout_ms = 10_000
        self._reachable_at: dict[tuple[str, int], float] = {}
        self._probing: dict[tuple[str, int], asyncio.Future[str | None]] = {}

    def load(self, loader) -> None:
        loader.add_option(
            "codex_connect_timeout_ms",
            int,
            10_000,
            "Milliseconds allowed for the upstream TCP handshake before answering 502 "
            "(0: no limit).",
        )

    def configure(self, updated: set[str]) -> None:
        if "codex_connect_timeout_ms" in updated:
            value = ctx.options.codex_connect_timeout_ms
            if value < 0:
                raise exceptions.OptionsError("codex_connect_timeout_ms must be >= 0")
            self.timeout_ms = value

    async def server_connect(self, data: server_hooks.ServerConnectionHookData) -> None:
        server = data.server
        if not self.timeout_ms or server.error or server.address is None or server.via:
            return
        host, port = server.address
        now = time.monotonic()
        if now - self._reachable_at.get((host, port), -1e9) < self.PROBE_CACHE_S:
            return
        pending = self._probing.get((host, port))
        if pending is not None:
            try:
                error = await asyncio.shield(pending)
            except asyncio.CancelledError:
                if not pending.cancelled():
                    raise  # this connect itself was cancelled
                error = await self._probe(host, port)  # the prober went away: probe here
        else:
            future: asyncio.Future[str | None] = asyncio.get_running_loop().create_future()
            self._probing[(host, port)] = future
            try:
                error = await self._probe(host, port)
            except BaseException:  # cancelled: the waiters probe for themselves
                future.cancel()
                raise
            finally:
                self._probing.pop((host, port), None)
            future.set_result(error)
        if error:
            server.error = error
            logger.warning("%s", error)

    async def _probe(self, host: str, port: int) -> str | None:
        """One bounded TCP handshake with ``host:port``: the error text, or ``None``."""
        try:
            _reader, writer = await asyncio.wait_for(
                asyncio.open_connection(host, port), self.timeout_ms / 1000
            )
        except TimeoutError:
            return f"connect timeout: no TCP handshake with {host}:{port} in {self.timeout_ms} ms"
        except OSError as e:
            if e.errno and e.errno > 0:
                cause = os.strerror(e.errno)  # asyncio's own text hides the cause
            else:
                cause = e.strerror or str(e) or type(e).__name__  # e.g. DNS failures
            return f"cannot connect to upstream {host}:{port}: {cause}"
        self._reachable_at[(host, port)] = time.monotonic()
        writer.close()
        try:
            await writer.wait_closed()
        except OSError:
            pass
        return None
