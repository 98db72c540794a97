"""``GET /health`` and ``GET /metrics``, answered by the gateway itself (no member key)."""

from __future__ import annotations

import json

from mitmproxy import http

from addons.common import SERVER_NAME, fail_closed
from addons.gateway_mode.core import GatewayCore
from addons.gateway_mode.metrics import CONTENT_TYPE

HEALTH, METRICS = b"/health", b"/metrics"


def health_document(core: GatewayCore) -> dict[str, object]:
    """``{"ok", "database", "ledger_pending_rows", "upstream_keys": {"healthy": [names],
    "cooling": [...], "disabled": [...]}}``: ok when the database takes rows and a key is
    healthy. Names only, never a key."""
    status = core.pool.status()
    database = core.database_ok
    return {
        "ok": database and bool(status.healthy),
        "database": database,
        "ledger_pending_rows": core.ledger.pending() if core.ledger else 0,
        "upstream_keys": {
            "healthy": status.healthy,
            "cooling": status.cooling,
            "disabled": status.disabled,
        },
    }


class LocalRoutes:
    """Answers ``GET /health`` (200, or 503 when not ok; JSON) and ``GET /metrics``
    (Prometheus text) in ``requestheaders``, exact targets only (no query). They carry member
    names and key names, no secret; keep the gateway on loopback or behind TLS."""

    def __init__(self, core: GatewayCore) -> None:
        self.core = core

    @fail_closed
    def requestheaders(self, flow: http.HTTPFlow) -> None:
        if flow.response or flow.error or not flow.live:
            return
        request = flow.request
        if request.data.method != b"GET" or request.data.path not in (HEALTH, METRICS):
            return
        if request.data.path == HEALTH:
            doc = health_document(self.core)
            body = json.dumps(doc).encode()
            flow.response = http.Response.make(
                200 if doc["ok"] else 503,
                body,
                {
                    "content-type": "application/json",
                    "server": SERVER_NAME,
                    "cache-control": "no-store",
                },
            )
        else:
            pending = self.core.ledger.pending() if self.core.ledger else 0
            flow.response = http.Response.make(
                200,
                self.core.metrics.render(self.core.pool, pending),
                {"content-type": CONTENT_TYPE, "server": SERVER_NAME, "cache-control": "no-store"},
            )
        flow.metadata["codex_proxy.refused"] = "local-route"
