import json

import pytest
import zstandard
from mitmproxy import contentviews, http
from mitmproxy.test import taddons, tflow, tutils

from addons.common import CHUNK_TIMING
from addons.contentviews import render_request
from addons.responses_turn import assemble_turn
from addons.sse_events import decode_sse
from addons.views import CodexContentviews
from tests.fake_upstream import (
    StreamCompressor,
    encode_event,
    response_object,
    responses_sse_events,
)


def ev(kind: str, **payload) -> bytes:
    return encode_event(kind, {"type": kind, **payload})


def sse_flow(body: bytes, encoding: str | None = None, timing=None) -> http.HTTPFlow:
    headers = [(b"content-type", b"text/event-stream")]
    if encoding:
        headers.append((b"content-encoding", encoding.encode()))
    f = tflow.tflow(resp=tutils.tresp(headers=headers, content=b""))
    f.request.path = "/v1/responses"
    f.request.headers["content-type"] = "application/json"
    f.request.content = json.dumps({"model": "gpt-6.2-sol", "stream": True}).encode()
    f.response.raw_content = body
    if timing is not None:
        f.metadata[CHUNK_TIMING] = timing
    return f


def shown(f: http.HTTPFlow, message=None) -> contentviews.ContentviewResult:
    with taddons.context(CodexContentviews()):
        return contentviews.prettify_message(message or f.response, f)


def test_text_turn_with_usage_and_timing():
    parts = [encode_event(k, p) for k, p in responses_sse_events("Hello there", "gpt-6.2-sol")]
    timing, size = [], 0
    for i, part in enumerate(parts):
        size += len(part)
        timing.append([5 + i * 10, size])
    result = shown(sse_flow(b"".join(parts), timing=timing))
    assert result.view_name == "Responses stream"
    text = result.text
    assert "status: completed" in text
    assert "── assistant text ──\nHello there\n" in text
    assert "tokens: input 42 (cached 8, cache writes 3), output 17 (reasoning 5), total 59" in text
    # created, in_progress, item added, part added, delta, delta: the first text is event 5.
    assert "timing: first event 5 ms, first text 45 ms, total " in text
    assert "output_text.delta 2" in text and "events: 10 (" in text


def test_parallel_tool_calls_and_reasoning():
    body = b"".join(
        [
            ev("response.created", response={"id": "resp_1", "model": "gpt-6.2-sol"}),
            ev("response.output_item.added", item={"id": "rs_1", "type": "reasoning"}),
            ev(
                "response.reasoning_summary_text.delta",
                item_id="rs_1",
                summary_index=0,
                delta="Look ",
            ),
            ev(
                "response.reasoning_summary_text.delta",
                item_id="rs_1",
                summary_index=0,
                delta="first.",
            ),
            *(
                ev(
                    "response.output_item.added",
                    item={
                        "id": f"fc_{i}",
                        "type": "function_call",
                        "name": name,
                        "call_id": f"call_{i}",
                    },
                )
                for i, name in ((1, "shell"), (2, "apply_patch"))
            ),
            ev(
                "response.function_call_arguments.delta", item_id="fc_1", delta='{"command": ["ls",'
            ),
            ev("response.function_call_arguments.delta", item_id="fc_2", delta='{"patch": "x"}'),
            ev("response.function_call_arguments.delta", item_id="fc_1", delta=' "-la"]}'),
            ev("response.completed", response=response_object("resp_1", "gpt-6.2-sol", "")),
        ]
    )
    text = shown(sse_flow(body)).text
    assert "── reasoning summary 1 ──\nLook first." in text
    assert (
        '── function call shell [call_1] ──\n{\n  "command": [\n    "ls",\n    "-la"\n  ]\n}'
        in text
    )
    assert '── function call apply_patch [call_2] ──\n{\n  "patch": "x"\n}' in text
    assert "timing:" not in text  # no chunk timing recorded: no made-up numbers


def test_incomplete_failed_and_error_events():
    incomplete = ev(
        "response.incomplete",
        response={
            "id": "r",
            "status": "incomplete",
            "incomplete_details": {"reason": "max_output_tokens"},
        },
    )
    assert "status: incomplete (max_output_tokens)" in shown(sse_flow(incomplete)).text
    failed = ev(
        "response.failed",
        response={
            "id": "r",
            "status": "failed",
            "error": {"code": "server_error", "message": "boom"},
        },
    )
    text = shown(sse_flow(failed)).text
    assert "status: failed" in text and "error: server_error: boom" in text
    events, _ = decode_sse(ev("error", code="rate_limit_exceeded", message="slow down"))
    turn = assemble_turn([(None, e) for e in events])
    assert turn.status == "failed" and turn.error == "rate_limit_exceeded: slow down"


