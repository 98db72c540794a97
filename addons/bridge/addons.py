"""The bridge's two addons: :class:`ChatBridge` (routes, ``/v1/models``, the request) placed
before the allowlist, and :class:`ChatReplies` (the reply) placed after the streaming and
redaction addons, whose stream callables it wraps."""

from __future__ import annotations

import asyncio
import json
import logging
from typing import Any

from mitmproxy import ctx, exceptions, http

from addons.allowlist import refusal_reason
from addons.body_decode import JsonTooDeep, decode_body, loads_json
from addons.bridge.efforts import DEFAULT_MODELS, ModelEfforts, model_ids, parse_models
from addons.bridge.stream import DONE, ChunkTranslator, sse_data
from addons.bridge.translate import BridgeError, chat_error, chat_to_responses, responses_to_chat
from addons.common import (
    ALLOWED,
    BRIDGE,
    BRIDGE_CLIENT_BODY,
    BRIDGE_CLIENT_REPLY,
    CLIENT_ERROR,
    LOCAL_REPLY_HEADER,
    REFUSED,
    SERVER_NAME,
    fail_closed,
)
from addons.sse_stream import is_event_stream

logger = logging.getLogger(__name__)

CHAT_ROUTE = "/v1/chat/completions"
MODELS_ROUTE = "/v1/models"


def invalid_request(param: str, message: str) -> http.Response:
    """A 400 in the OpenAI error shape, naming the field (``param``)."""
    body = {
        "error": {
            "type": "invalid_request_error",
            "code": "unsupported_parameter",
            "param": param,
            "message": message,
        }
    }
    return http.Response.make(
        400,
        json.dumps(body).encode(),
        {
            "content-type": "application/json",
            "server": SERVER_NAME,
            LOCAL_REPLY_HEADER: "bridge_invalid_request",
        },
    )


def models_reply(models: dict[str, ModelEfforts]) -> http.Response:
    """``GET /v1/models``: the configured models and their reasoning-effort variants."""
    data = [
        {"id": name, "object": "model", "created": 0, "owned_by": SERVER_NAME}
        for name in model_ids(models)
    ]
    return http.Response.make(
        200,
        json.dumps({"object": "list", "data": data}).encode(),
        {"content-type": "application/json", "server": SERVER_NAME},
    )


