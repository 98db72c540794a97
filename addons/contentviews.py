"""Codex-aware content views: a Codex turn readable at a glance in mitmweb, mitmdump and the
console.

Three views for the Responses API (mitmproxy 12's ``Contentview`` protocol), chosen
automatically for ``/v1/responses`` flows and messages (their render priority beats the JSON
and raw views) and selectable in mitmweb's "View" menu:

- **Responses request**: model, reasoning effort, instructions (first lines, length), tools by
  name, and the input items in order (role, type, a short excerpt, call ids linking calls to
  their outputs). mitmproxy decodes a compressed (``zstd``/``gzip``) body before the view.
- **Responses stream**: the assembled assistant text, reasoning summaries, each function call
  with its pretty-printed arguments, the final status, token usage, event counts and timing
  (time to first event, to first text, total; from the chunk timing the proxy keeps). The raw
  body is decoded by the one SSE decoder, so a cut zstd stream (which mitmproxy cannot decode)
  still renders what arrived, and says that it is partial.
- **Responses socket message**: a message of Codex's WebSocket transport (``GET /v1/responses``
  upgraded, gateway ``serve --websockets``): a ``response.create`` as the request view shows a
  POST body (plus ``previous_response_id`` and the warm-up's ``generate: false``), a server
  event by its type with what it carries (the delta text, the item, the turn's status and token
  usage on a terminal event). mitmproxy 12.3 renders WebSocket messages through the same
  registry (``Metadata.websocket_message`` is set for them; read in its
  ``contentviews/_utils.py``), so mitmweb shows it in the flow's "WebSocket" tab.

The shared rendering (:func:`render_request`, :func:`render_turn`, :func:`stream_timeline`,
:data:`PRIORITY`) is also the Chat Completions bridge's (``addons/bridge/contentviews.py``);
``addons/views.py`` registers both modules' views.
"""

from __future__ import annotations

import json
import logging
import textwrap
from typing import Any

from mitmproxy import contentviews, http
from mitmproxy.contentviews import Metadata

from addons.body_decode import loads_json
from addons.common import CHUNK_TIMING
from addons.responses_turn import TERMINAL, Turn, assemble_turn, excerpt, input_items, tool_names
from addons.sse_events import SseEvent, Timeline, timeline

logger = logging.getLogger(__name__)

#: Above mitmproxy's JSON view (1) for JSON, and above everything for event streams.
PRIORITY = 2.0


def _is_responses_flow(metadata: Metadata) -> bool:
    flow = metadata.flow
    if not isinstance(flow, http.HTTPFlow):
        return False
    path = flow.request.path.split("?", 1)[0]
    return path.endswith("/responses") or path.endswith("/responses/compact")


def render_request(body: Any) -> str:
    """The request view's text for a parsed Responses request body.

    Raises:
        ValueError: when the body is not a JSON object (the view then falls back to raw).
    """
    if not isinstance(body, dict):
        raise ValueError("not a Responses request object")
    reasoning: dict[str, Any] = body.get("reasoning") or {}
    if not isinstance(reasoning, dict):
        reasoning = {}
    lines = [
        f"model: {body.get('model', '-')}",
        f"reasoning effort: {reasoning.get('effort', '-')}"
        + (f" (summary: {reasoning['summary']})" if reasoning.get("summary") else ""),
        f"stream: {body.get('stream', False)}",
    ]
    for key in ("service_tier", "tool_choice", "parallel_tool_calls", "store"):
        if key in body:
            lines.append(f"{key}: {body[key]}")
    instructions = body.get("instructions")
    if isinstance(instructions, str) and instructions:
        first = [ln for ln in instructions.splitlines() if ln.strip()][:3]
        lines.append(f"instructions: {len(instructions)} characters")
        lines += [f"  | {excerpt(ln, 100)}" for ln in first]
    tools = tool_names(body)
    lines.append(f"tools ({len(tools)}): {', '.join(tools) if tools else '-'}")
    items = input_items(body)
    lines.append(f"input ({len(items)} items):")
    for i, it in enumerate(items, 1):
        label = it.kind if it.role is None else f"{it.kind}/{it.role}"
        link = f" [{it.call_id}]" if it.call_id else ""
        name = f" {it.name}" if it.name else ""
        lines.append(f"  {i:>3}. {label}{name}{link}: {it.text or '(empty)'}")
    return "\n".join(lines) + "\n"


