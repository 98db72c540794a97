"""The Codex-only filter (``require_codex_client``, on by default)."""

from __future__ import annotations

from mitmproxy import http

from addons.common import BRIDGE, fail_closed
from addons.gateway_mode.core import (
    MEMBER,
    SOCKET_ROUTE,
    GatewayCore,
    gateway_error,
    refuse,
    request_info,
)

#: Codex's session/turn headers (CODEX.md): present on every Codex request.
CODEX_HEADERS = ("session-id", "thread-id", "session_id", "x-codex-turn-metadata")


def looks_like_codex(request: http.Request, model: str | None) -> bool:
    """The Rust codex-gateway's rule: the model name contains ``codex``, or the User-Agent
    contains ``codex``, or Codex's session/turn headers are present (case-insensitive)."""
    if "codex" in (request.headers.get("user-agent") or "").lower():
        return True
    if any(name in request.headers for name in CODEX_HEADERS):
        return True
    return model is not None and "codex" in model.lower()


class CodexFilter:
    """Answers 403 ``not_codex`` (in ``request``, once the body's model is known) to member
    requests that do not look like Codex, when the config's ``require_codex_client`` is on.
    ``POST /v1/chat/completions`` (``--chat-bridge``) and ``GET /v1/realtime``
    (``--websockets``) are for other clients by design (the Rust gateway serves them "for
    compatible clients"; no Realtime client sends Codex's headers, and no realtime model's name
    contains ``codex``): not filtered, a member key is still required."""

    def __init__(self, core: GatewayCore) -> None:
        self.core = core

    @fail_closed
    def request(self, flow: http.HTTPFlow) -> None:
        if flow.response or flow.error or not flow.live or MEMBER not in flow.metadata:
            return
        if not self.core.require_codex_client or BRIDGE in flow.metadata:
            return
        if flow.metadata.get(SOCKET_ROUTE) == "realtime":
            return
        if looks_like_codex(flow.request, request_info(flow)["model"]):
            return
        self.core.metrics.refused.labels("not_codex").inc()
        refuse(
            flow,
            "not-codex",
            gateway_error(
                403,
                "not_codex",
                "this gateway only serves Codex clients (a Codex User-Agent or session headers, "
                "or a model whose name contains 'codex'); the operator can turn this off with "
                "require_codex_client: false",
            ),
        )
