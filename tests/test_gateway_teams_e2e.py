"""Teams against the real gateway (issue 32): two members of one team share its budget; the
second is refused once the team's is spent though its own is not, and the real Codex CLI
ends its turn at once with its usage-limit message; the team's bound (its limit plus what its
``max_concurrent`` requests in flight use) holds with ``serve --workers 2`` on SQLite, and with
two instances on one PostgreSQL, as a member's does (tests/test_gateway_overshoot.py)."""

from __future__ import annotations

import concurrent.futures
import re
import uuid
from pathlib import Path

import pytest

from addons.gateway_mode.core import MEMBER
from tests.conftest import ProxyProcess, wait_for
from tests.fake_upstream import FakeUpstream
from tests.gateway_harness import OPERATOR, Gateway, bearer, member_codex_home, run_member_codex
from tests.pg_cluster import PgCluster
from tests.test_gateway_overshoot import (
    QUOTA,
    REQUESTS,
    SLOTS,
    THREADS,
    TOKENS_PER_REQUEST,
    one_request,
)

pytestmark = pytest.mark.e2e

MODEL = "gpt-5.5"  # in Codex 0.171's catalog and in the rate card
BOUND = QUOTA - 1 + SLOTS * TOKENS_PER_REQUEST
SETTLE_S = 30.0


def metric(server: ProxyProcess, name: str, labels: str) -> float:
    text = server.request("GET", "/metrics", headers=OPERATOR)[2].decode()
    match = re.search(rf"^{name}{{{re.escape(labels)}}} (\S+)$", text, re.M)
    return float(match.group(1)) if match else 0.0


def sent_upstream(upstream) -> tuple[int, int]:
    """Turns the upstream was sent: ``(HTTP POSTs, socket response.create messages)``."""
    posts = [r for r in upstream.requests if r.method == "POST"]
    creates = [m for m in upstream.ws_messages if m.get("type") == "response.create"]
    return len(posts), len(creates)


@pytest.mark.codex
@pytest.mark.parametrize("websockets", [False, True], ids=["http", "websocket"])
def test_a_spent_team_ends_the_second_members_codex_turn_at_once(
    gateway, upstream, codex, tmp_path: Path, websockets: bool
) -> None:
    gateway.admin("add-team", "platform", "--five-hour-quota", "100")
    gateway.admin("add-member", "alice", "--team", "platform", "--five-hour-quota", "10000")
    gateway.admin("add-member", "bob", "--five-hour-quota", "10000")
    gateway.admin("set-member", "bob", "--team", "platform")
    alice, bob = gateway.add_key("alice"), gateway.add_key("bob")
    record = tmp_path / "rec"
    server = gateway.serve(upstream.url, "--record", str(record))
    for _ in range(2):  # 118 of the team's 100 tokens, all alice's
        assert server.post_json({"model": MODEL, "stream": True}, bearer(alice))[0] == 200
    wait_for(lambda: gateway.usage()["total"]["requests"] == 2, SETTLE_S, "rows")
    home, work, _ = member_codex_home(tmp_path, server, MODEL, websockets=websockets)
    before = sent_upstream(upstream)
    code, out, seconds = run_member_codex(codex, home, work, bob, timeout=60)
    assert code != 0
    assert "You've hit your usage limit" in out.replace("\u2019", "'"), out
    assert "Try again at" in out
    assert "Reconnecting" not in out  # no retry: one refusal, not a frozen terminal
    # Nothing of bob's reached the upstream (a socket's upgrade does: no turn on it).
    assert sent_upstream(upstream) == before
    print(f"bob refused by the team's quota in {seconds:.1f} s")
    # bob's own quota is untouched; the team has the refusal and every token.
    by_member = {m["member"]: m for m in gateway.usage()["members"]}
    assert "bob" not in by_member or by_member["bob"]["total_tokens"] == 0
    teams = {t["team"]: t for t in gateway.usage("--by", "team")["teams"]}
    assert teams["platform"]["total_tokens"] == 2 * TOKENS_PER_REQUEST
    assert teams["platform"]["refusals"]["quota"] >= 1
    assert metric(server, "codex_gateway_team_refused_total", 'kind="quota",team="platform"') >= 1
    tokens = 'kind="total",team="platform"'
    assert metric(server, "codex_gateway_team_tokens_total", tokens) == 2 * TOKENS_PER_REQUEST
    # The recording's flows name the team beside the member.
    wait_for(lambda: len(recorded_members(record)) >= 3, SETTLE_S, "recorded flows")
    marks = recorded_members(record)
    assert {(m["member"], m.get("team")) for m in marks} == {
        ("alice", "platform"),
        ("bob", "platform"),
    }, marks


def recorded_members(record: Path) -> list[dict]:
    """The member marker of every flow in the recording's ``flows.mitm``."""
    from mitmproxy import io

    path = record / "flows.mitm"
    if not path.exists():
        return []
    with open(path, "rb") as f:
        try:
            flows = list(io.FlowReader(f).stream())
        except Exception:  # a flow being written: read again
            return []
    return [f.metadata[MEMBER] for f in flows if MEMBER in f.metadata]


def settled_team(gw: Gateway, admitted: int) -> dict:
    """The team's usage once every admitted request's row is written."""

    def team() -> dict:
        return {t["team"]: t for t in gw.usage("--by", "team")["teams"]}.get("platform", {})

    wait_for(
        lambda: team().get("requests") == admitted and team().get("in_flight") == 0,
        SETTLE_S,
        "every admitted request's row",
    )
    return team()


