"""The gateway's ``GET /v1/realtime?model=…`` (``serve --websockets``): the openai SDK's
Realtime client (``client.realtime.connect``) with a member key against the stand-in's
Realtime API, plus units of the route's protocol object and of its turns driven through the
hooks (taddons / tflow)."""

from __future__ import annotations

import asyncio
import json

import pytest
from mitmproxy import http
from mitmproxy.test import taddons, tflow

from addons.common import WEBSOCKET
from addons.gateway_mode.core import MEMBER, SOCKET_ROUTE, UPSTREAM_KEY
from addons.gateway_mode.forward import route_url
from addons.gateway_mode.ledger import WS_CONNECTIONS
from addons.gateway_mode.socket_protocol import (
    REALTIME,
    RESPONSES,
    protocol_for,
    realtime_query,
)
from addons.gateway_mode.websocket import WebSocketRoute
from addons.standin import realtime_response_events
from tests.conftest import wait_for
from tests.gateway_harness import UPSTREAM_KEYS
from tests.test_gateway_ws import UPGRADE, connection_rows, upgrade_flow
from tests.test_gateway_ws import creates as upstream_creates
from tests.test_gateway_ws import rows as usage_rows

MODEL = "gpt-realtime"  # not in the rate card: unpriced


# -- the protocol object --------------------------------------------------------------------


@pytest.mark.parametrize(
    "path, expected",
    [
        (b"/v1/realtime?model=gpt-realtime", {"model": "gpt-realtime"}),
        (b"/v1/realtime?model=m&intent=transcription", {"model": "m", "intent": "transcription"}),
        (b"/v1/realtime", None),  # the model is required
        (b"/v1/realtime?model=", None),
        (b"/v1/realtime?model=a&model=b", None),
        (b"/v1/realtime?model=m&call_id=rtc_1", None),  # joining a call by id: not served
        (b"/v1/realtime/?model=m", None),
        (b"/v1/Realtime?model=m", None),
        (b"/v1/realtime?model=a%20b", None),
        (b"/v1/realtime?model=m&x", None),
    ],
)
def test_the_realtime_target_rule(path, expected):
    assert realtime_query(path) == expected
    assert (protocol_for(upgrade_flow(path).request) is REALTIME) is (expected is not None)


def test_each_route_claims_only_its_own_upgrades():
    assert protocol_for(upgrade_flow(b"/v1/responses").request) is RESPONSES
    assert protocol_for(upgrade_flow(b"/v1/realtime?model=m", b"POST").request) is None
    plain = tflow.tflow()
    plain.request.method, plain.request.data.path = "GET", b"/v1/realtime?model=m"
    assert protocol_for(plain.request) is None  # no Upgrade: websocket
    route = WebSocketRoute()
    with taddons.context(route) as tctx:
        tctx.configure(route, codex_gateway_websockets=False)  # serve --no-websockets
        flow = upgrade_flow(b"/v1/realtime?model=m")
        route.requestheaders(flow)
        assert WEBSOCKET not in flow.metadata
        tctx.configure(route, codex_gateway_websockets=True)  # the default
        route.requestheaders(flow)
        assert flow.metadata[WEBSOCKET] is True and flow.metadata[SOCKET_ROUTE] == "realtime"


