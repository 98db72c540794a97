"""Content views for Chat Completions flows (what mitmweb's front shows of a bridged call).

- **Chat Completions request**: the request as the bridge sends it upstream, rendered by the
  Responses request view (model after the effort suffix, reasoning effort, instructions, tools,
  input items), or the 400 the bridge answers, naming the field.
- **Chat Completions stream**: the chunk stream assembled like a Responses turn: text,
  ``reasoning_content``, tool calls with their arguments, finish reason, usage, timing.

Together with the Responses views of the key-holding proxy's flows (and the dumps'
``body`` / ``client_body``), both shapes of a bridged exchange are readable.
"""

from __future__ import annotations

from typing import Any

from mitmproxy import contentviews, http
from mitmproxy.contentviews import Metadata

from addons.body_decode import loads_json
from addons.bridge.efforts import DEFAULT_MODELS
from addons.bridge.translate import BridgeError, chat_to_responses
from addons.contentviews import (
    PRIORITY,
    json_request_priority,
    render_request,
    render_turn,
    stream_timeline,
)
from addons.responses_turn import FunctionCall, Turn
from addons.sse_events import SseEvent

CHAT_PATH = "/v1/chat/completions"


def _is_chat_flow(metadata: Metadata) -> bool:
    flow = metadata.flow
    return isinstance(flow, http.HTTPFlow) and flow.request.path.split("?", 1)[0] == CHAT_PATH


def render_chat_request(body: Any) -> str:
    """The request view's text: the upstream request the bridge would send, or its refusal."""
    try:
        translated, _ = chat_to_responses(body, DEFAULT_MODELS)
    except BridgeError as e:
        return f"the bridge refuses this request (400): {e}\n"
    header = "as the bridge sends it upstream (Responses API, built-in effort table):\n"
    return header + render_request(translated)


def chat_turn(events: list[tuple[int | None, SseEvent]]) -> Turn:
    """A chunk stream assembled into a :class:`addons.responses_turn.Turn` (status from the
    finish reason: ``stop`` / ``tool_calls`` -> completed, ``length`` / ``content_filter`` ->
    incomplete; an ``error`` chunk -> failed; none -> partial)."""
    turn = Turn()
    calls: dict[int, FunctionCall] = {}
    reasoning = ""
    for ms, ev in events:
        if ms is not None:
            turn.event_ms.append(ms)
            turn.first_event_ms = ms if turn.first_event_ms is None else turn.first_event_ms
            turn.last_event_ms = ms
        if ev.data.strip() == "[DONE]":
            turn.counts["[DONE]"] += 1
            continue
        chunk = ev.payload if isinstance(ev.payload, dict) else {}
        if chunk.get("error"):
            turn.counts["error"] += 1
            err = chunk["error"] if isinstance(chunk["error"], dict) else {}
            turn.status = "failed"
            turn.error = ": ".join(str(x) for x in (err.get("code"), err.get("message")) if x)
            continue
        turn.counts["chunk"] += 1
        turn.model = chunk.get("model") or turn.model
        turn.response_id = chunk.get("id") or turn.response_id
        usage = chunk.get("usage")
        if isinstance(usage, dict):
            turn.usage = {
                "input": int(usage.get("prompt_tokens") or 0),
                "cached": int((usage.get("prompt_tokens_details") or {}).get("cached_tokens") or 0),
                "output": int(usage.get("completion_tokens") or 0),
                "reasoning": int(
                    (usage.get("completion_tokens_details") or {}).get("reasoning_tokens") or 0
                ),
                "total": int(usage.get("total_tokens") or 0),
            }
        for choice in chunk.get("choices") or []:
            delta = choice.get("delta") or {}
            if delta.get("content"):
                turn.text += str(delta["content"])
                if turn.first_text_ms is None and ms is not None:
                    turn.first_text_ms = ms
            reasoning += str(delta.get("reasoning_content") or "")
            for tc in delta.get("tool_calls") or []:
                call = calls.setdefault(int(tc.get("index", 0)), FunctionCall(str(tc.get("id"))))
                fn = tc.get("function") or {}
                call.call_id = tc.get("id") or call.call_id
                call.name = fn.get("name") or call.name
                call.arguments += str(fn.get("arguments") or "")
            reason = choice.get("finish_reason")
            if reason in ("stop", "tool_calls"):
                turn.status = "completed"
            elif reason:
                turn.status, turn.incomplete_reason = "incomplete", reason
    turn.calls = [calls[i] for i in sorted(calls)]
    turn.reasoning = [reasoning] if reasoning else []
    return turn


class ChatRequestContentview(contentviews.Contentview):
    """The "Chat Completions request" view (see the module docstring)."""

    @property
    def name(self) -> str:
        """Shown in mitmweb's "View" menu."""
        return "Chat Completions request"

    def prettify(self, data: bytes, metadata: Metadata) -> str:
        """Render; raises ``ValueError`` for a body that is not JSON."""
        return render_chat_request(loads_json(data))

    def render_priority(self, data: bytes, metadata: Metadata) -> float:
        """High for the JSON body of a request to ``/v1/chat/completions``."""
        return json_request_priority(data, metadata, _is_chat_flow(metadata))


class ChatStreamContentview(contentviews.Contentview):
    """The "Chat Completions stream" view (see the module docstring)."""

    @property
    def name(self) -> str:
        """Shown in mitmweb's "View" menu."""
        return "Chat Completions stream"

    def prettify(self, data: bytes, metadata: Metadata) -> str:
        """Render the assembled chunk stream."""
        line = stream_timeline(data, metadata)
        return render_turn(chat_turn(line.events), line.error)

    def render_priority(self, data: bytes, metadata: Metadata) -> float:
        """High for an event stream answering ``/v1/chat/completions``."""
        ctype = (metadata.content_type or "").split(";", 1)[0].strip().lower()
        return PRIORITY if ctype == "text/event-stream" and _is_chat_flow(metadata) else -1
