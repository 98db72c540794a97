"""Connect failures: tried again before the client sees a 502."""

from __future__ import annotations

import asyncio
import logging
from typing import Any

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
    request, not per connection); only after the last try does mitmproxy answer 502. The failed
    tries are counted in the usage row's ``attempts`` of the flow the connection was made for
    (``core.connect_retries`` by client connection: Codex speaks HTTP/1.1, one request
    at a time per connection; read by accounting)."""

    def __init__(self, core: GatewayCore) -> None:
        super().__init__()
        self.core = core

    async def server_connect(self, data: server_hooks.ServerConnectionHookData) -> None:
        for attempt in range(1, self.core.max_attempts + 1):
            await super().server_connect(data)
            if not data.server.error or attempt == self.core.max_attempts:
                if attempt > 1:  # the flow's usage row counts them (attempts)
                    self.core.connect_retries[data.client.id] = attempt - 1
                return
            logger.info("connect attempt %d failed; trying again", attempt)
            self.core.metrics.retries.labels("connect").inc()
            data.server.error = None
            await asyncio.sleep(BACKOFF_S)

    def client_disconnected(self, client: Any) -> None:
        self.core.connect_retries.pop(client.id, None)