def test_partial_and_cut_zstd_stream_render_what_arrived():
    parts = [encode_event(k, p) for k, p in responses_sse_events("one two three", "m")]
    compressor = StreamCompressor("zstd")
    cut = b"".join(compressor.event(p) for p in parts[:6])  # no terminal event, frame open
    f = sse_flow(cut, "zstd")
    result = shown(f)
    assert result.view_name == "Responses stream"
    assert "status: partial" in result.text
    assert "body: zstd: the stream ends before its frame does (truncated)" in result.text
    assert "── assistant text ──\none two" in result.text


def test_request_view_on_a_zstd_codex_request():
    body = {
        "model": "gpt-6.2-sol",
        "instructions": "You are Codex.\n\nBe brief.\n" + "x" * 500,
        "reasoning": {"effort": "high", "summary": "auto"},
        "tools": [{"type": "function", "name": "shell"}, {"type": "web_search"}],
        "input": [
            {
                "type": "message",
                "role": "user",
                "content": [{"type": "input_text", "text": "list files"}],
            },
            {
                "type": "function_call",
                "name": "shell",
                "call_id": "call_9",
                "arguments": '{"command":["ls"]}',
            },
            {"type": "function_call_output", "call_id": "call_9", "output": "README.md\nrun.sh"},
            {"type": "reasoning", "summary": [{"type": "summary_text", "text": "thinking"}]},
        ],
        "stream": True,
    }
    f = sse_flow(b"")
    f.request.headers["content-encoding"] = "zstd"
    f.request.raw_content = zstandard.ZstdCompressor().compress(json.dumps(body).encode())
    result = shown(f, f.request)
    assert result.view_name == "Responses request"
    text = result.text
    assert "model: gpt-6.2-sol" in text and "reasoning effort: high (summary: auto)" in text
    assert "instructions: 526 characters\n  | You are Codex.\n  | Be brief." in text
    assert "tools (2): shell, web_search" in text
    assert "input (4 items):" in text
    assert "1. message/user: list files" in text
    assert '2. function_call shell [call_9]: {"command":["ls"]}' in text
    assert "3. function_call_output [call_9]: README.md run.sh" in text
    assert "4. reasoning: thinking" in text


def test_views_leave_other_flows_alone():
    f = sse_flow(b"data: x\n\n")
    f.request.path = "/v1/other"
    assert shown(f).view_name != "Responses stream"
    json_reply = tflow.tflow(
        resp=tutils.tresp(headers=[(b"content-type", b"application/json")], content=b"{}")
    )
    assert shown(json_reply).view_name != "Responses request"
    assert render_request({"model": "m"}).startswith("model: m\n")


@pytest.mark.e2e
def test_flow_detail_3_prints_the_turn(upstream, start_proxy):
    proxy = start_proxy(upstream.url, "--set", "flow_detail=3")
    assert proxy.post_json({"model": "gpt-6.2-sol", "stream": True, "input": "hi"})[0] == 200
    assert proxy.shutdown() == 0
    out = proxy.output()
    assert "input (1 items):" in out and "message/user: hi" in out
    assert "── assistant text ──\n" in out and upstream.text in out


def test_socket_messages_of_codexs_websocket_transport_render_readably():
    from mitmproxy.websocket import WebSocketMessage

    f = tflow.twebsocketflow(messages=False)
    f.request.path = "/v1/responses"
    create = {
        "type": "response.create",
        "model": "gpt-5.5",
        "stream": True,
        "previous_response_id": "resp_1",
        "tools": [{"type": "function", "name": "exec_command"}],
        "input": [{"type": "function_call_output", "call_id": "call_0", "output": "ran"}],
    }
    message = WebSocketMessage(1, True, json.dumps(create).encode())
    f.websocket.messages.append(message)
    result = shown(f, message)
    assert result.view_name == "Responses socket message"
    assert result.text.startswith("response.create (a turn on the socket)\n")
    assert "previous_response_id: resp_1" in result.text and "model: gpt-5.5" in result.text
    assert "function_call_output [call_0]: ran" in result.text
    done = {"type": "response.completed", "response": response_object("resp_2", "gpt-5.5", "hi")}
    event = WebSocketMessage(1, False, json.dumps(done).encode())
    result = shown(f, event)
    assert result.text.startswith("server event: response.completed\nstatus: completed\n")
    assert "total 59" in result.text
    created = {"type": "response.created", "response": {"id": "r", "status": "in_progress"}}
    text = shown(f, WebSocketMessage(1, False, json.dumps(created).encode())).text
    assert text == "server event: response.created\nresponse: r   status: in_progress   model: -\n"
    delta = WebSocketMessage(1, False, b'{"type": "response.output_text.delta", "delta": "Hel"}')
    assert "delta: 'Hel'" in shown(f, delta).text
    f.request.path = "/v1/realtime"  # not this view's route
    assert shown(f, delta).view_name != "Responses socket message"
