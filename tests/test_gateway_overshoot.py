"""A quota holds under the defaults, against the real gateway (issue 30).

A member with a 500-token 5-hour quota and ``max_concurrent`` left at 0 sends 200 requests from
32 threads. Before, nothing bounded what it could spend (measured: 7.7x the quota from 64
threads); now the gateway gives such a member ``quota_max_concurrent`` slots (4) and frees a slot
only once its request's usage is in the database, so the usage in the window stays within the
bound docs/gateway.md states: ``limit - 1 + N x R`` (``R``: one reply's tokens). Checked with
``serve --workers 2`` on SQLite, and with two instances (two workers each) on one PostgreSQL.
"""

from __future__ import annotations

import concurrent.futures
import http.client
import json
import uuid
from pathlib import Path

import pytest

from tests.conftest import ProxyProcess, wait_for
from tests.fake_upstream import FakeUpstream
from tests.gateway_harness import Gateway, bearer
from tests.pg_cluster import PgCluster

pytestmark = pytest.mark.e2e

STREAM = {"model": "gpt-5.5", "stream": True}
#: total_tokens of the stand-in's default stream.
TOKENS_PER_REQUEST = 59
QUOTA = 500
SLOTS = 4  # config/gateway.yaml quota_max_concurrent
BOUND = QUOTA - 1 + SLOTS * TOKENS_PER_REQUEST
REQUESTS, THREADS = 200, 32
SETTLE_S = 30.0


def one_request(server: ProxyProcess, headers: dict[str, str]) -> tuple[int, str | None]:
    """``(status, error code)`` of one streamed request, its body read to the end."""
    conn = http.client.HTTPConnection("127.0.0.1", server.port, timeout=60)
    try:
        conn.request(
            "POST",
            "/v1/responses",
            json.dumps(STREAM),
            {**headers, "content-type": "application/json"},
        )
        resp = conn.getresponse()
        body = resp.read()
        if resp.status == 200:
            return 200, None
        return resp.status, json.loads(body)["error"]["code"]
    finally:
        conn.close()


def hammer(
    servers: list[ProxyProcess], headers: dict[str, str]
) -> dict[tuple[int, str | None], int]:
    """:data:`REQUESTS` requests from :data:`THREADS` threads, spread over ``servers``;
    returns how many got each ``(status, error code)``."""
    outcomes: dict[tuple[int, str | None], int] = {}
    with concurrent.futures.ThreadPoolExecutor(THREADS) as pool:
        futures = [
            pool.submit(one_request, servers[i % len(servers)], headers) for i in range(REQUESTS)
        ]
        for future in futures:
            outcome = future.result()
            outcomes[outcome] = outcomes.get(outcome, 0) + 1
    return outcomes


def settled_total(gw: Gateway, member: str, admitted: int) -> dict:
    """The member's usage once every admitted request's row is written."""
    wait_for(
        lambda: (
            gw.usage("--member", member)["total"]["requests"] == admitted
            and gw.usage("--member", member)["total"]["in_flight"] == 0
        ),
        SETTLE_S,
        "every admitted request's row",
    )
    return gw.usage("--member", member)["total"]


def check_bound(gw: Gateway, servers: list[ProxyProcess]) -> None:
    proc = gw.admin("add-member", "mallory", "--five-hour-quota", str(QUOTA))
    # add-member says which bound it applies.
    assert f"plus what {SLOTS} requests in flight use" in proc.stderr, proc.stderr
    headers = bearer(gw.add_key("mallory"))
    outcomes = hammer(servers, headers)
    admitted = outcomes.get((200, None), 0)
    refused = {k: v for k, v in outcomes.items() if k != (200, None)}
    assert set(refused) <= {(429, "quota_exceeded"), (429, "concurrency_limit")}, outcomes
    total = settled_total(gw, "mallory", admitted)
    assert total["total_tokens"] == admitted * TOKENS_PER_REQUEST
    print(f"admitted {admitted}, {total['total_tokens']} tokens (bound {BOUND}), {outcomes}")
    # The quota is spent (the member got far enough), and never past the stated bound.
    assert total["total_tokens"] >= QUOTA
    assert total["total_tokens"] <= BOUND, (admitted, outcomes)
    assert outcomes.get((429, "quota_exceeded"), 0) > 0