class ChatBridge:
    """``--chat-bridge``: claims ``POST /v1/chat/completions`` for the allowlist, answers
    ``GET /v1/models``, and translates the request body before it goes upstream.

    Off (the default), it does nothing: the allowlist answers both routes 403, as the
    reference proxy does. On, a chat request is marked :data:`addons.common.BRIDGE` (exact
    target, ``POST``, no query: the allowlist's own rule) in ``requestheaders``, asks the
    upstream for an uncompressed reply, and in ``request`` its body becomes a Responses request
    to the same upstream URL (the key injected as for any allowlisted flow); a body the bridge
    cannot translate is answered 400 naming the field and never forwarded.
    """

    def __init__(self) -> None:
        self.enabled = False
        self.reasoning_content = False
        self.models: dict[str, ModelEfforts] = dict(DEFAULT_MODELS)

    def load(self, loader) -> None:
        loader.add_option(
            "codex_chat_bridge",
            bool,
            False,
            "Translate POST /v1/chat/completions to the Responses upstream and answer "
            "GET /v1/models (off: both are refused, as in the reference proxy).",
        )
        loader.add_option(
            "codex_chat_bridge_models",
            str,
            "",
            'JSON {"model": {"efforts": [...], "default": effort|null}}: the models '
            "GET /v1/models lists and how reasoning effort is clamped per model "
            "(empty: the built-in table, the pinned Codex's model catalog then the Go "
            "bridge's older models).",
        )
        loader.add_option(
            "codex_chat_bridge_reasoning_content",
            bool,
            False,
            "Stream reasoning summaries as reasoning_content deltas.",
        )

    def configure(self, updated: set[str]) -> None:
        if "codex_chat_bridge" in updated:
            self.enabled = ctx.options.codex_chat_bridge
        if "codex_chat_bridge_reasoning_content" in updated:
            self.reasoning_content = ctx.options.codex_chat_bridge_reasoning_content
        if "codex_chat_bridge_models" in updated:
            try:
                self.models = parse_models(ctx.options.codex_chat_bridge_models)
            except ValueError as e:
                raise exceptions.OptionsError(f"codex_chat_bridge_models: {e}") from None

    @fail_closed
    def requestheaders(self, flow: http.HTTPFlow) -> None:
        if not self.enabled or flow.response or flow.error or not flow.live:
            return
        request = flow.request
        if refusal_reason(request, frozenset({CHAT_ROUTE})) is None:
            flow.metadata[BRIDGE] = {}
            request.headers["accept-encoding"] = "identity"
        elif (
            request.data.method == b"GET"
            and request.data.path == MODELS_ROUTE.encode()
            and not request.authority
        ):
            flow.response = models_reply(self.models)

    @fail_closed
    async def request(self, flow: http.HTTPFlow) -> None:
        if BRIDGE not in flow.metadata or flow.response or flow.error or not flow.live:
            return
        request = flow.request
        raw = request.raw_content or b""
        encoding = request.headers.get("content-encoding")
        try:
            if encoding or len(raw) > OFF_LOOP_BYTES:  # decoding may take ~100 ms: not here
                translated, context, client_text = await asyncio.get_running_loop().run_in_executor(
                    None, read_chat_request, raw, encoding, self.models
                )
            else:
                translated, context, client_text = read_chat_request(raw, encoding, self.models)
        except BridgeError as e:
            flow.metadata.pop(ALLOWED, None)
            flow.metadata[REFUSED] = "bridge-invalid-request"
            flow.response = invalid_request(e.param, str(e))
            return
        context["reasoning_content"] = self.reasoning_content
        flow.metadata[BRIDGE] = context
        flow.metadata[BRIDGE_CLIENT_BODY] = client_text
        request.headers.pop("content-encoding", None)
        request.headers["content-type"] = "application/json"
        request.content = json.dumps(translated, ensure_ascii=False).encode()


#: Compressed or larger request bodies (bytes) are read off the event loop.
OFF_LOOP_BYTES = 256 * 1024


def read_chat_request(
    raw: bytes, content_encoding: str | None, models: Any
) -> tuple[dict[str, Any], dict[str, Any], str]:
    """A Chat Completions request body as received: ``(Responses request, translation context,
    the client's body as text)``, decoded within the decode limits and parsed with the JSON
    depth limit.

    Raises:
        BridgeError: past the decode limit, nested too deep, not JSON, or not translatable.
    """
    decoded = decode_body(raw, content_encoding)
    if decoded.over_limit:
        raise BridgeError("body", f"is not readable: {decoded.error}")
    try:
        body = loads_json(decoded.data)
    except JsonTooDeep as e:
        raise BridgeError("body", f"is {e}") from None
    except ValueError:
        raise BridgeError("body", "is not valid JSON") from None
    translated, context = chat_to_responses(body, models)
    return translated, context, decoded.data.decode("utf-8", "replace")


