"""``GET /health`` and ``GET /metrics``, answered by the gateway itself on the members' port.

Members share that port, so what it says without a credential must name no one: ``/health``
says ok or not; ``/metrics`` and ``/health``'s detail (member names, usage counts, upstream key
names) need the operator's metrics token (``metrics_token_file``), which Prometheus sends as
``Authorization: Bearer`` (``authorization: {credentials_file: ...}`` in its scrape config).
"""

from __future__ import annotations

import functools
import hmac
import json
import logging
import re

from mitmproxy import ctx, exceptions, http

from addons.common import SERVER_NAME, fail_closed
from addons.gateway_mode.core import GatewayCore, gateway_error
from addons.gateway_mode.metrics import CONTENT_TYPE
from addons.gateway_mode.quota import quota_readings

logger = logging.getLogger(__name__)

HEALTH, METRICS = b"/health", b"/metrics"
#: RFC 6750's ``b64token`` (what a Bearer credential may hold), at least 32 characters (e.g.
#: ``openssl rand -hex 32``: 64) and at most 1024.
_TOKEN = re.compile(rb"[A-Za-z0-9\-._~+/]{32,1024}=*")
_HEADERS = {"server": SERVER_NAME, "cache-control": "no-store"}


def read_metrics_token(path: str) -> bytes:
    """The metrics token in the file at ``path``: its text with surrounding whitespace removed
    (Prometheus trims a ``credentials_file`` the same way), 32 to 1024 ``b64token`` characters.

    Raises:
        ValueError: unreadable, or not such a token; the message names the file, never its
        bytes.
    """
    try:
        with open(path, "rb") as f:
            data = f.read(4096)
    except OSError as e:
        raise ValueError(f"{path}: cannot read the metrics token: {e.strerror}") from None
    token = data.strip()
    if not _TOKEN.fullmatch(token):
        del data, token
        raise ValueError(
            f"{path}: not a metrics token (32 to 1024 characters of A-Z a-z 0-9 -._~+/, "
            "e.g. from `openssl rand -hex 32`)"
        )
    return token


def health_document(core: GatewayCore) -> dict[str, object]:
    """``{"ok", "database", "ledger_pending_rows", "upstream_keys": {"healthy": [names],
    "cooling": [...], "disabled": [...]}}``: ok when the database takes rows and a key is
    healthy. Names only, never a key. Only the metrics token's holder sees more than ``ok``."""
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
    """Answers ``GET /health`` and ``GET /metrics`` in ``requestheaders``, exact targets only
    (no query), before member auth.

    Cases: ``/health`` → 200 ``{"ok": true}`` or 503 ``{"ok": false}``, with the whole
    :func:`health_document` only for the metrics token; ``/metrics`` with the token →
    Prometheus text; without it, or with a wrong one → 401 ``metrics_token_required``; with no
    ``codex_gateway_metrics_token_file`` configured → 404 ``metrics_disabled``. The
    ``Authorization`` header of these requests is removed once read (no recording keeps the
    token); the token is compared in constant time and never logged. A ``/metrics`` scrape
    first reads the quota gauges anew when they are stale (on a database thread, at most one
    reading every ``QUOTA_SAMPLE_S``; ``quota_metrics``).
    """

    def __init__(self, core: GatewayCore) -> None:
        self.core = core
        self._expected: bytes | None = None

    def load(self, loader) -> None:
        loader.add_option(
            "codex_gateway_metrics_token_file",
            str,
            "",
            """
            File holding the token that unlocks GET /metrics and /health's detail on the
            members' port, sent as Authorization: Bearer TOKEN (32+ characters, e.g. openssl
            rand -hex 32). Empty: /metrics answers 404 and /health only says ok.
            """,
        )

    def configure(self, updated: set[str]) -> None:
        if "codex_gateway_metrics_token_file" in updated:
            path = ctx.options.codex_gateway_metrics_token_file
            try:
                self._expected = b"Bearer " + read_metrics_token(path) if path else None
            except ValueError as e:
                raise exceptions.OptionsError(f"codex_gateway_metrics_token_file: {e}") from e

    def _authorized(self, request: http.Request) -> bool:
        """Whether ``request`` carries exactly one ``Authorization`` equal to ``Bearer TOKEN``
        (constant-time). Removes the header from the request either way."""
        values = [v for n, v in request.headers.fields if n.lower() == b"authorization"]
        request.headers.pop("authorization", None)
        if self._expected is None or len(values) != 1:
            return False
        return hmac.compare_digest(values[0], self._expected)

    @fail_closed
    async def requestheaders(self, flow: http.HTTPFlow) -> None:
        if flow.response or flow.error or not flow.live:
            return
        request = flow.request
        if request.data.method != b"GET" or request.data.path not in (HEALTH, METRICS):
            return
        flow.metadata["codex_proxy.refused"] = "local-route"
        authorized = self._authorized(request)
        if request.data.path == HEALTH:
            doc = health_document(self.core)
            body = json.dumps(doc if authorized else {"ok": doc["ok"]}).encode()
            flow.response = http.Response.make(
                200 if doc["ok"] else 503,
                body,
                {"content-type": "application/json", **_HEADERS},
            )
        elif self._expected is None:
            flow.response = gateway_error(
                404,
                "metrics_disabled",
                "this gateway serves no metrics: set metrics_token_file in its config",
            )
        elif not authorized:
            flow.response = gateway_error(
                401,
                "metrics_token_required",
                "GET /metrics needs Authorization: Bearer <the gateway's metrics token>",
                {"www-authenticate": 'Bearer realm="codex-gateway-metrics"'},
            )
        else:
            core = self.core
            if core.db is not None and core.ledger is not None:  # quota gauges, if stale
                await core.metrics.quotas.refresh(
                    core.run_db, functools.partial(quota_readings, core)
                )
            pending = self.core.ledger.pending() if self.core.ledger else 0
            flow.response = http.Response.make(
                200,
                self.core.metrics.render(self.core.pool, pending),
                {"content-type": CONTENT_TYPE, **_HEADERS},
            )
