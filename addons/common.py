"""Small pieces shared by the addons: flow markers, local JSON replies, fail-closed hooks.

Addons tell each other things through ``flow.metadata`` markers (plain, serialisable values: the
metadata is written into mitmproxy flow files). The allowlist sets :data:`ALLOWED`; only flows
carrying it are ever routed upstream or get the key.
"""

from __future__ import annotations

import functools
import json
import logging
from collections.abc import Callable
from typing import Any, TypeVar

from mitmproxy import http

logger = logging.getLogger(__name__)

#: Set to ``True`` by the allowlist on flows that may go upstream (``POST /v1/responses``).
ALLOWED = "codex_proxy.allowed"
#: Set by whichever addon answered locally: a short reason such as ``"not-allowlisted"``.
REFUSED = "codex_proxy.refused"
#: Set to ``True`` by the forwarder once the key was injected into the flow's request.
KEY_INJECTED = "codex_proxy.key_injected"
#: The dump sequence number (int) of an accepted flow, when dumps are on.
DUMP_SEQ = "codex_proxy.dump_seq"
#: Set by the Chat Completions bridge on a ``POST /v1/chat/completions`` it claimed (the
#: allowlist then allows it): ``{}``, then the reply context (model, stream, include_usage).
BRIDGE = "codex_proxy.bridge"
#: Set on a WebSocket upgrade of ``GET /v1/responses`` that a mode accepts (the gateway with
#: ``--websockets``): the allowlist marks it allowed, the 426 refusal leaves it alone.
WEBSOCKET = "codex_proxy.websocket"
#: Set on a request a mode answers itself once its client is authenticated, never forwarded
#: (the gateway's ``GET /v1/models`` for members): the allowlist lets it through to member
#: auth; the mode's own addon answers it, and the forwarder never sees it unanswered.
LOCAL_ROUTE = "codex_proxy.local_route"
#: A bridged flow's request body as the client sent it (Chat Completions JSON text).
BRIDGE_CLIENT_BODY = "codex_proxy.bridge_client_body"
#: A bridged flow's reply as the client got it (Chat Completions JSON or chunk SSE text).
BRIDGE_CLIENT_REPLY = "codex_proxy.bridge_client_reply"
#: Why a bridged reply reached its client as an error the upstream did not send (the reply
#: could not be read or translated); the gateway's usage row says so.
CLIENT_ERROR = "codex_proxy.client_error"
#: ``[[ms since response headers, body bytes so far], ...]`` of a streamed reply, per chunk.
CHUNK_TIMING = "codex_proxy.chunk_timing"

SERVER_NAME = "codex-responses-api-proxy"
#: Response header on every reply the proxy makes itself (refusals, errors): the error code.
#: The mitmweb front (``addons/web_ui.py``) uses it to mark refused flows.
LOCAL_REPLY_HEADER = "x-codex-proxy-error"


def error_response(
    status: int,
    error_type: str,
    code: str,
    message: str,
    headers: dict[str, str] | None = None,
    fields: dict[str, Any] | None = None,
) -> http.Response:
    """A local JSON error reply in the OpenAI error shape: ``{"error": {"type": error_type,
    "code": code, "message": message, **fields}}`` (UTF-8), marked with
    :data:`LOCAL_REPLY_HEADER`. ``message`` must never contain a secret; callers pass fixed
    texts or request-derived data."""
    body = json.dumps(
        {"error": {"type": error_type, "code": code, "message": message, **(fields or {})}},
        ensure_ascii=False,
    ).encode()
    return http.Response.make(
        status,
        body,
        {
            "content-type": "application/json",
            "server": SERVER_NAME,
            LOCAL_REPLY_HEADER: code,
            **(headers or {}),
        },
    )


def json_response(status: int, code: str, message: str, **headers: str) -> http.Response:
    """The strict proxy's local error reply: :func:`error_response` with type
    ``codex_proxy`` and ``headers`` as keyword arguments."""
    return error_response(status, "codex_proxy", code, message, headers)


F = TypeVar("F", bound=Callable[..., Any])


def _fail(flow: Any, hook: str, exc: BaseException) -> None:
    # The exception text comes from our code or mitmproxy's; neither formats the key into it,
    # but only the type name is logged to stay safe against future changes.
    logger.error("codex proxy: %s hook failed (%s); failing closed", hook, type(exc).__name__)
    if not isinstance(flow, http.HTTPFlow):
        return
    if flow.response is None and flow.live and flow.error is None:
        flow.request.stream = False  # a local reply and a streamed request cannot coexist
        flow.response = json_response(
            500, "proxy_internal_error", f"internal error in the proxy's {hook} hook"
        )
        flow.metadata[REFUSED] = "internal-error"
        flow.metadata.pop(ALLOWED, None)
    elif flow.live:
        flow.kill()


def fail_closed(hook: F) -> F:
    """Decorate a flow hook so that any exception answers 500 locally or kills the flow.

    mitmproxy logs an exception raised by a hook and lets the flow go on (fail open); a
    security-critical hook must not. Before a response exists the flow gets a local 500 JSON
    reply (and loses the allowlist mark, so the key is never injected); after that it is killed.
    Works for sync and async hooks taking ``(self, flow)``.
    """
    import inspect

    if inspect.iscoroutinefunction(hook):

        @functools.wraps(hook)
        async def async_wrapper(self: Any, flow: Any) -> Any:
            try:
                return await hook(self, flow)
            except Exception as exc:
                _fail(flow, hook.__name__, exc)
                return None

        return async_wrapper  # type: ignore[return-value]

    @functools.wraps(hook)
    def wrapper(self: Any, flow: Any) -> Any:
        try:
            return hook(self, flow)
        except Exception as exc:
            _fail(flow, hook.__name__, exc)
            return None

    return wrapper  # type: ignore[return-value]
