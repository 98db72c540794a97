"""A Responses SSE stream -> ``chat.completion.chunk`` SSE, event by event.

Each upstream event that has a Chat Completions counterpart becomes its chunk in the same call
that received it: nothing is held back (the bridge adds no buffering). Order of what a client
sees: the role, then content deltas and tool-call deltas (``index``, ``id``, ``name``, then
argument fragments), optionally ``reasoning_content`` deltas, the finish chunk, the usage chunk
when ``stream_options.include_usage`` asked for it, then ``data: [DONE]``. A ``response.failed``
or ``error`` event ends the stream with an ``{"error": ...}`` chunk, which the ``openai`` SDK
raises as an ``APIError``.
"""

from __future__ import annotations

import json
import time
from typing import Any

from addons.bridge.translate import chat_usage, completion_id, finish_reason
from addons.responses_turn import usage_of
from addons.sse_events import SseDecoder, SseEvent

DONE = b"data: [DONE]\n\n"


def sse_data(obj: Any) -> bytes:
    """One SSE event carrying ``obj`` as JSON (Chat Completions streams use ``data:`` only)."""
    return b"data: " + json.dumps(obj, ensure_ascii=False, separators=(",", ":")).encode() + b"\n\n"


class ChunkTranslator:
    """Feed it the upstream's raw chunks (``feed``), then ``finish()``; each call returns the
    bytes to send to the client now. ``context`` comes from
    :func:`addons.bridge.translate.chat_to_responses`; ``content_encoding`` is the upstream
    reply's (the bridge asks for identity, but decodes whatever comes)."""

    def __init__(
        self,
        context: dict[str, Any],
        content_encoding: str | None = None,
        reasoning_content: bool = False,
    ) -> None:
        self.context = context
        self.reasoning_content = reasoning_content
        self._decoder = SseDecoder(content_encoding)
        self._id = completion_id(None)
        self._created = int(time.time())
        self._started = False
        self._calls: dict[str, int] = {}  # item id -> tool call index
        self._ended = False
        #: Everything sent to the client, for dumps and flow metadata.
        self.sent: list[bytes] = []
        #: The error the client got that the upstream did not send (the stream ended, or
        #: could no longer be decoded, before its terminal event), else ``None``.
        self.client_error: str | None = None

    def feed(self, raw: bytes) -> bytes:
        """Chunks for the events completed by ``raw``."""
        return self._emit(self._decoder.feed(raw))

    def finish(self) -> bytes:
        """Chunks for what is left; a stream that ended without a terminal event still gets
        ``[DONE]`` after an error chunk saying so."""
        out = self._emit(self._decoder.finish())
        if not self._ended:
            message = "the upstream stream ended before the response was complete"
            if self._decoder.error:
                message += f" ({self._decoder.error})"
            self.client_error = message
            out += self._send(sse_data({"error": {"type": "upstream_error", "message": message}}))
            out += self._send(DONE)
            self._ended = True
        return out

    def _send(self, data: bytes) -> bytes:
        self.sent.append(data)
        return data

    def _chunk(self, delta: dict[str, Any], finish: str | None = None) -> bytes:
        return self._send(
            sse_data(
                {
                    "id": self._id,
                    "object": "chat.completion.chunk",
                    "created": self._created,
                    "model": self.context.get("model"),
                    "choices": [
                        {"index": 0, "delta": delta, "finish_reason": finish, "logprobs": None}
                    ],
                }
            )
        )

    def _start(self) -> bytes:
        if self._started:
            return b""
        self._started = True
        return self._chunk({"role": "assistant", "content": ""})

    def _emit(self, events: list[SseEvent]) -> bytes:
        out = b""
        for ev in events:
            if self._ended:
                break
            out += self._one(ev)
        return out

    def _one(self, ev: SseEvent) -> bytes:
        p = ev.payload if isinstance(ev.payload, dict) else {}
        kind = ev.type
        response = p.get("response") if isinstance(p.get("response"), dict) else None
        if kind == "response.created":
            if response is not None and response.get("id"):
                self._id = completion_id(response["id"])
            return self._start()  # the role chunk at once: the client sees the turn begin
        if kind == "response.output_text.delta":
            return self._start() + self._chunk({"content": str(p.get("delta", ""))})
        if kind == "response.reasoning_summary_text.delta" and self.reasoning_content:
            return self._start() + self._chunk({"reasoning_content": str(p.get("delta", ""))})
        if kind == "response.output_item.added":
            item = p.get("item")
            if isinstance(item, dict) and item.get("type") == "function_call":
                index = self._calls.setdefault(str(item.get("id", "")), len(self._calls))
                call = {
                    "index": index,
                    "id": item.get("call_id") or item.get("id"),
                    "type": "function",
                    "function": {"name": item.get("name"), "arguments": ""},
                }
                return self._start() + self._chunk({"tool_calls": [call]})
            return b""
        if kind == "response.function_call_arguments.delta":
            index = self._calls.setdefault(str(p.get("item_id", "")), len(self._calls))
            fragment = {"index": index, "function": {"arguments": str(p.get("delta", ""))}}
            return self._start() + self._chunk({"tool_calls": [fragment]})
        if kind in ("response.completed", "response.incomplete"):
            response = response or {}
            details = response.get("incomplete_details") or {}
            reason = details.get("reason") if isinstance(details, dict) else None
            status = "incomplete" if kind == "response.incomplete" else "completed"
            out = self._start() + self._chunk({}, finish_reason(status, reason, bool(self._calls)))
            usage = chat_usage(usage_of(response))
            if self.context.get("include_usage") and usage is not None:
                out += self._send(
                    sse_data(
                        {
                            "id": self._id,
                            "object": "chat.completion.chunk",
                            "created": self._created,
                            "model": self.context.get("model"),
                            "choices": [],
                            "usage": usage,
                        }
                    )
                )
            self._ended = True
            return out + self._send(DONE)
        if kind in ("response.failed", "error"):
            source = (response or {}).get("error") if kind == "response.failed" else p
            error = source if isinstance(source, dict) else {}
            self._ended = True
            body = {
                "error": {
                    "type": "upstream_error",
                    "code": error.get("code"),
                    "message": error.get("message") or "the upstream response failed",
                }
            }
            return self._send(sse_data(body)) + self._send(DONE)
        return b""
