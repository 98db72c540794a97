"""Realistic Responses API event sequences for tests: tool calls (parallel, arguments in
fragments), reasoning summaries, and the incomplete / failed endings."""

from __future__ import annotations

import json
from collections.abc import Callable
from typing import Any

from tests.fake_upstream import response_object, responses_sse_events

Event = tuple[str, dict[str, Any]]


class _Seq:
    def __init__(self) -> None:
        self.events: list[Event] = []

    def add(self, kind: str, **payload: Any) -> None:
        self.events.append((kind, {"type": kind, "sequence_number": len(self.events), **payload}))


def tool_call_events(
    calls: list[tuple[str, dict[str, Any]]],
    model: str = "gpt-6.2-sol",
    response_id: str = "resp_tools",
    reasoning: str | None = None,
    fragment: int = 7,
) -> list[Event]:
    """A turn that calls each ``(name, arguments)`` in ``calls``, in parallel: every call's
    item is added first, then the argument fragments interleave across calls (as the API
    streams parallel calls), then each is done; optionally a reasoning summary first."""
    s = _Seq()
    base = response_object(response_id, model, "", "in_progress")
    s.add("response.created", response=base)
    s.add("response.in_progress", response=base)
    output: list[dict[str, Any]] = []
    index = 0
    if reasoning is not None:
        rs = {"id": "rs_1", "type": "reasoning", "summary": []}
        s.add("response.output_item.added", output_index=0, item=rs)
        s.add(
            "response.reasoning_summary_part.added",
            item_id="rs_1",
            output_index=0,
            summary_index=0,
            part={"type": "summary_text", "text": ""},
        )
        for i in range(0, len(reasoning), fragment):
            s.add(
                "response.reasoning_summary_text.delta",
                item_id="rs_1",
                output_index=0,
                summary_index=0,
                delta=reasoning[i : i + fragment],
            )
        s.add(
            "response.reasoning_summary_text.done",
            item_id="rs_1",
            output_index=0,
            summary_index=0,
            text=reasoning,
        )
        done = {**rs, "summary": [{"type": "summary_text", "text": reasoning}]}
        s.add("response.output_item.done", output_index=0, item=done)
        output.append(done)
        index = 1
    items = []
    for n, (name, args) in enumerate(calls):
        item = {
            "id": f"fc_{n}",
            "type": "function_call",
            "status": "in_progress",
            "call_id": f"call_{n}",
            "name": name,
            "arguments": "",
        }
        s.add("response.output_item.added", output_index=index + n, item=item)
        items.append((item, json.dumps(args)))
    longest = max((len(a) for _, a in items), default=0)
    for i in range(0, longest, fragment):
        for n, (item, text) in enumerate(items):
            if i < len(text):
                s.add(
                    "response.function_call_arguments.delta",
                    item_id=item["id"],
                    output_index=index + n,
                    delta=text[i : i + fragment],
                )
    for n, (item, text) in enumerate(items):
        s.add(
            "response.function_call_arguments.done",
            item_id=item["id"],
            output_index=index + n,
            arguments=text,
        )
        done = {**item, "status": "completed", "arguments": text}
        s.add("response.output_item.done", output_index=index + n, item=done)
        output.append(done)
    final = {**response_object(response_id, model, ""), "output": output}
    s.add("response.completed", response=final)
    return s.events


def ending(events: list[Event], kind: str, **response: Any) -> list[Event]:
    """``events`` with the terminal ``response.completed`` replaced by ``kind``
    (``response.incomplete`` / ``response.failed``) whose response carries ``response``."""
    head = [e for e in events if e[0] != "response.completed"]
    last = dict(events[-1][1]["response"])
    last.update(response)
    return [*head, (kind, {"type": kind, "sequence_number": len(head), "response": last})]


def tool_outputs(body: dict[str, Any]) -> list[dict[str, Any]]:
    """The ``function_call_output`` items of a request body's (or ``response.create``'s)
    ``input``."""
    return [
        item
        for item in body.get("input") or []
        if isinstance(item, dict) and item.get("type") == "function_call_output"
    ]


def tool_then_answer(cmd: str, answer: str, model: str) -> Callable[[dict[str, Any]], list[Event]]:
    """A stand-in ``responder``: a turn that asks Codex to run ``cmd`` (``exec_command``),
    then, once a request carries the tool's output, ``answer`` (response ``resp_final``)."""

    def responder(body: dict[str, Any]) -> list[Event]:
        if tool_outputs(body):
            return responses_sse_events(answer, model, "resp_final")
        return tool_call_events([("exec_command", {"cmd": cmd})], model)

    return responder
