"""``serve --chat-bridge``: the openai SDK's ``chat.completions`` with a member key through the
gateway (member auth, quotas, the upstream key pool, the usage ledger)."""

from __future__ import annotations

import json
import sqlite3

import openai
import pytest

from tests.conftest import wait_for
from tests.fake_upstream import responses_sse_events
from tests.gateway_harness import UPSTREAM_KEYS
from tests.responses_events import tool_call_events

pytestmark = pytest.mark.e2e

TOOLS = [
    {
        "type": "function",
        "function": {
            "name": "get_weather",
            "parameters": {"type": "object", "properties": {"city": {"type": "string"}}},
        },
    }
]


def client(server, key: str) -> openai.OpenAI:
    return openai.OpenAI(
        base_url=f"http://127.0.0.1:{server.port}/v1", api_key=key, max_retries=0, timeout=30
    )


def rows(gateway) -> list[dict]:
    with sqlite3.connect(gateway.database.removeprefix("sqlite:///")) as db:
        db.row_factory = sqlite3.Row
        return [dict(r) for r in db.execute("SELECT * FROM usage ORDER BY ts_ms")]


def test_sdk_chat_completions_with_a_member_key_streamed_with_tools_and_metered(gateway, upstream):
    gateway.admin("add-member", "alice", "--five-hour-quota", "100000")
    key = gateway.add_key("alice")
    server = gateway.serve(upstream.url, "--chat-bridge")

    def responder(body: dict) -> list:
        if any(i.get("type") == "function_call_output" for i in body["input"]):
            return responses_sse_events("It is 12 degrees.", body["model"], "resp_final")
        return tool_call_events([("get_weather", {"city": "Paris"})], body["model"])

    upstream.responder = responder
    messages: list = [{"role": "user", "content": "Weather in Paris?"}]
    with client(server, key) as sdk:
        calls: dict[int, dict] = {}
        finish = None
        for chunk in sdk.chat.completions.create(
            model="gpt-5.5", messages=messages, tools=TOOLS, stream=True
        ):
            for tc in (chunk.choices[0].delta.tool_calls or []) if chunk.choices else []:
                entry = calls.setdefault(tc.index, {"id": None, "name": None, "arguments": ""})
                entry["id"] = tc.id or entry["id"]
                entry["name"] = (tc.function.name if tc.function else None) or entry["name"]
                entry["arguments"] += (tc.function.arguments or "") if tc.function else ""
            if chunk.choices and chunk.choices[0].finish_reason:
                finish = chunk.choices[0].finish_reason
        assert finish == "tool_calls"
        assert calls[0]["name"] == "get_weather" and json.loads(calls[0]["arguments"]) == {
            "city": "Paris"
        }
        messages += [
            {
                "role": "assistant",
                "tool_calls": [
                    {
                        "id": calls[0]["id"],
                        "type": "function",
                        "function": {"name": "get_weather", "arguments": calls[0]["arguments"]},
                    }
                ],
            },
            {"role": "tool", "tool_call_id": calls[0]["id"], "content": "12 C"},
        ]
        chunks = list(
            sdk.chat.completions.create(
                model="gpt-5.5",
                messages=messages,
                tools=TOOLS,
                stream=True,
                stream_options={"include_usage": True},
            )
        )
        text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
        assert text == "It is 12 degrees."
        assert chunks[-1].usage is not None and chunks[-1].usage.total_tokens == 59
        # No member key, or a wrong one: 401 in the OpenAI shape, nothing forwarded.
        with client(server, "sk-codex-gw-" + "Z" * 43) as stranger:
            with pytest.raises(openai.AuthenticationError):
                stranger.chat.completions.create(model="gpt-5.5", messages=messages)
    assert len(upstream.requests) == 2
    for request in upstream.requests:
        assert request.path_qs == "/v1/responses"
        assert request.header_values("authorization")[0] in {
            f"Bearer {v}" for v in UPSTREAM_KEYS.values()
        }
        assert key not in json.dumps(request.headers)
    wait_for(lambda: len(rows(gateway)) == 2, 10, "ledger rows")
    ledger = rows(gateway)
    assert {r["route"] for r in ledger} == {"/v1/chat/completions"}
    assert all(r["total_tokens"] == 59 and r["model"] == "gpt-5.5" for r in ledger)
    assert all(r["credits_micro"] for r in ledger)  # priced with the gateway's rate card
    assert server.shutdown() == 0


def test_a_member_over_quota_gets_429_on_the_chat_route(gateway, upstream):
    gateway.admin("add-member", "bob", "--five-hour-quota", "50")
    key = gateway.add_key("bob")
    server = gateway.serve(upstream.url, "--chat-bridge")
    messages = [{"role": "user", "content": "Hi"}]
    with client(server, key) as sdk:
        reply = sdk.chat.completions.create(model="gpt-5.5", messages=messages)
        assert reply.choices[0].message.content == upstream.text
        wait_for(lambda: len(rows(gateway)) == 1, 10, "ledger row")
        with pytest.raises(openai.RateLimitError) as refused:
            sdk.chat.completions.create(model="gpt-5.5", messages=messages)
    assert refused.value.body["type"] == "usage_limit_reached"  # type: ignore[index]
    assert len(upstream.requests) == 1


def test_the_chat_route_is_refused_without_the_flag(gateway, upstream):
    gateway.admin("add-member", "carol")
    key = gateway.add_key("carol")
    server = gateway.serve(upstream.url)
    with client(server, key) as sdk, pytest.raises(openai.PermissionDeniedError):
        sdk.chat.completions.create(model="gpt-5.5", messages=[{"role": "user", "content": "x"}])
    assert not upstream.requests
