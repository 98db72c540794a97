"""addons/exchange.py: the one reader of what a Responses exchange says."""

from __future__ import annotations

import gzip
import json

import pytest
from mitmproxy.test import tutils

from addons.body_decode import DecodeLimits
from addons.exchange import (
    Reply,
    outcome,
    read_exchange,
    read_reply,
    read_request,
    request_fields,
)
from addons.sse_events import SseEvent
from tests.fake_upstream import encode_event, response_object, responses_sse_events

MODEL = "gpt-5.5"


def sse_bytes(events) -> bytes:
    return b"".join(encode_event(k, p) for k, p in events)


def test_a_compressed_stream_with_chunk_timing_gives_every_fact():
    raw = sse_bytes(responses_sse_events("hi", MODEL, "r1"))
    wire = gzip.compress(raw)
    half = len(wire) // 2
    facts = read_exchange(
        json.dumps({"model": MODEL, "service_tier": "priority", "input": "x"}).encode(),
        Reply(200, "text/event-stream; charset=utf-8", wire, "gzip", [[5, half], [9, len(wire)]]),
    )
    assert (facts.model, facts.service_tier, facts.status) == (MODEL, "priority", 200)
    assert facts.streamed and facts.completed and facts.outcome == "completed"
    assert facts.usage is not None and facts.usage["total"] == 59
    assert facts.events == len(responses_sse_events("hi", MODEL, "r1"))
    assert facts.first_event_ms in (5, 9) and facts.event_ms[-1] == 9
    # The timing is in decoded bytes: what the dump's body (and replay) holds.
    assert facts.decoded_timing[-1] == [9, len(raw)]
    assert facts.content_encoding == "gzip" and facts.decode_error is None
    assert facts.turn.text == "hi"


def test_a_json_reply_a_garbage_body_an_error_status_and_no_reply():
    js = read_reply(
        Reply(200, "application/json", json.dumps(response_object("r", MODEL, "x")).encode())
    )
    assert js.usage is not None and js.turn_status == "completed" and not js.streamed
    assert js.events == 0
    bad = read_reply(Reply(200, "application/json", b"{not json"))
    assert (bad.usage, bad.turn_status, bad.outcome) == (None, None, "cut")
    refused = read_reply(Reply(429, "application/json", b'{"error": {}}'))
    assert refused.outcome == "failed" and refused.usage is None
    assert read_reply(None).outcome == "failed" and read_reply(Reply(None)).status is None


def test_an_incomplete_or_failed_stream_keeps_the_tokens_it_spent():
    events = responses_sse_events("hi", MODEL, "r1")
    kind, last = events[-1]
    assert kind == "response.completed"
    cut_short = {**last, "type": "response.incomplete"}
    cut_short["response"] = {**last["response"], "status": "incomplete"}
    facts = read_reply(Reply(200, "text/event-stream", sse_bytes([*events[:-1], ("x", cut_short)])))
    assert facts.turn_status == "incomplete" and not facts.completed
    assert facts.usage is not None and facts.usage["total"] == 59
    cut = read_reply(Reply(200, "text/event-stream", sse_bytes(events[:-1])))
    assert cut.outcome == "cut" and cut.usage is None


def test_events_already_split_stand_for_the_body():
    events = [
        (ms, SseEvent(kind, json.dumps(payload)))
        for ms, (kind, payload) in enumerate(responses_sse_events("hey", MODEL, "r9"))
    ]
    facts = read_exchange({"type": "response.create", "model": MODEL}, Reply(200, events=events))
    assert facts.streamed and facts.completed and facts.model == MODEL
    assert facts.first_event_ms == 0 and facts.events == len(events)


def test_a_dump_files_body_reads_like_the_wire():
    from tests.responses_events import tool_call_events

    text = sse_bytes(tool_call_events([("exec_command", {"cmd": "ls", "workdir": "/"})], MODEL))
    facts = read_exchange(None, Reply(200, "text/event-stream", text.decode()))
    assert facts.tool_calls == [("exec_command", ("cmd", "workdir"))]
    body = response_object("r", MODEL, "x")
    body["output"].append(
        {"type": "function_call", "id": "fc", "name": "f", "call_id": "c", "arguments": "[1]"}
    )
    assert read_exchange({}, Reply(200, "application/json", body)).tool_calls == [("f", ())]


def test_request_facts_of_bodies_good_and_bad():
    assert request_fields({"model": 3, "service_tier": "flex"}).model is None
    assert request_fields([1]).service_tier is None
    plain = read_request(gzip.compress(b'{"model": "m", "service_tier": "flex"}'), "gzip")
    assert (plain.model, plain.service_tier) == ("m", "flex")
    assert read_request(b"", None).decoded is None
    bomb = gzip.compress(b"{" + b" " * (4 * 1024 * 1024) + b"}")
    over = read_request(bomb, "gzip", DecodeLimits(max_bytes=1024 * 1024))
    assert over.decoded is not None and over.decoded.over_limit and over.model is None
    deep = read_request(b"[" * 50_000 + b"]" * 50_000, None)
    assert deep.too_deep is not None and deep.model is None


@pytest.mark.parametrize(
    "turn_status, completed, status, expected",
    [
        ("incomplete", False, 200, "incomplete"),
        (None, True, 200, "completed"),  # an older ledger line without turn_status
        (None, False, 502, "failed"),
        (None, False, None, "failed"),
        (None, False, 200, "cut"),
    ],
)
def test_outcome(turn_status, completed, status, expected):
    assert outcome(turn_status, completed, status) == expected


def test_a_flows_reply():
    response = tutils.tresp(headers=[(b"content-type", b"text/event-stream")])
    response.content = sse_bytes(responses_sse_events("hi", MODEL, "r1"))
    reply = Reply.of(response, [[3, len(response.content)]])
    assert reply.streamed and reply.status == 200 and read_reply(reply).first_event_ms == 3
    assert Reply.of(None).status is None


def test_the_gateways_usage_rows_read_an_incomplete_stream_like_the_recorder():
    """The gateway priced only ``response.completed`` before addons/exchange.py; an incomplete
    turn's tokens were spent, and its socket path already counted them."""
    from addons.gateway_mode.accounting import reply_usage

    events = responses_sse_events("hi", MODEL, "r1")
    last = events[-1][1]
    cut_short = {**last, "type": "response.incomplete"}
    cut_short["response"] = {**last["response"], "status": "incomplete"}
    response = tutils.tresp(headers=[(b"content-type", b"text/event-stream")])
    response.content = sse_bytes([*events[:-1], ("response.incomplete", cut_short)])
    metered = reply_usage(response)
    usage, count, status = metered.usage, metered.events, metered.turn_status
    assert usage is not None and usage["total"] == 59
    assert (count, status) == (len(events), "incomplete")