def test_realtime_events_turn_rules_usage_and_refusal_shape():
    from addons.gateway_mode.websocket import Turn

    created, _, done = realtime_response_events("resp_1", "hi")
    assert REALTIME.confirms(created) and REALTIME.response_id(created) == "resp_1"
    a = Turn("m", None, 0.0, confirmed=True, client_event_id="evt_a", response_id="resp_0")
    b = Turn("m", None, 0.0, confirmed=True, client_event_id="evt_b", response_id="resp_1")
    c = Turn("m", None, 0.0, client_event_id="evt_c")
    assert REALTIME.ended(created, [a, b, c]) is None
    assert REALTIME.ended(done, [a, b, c]) == 1  # by response.id
    assert REALTIME.ended(done, [c]) == 0 and REALTIME.ended(done, []) is None
    assert REALTIME.usage(done) == {
        "input": 42, "cached": 8, "cache_write": 0, "output": 17, "reasoning": 0, "total": 59,
    }  # fmt: skip
    assert REALTIME.turn_status(done) == "completed" and REALTIME.end_status(done) == 200

    def error(answers):
        return {"type": "error", "error": {"type": "invalid_request_error", "event_id": answers}}

    assert REALTIME.ended(error("evt_c"), [a, b, c]) == 2  # it answers c's response.create
    assert REALTIME.ended(error("evt_x"), [a, b, c]) is None  # about another client event
    assert REALTIME.ended(error("evt_a"), [a, b, c]) is None  # started: response.done follows
    assert REALTIME.ended(error(None), [a, b, c]) == 2  # the oldest not started
    assert RESPONSES.ended(error(None), [a]) == 0 and RESPONSES.ended(created, [a]) is None
    assert REALTIME.end_status(error("evt_c")) is None
    session = {"type": "session.updated", "session": {"model": "gpt-realtime-2"}}
    assert REALTIME.server_model(session) == "gpt-realtime-2"
    assert REALTIME.turn_model({"type": "response.create"}, "m") == "m"
    refusal = json.loads(REALTIME.refusal(429, "usage_limit_reached", "quota_exceeded", "no", "e1"))
    assert refusal["type"] == "error" and refusal["event_id"].startswith("event_gw")
    assert refusal["error"] == {
        "type": "usage_limit_reached", "code": "quota_exceeded", "message": "no",
        "param": None, "event_id": "e1",
    }  # fmt: skip
    codex = json.loads(RESPONSES.refusal(429, "usage_limit_reached", "quota_exceeded", "no"))
    assert codex["status"] == 429 and "event_id" not in codex  # Codex's shape unchanged
    # Busy slots: Codex's response.failed it waits out; the Realtime error event.
    busy = json.loads(REALTIME.busy("full", 1, "e2", limit="max_concurrent", used=1, allowed=1))
    assert busy["type"] == "error" and busy["error"]["code"] == "concurrency_limit"
    assert busy["error"]["event_id"] == "e2" and busy["error"]["allowed"] == 1
    assert json.loads(RESPONSES.busy("full", 1, None))["type"] == "response.failed"
    # Codex-only extras are not sent to a Realtime client.
    from addons.gateway_mode.windows import Limit, LimitUsage

    usages = [LimitUsage(Limit("five_hour_tokens", "tokens", 5 * 3_600_000, 100), 50, None)]
    assert REALTIME.rate_limits(usages) is None and REALTIME.quota_fields(usages) == {}
    assert json.loads(RESPONSES.rate_limits(usages) or b"{}")["type"] == "codex.rate_limits"
    assert "headers" in RESPONSES.quota_fields(usages)


@pytest.mark.parametrize(
    "upstream_url, path, expected",
    [
        (
            "https://api.openai.com/v1/responses",
            "/v1/realtime?model=m",
            "https://api.openai.com/v1/realtime?model=m",
        ),
        (
            "https://x.example/openai/v1/responses?api-version=1",
            "/v1/realtime?model=m&intent=t",
            "https://x.example/openai/v1/realtime?api-version=1&model=m&intent=t",
        ),
        ("http://h:1/v1/responses", "/v1/responses", "http://h:1/v1/responses"),
    ],
)
def test_the_upstream_realtime_url_keeps_both_queries(upstream_url, path, expected):
    assert route_url(upstream_url, path) == expected


# -- turns through the hooks ----------------------------------------------------------------


def _turns(limits: dict | None = None):
    from tests.test_gateway_ws import _turns as responses_turns

    core, turns, forwarder = responses_turns()
    if limits:
        core.directory.load(
            [
                {
                    "key_hash": "h",
                    "key_id": "k1",
                    "member": "alice",
                    "member_id": 1,
                    "max_concurrent": 0,
                    **limits,
                }
            ]
        )
    return core, turns, forwarder