class ChatReplies:
    """Translates the reply of a bridged flow back to Chat Completions.

    In ``responseheaders`` it takes over the body: an event stream is translated event by event
    (:class:`addons.bridge.stream.ChunkTranslator`, wrapping whatever stream callable the
    streaming and redaction addons set, so their copies keep the upstream's bytes); any other
    reply is collected and sent translated at its end (``chat.completion``, or the error in
    the Chat Completions shape with the upstream's status). The translated reply goes out
    chunked; ``Content-Length`` and ``Content-Encoding`` of the upstream's body are dropped. At
    the end the flow keeps the upstream's body (dumps, flow files and the ledger show what the
    upstream said) and :data:`addons.common.BRIDGE_CLIENT_REPLY` what the client got.
    """

    def __init__(self) -> None:
        self._sent: dict[str, list[bytes]] = {}
        self._upstream: dict[str, list[bytes]] = {}
        self._encoding: dict[str, str] = {}

    @fail_closed
    def responseheaders(self, flow: http.HTTPFlow) -> None:
        context = flow.metadata.get(BRIDGE)
        response = flow.response
        if not isinstance(context, dict) or "model" not in context or response is None:
            return
        encoding = response.headers.get("content-encoding")
        if encoding:
            self._encoding[flow.id] = encoding
        sse = is_event_stream(response) and response.status_code == 200
        for name in ("content-length", "content-encoding"):
            response.headers.pop(name, None)
        response.headers["transfer-encoding"] = "chunked"
        if not sse:
            response.headers["content-type"] = "application/json"
        inner = response.stream
        upstream = self._upstream.setdefault(flow.id, [])
        sent = self._sent.setdefault(flow.id, [])
        translator = ChunkTranslator(context, encoding, bool(context.get("reasoning_content")))
        status = response.status_code

        broken: list[bool] = []

        def translate(chunk: bytes) -> bytes | None:
            passed = inner(chunk) if callable(inner) else chunk
            # The stream callables below us (tee, redaction) return their chunk as bytes.
            data = passed if isinstance(passed, bytes) else b"".join(passed)
            if sse:
                out = translator.feed(data)
                if chunk:
                    return out
                out += translator.finish()
                if translator.client_error is not None:
                    flow.metadata[CLIENT_ERROR] = translator.client_error
                return out
            if chunk:
                upstream.append(data)  # a whole reply is translated at its end
                return None
            out, client_error = self._whole(b"".join(upstream), encoding, status, context)
            if client_error is not None:
                flow.metadata[CLIENT_ERROR] = client_error
            return out

        def stream(chunk: bytes) -> list[bytes]:
            # A list, never b"": mitmproxy frames each returned bytes object as one HTTP/1
            # chunk, and an empty one is the chunked body's terminator.
            if broken:
                return []
            try:
                out = translate(chunk)
            except Exception as e:
                # Fail closed, visibly: the client gets an error it can raise, never a reply
                # that silently lost part of the upstream's.
                logger.error("bridge: cannot translate a reply (%s); ending it", type(e).__name__)
                broken.append(True)
                flow.metadata[CLIENT_ERROR] = "the proxy could not translate the upstream's reply"
                error = chat_error(502, b"the proxy could not translate the upstream's reply")
                out = sse_data(json.loads(error)) + DONE if sse else error
            if out is None:
                return []
            sent.append(out)
            return [out] if out else []

        response.stream = stream

    @staticmethod
    def _whole(
        raw: bytes, encoding: str | None, status: int, context: dict[str, Any]
    ) -> tuple[bytes, str | None]:
        """A whole reply translated, and the error the client gets that the upstream did
        not send (``None`` when it gets the translation or the upstream's own error)."""
        decoded = decode_body(raw, encoding)
        if status != 200:
            return chat_error(status, decoded.data), None
        try:
            return json.dumps(responses_to_chat(loads_json(decoded.data), context)).encode(), None
        except ValueError:
            message = "the upstream reply is not a Responses object"
            if decoded.error:
                message += f" ({decoded.error})"
            return chat_error(502, message.encode()), message

    def response(self, flow: http.HTTPFlow) -> None:
        self._finish(flow)

    def error(self, flow: http.HTTPFlow) -> None:
        self._finish(flow)

    def _finish(self, flow: http.HTTPFlow) -> None:
        sent = self._sent.pop(flow.id, None)
        upstream = self._upstream.pop(flow.id, None)
        encoding = self._encoding.pop(flow.id, None)
        if sent is None or flow.response is None:
            return
        flow.response.stream = False
        if not flow.response.raw_content and upstream:
            flow.response.raw_content = b"".join(upstream)
        if encoding and flow.response.raw_content:
            # The body kept is the upstream's, as it came: so is its coding (the client got
            # the translation, uncoded; these headers have gone out already).
            flow.response.headers["content-encoding"] = encoding
        flow.metadata[BRIDGE_CLIENT_REPLY] = b"".join(sent).decode("utf-8", "replace")
