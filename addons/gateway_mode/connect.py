"""Connect failures: tried again before the client sees a 502."""

from __future__ import annotations

import asyncio
import logging

from mitmproxy.proxy import server_hooks

from addons.gateway_mode.core import GatewayCore
from addons.upstream_connect import UpstreamConnect

logger = logging.getLogger(__name__)

#: Seconds between connect attempts.
BACKOFF_S = 0.25


class RetryingConnect(UpstreamConnect):
    """The strict proxy's bounded connect (:class:`addons.upstream_connect.UpstreamConnect`),
    tried up to ``max_attempts`` times in all. Every key of the pool reaches the same upstream
    host, so a failed TCP handshake is retried on the same address (the key is chosen per
    request, not per connection); only after the last try does mitmproxy answer 502."""

    def __init__(self, core: GatewayCore) -> None:
        super().__init__()
        self.core = core

    async def server_connect(self, data: server_hooks.ServerConnectionHookData) -> None:
        for attempt in range(1, self.core.max_attempts + 1):
            await super().server_connect(data)
            if not data.server.error or attempt == self.core.max_attempts:
                return
            logger.info("connect attempt %d failed; trying again", attempt)
            self.core.metrics.retries.labels("connect").inc()
            data.server.error = None
            await asyncio.sleep(BACKOFF_S)