def _rt_flow() -> http.HTTPFlow:
    flow = tflow.twebsocketflow(messages=False)
    flow.request.data.path = b"/v1/realtime?model=gpt-realtime"
    flow.metadata[WEBSOCKET] = True
    flow.metadata[SOCKET_ROUTE] = "realtime"
    flow.metadata[MEMBER] = {"member": "alice", "member_id": 1, "key_id": "k1"}
    flow.metadata[UPSTREAM_KEY] = "alpha"
    return flow


async def test_realtime_turns_are_rows_with_the_session_model_and_the_socket_a_connection_row():
    from tests.test_gateway_ws import _say

    core, turns, forwarder = _turns()
    with taddons.context(turns):
        flow = _rt_flow()
        turns.websocket_start(flow)
        await _say(turns, flow, False, {"type": "session.created", "session": {"model": MODEL}})
        await _say(turns, flow, True, {"type": "conversation.item.create", "item": {}})
        await _say(turns, flow, True, {"type": "response.create", "event_id": "evt_1"})
        for event in realtime_response_events("resp_1", "hi"):
            await _say(turns, flow, False, event)
        # A response the server starts itself (turn detection): metered when it ends.
        for event in realtime_response_events("resp_2", "again"):
            await _say(turns, flow, False, event)
        # A response.create the server refuses before starting it: the turn ends, no usage.
        await _say(turns, flow, True, {"type": "response.create", "event_id": "evt_3"})
        bad = {"type": "invalid_request_error", "code": "x", "event_id": "evt_3"}
        await _say(turns, flow, False, {"type": "error", "error": bad})
        flow.websocket.close_code = 1000
        flow.websocket.closed_by_client = True
        turns.websocket_end(flow)
    rows = core.ledger.rows  # type: ignore[union-attr]
    usage = [r for r in rows if "table" not in r]
    assert [r["route"] for r in usage] == ["ws:/v1/realtime"] * 3
    first, second, third = usage
    assert first["model"] == MODEL and first["total_tokens"] == 59 and first["cached_tokens"] == 8
    assert first["status"] == 200 and first["error"] is None and first["events"] == 3
    assert first["credits_micro"] is None  # gpt-realtime: not in the rate card
    assert second["total_tokens"] == 59 and second["error"] is None
    assert third["total_tokens"] == 0 and third["error"] == "error event: x"
    opened, closed = [r for r in rows if r.get("table") == WS_CONNECTIONS]
    assert opened["row_id"] == closed["row_id"] and opened["duration_ms"] is None
    assert closed["route"] == "ws:/v1/realtime" and closed["model"] == MODEL
    assert closed["client_messages"] == 3 and closed["upstream_messages"] == 8
    assert closed["turns"] == 3 and closed["close_reason"] == "closed by the client (1000)"
    assert closed["duration_ms"] is not None and closed["closed_ms"] >= closed["opened_ms"]
    assert forwarder.ended == [flow.id]
    # A model the rate card prices is charged like HTTP (here gpt-5.5, from the URL).
    core.ledger.rows.clear()  # type: ignore[union-attr]
    with taddons.context(turns):
        priced = _rt_flow()
        priced.request.data.path = b"/v1/realtime?model=gpt-5.5"
        turns.websocket_start(priced)
        await _say(turns, priced, True, {"type": "response.create"})
        for event in realtime_response_events("resp_4", "hi"):
            await _say(turns, priced, False, event)
    (row,) = [r for r in core.ledger.rows if "table" not in r]  # type: ignore[union-attr]
    assert row["model"] == "gpt-5.5" and row["credits_micro"] and row["rate"]


