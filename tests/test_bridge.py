"""The Chat Completions bridge: effort table, translators (table-driven and property tests),
and the real ``openai`` SDK's ``chat.completions`` through the proxy."""

from __future__ import annotations

import itertools
import json
import os
import subprocess
import sys
import threading
from pathlib import Path

import openai
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from mitmproxy import contentviews
from mitmproxy.test import taddons, tflow, tutils

from addons import codex_models
from addons.bridge.addons import ChatReplies
from addons.bridge.efforts import DEFAULT_MODELS, model_ids, parse_models, resolve
from addons.bridge.stream import DONE, ChunkTranslator
from addons.bridge.translate import BridgeError, chat_to_responses, responses_to_chat
from addons.common import BRIDGE, BRIDGE_CLIENT_REPLY
from addons.sse_events import parse_sse_text
from addons.views import CodexContentviews
from tests.conftest import TEST_KEY
from tests.fake_upstream import encode_event, response_object, responses_sse_events
from tests.responses_events import ending, tool_call_events

MODELS = DEFAULT_MODELS


@pytest.mark.parametrize(
    ("body", "expected"),
    [
        ({"model": "gpt-5.1-high"}, ("gpt-5.1", "high")),
        ({"model": "gpt-5-codex-mini-low"}, ("gpt-5-codex-mini", "medium")),
        ({"model": "gpt-5.1"}, ("gpt-5.1", "low")),
        ({"model": "gpt-5"}, ("gpt-5", None)),
        ({"model": "gpt-5", "reasoning_effort": "xhigh"}, ("gpt-5", "high")),
        ({"model": "gpt-5.1-codex-max-xhigh"}, ("gpt-5.1-codex-max", "xhigh")),
        ({"model": "gpt-5.1", "reasoning_effort": "none"}, ("gpt-5.1", "low")),
        ({"model": "gpt-5.1-low", "reasoning": {"effort": "high"}}, ("gpt-5.1", "high")),
        ({"model": "gpt-5.1-low", "reasoning_effort": "medium"}, ("gpt-5.1", "medium")),
        ({"model": "my-model-high"}, ("my-model-high", None)),
        ({"model": "my-model", "reasoning_effort": "minimal"}, ("my-model", "minimal")),
    ],
)
def test_effort_resolution_follows_the_go_bridge(body, expected):
    assert resolve(body, MODELS) == expected


@pytest.mark.parametrize(
    ("model", "expected"),
    [
        # Codex 0.171's catalog (config/codex-models.yaml): suffixes up to -max and -ultra,
        # clamped per model to its supported levels, the catalog's default when none is given.
        ("gpt-6.2-sol", ("gpt-6.2-sol", "low")),
        ("gpt-6.2-sol-max", ("gpt-6.2-sol", "max")),
        ("gpt-6.2-sol-ultra", ("gpt-6.2-sol", "ultra")),
        ("gpt-6.2-sol-minimal", ("gpt-6.2-sol", "low")),
        ("gpt-6-sol", ("gpt-6-sol", "medium")),
        ("gpt-6-luna-ultra", ("gpt-6-luna", "max")),
        ("gpt-5.6-luna-ultra", ("gpt-5.6-luna", "max")),
        ("gpt-5.6-terra-xhigh", ("gpt-5.6-terra", "xhigh")),
        ("gpt-5.5", ("gpt-5.5", "medium")),
        ("gpt-5.5-max", ("gpt-5.5", "xhigh")),
        ("gpt-5.5-ultra", ("gpt-5.5", "xhigh")),
        ("gpt-daybreak-red-latest-ultra", ("gpt-daybreak-red-latest", "ultra")),  # hidden
        # A model whose own name ends in an effort stays itself.
        ("gpt-5.1-codex-max", ("gpt-5.1-codex-max", "low")),
        ("gpt-5.1-codex-max-max", ("gpt-5.1-codex-max", "xhigh")),
        ("gpt-7-nova-max", ("gpt-7-nova-max", None)),  # not in the table: unchanged
    ],
)
def test_catalog_suffixes_and_clamping(model, expected):
    assert resolve({"model": model}, MODELS) == expected


@pytest.mark.parametrize(
    ("effort", "expected"), [("ultra", "max"), ("none", "low"), ("max", "max")]
)
def test_explicit_effort_is_clamped_to_the_catalog_model(effort, expected):
    assert resolve({"model": "gpt-6-luna", "reasoning_effort": effort}, MODELS) == (
        "gpt-6-luna",
        expected,
    )


