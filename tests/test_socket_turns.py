"""addons/socket_turns.py: turns on a WebSocket as dump pairs and ledger lines, driven through
the gateway's socket metering (its start and end calls) with the real DumpWriter and Recorder."""

from __future__ import annotations

import json

from mitmproxy.test import taddons

from addons.common import ALLOWED, DUMP_SEQ
from addons.dumps import DumpWriter
from addons.recorder import Recorder, read_ledger
from addons.replay import load_recording, read_dump_pairs, socket_differences
from addons.socket_turns import sse_text
from addons.sse_events import parse_sse_text
from tests.fake_upstream import response_object
from tests.test_gateway_ws import MODEL, _say, _turns, _ws_flow

CREATE = {"type": "response.create", "model": MODEL, "stream": True, "input": []}


async def test_each_turn_is_a_dump_pair_and_a_ledger_line_and_a_cut_one_says_so(tmp_path):
    _, turns, _ = _turns()
    dumps, recorder = DumpWriter(workers="thread"), Recorder()
    with taddons.context(turns, dumps, recorder) as tctx:
        tctx.configure(dumps, codex_dump_dir=str(tmp_path / "dumps"))
        tctx.configure(recorder, codex_record_dir=str(tmp_path))
        flow = _ws_flow()
        flow.metadata[ALLOWED] = True
        flow.request.path = "/v1/responses"
        flow.request.headers["authorization"] = "Bearer sk-upstream-secret"
        reply, flow.response = flow.response, None
        dumps.requestheaders(flow)  # the upgrade's own pair (101)
        flow.response = reply
        await dumps.response(flow)
        turns.websocket_start(flow)
        await _say(turns, flow, True, {**CREATE, "generate": False})
        await _say(turns, flow, False, {"type": "response.created", "response": {"id": "w"}})
        await _say(turns, flow, False, {"type": "response.completed", "response": {"id": "w"}})
        await _say(turns, flow, True, {**CREATE, "previous_response_id": "w", "input": [1]})
        await _say(turns, flow, False, {"type": "response.output_text.delta", "delta": "hi"})
        done = response_object("resp_1", MODEL, "hi")
        await _say(turns, flow, False, {"type": "response.completed", "response": done})
        await _say(turns, flow, True, CREATE)
        await _say(turns, flow, False, {"type": "response.output_text.delta", "delta": "cu"})
        flow.websocket.close_code = 1006
        turns.websocket_end(flow)
        dumps.websocket_end(flow)
        dumps.flush()
    upgrade_seq = flow.metadata[DUMP_SEQ]
    pairs = read_dump_pairs(tmp_path / "dumps")
    assert [p.seq for p in pairs] == [upgrade_seq, 2, 3, 4]
    assert pairs[0].response["status"] == 101
    warm_up, turn, cut = pairs[1:]
    for pair in (warm_up, turn, cut):
        assert pair.request["transport"] == pair.response["transport"] == "websocket"
        assert pair.request["route"] == "ws:/v1/responses"
        assert pair.request["upgrade_seq"] == upgrade_seq
        assert pair.request["method"] == "GET" and pair.request["url"] == "/v1/responses"
        headers = {h["name"]: h["value"] for h in pair.request["headers"]}
        assert headers["authorization"] == "[REDACTED]"
    assert turn.request["body"]["previous_response_id"] == "w"
    assert turn.response["status"] == 200 and "error" not in turn.response
    # The events as an SSE dump shows them: each one, in order, this turn's only.
    events = parse_sse_text(turn.response["body"])
    assert [e.type for e in events] == ["response.output_text.delta", "response.completed"]
    assert [e.event for e in events] == [e.type for e in events]
    assert cut.response["status"] is None and "socket closed (1006)" in cut.response["error"]
    assert [e.type for e in parse_sse_text(cut.response["body"])] == ["response.output_text.delta"]
    lines = read_ledger(str(tmp_path))
    assert [r.seq for r in lines] == [2, 3, 4]
    assert all(r.transport == "websocket" and r.model == MODEL for r in lines)
    assert [r.turn_status for r in lines] == ["completed", "completed", None]
    assert lines[1].usage is not None and lines[1].usage["total"] == 59
    assert lines[1].events == 2 and lines[1].first_event_ms is not None
    assert lines[2].status is None and lines[2].error and not lines[2].completed
    # The ledger's chunk timing describes the dump's body: replay paces by it.
    assert lines[1].chunk_timing[-1][1] == len(turn.response["body"].encode())
    for path in (tmp_path / "dumps").iterdir():
        assert b"sk-upstream-secret" not in path.read_bytes()
    assert b"sk-upstream-secret" not in (tmp_path / "usage.jsonl").read_bytes()
    # Replay serves the finished turn, not the warm-up, the cut turn or the upgrade.
    assert [(x.seq, x.transport) for x in load_recording(tmp_path)] == [(3, "websocket")]


def test_a_socket_turn_matches_the_http_post_of_the_same_conversation():
    recorded = {
        **CREATE,
        "previous_response_id": "resp_tools",
        "tools": [{"name": "exec_command"}],
        "input": [{"type": "function_call_output", "call_id": "c"}],
    }
    post = {
        "model": MODEL,
        "stream": True,
        "tools": [{"name": "exec_command"}],
        "input": [
            {"type": "message", "role": "user"},
            {"type": "function_call", "call_id": "c"},
            {"type": "function_call_output", "call_id": "c"},
        ],
    }
    assert socket_differences(recorded, post) == []
    other = {**post, "input": post["input"][:2]}
    assert [d.split(":")[0] for d in socket_differences(recorded, other)] == ["input"]
    assert socket_differences(recorded, {**post, "model": "x"})[0].startswith("model:")


def test_the_sse_text_of_a_turn_reads_back_as_its_events():
    from addons.socket_turns import SocketTurn

    turn = SocketTurn("ws:/v1/responses", json.dumps(CREATE).encode(), 100.0, 0)
    turn.events = [(100.25, b'{"type": "response.created"}'), (100.5, b"not json")]
    turn.status = 200
    events = parse_sse_text(sse_text(turn))
    assert [(e.event, e.data) for e in events] == [
        ("response.created", '{"type": "response.created"}'),
        ("message", "not json"),
    ]
    assert turn.chunk_timing() == [
        [250, len(sse_text(turn).split("\n\n")[0]) + 2],
        [500, len(sse_text(turn))],
    ]
    facts = turn.facts()
    assert facts.model == MODEL and facts.events == 2 and facts.first_event_ms == 250