async def test_an_unpriced_realtime_model_is_refused_for_a_credit_quota_in_the_realtime_shape():
    from tests.test_gateway_ws import _say

    core, turns, _ = _turns({"five_hour_credits_micro": 5_000_000})
    sent: list[bytes] = []
    turns._inject = lambda flow, data: sent.append(data)  # type: ignore[method-assign]

    async def no_usage(fn, *args):
        return []

    core.run_db = no_usage  # type: ignore[method-assign]
    with taddons.context(turns):
        flow = _rt_flow()
        turns.websocket_start(flow)
        await _say(turns, flow, True, {"type": "response.create", "event_id": "evt_9"})
        assert flow.websocket.messages[-1].dropped
    event = json.loads(sent[0])
    assert event["type"] == "error" and "status" not in event
    assert event["error"]["code"] == "unpriced_model" and event["error"]["event_id"] == "evt_9"
    assert event["error"]["model"] == MODEL
    assert [r for r in core.ledger.rows if "table" not in r] == []  # type: ignore[union-attr]


# -- the openai SDK's Realtime client through the gateway -----------------------------------


async def realtime_turn(port: int, key: str, model: str = MODEL) -> list:
    """One text turn with the openai SDK's Realtime client: the events received, in order,
    until ``response.done`` or an ``error`` after the ``response.create``."""
    import openai

    client = openai.AsyncOpenAI(api_key=key, base_url=f"http://127.0.0.1:{port}/v1")
    events = []
    async with client.realtime.connect(model=model) as conn:
        events.append(await asyncio.wait_for(conn.recv(), 30))  # session.created
        await conn.session.update(session={"type": "realtime", "output_modalities": ["text"]})
        await conn.conversation.item.create(
            item={
                "type": "message",
                "role": "user",
                "content": [{"type": "input_text", "text": "Say hello"}],
            }
        )
        await conn.response.create(event_id="evt_turn_1")
        while True:
            event = await asyncio.wait_for(conn.recv(), 30)
            events.append(event)
            if event.type in ("response.done", "error"):
                break
    return events


