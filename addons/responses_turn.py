"""What a Responses API turn holds, assembled from its request body and its SSE events.

Shared by the content views (``addons/contentviews.py``), the report (``addons/report.py``)
and :mod:`addons.exchange`, the one reader of an exchange's facts (the recording's ledger,
the gateway's usage rows and ``./run.sh compare`` go through it). The events come from the
one SSE decoder (:mod:`addons.sse_events`); event and field names are the Responses API's
streaming events (``response.output_text.delta``, ``response.function_call_arguments.delta``,
``response.reasoning_summary_text.delta``, ``response.output_item.added`` / ``.done``,
``response.completed`` / ``.incomplete`` / ``.failed``, ``error``).
"""

from __future__ import annotations

import json
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from addons.sse_events import SseEvent, parse_sse_text

#: The terminal events of a Responses stream and the status each one means.
TERMINAL = {
    "response.completed": "completed",
    "response.incomplete": "incomplete",
    "response.failed": "failed",
    "error": "failed",
}


#: The token kinds :func:`usage_of` reads, in the order tables show them.
USAGE_KINDS = ("input", "cached", "cache_write", "output", "reasoning", "total")


def usage_of(response_obj: Any) -> dict[str, int] | None:
    """Token usage from a Responses API ``response`` object (``response.completed`` carries
    it): input, cached (input_tokens_details.cached_tokens), cache_write
    (input_tokens_details.cache_write_tokens, reported since 2026 and shown by Codex 0.171 as
    ``cache_write_input_tokens``), output, reasoning (output_tokens_details.reasoning_tokens),
    total. ``None`` when absent. As in the API, cached is part of input and reasoning part of
    output; cache_write is kept as reported (no credit rate applies to it)."""
    if not isinstance(response_obj, dict) or not isinstance(response_obj.get("usage"), dict):
        return None
    u = response_obj["usage"]

    def num(value: Any) -> int:
        return value if isinstance(value, int) and not isinstance(value, bool) else 0

    input_details = u.get("input_tokens_details")
    if not isinstance(input_details, dict):
        input_details = {}
    output_details = u.get("output_tokens_details")
    if not isinstance(output_details, dict):
        output_details = {}
    return {
        "input": num(u.get("input_tokens")),
        "cached": num(input_details.get("cached_tokens")),
        "cache_write": num(input_details.get("cache_write_tokens")),
        "output": num(u.get("output_tokens")),
        "reasoning": num(output_details.get("reasoning_tokens")),
        "total": num(u.get("total_tokens")),
    }


@dataclass
class FunctionCall:
    """One tool call of the turn: ``arguments`` as assembled from the deltas (a JSON text)."""

    item_id: str
    name: str = ""
    call_id: str = ""
    arguments: str = ""

    def pretty_arguments(self) -> str:
        """The arguments pretty-printed when they are JSON, else as they came."""
        try:
            return json.dumps(json.loads(self.arguments), indent=2, ensure_ascii=False)
        except ValueError:
            return self.arguments


@dataclass
class Turn:
    """A streamed reply, assembled. Times are ms since the response headers (``None`` when the
    chunk timing is unknown). ``status`` is the terminal event's (``completed``, ``incomplete``,
    ``failed``) or ``None`` for a stream that ended without one (``partial``)."""

    response_id: str | None = None
    model: str | None = None
    status: str | None = None
    incomplete_reason: str | None = None
    error: str | None = None
    text: str = ""
    reasoning: list[str] = field(default_factory=list)
    calls: list[FunctionCall] = field(default_factory=list)
    usage: dict[str, int] | None = None
    counts: Counter[str] = field(default_factory=Counter)
    first_event_ms: int | None = None
    first_text_ms: int | None = None
    last_event_ms: int | None = None
    #: Each event's arrival (ms), in order; empty without chunk timing.
    event_ms: list[int] = field(default_factory=list)

    @property
    def partial(self) -> bool:
        """Whether the stream ended without a terminal event (client gone, upstream cut)."""
        return self.status is None

    @property
    def events(self) -> int:
        """How many events arrived."""
        return sum(self.counts.values())


def _error_text(obj: Any) -> str:
    if isinstance(obj, dict):
        code, message = obj.get("code"), obj.get("message")
        return ": ".join(str(x) for x in (code, message) if x) or json.dumps(obj)
    return str(obj)