def render_turn(turn: Turn, decode_error: str | None = None) -> str:
    """The stream view's text for an assembled :class:`Turn`."""
    lines: list[str] = []
    status = turn.status or "partial (no terminal event: the client left or the upstream cut)"
    if turn.incomplete_reason:
        status += f" ({turn.incomplete_reason})"
    lines.append(f"status: {status}")
    if turn.error:
        lines.append(f"error: {turn.error}")
    if decode_error:
        lines.append(f"body: {decode_error}; showing what arrived")
    if turn.model or turn.response_id:
        lines.append(f"model: {turn.model or '-'}   response: {turn.response_id or '-'}")
    if turn.usage:
        u = turn.usage
        lines.append(
            f"tokens: input {u['input']} (cached {u['cached']}"
            + (f", cache writes {u['cache_write']}" if u.get("cache_write") else "")
            + f"), output {u['output']} "
            f"(reasoning {u['reasoning']}), total {u['total']}"
        )
    timing = []
    for label, value in (
        ("first event", turn.first_event_ms),
        ("first text", turn.first_text_ms),
        ("total", turn.last_event_ms),
    ):
        if value is not None:
            timing.append(f"{label} {value} ms")
    if timing:
        lines.append("timing: " + ", ".join(timing))
    counts = ", ".join(f"{k.removeprefix('response.')} {n}" for k, n in turn.counts.items())
    lines.append(
        textwrap.fill(
            f"events: {turn.events} ({counts or 'none'})", width=88, subsequent_indent="  "
        )
    )
    for i, summary in enumerate(turn.reasoning, 1):
        lines += ["", f"── reasoning summary {i} ──", summary]
    if turn.text:
        lines += ["", "── assistant text ──", turn.text]
    for c in turn.calls:
        lines += ["", f"── function call {c.name or '?'} [{c.call_id or c.item_id}] ──"]
        lines.append(c.pretty_arguments() or "(no arguments)")
    return "\n".join(lines) + "\n"


class ResponsesRequestContentview(contentviews.Contentview):
    """The "Responses request" view (see the module docstring)."""

    @property
    def name(self) -> str:
        """Shown in mitmweb's "View" menu."""
        return "Responses request"

    def prettify(self, data: bytes, metadata: Metadata) -> str:
        """Render; raises ``ValueError`` for a body that is not a JSON object."""
        return render_request(loads_json(data))

    def render_priority(self, data: bytes, metadata: Metadata) -> float:
        """High for the JSON body of a request to ``/v1/responses``; else not for this data."""
        return json_request_priority(data, metadata, _is_responses_flow(metadata))


class ResponsesStreamContentview(contentviews.Contentview):
    """The "Responses stream" view (see the module docstring)."""

    @property
    def name(self) -> str:
        """Shown in mitmweb's "View" menu."""
        return "Responses stream"

    def prettify(self, data: bytes, metadata: Metadata) -> str:
        """Render what the stream said. ``data`` is mitmproxy's decoded body; the raw body of
        ``metadata.http_message`` is preferred, so a cut compressed stream still renders."""
        line = stream_timeline(data, metadata)
        return render_turn(assemble_turn(line.events), line.error)

    def render_priority(self, data: bytes, metadata: Metadata) -> float:
        """High for an event stream answering ``/v1/responses``; else not for this data."""
        ctype = (metadata.content_type or "").split(";", 1)[0].strip().lower()
        if ctype == "text/event-stream" and _is_responses_flow(metadata):
            return PRIORITY
        return -1