@pytest.mark.e2e
def test_a_realtime_turn_through_the_gateway_is_metered_and_no_key_leaks(
    gateway, upstream, tmp_path
):
    gateway.admin("add-member", "alice", "--five-hour-quota", "100000")
    key = gateway.add_key("alice")
    record, dumps = tmp_path / "rec", tmp_path / "dumps"
    server = gateway.serve(
        upstream.url, "--websockets", "--record", str(record), "--dump-dir", str(dumps)
    )
    events = asyncio.run(realtime_turn(server.port, key))
    kinds = [e.type for e in events]
    assert kinds[0] == "session.created" and events[0].session.model == MODEL
    assert "response.output_text.delta" in kinds and kinds[-1] == "response.done"
    assert events[-1].response.usage.total_tokens == 59
    # The upstream: the Realtime URL with the member's query, a pool key, its own Host.
    (upgrade,) = upstream.requests
    assert upgrade.method == "GET" and upgrade.path_qs == f"/v1/realtime?model={MODEL}"
    assert upgrade.header_values("authorization")[0] in {
        f"Bearer {v}" for v in UPSTREAM_KEYS.values()
    }
    assert upgrade.header_values("host") == [f"127.0.0.1:{upstream.port}"]
    sent = [m["type"] for m in upstream.ws_messages]
    assert sent == ["session.update", "conversation.item.create", "response.create"]
    wait_for(lambda: usage_rows(gateway), 10, "the ledger row")
    (row,) = usage_rows(gateway)
    assert row["route"] == "ws:/v1/realtime" and row["model"] == MODEL and row["status"] == 200
    assert (row["input_tokens"], row["cached_tokens"], row["output_tokens"]) == (42, 8, 17)
    assert row["total_tokens"] == 59 and row["credits_micro"] is None  # unpriced model
    wait_for(lambda: [c for c in connection_rows(gateway) if c["closed_ms"]], 10, "closed")
    (conn,) = connection_rows(gateway)
    assert conn["route"] == "ws:/v1/realtime" and conn["turns"] == 1 and conn["model"] == MODEL
    assert conn["client_messages"] == 3 and conn["upstream_messages"] == 6
    assert conn["upstream_key"] in UPSTREAM_KEYS and "client" in conn["close_reason"]
    summary = gateway.usage()
    (alice,) = summary["members"]
    assert alice["ws_connections"] == 1 and alice["ws_client_messages"] == 3
    assert alice["ws_upstream_messages"] == 6 and alice["total_tokens"] == 59
    table = gateway.admin("usage").stdout
    assert "ws conns" in table and "3/6" in table
    assert server.shutdown() == 0
    # The recording's ledger reads the Realtime turn as the gateway's did: model, tokens.
    lines = [json.loads(x) for x in (record / "usage.jsonl").read_text().splitlines()]
    assert [x["status"] for x in lines if x["transport"] is None] == [101]  # the upgrade
    (line,) = [x for x in lines if x["transport"] == "websocket"]
    assert line["model"] == MODEL
    assert line["usage"]["total"] == 59 and line["usage"]["cached"] == 8
    assert line["turn_status"] == "completed" and line["status"] == 200
    # Leak scan: the recording (flows with their messages, HAR), dumps, logs, the database.
    places = {str(p): p.read_bytes() for d in (record, dumps) for p in d.rglob("*") if p.is_file()}
    places["stdout"] = server.stdout_path.read_bytes()
    places["stderr"] = server.stderr_path.read_bytes()
    places["database"] = (tmp_path / "gateway.db").read_bytes()
    assert any(b"realtime" in data for data in places.values())  # the turn was recorded
    for name, data in places.items():
        for secret in [*UPSTREAM_KEYS.values(), key]:
            assert secret.encode() not in data, f"a key in {name}"
    # The member key never reached the upstream, and the client never saw an upstream key.
    for _, value in upgrade.headers:
        assert key not in value
    assert not any(v in json.dumps([e.to_dict() for e in events]) for v in UPSTREAM_KEYS.values())


@pytest.mark.e2e
def test_an_over_quota_member_gets_the_realtime_error_event_and_the_upstream_sees_nothing(
    gateway, upstream
):
    gateway.admin("add-member", "bob", "--five-hour-quota", "100")
    key = gateway.add_key("bob")
    server = gateway.serve(upstream.url, "--websockets")
    for _ in range(2):  # 59 then 118 of 100 tokens
        assert asyncio.run(realtime_turn(server.port, key))[-1].type == "response.done"
    wait_for(lambda: sum(r["total_tokens"] for r in usage_rows(gateway)) == 118, 10, "rows")
    before = len(upstream_creates(upstream))
    events = asyncio.run(realtime_turn(server.port, key))
    error = events[-1]
    assert error.type == "error" and error.event_id.startswith("event_gw")
    assert error.error.type == "usage_limit_reached" and error.error.code == "quota_exceeded"
    assert error.error.event_id == "evt_turn_1" and "bob" in error.error.message
    assert len(upstream_creates(upstream)) == before  # the refused one never went upstream
    assert len(usage_rows(gateway)) == 2