def test_built_in_table_is_the_snapshot_then_the_go_table():
    snapshot = codex_models.catalog()
    names = list(MODELS)
    assert names[: len(snapshot.models)] == snapshot.slugs()
    for m in snapshot.models:
        assert MODELS[m.slug].allowed == m.supported_reasoning_levels, m.slug
        assert MODELS[m.slug].default == m.default_reasoning_level, m.slug
    assert MODELS["gpt-5.1"].allowed == ("low", "medium", "high")  # the Go bridge's, kept
    ids = model_ids(MODELS)
    assert "gpt-6.2-sol-ultra" in ids and "gpt-6-luna-max" in ids
    assert "gpt-6-luna-ultra" not in ids and "gpt-5.5-max" not in ids
    assert not any(i.startswith("codex-auto-review") for i in ids)  # hidden in Codex's picker


def test_effort_table_validation_and_model_list():
    assert parse_models("") == DEFAULT_MODELS
    table = parse_models({"m": {"efforts": ["high", "medium"], "default": "medium"}})
    assert table["m"].allowed == ("medium", "high")
    for bad in (
        {"m": {"efforts": ["low", "high"]}},  # a gap
        {"m": {"efforts": ["turbo"]}},
        {"m": {"efforts": ["low"], "default": "high"}},
        {"m": "low"},
    ):
        with pytest.raises(ValueError):
            parse_models(bad)
    with pytest.raises(ValueError, match="reasoning_effort"):
        resolve({"model": "gpt-5", "reasoning_effort": "turbo"}, MODELS)
    ids = model_ids(table)
    assert ids == ["m", "m-medium", "m-high"]


def test_request_translation():
    body = {
        "model": "gpt-5.1-codex-high",
        "messages": [
            {"role": "system", "content": "Be brief."},
            {"role": "developer", "content": [{"type": "text", "text": "Use tools."}]},
            {
                "role": "user",
                "content": [
                    {"type": "text", "text": "What is this?"},
                    {
                        "type": "image_url",
                        "image_url": {"url": "data:image/png;base64,AA", "detail": "low"},
                    },
                ],
            },
            {
                "role": "assistant",
                "content": "Let me look.",
                "tool_calls": [
                    {
                        "id": "call_1",
                        "type": "function",
                        "function": {"name": "shell", "arguments": '{"c":1}'},
                    }
                ],
            },
            {"role": "tool", "tool_call_id": "call_1", "content": "a.png"},
        ],
        "tools": [
            {"type": "function", "function": {"name": "shell", "parameters": {"type": "object"}}}
        ],
        "tool_choice": {"type": "function", "function": {"name": "shell"}},
        "parallel_tool_calls": True,
        "response_format": {
            "type": "json_schema",
            "json_schema": {"name": "r", "schema": {"type": "object"}, "strict": True},
        },
        "max_tokens": 100,
        "user": "u1",
        "stream": True,
        "stream_options": {"include_usage": True},
        "temperature": 0.2,
    }
    out, context = chat_to_responses(body, MODELS)
    assert out["model"] == "gpt-5.1-codex" and out["reasoning"] == {"effort": "high"}
    assert out["instructions"] == "Be brief.\n\nUse tools."
    assert out["input"] == [
        {
            "type": "message",
            "role": "user",
            "content": [
                {"type": "input_text", "text": "What is this?"},
                {"type": "input_image", "image_url": "data:image/png;base64,AA", "detail": "low"},
            ],
        },
        {
            "type": "message",
            "role": "assistant",
            "content": [{"type": "output_text", "text": "Let me look."}],
        },
        {"type": "function_call", "call_id": "call_1", "name": "shell", "arguments": '{"c":1}'},
        {"type": "function_call_output", "call_id": "call_1", "output": "a.png"},
    ]
    assert out["tools"] == [{"type": "function", "name": "shell", "parameters": {"type": "object"}}]
    assert out["tool_choice"] == {"type": "function", "name": "shell"}
    assert out["text"] == {
        "format": {"type": "json_schema", "name": "r", "schema": {"type": "object"}, "strict": True}
    }
    assert out["max_output_tokens"] == 100 and out["user"] == "u1" and out["store"] is False
    assert out["stream"] is True and out["temperature"] == 0.2 and out["parallel_tool_calls"]
    assert context == {"model": "gpt-5.1-codex-high", "stream": True, "include_usage": True}
    json_object, _ = chat_to_responses(
        {
            "model": "m",
            "messages": [{"role": "user", "content": "x"}],
            "response_format": {"type": "json_object"},
            "store": True,
        },
        MODELS,
    )
    assert (
        json_object["text"] == {"format": {"type": "json_object"}} and json_object["store"] is True
    )