def test_quota_holds_under_the_defaults_with_two_workers_on_sqlite(tmp_path: Path) -> None:
    gw = Gateway(tmp_path)
    gw.admin("init")
    try:
        with FakeUpstream() as up:
            server = gw.serve(up.url, "--workers", "2")
            check_bound(gw, [server])
    finally:
        gw.stop()


def test_quota_holds_across_instances_on_postgresql(tmp_path: Path, pg_cluster: PgCluster) -> None:
    name = f"gw_{uuid.uuid4().hex[:8]}"
    pg_cluster.create_database(name)
    gw = Gateway(tmp_path, database=pg_cluster.url(name))
    gw.admin("init")
    try:
        with FakeUpstream() as up:
            servers = [gw.serve(up.url, "--workers", "2"), gw.serve(up.url, "--workers", "2")]
            check_bound(gw, servers)
    finally:
        gw.stop()


def socket_hammer(server: ProxyProcess, key: str) -> tuple[dict[str, int], int]:
    """:data:`REQUESTS` ``response.create`` messages over :data:`THREADS` concurrent sockets
    (Codex's WebSocket transport), each sent once the socket's previous turn ended; returns
    how many ended each way (``completed`` or the error code) and one turn's total tokens."""
    import asyncio

    import aiohttp

    outcomes: dict[str, int] = {}
    per_turn: list[int] = []
    headers = {"authorization": f"Bearer {key}", "user-agent": "codex_exec/0.171.0 (test)"}
    url = f"ws://127.0.0.1:{server.port}/v1/responses"
    create = json.dumps({"type": "response.create", "model": STREAM["model"]})

    async def one_socket(turns: int, client: aiohttp.ClientSession) -> None:
        async with client.ws_connect(url, headers=headers) as ws:
            for _ in range(turns):
                await ws.send_str(create)
                async for msg in ws:
                    event = json.loads(msg.data)
                    kind = event.get("type")
                    if kind == "response.completed":
                        outcomes["completed"] = outcomes.get("completed", 0) + 1
                        per_turn.append(event["response"]["usage"]["total_tokens"])
                        break
                    if kind in ("error", "response.failed"):
                        error = event.get("error") or event.get("response", {}).get("error", {})
                        code = str(error.get("code") or error.get("type"))
                        outcomes[code] = outcomes.get(code, 0) + 1
                        break

    async def scenario() -> None:
        async with aiohttp.ClientSession() as client:
            await asyncio.gather(*(one_socket(REQUESTS // THREADS, client) for _ in range(THREADS)))

    asyncio.run(scenario())
    return outcomes, max(per_turn, default=0)


def test_quota_holds_under_the_defaults_over_the_socket(tmp_path: Path) -> None:
    """The same bound over Codex's WebSocket transport: a socket turn takes its slot before
    the usage is read, as an HTTP request does, and gives it back once its row is written."""
    gw = Gateway(tmp_path)
    gw.admin("init")
    try:
        with FakeUpstream() as up:
            server = gw.serve(up.url, "--workers", "2")
            gw.admin("add-member", "mallory", "--five-hour-quota", str(QUOTA))
            outcomes, reply_tokens = socket_hammer(server, gw.add_key("mallory"))
            admitted = outcomes.get("completed", 0)
            assert set(outcomes) <= {"completed", "quota_exceeded", "rate_limit_exceeded"}, outcomes
            total = settled_total(gw, "mallory", admitted)
            bound = QUOTA - 1 + SLOTS * reply_tokens
            print(f"socket: admitted {admitted}, {total['total_tokens']} tokens (bound {bound})")
            assert total["total_tokens"] >= QUOTA and outcomes.get("quota_exceeded", 0) > 0
            assert total["total_tokens"] <= bound, outcomes
    finally:
        gw.stop()