@pytest.mark.e2e
def test_revoking_a_member_key_closes_its_realtime_socket(gateway, upstream):
    import threading

    import openai

    gateway.admin("add-member", "carol")
    key = gateway.add_key("carol")
    key_id = gateway.admin("list-keys", "carol").stdout.split("\n")[1].split()[0]
    server = gateway.serve(upstream.url, "--websockets")
    upstream.gate = threading.Event()  # the response stays open upstream

    async def session() -> tuple[list, float]:
        client = openai.AsyncOpenAI(api_key=key, base_url=f"http://127.0.0.1:{server.port}/v1")
        events = []
        async with client.realtime.connect(model=MODEL) as conn:
            events.append(await asyncio.wait_for(conn.recv(), 30))
            await conn.response.create()
            events.append(await asyncio.wait_for(conn.recv(), 30))  # response.created
            loop = asyncio.get_running_loop()
            await loop.run_in_executor(None, gateway.admin, "revoke-key", key_id)
            revoked = loop.time()
            try:
                while True:  # bounded: the gateway closes it, else this times out
                    events.append(await asyncio.wait_for(conn.recv(), 10))
            except openai.OpenAIError as e:  # the SDK's ConnectionClosed, wrapped
                events.append(e)
            except Exception as e:
                events.append(e)
            return events, loop.time() - revoked

    try:
        events, seconds = asyncio.run(session())
    finally:
        upstream.gate.set()
    print(f"socket closed {seconds:.2f} s after revoke-key returned; last: {events[-1]!r}")
    assert [getattr(e, "type", None) for e in events[:2]] == ["session.created", "response.created"]
    error = events[-2]
    assert error.type == "error" and error.error.code == "invalid_member_key"
    assert "revoked" in error.error.message
    assert not hasattr(events[-1], "type")  # then the socket closed
    wait_for(lambda: upstream.ws_open == 0, 10, "the upstream side closed too")
    wait_for(lambda: any(c["closed_ms"] for c in connection_rows(gateway)), 10, "closed row")
    (conn,) = connection_rows(gateway)
    assert conn["close_reason"] == "member key revoked"
    (row,) = usage_rows(gateway)
    assert "socket closed" in row["error"]


@pytest.mark.e2e
def test_realtime_upgrades_refused_before_the_upstream_without_the_flag_a_key_or_a_model(
    gateway, upstream
):
    gateway.admin("add-member", "dave")
    key = gateway.add_key("dave")
    server = gateway.serve(upstream.url, "--no-websockets")
    status = server.request(
        "GET",
        f"/v1/realtime?model={MODEL}",
        headers={"authorization": f"Bearer {key}", **UPGRADE},
    )[0]
    assert status == 403 and upstream.requests == []
    # Codex's socket route is off too: 426, as the strict proxy answers (Codex uses HTTP).
    codex_upgrade = {"authorization": f"Bearer {key}", **UPGRADE, "user-agent": "codex_exec/0"}
    assert server.request("GET", "/v1/responses", headers=codex_upgrade)[0] == 426
    server.shutdown()
    both = gateway.admin("serve", "--websockets", "--no-websockets", check=False)
    assert both.returncode == 2 and "contradict" in both.stderr
    server = gateway.serve(upstream.url)  # served by default
    refused = {
        f"/v1/realtime?model={MODEL}": {},  # no member key
        f"/v1/realtime?model={MODEL}&call_id=rtc_1": {"authorization": f"Bearer {key}"},
        "/v1/realtime": {"authorization": f"Bearer {key}"},  # no model
    }
    statuses = [
        server.request("GET", path, headers={**headers, **UPGRADE})[0]
        for path, headers in refused.items()
    ]
    assert statuses == [401, 403, 403] and upstream.requests == []


@pytest.mark.e2e
def test_a_failed_realtime_handshake_is_answered_503_and_the_next_upgrade_uses_another_key(
    gateway, upstream
):
    """As for Codex's socket: the upstream's 429 on the upgrade cools that key down, the member
    gets a local 503 with ``Retry-After: 0``, and its next upgrade goes out on another key."""
    import openai
    import websockets

    gateway.admin("add-member", "fay")
    key = gateway.add_key("fay")
    server = gateway.serve(upstream.url, "--websockets")
    upstream.key_status = {v: 429 for name, v in UPSTREAM_KEYS.items() if name != "gamma"}
    statuses = []
    for _ in range(len(UPSTREAM_KEYS)):
        try:
            events = asyncio.run(realtime_turn(server.port, key))
            break
        except (openai.OpenAIError, websockets.exceptions.InvalidStatus) as e:
            cause = e.__cause__ if isinstance(e, openai.OpenAIError) else e
            assert isinstance(cause, websockets.exceptions.InvalidStatus), repr(e)
            statuses.append(cause.response.status_code)
            assert cause.response.headers["retry-after"] == "0"
    else:
        pytest.fail(f"no upgrade succeeded: {statuses}")
    print("refused upgrades before one succeeded:", statuses)
    assert statuses and set(statuses) == {503} and events[-1].type == "response.done"
    names = {f"Bearer {v}": name for name, v in UPSTREAM_KEYS.items()}
    used = [names[r.header_values("authorization")[0]] for r in upstream.requests]
    assert used[-1] == "gamma" and len(used) == len(statuses) + 1
    wait_for(lambda: usage_rows(gateway), 10, "the ledger row")
    assert [r["upstream_key"] for r in usage_rows(gateway)] == ["gamma"]