@pytest.mark.parametrize(
    ("extra", "param"),
    [
        ({"n": 2}, "n"),
        ({"logprobs": True}, "logprobs"),
        ({"stop": ["\n"]}, "stop"),
        ({"audio": {"voice": "x"}}, "audio"),
        ({"frequency_penalty": 0.5}, "frequency_penalty"),
        ({"no_such_field": 1}, "no_such_field"),
        ({"messages": []}, "messages"),
        ({"messages": [{"role": "function", "content": "x"}]}, "messages[0].role"),
        (
            {"messages": [{"role": "user", "content": [{"type": "input_audio"}]}]},
            "messages[0].content[0]",
        ),
        ({"tools": [{"type": "web_search"}]}, "tools[0]"),
        ({"response_format": {"type": "grammar"}}, "response_format.type"),
        ({"max_tokens": 0}, "max_completion_tokens"),
        ({"model": None}, "model"),
    ],
)
def test_unsupported_fields_are_400_naming_the_field(extra, param):
    body = {"model": "gpt-6.2-sol", "messages": [{"role": "user", "content": "hi"}], **extra}
    with pytest.raises(BridgeError) as e:
        chat_to_responses(body, MODELS)
    assert e.value.param == param


def test_whole_reply_translation():
    context = {"model": "gpt-6.2-sol-high"}
    text = responses_to_chat(response_object("r1", "gpt-6.2-sol", "Hello"), context)
    assert text["object"] == "chat.completion" and text["model"] == "gpt-6.2-sol-high"
    choice = text["choices"][0]
    assert choice["message"] == {"role": "assistant", "content": "Hello"}
    assert choice["finish_reason"] == "stop"
    assert text["usage"] == {
        "prompt_tokens": 42,
        "completion_tokens": 17,
        "total_tokens": 59,
        "prompt_tokens_details": {"cached_tokens": 8},
        "completion_tokens_details": {"reasoning_tokens": 5},
    }
    tools = tool_call_events([("shell", {"c": 1}), ("read", {"p": "x"})])[-1][1]["response"]
    calls = responses_to_chat(tools, context)["choices"][0]
    assert calls["finish_reason"] == "tool_calls" and calls["message"]["content"] is None
    assert [c["function"]["name"] for c in calls["message"]["tool_calls"]] == ["shell", "read"]
    cut = {
        **response_object("r2", "m", "Hel"),
        "status": "incomplete",
        "incomplete_details": {"reason": "max_output_tokens"},
    }
    assert responses_to_chat(cut, context)["choices"][0]["finish_reason"] == "length"
    filtered = {**cut, "incomplete_details": {"reason": "content_filter"}}
    assert responses_to_chat(filtered, context)["choices"][0]["finish_reason"] == "content_filter"


def chunks_of(data: bytes) -> list[dict | str]:
    return [
        json.loads(e.data) if e.data != "[DONE]" else "[DONE]"
        for e in parse_sse_text(data.decode())
    ]


def run_stream(events, context=None, reasoning=False, cuts=None) -> list[dict | str]:
    raw = b"".join(encode_event(k, p) for k, p in events)
    translator = ChunkTranslator(context or {"model": "m", "include_usage": True}, None, reasoning)
    bounds = sorted({0, len(raw), *(cuts or [])})
    out = b"".join(translator.feed(raw[a:b]) for a, b in itertools.pairwise(bounds))
    return chunks_of(out + translator.finish())


def finish_reasons(chunks: list[dict | str]) -> list[str]:
    return [
        c["choices"][0]["finish_reason"]
        for c in chunks
        if isinstance(c, dict) and c.get("choices") and c["choices"][0]["finish_reason"]
    ]


def test_stream_text_usage_and_done():
    chunks = run_stream(responses_sse_events("Hi there", "gpt-6.2-sol", "resp_9"))
    assert chunks[0]["choices"][0]["delta"] == {"role": "assistant", "content": ""}
    assert chunks[0]["id"] == "chatcmpl-resp_9" and chunks[0]["object"] == "chat.completion.chunk"
    text = "".join(c["choices"][0]["delta"].get("content", "") for c in chunks[1:-3])
    assert text == "Hi there"
    assert chunks[-3]["choices"][0] == {
        "index": 0,
        "delta": {},
        "finish_reason": "stop",
        "logprobs": None,
    }
    assert chunks[-2]["choices"] == [] and chunks[-2]["usage"]["prompt_tokens_details"] == {
        "cached_tokens": 8
    }
    assert chunks[-1] == "[DONE]"
    no_usage = run_stream(responses_sse_events("Hi", "m"), {"model": "m", "include_usage": False})
    assert all("usage" not in c for c in no_usage if isinstance(c, dict))