class ResponsesSocketContentview(contentviews.Contentview):
    """The "Responses socket message" view (see the module docstring)."""

    @property
    def name(self) -> str:
        """Shown in mitmweb's "View" menu."""
        return "Responses socket message"

    def prettify(self, data: bytes, metadata: Metadata) -> str:
        """Render; raises ``ValueError`` for a message that is not a JSON object."""
        return render_socket_message(loads_json(data))

    def render_priority(self, data: bytes, metadata: Metadata) -> float:
        """High for a JSON object message on a ``/v1/responses`` WebSocket; else not for it."""
        if (
            metadata.websocket_message is not None
            and _is_responses_flow(metadata)
            and data.lstrip()[:1] == b"{"
        ):
            return PRIORITY
        return -1


def render_socket_message(body: Any) -> str:
    """The socket view's text for a parsed message: a client's ``response.create`` or a
    server event (the SSE events' JSON, one per message).

    Raises:
        ValueError: when the message is not a JSON object.
    """
    if not isinstance(body, dict):
        raise ValueError("not a Responses socket message")
    kind = str(body.get("type") or "?")
    if kind == "response.create":
        lines = ["response.create (a turn on the socket)"]
        if body.get("previous_response_id"):
            lines.append(f"previous_response_id: {body['previous_response_id']}")
        if body.get("generate") is False:
            lines.append("generate: false (a warm-up: no model output)")
        return "\n".join(lines) + "\n" + render_request(body)
    lines = [f"server event: {kind}"]
    if isinstance(body.get("delta"), str):
        lines.append(f"delta: {body['delta']!r}")
    item = body.get("item")
    if isinstance(item, dict):
        label = " ".join(str(item[k]) for k in ("type", "role", "name") if item.get(k))
        lines.append(f"item: {label or '?'} [{item.get('call_id') or item.get('id') or '-'}]")
        if isinstance(item.get("arguments"), str):
            lines.append(f"arguments: {excerpt(item['arguments'], 200)}")
    response = body.get("response")
    if kind in TERMINAL:
        turn = assemble_turn([(None, SseEvent(kind, json.dumps(body)))])
        lines.append(render_turn(turn).rstrip("\n"))
    elif isinstance(response, dict):  # response.created / .in_progress: the turn so far
        lines.append(
            f"response: {response.get('id') or '-'}   status: {response.get('status') or '-'}"
            f"   model: {response.get('model') or '-'}"
        )
    return "\n".join(lines) + "\n"


def stream_timeline(data: bytes, metadata: Metadata) -> Timeline:
    """A view's SSE body as events with their arrival times. The raw body of
    ``metadata.http_message`` is preferred to mitmproxy's decoded ``data``, so a cut
    compressed stream still yields what arrived; the flow's chunk timing is used when it
    describes this body."""
    message = metadata.http_message
    raw, encoding = data, None
    if isinstance(message, http.Response) and message.raw_content is not None:
        raw, encoding = message.raw_content, message.headers.get("content-encoding")
    flow = metadata.flow
    chunk_timing = flow.metadata.get(CHUNK_TIMING, []) if flow is not None else []
    return timeline(raw, encoding, chunk_timing if _timing_fits(chunk_timing, raw) else [])


def json_request_priority(data: bytes, metadata: Metadata, for_flow: bool) -> float:
    """:data:`PRIORITY` for a JSON object body of a request whose flow ``for_flow`` accepts,
    else -1 (not for this data)."""
    if (
        for_flow
        and data
        and isinstance(metadata.http_message, http.Request)
        and data.lstrip()[:1] == b"{"
    ):
        return PRIORITY
    return -1


def _timing_fits(chunk_timing: Any, raw: bytes) -> bool:
    """Whether the recorded ``[[ms, raw bytes so far], ...]`` describes this body."""
    try:
        return bool(chunk_timing) and int(chunk_timing[-1][1]) == len(raw)
    except (TypeError, ValueError, IndexError):
        return False