@pytest.mark.e2e
def test_realtime_concurrency_slots_count_open_responses_not_idle_sockets(gateway, upstream):
    import threading

    import openai

    gateway.admin("add-member", "erin", "--max-concurrent", "1")
    key = gateway.add_key("erin")
    server = gateway.serve(upstream.url, "--websockets")
    upstream.gate = threading.Event()
    client = openai.AsyncOpenAI(api_key=key, base_url=f"http://127.0.0.1:{server.port}/v1")

    async def scenario() -> tuple[list, list, list]:
        async with (
            client.realtime.connect(model=MODEL) as first,
            client.realtime.connect(model=MODEL) as second,
        ):
            # Two idle sockets hold no slot; a response on the first takes the one slot.
            await first.recv(), await second.recv()  # session.created
            await first.response.create()
            held = [await asyncio.wait_for(first.recv(), 30)]  # response.created, then held
            await second.response.create(event_id="evt_second")
            refused = [await asyncio.wait_for(second.recv(), 30)]
            assert upstream.gate is not None
            upstream.gate.set()
            while held[-1].type != "response.done":
                held.append(await asyncio.wait_for(first.recv(), 30))
            # The response ended: its slot is free for the other socket.
            await second.response.create()
            served = [await asyncio.wait_for(second.recv(), 30)]
            while served[-1].type not in ("response.done", "error"):
                served.append(await asyncio.wait_for(second.recv(), 30))
            return held, refused, served

    held, refused, served = asyncio.run(scenario())
    assert held[0].type == "response.created" and held[-1].type == "response.done"
    assert refused[0].type == "error" and refused[0].error.code == "concurrency_limit"
    assert refused[0].error.event_id == "evt_second"
    assert served[-1].type == "response.done"
    assert len(upstream_creates(upstream)) == 2  # the refused one never went upstream


async def test_a_response_the_server_starts_for_a_member_over_quota_is_cancelled_upstream():
    from addons.gateway_mode.windows import Limit, LimitUsage
    from tests.test_gateway_ws import _say

    core, turns, _ = _turns({"five_hour_quota": 100})
    sent: list[tuple[bytes, bool]] = []
    turns._inject = lambda flow, data, to_client=True: sent.append((data, to_client))  # type: ignore[method-assign]
    over = [LimitUsage(Limit("five_hour_quota", "tokens", 5 * 3_600_000, 100), 118, None)]

    async def usage_now(fn, *args):
        return over

    core.run_db = usage_now  # type: ignore[method-assign]
    with taddons.context(turns):
        flow = _rt_flow()
        turns.websocket_start(flow)
        created, _, done = realtime_response_events("resp_vad", "hi")
        await _say(turns, flow, False, created)  # server turn detection started it
        for _ in range(500):
            if len(sent) == 2:
                break
            await asyncio.sleep(0.01)
        cancel, error = sent
        assert cancel[1] is False  # to the upstream
        assert json.loads(cancel[0]) == {"type": "response.cancel", "response_id": "resp_vad"}
        assert error[1] is True and json.loads(error[0])["error"]["code"] == "quota_exceeded"
        done["response"]["status"] = "cancelled"
        await _say(turns, flow, False, done)  # its usage so far is still metered
    (row,) = [r for r in core.ledger.rows if "table" not in r]  # type: ignore[union-attr]
    assert row["total_tokens"] == 59 and row["error"] == "response cancelled"
    # Under the limit, nothing is cancelled.
    sent.clear()
    over[0] = LimitUsage(over[0].limit, 10, None)
    with taddons.context(turns):
        flow = _rt_flow()
        turns.websocket_start(flow)
        await _say(turns, flow, False, realtime_response_events("resp_ok", "hi")[0])
        while turns._checks:
            await asyncio.sleep(0.01)
    assert sent == []