def assemble_turn(events: Sequence[tuple[int | None, SseEvent]]) -> Turn:
    """Assemble a :class:`Turn` from ``(arrival ms or None, event)`` pairs, in order (see
    :func:`addons.sse_events.timeline`). Unknown events are counted and otherwise ignored."""
    turn = Turn()
    texts: dict[str, str] = {}
    calls: dict[str, FunctionCall] = {}
    summaries: dict[tuple[str, int], str] = {}

    def call(item_id: str) -> FunctionCall:
        if item_id not in calls:
            calls[item_id] = FunctionCall(item_id)
        return calls[item_id]

    for ms, ev in events:
        kind = ev.type
        turn.counts[kind] += 1
        if ms is not None:
            turn.event_ms.append(ms)
            if turn.first_event_ms is None:
                turn.first_event_ms = ms
            turn.last_event_ms = ms
        p = ev.payload if isinstance(ev.payload, dict) else {}
        item_id = str(p.get("item_id", ""))
        response = p.get("response")
        if isinstance(response, dict):
            turn.response_id = response.get("id") or turn.response_id
            turn.model = response.get("model") or turn.model
        if kind == "response.output_text.delta":
            texts[item_id] = texts.get(item_id, "") + str(p.get("delta", ""))
            if turn.first_text_ms is None and ms is not None:
                turn.first_text_ms = ms
        elif kind == "response.output_text.done" and isinstance(p.get("text"), str):
            texts[item_id] = p["text"]
        elif kind == "response.function_call_arguments.delta":
            call(item_id).arguments += str(p.get("delta", ""))
        elif kind == "response.function_call_arguments.done" and isinstance(
            p.get("arguments"), str
        ):
            call(item_id).arguments = p["arguments"]
        elif kind == "response.reasoning_summary_text.delta":
            key = (item_id, int(p.get("summary_index", 0) or 0))
            summaries[key] = summaries.get(key, "") + str(p.get("delta", ""))
        elif kind == "response.reasoning_summary_text.done" and isinstance(p.get("text"), str):
            summaries[(item_id, int(p.get("summary_index", 0) or 0))] = p["text"]
        elif kind in ("response.output_item.added", "response.output_item.done"):
            item = p.get("item")
            if isinstance(item, dict) and item.get("type") == "function_call":
                c = call(str(item.get("id", "")))
                c.name = item.get("name") or c.name
                c.call_id = item.get("call_id") or c.call_id
                if kind.endswith(".done") and isinstance(item.get("arguments"), str):
                    c.arguments = item["arguments"]
        if kind in TERMINAL:
            turn.status = TERMINAL[kind]
            if isinstance(response, dict):
                turn.usage = usage_of(response) or turn.usage
                details = response.get("incomplete_details")
                if isinstance(details, dict):
                    turn.incomplete_reason = details.get("reason")
                if response.get("error"):
                    turn.error = _error_text(response["error"])
            if kind == "error":
                turn.error = _error_text(p)
    turn.text = "".join(texts.values())
    turn.calls = list(calls.values())
    turn.reasoning = [summaries[k] for k in sorted(summaries)]
    return turn


def turn_of_reply(body: Any) -> Turn:
    """A :class:`Turn` from a reply body as a dump file holds it (``addons/dumps.py``): an SSE
    body (a decoded string) through :func:`assemble_turn` (no timing), or a JSON ``response``
    object (a non-streamed reply): its status, usage and ``function_call`` output items.
    Anything else is an empty turn with no status."""
    if isinstance(body, str):
        return assemble_turn([(None, ev) for ev in parse_sse_text(body)])
    turn = Turn()
    if not isinstance(body, dict):
        return turn
    turn.response_id, turn.model = body.get("id"), body.get("model")
    status = body.get("status")
    turn.status = status if status in ("completed", "incomplete", "failed") else None
    turn.usage = usage_of(body)
    for item in body.get("output") or []:
        if isinstance(item, dict) and item.get("type") == "function_call":
            arguments = item.get("arguments")
            turn.calls.append(
                FunctionCall(
                    str(item.get("id", "")),
                    str(item.get("name") or ""),
                    str(item.get("call_id") or ""),
                    arguments if isinstance(arguments, str) else "",
                )
            )
    return turn


def excerpt(text: str, limit: int = 80) -> str:
    """One line of at most ``limit`` characters (whitespace collapsed, ``…`` when cut)."""
    flat = " ".join(text.split())
    return flat if len(flat) <= limit else flat[: limit - 1] + "…"


def _content_text(content: Any) -> str:
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        parts = []
        for part in content:
            if isinstance(part, dict):
                if isinstance(part.get("text"), str):
                    parts.append(part["text"])
                elif part.get("type") in ("input_image", "image_url"):
                    parts.append("[image]")
        return " ".join(parts)
    return ""


@dataclass
class InputItem:
    """One input item of a request, for a person: ``kind`` (``message``, ``function_call``,
    ``function_call_output``, ``reasoning``, …), ``role``, a short ``text`` and the
    ``call_id`` that links a call to its output."""

    kind: str
    role: str | None
    text: str
    call_id: str | None = None
    name: str | None = None


def input_items(body: dict[str, Any]) -> list[InputItem]:
    """The request's ``input`` as :class:`InputItem`\\ s (a plain string input is one user
    message)."""
    raw = body.get("input")
    if isinstance(raw, str):
        return [InputItem("message", "user", excerpt(raw))]
    items = []
    for it in raw if isinstance(raw, list) else []:
        if not isinstance(it, dict):
            continue
        kind = str(it.get("type") or ("message" if "role" in it else "?"))
        if kind == "function_call":
            text = excerpt(str(it.get("arguments", "")))
        elif kind == "function_call_output":
            text = excerpt(str(it.get("output", "")))
        elif kind == "reasoning":
            text = excerpt(" ".join(_content_text(s.get("text")) for s in it.get("summary") or []))
        else:
            text = excerpt(_content_text(it.get("content")))
        items.append(InputItem(kind, it.get("role"), text, it.get("call_id"), it.get("name")))
    return items


def tool_names(body: dict[str, Any]) -> list[str]:
    """Tool names of a request (a tool without a name is listed by its type)."""
    tools = body.get("tools")
    return [
        str(t.get("name") or t.get("type") or "?")
        for t in (tools if isinstance(tools, list) else [])
        if isinstance(t, dict)
    ]