def test_stream_parallel_tool_calls_and_reasoning_content():
    events = tool_call_events(
        [("shell", {"command": ["ls", "-la"]}), ("read", {"path": "a"})], reasoning="Think."
    )
    chunks = run_stream(events, reasoning=True)
    deltas = [c["choices"][0]["delta"] for c in chunks if isinstance(c, dict) and c["choices"]]
    assert "".join(d.get("reasoning_content", "") for d in deltas) == "Think."
    heads = [t for d in deltas for t in d.get("tool_calls", []) if "id" in t]
    assert [(t["index"], t["id"], t["function"]["name"]) for t in heads] == [
        (0, "call_0", "shell"),
        (1, "call_1", "read"),
    ]
    args = {0: "", 1: ""}
    for d in deltas:
        for t in d.get("tool_calls", []):
            args[t["index"]] += t["function"]["arguments"]
    assert json.loads(args[0]) == {"command": ["ls", "-la"]} and json.loads(args[1]) == {
        "path": "a"
    }
    finish = [
        c
        for c in chunks
        if isinstance(c, dict) and c["choices"] and c["choices"][0]["finish_reason"]
    ]
    assert finish[0]["choices"][0]["finish_reason"] == "tool_calls"
    without = run_stream(events, reasoning=False)
    assert not any("reasoning_content" in json.dumps(c) for c in without)


def test_stream_incomplete_failed_and_cut():
    base = responses_sse_events("a b", "m")
    incomplete = ending(
        base,
        "response.incomplete",
        status="incomplete",
        incomplete_details={"reason": "max_output_tokens"},
    )
    assert finish_reasons(run_stream(incomplete)) == ["length"]
    failed = ending(
        base, "response.failed", status="failed", error={"code": "server_error", "message": "boom"}
    )
    chunks = run_stream(failed)
    assert chunks[-2] == {
        "error": {"type": "upstream_error", "code": "server_error", "message": "boom"}
    }
    assert chunks[-1] == "[DONE]"
    cut = run_stream(base[:5])
    assert "ended before the response was complete" in cut[-2]["error"]["message"]


@settings(max_examples=60, deadline=None)
@given(st.lists(st.integers(min_value=0, max_value=20_000), max_size=15))
def test_any_chunking_gives_the_same_chunks(cuts):
    events = tool_call_events([("shell", {"c": "x" * 40}), ("read", {"p": 1})], reasoning="Hm.")
    ref = run_stream(events, reasoning=True)
    got = run_stream(events, reasoning=True, cuts=cuts)
    strip = lambda cs: [{**c, "created": 0} if isinstance(c, dict) else c for c in cs]  # noqa: E731
    assert strip(got) == strip(ref)


MESSAGE = st.one_of(
    st.builds(lambda t: {"role": "user", "content": t}, st.text(max_size=20)),
    st.builds(lambda t: {"role": "assistant", "content": t}, st.text(min_size=1, max_size=20)),
    st.builds(lambda t: {"role": "system", "content": t}, st.text(max_size=20)),
    st.builds(
        lambda i, a: {
            "role": "assistant",
            "content": None,
            "tool_calls": [
                {"id": f"c{i}", "type": "function", "function": {"name": "f", "arguments": a}}
            ],
        },
        st.integers(0, 99),
        st.text(min_size=1, max_size=10),
    ),
    st.builds(
        lambda i, t: {"role": "tool", "tool_call_id": f"c{i}", "content": t},
        st.integers(0, 99),
        st.text(max_size=10),
    ),
)