@pytest.mark.e2e
def test_a_response_the_server_starts_for_a_member_over_quota_is_cancelled(gateway, upstream):
    """Server-side turn detection starts a response without a response.create: the gateway
    checks it once started, cancels it upstream and tells the member (openai SDK)."""
    import openai

    gateway.admin("add-member", "gus", "--five-hour-quota", "100")
    key = gateway.add_key("gus")
    server = gateway.serve(upstream.url, "--websockets")
    for _ in range(2):  # 59 then 118 of 100 tokens
        assert asyncio.run(realtime_turn(server.port, key))[-1].type == "response.done"
    wait_for(lambda: sum(r["total_tokens"] for r in usage_rows(gateway)) == 118, 10, "rows")
    client = openai.AsyncOpenAI(api_key=key, base_url=f"http://127.0.0.1:{server.port}/v1")

    async def spoken() -> list:
        events = []
        async with client.realtime.connect(model=MODEL) as conn:
            events.append(await asyncio.wait_for(conn.recv(), 30))
            await conn.input_audio_buffer.commit()  # the server starts a response itself
            while [e.type for e in events].count("response.done") < 1 or not any(
                e.type == "error" for e in events
            ):
                events.append(await asyncio.wait_for(conn.recv(), 30))
        return events

    events = asyncio.run(spoken())
    kinds = [e.type for e in events]
    assert "response.created" in kinds and "response.done" in kinds
    (error,) = [e for e in events if e.type == "error"]
    assert error.error.code == "quota_exceeded" and "gus" in error.error.message
    started = next(e for e in events if e.type == "response.created").response.id
    wait_for(
        lambda: any(m.get("type") == "response.cancel" for m in upstream.ws_messages),
        10,
        "the cancel upstream",
    )
    cancels = [m for m in upstream.ws_messages if m.get("type") == "response.cancel"]
    assert [c["response_id"] for c in cancels] == [started]
    wait_for(lambda: len(usage_rows(gateway)) == 3, 10, "the started response's row")
    assert usage_rows(gateway)[-1]["total_tokens"] == 59  # metered all the same


async def test_an_unread_realtime_message_is_answered_in_the_realtime_shape_and_counted():
    from tests.test_gateway_ws import _say

    core, turns, _ = _turns()
    sent: list[bytes] = []
    turns._inject = lambda flow, data: sent.append(data)  # type: ignore[method-assign]
    with taddons.context(turns):
        flow = _rt_flow()
        turns.websocket_start(flow)
        deep = b'{"type": "conversation.item.create", "item": ' + b"[" * 1100 + b"]" * 1100 + b"}"
        await _say(turns, flow, True, deep)
        assert flow.websocket.messages[-1].dropped
        await _say(turns, flow, True, b"\x00 not json")
        assert flow.websocket.messages[-1].dropped
        turns.websocket_end(flow)
    (event,) = [json.loads(m) for m in sent]  # the non-JSON one is dropped unanswered
    assert event["type"] == "error" and "status" not in event
    assert event["error"]["code"] == "json_too_deep" and event["error"]["event_id"] is None
    closed = [r for r in core.ledger.rows if r.get("table") == WS_CONNECTIONS][-1]  # type: ignore[union-attr]
    assert closed["client_messages"] == 2 and closed["turns"] == 0