def check_team_bound(gw: Gateway, servers: list[ProxyProcess]) -> None:
    """Two members without a quota of their own, in a team with :data:`QUOTA` tokens per 5
    hours and the default slots, hammer it together: the team's usage stays within
    :data:`BOUND` (``limit - 1 + slots x one reply``)."""
    proc = gw.admin("add-team", "platform", "--five-hour-quota", str(QUOTA))
    assert f"plus what {SLOTS} requests in flight use" in proc.stderr, proc.stderr
    for name in ("mallory", "trudy"):
        gw.admin("add-member", name, "--team", "platform")
    headers = [bearer(gw.add_key("mallory")), bearer(gw.add_key("trudy"))]
    # Both members at once, each request to the next server in turn.
    outcomes: dict[tuple[int, str | None], int] = {}
    with concurrent.futures.ThreadPoolExecutor(THREADS) as pool:
        futures = [
            pool.submit(one_request, servers[i % len(servers)], headers[i % 2])
            for i in range(REQUESTS)
        ]
        for future in futures:
            outcome = future.result()
            outcomes[outcome] = outcomes.get(outcome, 0) + 1
    admitted = outcomes.get((200, None), 0)
    refused = {k: v for k, v in outcomes.items() if k != (200, None)}
    assert set(refused) <= {(429, "quota_exceeded"), (429, "concurrency_limit")}, outcomes
    total = settled_team(gw, admitted)
    print(f"team: admitted {admitted}, {total['total_tokens']} tokens (bound {BOUND}), {outcomes}")
    assert total["total_tokens"] == admitted * TOKENS_PER_REQUEST
    assert QUOTA <= total["total_tokens"] <= BOUND, outcomes
    assert outcomes.get((429, "quota_exceeded"), 0) > 0


def test_a_team_quota_holds_with_two_workers_on_sqlite(tmp_path: Path) -> None:
    gw = Gateway(tmp_path)
    gw.admin("init")
    try:
        with FakeUpstream() as up:
            check_team_bound(gw, [gw.serve(up.url, "--workers", "2")])
    finally:
        gw.stop()


def test_a_team_quota_holds_across_instances_on_postgresql(
    tmp_path: Path, pg_cluster: PgCluster
) -> None:
    name = f"gw_{uuid.uuid4().hex[:8]}"
    pg_cluster.create_database(name)
    gw = Gateway(tmp_path, database=pg_cluster.url(name))
    gw.admin("init")
    try:
        with FakeUpstream() as up:
            servers = [gw.serve(up.url, "--workers", "2"), gw.serve(up.url, "--workers", "2")]
            check_team_bound(gw, servers)
    finally:
        gw.stop()


def test_a_team_slot_on_the_socket_is_shared_by_its_members(gateway, upstream) -> None:
    """Over Codex's WebSocket transport: a turn of one member holds the team's one slot, the
    other member's turn gets the busy answer naming the team (Codex waits it out and
    resends), and is served once the first turn ended."""
    import asyncio
    import json
    import threading

    import aiohttp

    gateway.admin("add-team", "platform", "--max-concurrent", "1")
    gateway.admin("add-member", "erin", "--team", "platform")
    gateway.admin("add-member", "finn", "--team", "platform", "--max-concurrent", "5")
    server = gateway.serve(upstream.url)
    url = f"ws://127.0.0.1:{server.port}/v1/responses"
    agent = {"user-agent": "codex_exec/0.171.0 (test)"}
    erin = {"authorization": f"Bearer {gateway.add_key('erin')}", **agent}
    finn = {"authorization": f"Bearer {gateway.add_key('finn')}", **agent}
    create = json.dumps({"type": "response.create", "model": MODEL})
    upstream.gate = threading.Event()

    async def until_done(ws: aiohttp.ClientWebSocketResponse) -> list[dict]:
        events = []
        async for msg in ws:
            events.append(json.loads(msg.data))
            if events[-1]["type"] in ("response.completed", "response.failed", "error"):
                break
        return events

    async def scenario() -> tuple[list[dict], dict, list[dict]]:
        async with (
            aiohttp.ClientSession() as client,
            client.ws_connect(url, headers=erin) as first,
            client.ws_connect(url, headers=finn) as second,
        ):
            await first.send_str(create)
            held = [json.loads((await first.receive()).data)]  # the turn has its slot
            await second.send_str(create)
            refused = json.loads((await second.receive()).data)
            assert upstream.gate is not None
            upstream.gate.set()
            held += await until_done(first)
            await second.send_str(create)
            return held, refused, await until_done(second)

    held, refused, served = asyncio.run(scenario())
    assert held[-1]["type"] == "response.completed"
    assert refused["type"] == "response.failed"
    error = refused["response"]["error"]
    assert error["code"] == "rate_limit_exceeded"
    assert error["message"] == (
        "team 'platform' of member 'finn' already has 1 requests in flight (max_concurrent 1). "
        "Please try again in 1s."
    )
    assert served[-1]["type"] == "response.completed"
    creates = [m for m in upstream.ws_messages if m.get("type") == "response.create"]
    assert len(creates) == 2  # the refused one never went upstream