@given(st.lists(MESSAGE, min_size=1, max_size=12))
def test_messages_keep_their_order_and_count(messages):
    out, _ = chat_to_responses({"model": "gpt-6.2-sol", "messages": messages}, MODELS)
    non_system = [m for m in messages if m["role"] != "system"]
    assert len(out["input"]) == len(non_system)
    for msg, item in zip(non_system, out["input"], strict=True):
        if msg["role"] == "tool":
            assert item == {
                "type": "function_call_output",
                "call_id": msg["tool_call_id"],
                "output": msg["content"],
            }
        elif msg.get("tool_calls"):
            assert item["type"] == "function_call" and item["call_id"] == msg["tool_calls"][0]["id"]
        else:
            assert item["role"] == msg["role"]
            assert item["content"][0]["text"] == msg["content"]
    systems = [m["content"] for m in messages if m["role"] == "system"]
    assert out.get("instructions") == ("\n\n".join(systems) if systems else None)


# End to end: the openai SDK's chat.completions through the real proxy. -------------------


@pytest.fixture
def bridge(upstream, start_proxy):
    return start_proxy(upstream.url, "--chat-bridge")


def sdk(proxy) -> openai.OpenAI:
    return openai.OpenAI(
        base_url=f"{proxy.base}/v1", api_key="sk-client-not-the-key", max_retries=0, timeout=30
    )


def sent_upstream(upstream, i: int = -1) -> dict:
    return json.loads(upstream.requests[i].body)


@pytest.mark.e2e
def test_sdk_streams_a_codex_model_with_usage(upstream, bridge):
    with sdk(bridge) as client:
        chunks = list(
            client.chat.completions.create(
                model="gpt-5.1-codex-high",
                messages=[
                    {"role": "system", "content": "Be brief."},
                    {"role": "user", "content": "hi"},
                ],
                stream=True,
                stream_options={"include_usage": True},
            )
        )
    assert chunks[0].choices[0].delta.role == "assistant"
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == upstream.text
    assert chunks[-2].choices[0].finish_reason == "stop"
    usage = chunks[-1].usage
    assert (usage.prompt_tokens, usage.completion_tokens, usage.total_tokens) == (42, 17, 59)
    assert usage.prompt_tokens_details.cached_tokens == 8
    assert usage.completion_tokens_details.reasoning_tokens == 5
    got = upstream.requests[0]
    assert got.path_qs == "/v1/responses"
    assert got.header_values("authorization") == [f"Bearer {TEST_KEY}"]
    assert got.header_values("accept-encoding") == ["identity"]
    body = sent_upstream(upstream)
    assert body["model"] == "gpt-5.1-codex" and body["reasoning"] == {"effort": "high"}
    assert body["instructions"] == "Be brief." and body["stream"] is True
    assert bridge.shutdown() == 0
    docs = {p.name: json.loads(p.read_text()) for p in bridge.dump_files()}
    request = next(v for k, v in docs.items() if k.endswith("-request.json"))
    response = next(v for k, v in docs.items() if k.endswith("-response.json"))
    assert request["body"]["model"] == "gpt-5.1-codex"  # what went upstream
    assert request["client_body"]["model"] == "gpt-5.1-codex-high"  # what the client sent
    assert "event: response.completed" in response["body"]
    assert (
        "chat.completion.chunk" in response["client_body"] and "[DONE]" in response["client_body"]
    )
    for path in bridge.dump_files():  # the client's dropped key is redacted, ours never written
        data = path.read_bytes()
        assert TEST_KEY.encode() not in data and b"sk-client-not-the-key" not in data


@pytest.mark.e2e
def test_sdk_whole_reply_and_models(upstream, bridge):
    with sdk(bridge) as client:
        reply = client.chat.completions.create(
            model="gpt-6.2-sol-max", messages=[{"role": "user", "content": "hi"}]
        )
        models = [m.id for m in client.models.list()]
    assert reply.choices[0].message.content == upstream.text
    assert reply.choices[0].finish_reason == "stop" and reply.usage.total_tokens == 59
    assert reply.model == "gpt-6.2-sol-max"
    assert "gpt-5.1-codex-max-xhigh" in models and "gpt-6.2-sol-ultra" in models
    assert models.index("gpt-6.2-sol") < models.index("gpt-5.5") < models.index("gpt-5")
    assert len(upstream.requests) == 1  # /v1/models was answered locally
    sent = json.loads(upstream.requests[0].body)
    assert sent["model"] == "gpt-6.2-sol" and sent["reasoning"] == {"effort": "max"}


@pytest.mark.e2e
def test_sdk_tool_round_trip(upstream, bridge):
    def responder(body):
        if any(i.get("type") == "function_call_output" for i in body["input"]):
            return responses_sse_events("It is 12 degrees.", body["model"], "resp_final")
        return tool_call_events([("get_weather", {"city": "Paris"})], body["model"])

    upstream.responder = responder
    upstream.json_reply = lambda body: response_object(
        "resp_final", body["model"], "It is 12 degrees."
    )
    tools = [
        {
            "type": "function",
            "function": {
                "name": "get_weather",
                "parameters": {"type": "object", "properties": {"city": {"type": "string"}}},
            },
        }
    ]
    messages = [{"role": "user", "content": "Weather in Paris?"}]
    with sdk(bridge) as client:
        first = client.chat.completions.create(
            model="gpt-6.2-sol", messages=messages, tools=tools, stream=True
        )
        calls: dict[int, dict] = {}
        finish = None
        for chunk in first:
            for tc in chunk.choices[0].delta.tool_calls or [] if chunk.choices else []:
                entry = calls.setdefault(tc.index, {"id": None, "name": None, "arguments": ""})
                entry["id"] = tc.id or entry["id"]
                entry["name"] = (tc.function.name if tc.function else None) or entry["name"]
                entry["arguments"] += (tc.function.arguments or "") if tc.function else ""
            if chunk.choices and chunk.choices[0].finish_reason:
                finish = chunk.choices[0].finish_reason
        assert finish == "tool_calls"
        assert calls == {
            0: {"id": "call_0", "name": "get_weather", "arguments": '{"city": "Paris"}'}
        }
        messages += [
            {
                "role": "assistant",
                "tool_calls": [
                    {
                        "id": "call_0",
                        "type": "function",
                        "function": {"name": "get_weather", "arguments": calls[0]["arguments"]},
                    }
                ],
            },
            {"role": "tool", "tool_call_id": "call_0", "content": "12 C"},
        ]
        second = client.chat.completions.create(model="gpt-6.2-sol", messages=messages, tools=tools)
    assert second.choices[0].message.content == "It is 12 degrees."
    upstream_input = sent_upstream(upstream, 1)["input"]
    assert [i["type"] for i in upstream_input] == [
        "message",
        "function_call",
        "function_call_output",
    ]
    assert sent_upstream(upstream, 0)["tools"][0]["name"] == "get_weather"


@pytest.mark.e2e
def test_sdk_json_schema_and_refusals(upstream, bridge):
    schema = {"type": "object", "properties": {"a": {"type": "integer"}}, "required": ["a"]}
    with sdk(bridge) as client:
        client.chat.completions.create(
            model="gpt-6.2-sol",
            messages=[{"role": "user", "content": "give a"}],
            response_format={
                "type": "json_schema",
                "json_schema": {"name": "A", "schema": schema, "strict": True},
            },
        )
        assert sent_upstream(upstream)["text"] == {
            "format": {"type": "json_schema", "name": "A", "schema": schema, "strict": True}
        }
        with pytest.raises(openai.BadRequestError) as refused:
            client.chat.completions.create(
                model="gpt-6.2-sol", messages=[{"role": "user", "content": "x"}], n=2
            )
        assert refused.value.body["param"] == "n"
        assert len(upstream.requests) == 1  # the refused one never went upstream
        upstream.events = ending(
            responses_sse_events("partial", "m"),
            "response.failed",
            status="failed",
            error={"code": "server_error", "message": "upstream broke"},
        )
        with pytest.raises(openai.APIError, match="upstream broke"):
            list(
                client.chat.completions.create(
                    model="gpt-6.2-sol", messages=[{"role": "user", "content": "x"}], stream=True
                )
            )
        upstream.events = None
        upstream.status = 429
        upstream.error_body = {
            "error": {"message": "slow down", "type": "rate_limit", "code": "rate_limit_exceeded"}
        }
        with pytest.raises(openai.RateLimitError) as limited:
            client.chat.completions.create(
                model="gpt-6.2-sol", messages=[{"role": "user", "content": "x"}]
            )
        assert limited.value.body["code"] == "rate_limit_exceeded"


@pytest.mark.e2e
def test_each_event_becomes_its_chunk_at_once(upstream, bridge):
    upstream.gate = threading.Event()
    upstream.gate_timeout = 15
    conn = bridge.connection()
    conn.request(
        "POST",
        "/v1/chat/completions",
        json.dumps(
            {"model": "gpt-6.2-sol", "stream": True, "messages": [{"role": "user", "content": "x"}]}
        ),
        {"content-type": "application/json"},
    )
    resp = conn.getresponse()
    first = resp.readline()
    assert b'"role":"assistant"' in first  # response.created's chunk, while the upstream waits
    upstream.gate.set()
    rest = resp.read()
    conn.close()
    assert upstream.gate_timed_out is False and rest.endswith(DONE)


@pytest.mark.e2e
def test_off_by_default_the_strict_proxy_refuses_chat(upstream, start_proxy):
    proxy = start_proxy(upstream.url)
    assert proxy.post_json({"model": "m", "messages": []})[0] == 200  # /v1/responses still
    status, _, _ = proxy.request(
        "POST", "/v1/chat/completions", b"{}", {"content-type": "application/json"}
    )
    assert status == 403 and proxy.request("GET", "/v1/models")[0] == 403
    assert len(upstream.requests) == 1


@pytest.mark.e2e
def test_llm_cli_streams_through_the_bridge(upstream, bridge, tmp_path):
    """Simon Willison's ``llm`` (PyPI), a real Chat Completions client: its OpenAI-compatible
    model configured on the bridge's ``/v1``."""
    home = tmp_path / "llm-home"
    home.mkdir()
    (home / "extra-openai-models.yaml").write_text(
        "- model_id: codex-bridge\n"
        "  model_name: gpt-5.1-codex-high\n"
        f"  api_base: {bridge.base}/v1\n"
    )
    llm = Path(sys.executable).with_name("llm")
    result = subprocess.run(
        [str(llm), "-m", "codex-bridge", "--key", "sk-llm-not-the-key", "--no-log", "Say hello"],
        env={**os.environ, "LLM_USER_PATH": str(home)},
        capture_output=True,
        text=True,
        timeout=120,
        stdin=subprocess.DEVNULL,
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == upstream.text
    body = sent_upstream(upstream)
    assert body["model"] == "gpt-5.1-codex" and body["reasoning"] == {"effort": "high"}
    assert upstream.requests[0].header_values("authorization") == [f"Bearer {TEST_KEY}"]


@pytest.mark.e2e
def test_sdk_parallel_calls_reasoning_and_incomplete(upstream, start_proxy):
    proxy = start_proxy(
        upstream.url, "--chat-bridge", "--set", "codex_chat_bridge_reasoning_content=true"
    )
    upstream.events = tool_call_events(
        [("shell", {"command": ["ls"]}), ("read_file", {"path": "README.md"})],
        reasoning="I should list and read.",
    )
    args: dict[int, str] = {}
    names: dict[int, str] = {}
    reasoning = ""
    with sdk(proxy) as client:
        for chunk in client.chat.completions.create(
            model="gpt-6.2-sol", messages=[{"role": "user", "content": "look"}], stream=True
        ):
            if not chunk.choices:
                continue
            delta = chunk.choices[0].delta
            reasoning += (delta.model_extra or {}).get("reasoning_content") or ""
            for tc in delta.tool_calls or []:
                if tc.function and tc.function.name:
                    names[tc.index] = tc.function.name
                args[tc.index] = args.get(tc.index, "") + (
                    (tc.function and tc.function.arguments) or ""
                )
        assert names == {0: "shell", 1: "read_file"}
        assert json.loads(args[0]) == {"command": ["ls"]}
        assert json.loads(args[1]) == {"path": "README.md"}
        assert reasoning == "I should list and read."
        # Cut at max_output_tokens: finish_reason "length", streamed and whole.
        upstream.events = ending(
            responses_sse_events("Once upon", "m"),
            "response.incomplete",
            status="incomplete",
            incomplete_details={"reason": "max_output_tokens"},
        )
        streamed = [
            c.choices[0].finish_reason
            for c in client.chat.completions.create(
                model="gpt-6.2-sol",
                messages=[{"role": "user", "content": "x"}],
                stream=True,
                max_tokens=3,
            )
            if c.choices and c.choices[0].finish_reason
        ]
        assert streamed == ["length"]
        upstream.json_reply = lambda body: {
            **response_object("r", body["model"], "Once upon"),
            "status": "incomplete",
            "incomplete_details": {"reason": "max_output_tokens"},
        }
        whole = client.chat.completions.create(
            model="gpt-6.2-sol", messages=[{"role": "user", "content": "x"}], max_tokens=3
        )
        assert whole.choices[0].finish_reason == "length"
        assert whole.choices[0].message.content == "Once upon"
    assert sent_upstream(upstream)["max_output_tokens"] == 3


def bridged_flow(content_type: bytes = b"text/event-stream"):
    f = tflow.tflow(resp=tutils.tresp(headers=[(b"content-type", content_type)], content=b""))
    f.metadata[BRIDGE] = {"model": "m", "stream": True, "include_usage": False}
    return f


def test_reply_addon_streams_translated_chunks_and_keeps_the_upstream_body():
    addon = ChatReplies()
    with taddons.context(addon):
        f = bridged_flow()
        addon.responseheaders(f)
        assert f.response.headers["transfer-encoding"] == "chunked"
        raw = [encode_event(k, p) for k, p in responses_sse_events("a b", "m")]
        out = [f.response.stream(r) for r in raw] + [f.response.stream(b"")]
        assert all(isinstance(o, list) and b"" not in o for o in out)  # never a terminator
        assert out[1] == [] and out[-2][0].endswith(DONE)
        addon.response(f)
        assert f.response.raw_content == b""  # no tee below in this unit test: nothing kept
        assert "chat.completion.chunk" in f.metadata[BRIDGE_CLIENT_REPLY]


def test_reply_addon_fails_closed_with_an_error_chunk(monkeypatch):
    def boom(self, raw):
        raise RuntimeError("x")

    monkeypatch.setattr(ChunkTranslator, "feed", boom)
    addon = ChatReplies()
    with taddons.context(addon):
        f = bridged_flow()
        addon.responseheaders(f)
        first = f.response.stream(b"data: {}\n\n")
        assert len(first) == 1 and first[0].endswith(DONE)
        assert json.loads(first[0].split(b"\n\n")[0][6:])["error"]["type"] == "upstream_error"
        assert f.response.stream(b"more") == [] and f.response.stream(b"") == []


def chat_flow(request_body: dict, reply: bytes):
    f = tflow.tflow(
        resp=tutils.tresp(headers=[(b"content-type", b"text/event-stream")], content=b"")
    )
    f.request.path = "/v1/chat/completions"
    f.request.headers["content-type"] = "application/json"
    f.request.content = json.dumps(request_body).encode()
    f.response.raw_content = reply
    return f


def test_chat_views_show_the_upstream_request_and_the_assembled_reply():
    events = tool_call_events([("shell", {"command": ["ls"]})], reasoning="Hm.")
    events = events[:-1] + responses_sse_events("Done.", "m")[2:]  # calls, then text, completed
    translator = ChunkTranslator({"model": "gpt-5.1-codex-high", "include_usage": True}, None, True)
    reply = translator.feed(b"".join(encode_event(k, p) for k, p in events)) + translator.finish()
    body = {
        "model": "gpt-5.1-codex-high",
        "messages": [{"role": "user", "content": "ls"}],
        "stream": True,
    }
    f = chat_flow(body, reply)
    with taddons.context(CodexContentviews()):
        req = contentviews.prettify_message(f.request, f)
        resp = contentviews.prettify_message(f.response, f)
    assert req.view_name == "Chat Completions request"
    assert "as the bridge sends it upstream" in req.text and "model: gpt-5.1-codex\n" in req.text
    assert "reasoning effort: high" in req.text and "1. message/user: ls" in req.text
    assert resp.view_name == "Chat Completions stream"
    assert "status: completed" in resp.text and "── assistant text ──\nDone." in resp.text
    assert '── function call shell [call_0] ──\n{\n  "command": [\n    "ls"\n  ]\n}' in resp.text
    assert "── reasoning summary 1 ──\nHm." in resp.text
    assert "tokens: input 42 (cached 8), output 17 (reasoning 5), total 59" in resp.text
    refused = chat_flow({**body, "n": 3}, b"")
    with taddons.context(CodexContentviews()):
        assert (
            "refuses this request (400): n:"
            in contentviews.prettify_message(refused.request, refused).text
        )


@pytest.mark.e2e
def test_a_bomb_or_deep_json_is_a_400_and_never_goes_upstream(upstream, bridge):
    import gzip

    bomb = gzip.compress(bytes(1024 * 1024), 9) * 256  # 256 MiB in ~270 KB
    headers = {"content-type": "application/json", "content-encoding": "gzip"}
    status, _, body = bridge.request("POST", "/v1/chat/completions", bomb, headers)
    assert status == 400 and b"decoding stopped at the limit" in body
    deep = b'{"model": "m", "messages": ' + b"[" * 50_000 + b"]" * 50_000 + b"}"
    status, _, body = bridge.request(
        "POST", "/v1/chat/completions", deep, {"content-type": "application/json"}
    )
    assert status == 400 and b"nested deeper" in body
    assert upstream.requests == []
    assert bridge.post_json({"model": "m", "input": "hi"})[0] == 200  # still serving
