"""Gateway mode on a real PostgreSQL server (the session's ``pg_cluster``).

Several gateway instances share one database: token quotas and ``max_concurrent`` slots are
counted across all of them. A database outage loses no usage row: rows wait in the ledger
(new requests are refused 503 meanwhile) and land exactly once when the server is back.
Each test uses a fresh database of the shared cluster.
"""

from __future__ import annotations

import json
import threading
import uuid
from pathlib import Path

import pytest

from tests.conftest import open_stream, wait_for
from tests.fake_upstream import FakeUpstream
from tests.gateway_harness import OPERATOR, Gateway, bearer
from tests.pg_cluster import PgCluster

pytestmark = pytest.mark.e2e

STREAM = {"model": "gpt-5.5", "stream": True}
#: total_tokens of the fake upstream's default stream.
TOKENS_PER_REQUEST = 59
#: Seconds for rows to reach the database, leases to be released, health to change.
SETTLE_S = 15.0


def fresh_gateway(tmp_path: Path, pg_cluster: PgCluster) -> Gateway:
    """A gateway deployment on a new, initialised database of the cluster."""
    name = f"gw_{uuid.uuid4().hex[:8]}"
    pg_cluster.create_database(name)
    gw = Gateway(tmp_path, database=pg_cluster.url(name))
    gw.admin("init")
    return gw


def error_code(body: bytes) -> str:
    return json.loads(body)["error"]["code"]


def requests_of(gw: Gateway, member: str) -> int:
    return gw.usage("--member", member)["total"]["requests"]


def test_two_instances_share_one_quota(tmp_path: Path, pg_cluster: PgCluster) -> None:
    gw = fresh_gateway(tmp_path, pg_cluster)
    gw.admin("add-member", "alice", "--five-hour-quota", "100")
    gw.admin("add-member", "bob")
    alice, bob = bearer(gw.add_key("alice")), bearer(gw.add_key("bob"))
    try:
        with FakeUpstream() as up:
            a, b = gw.serve(up.url), gw.serve(up.url)

            status, _, body = a.post_json(STREAM, alice)
            assert status == 200, body

            # 59 tokens used of 100: still admitted, by the other instance.
            status, _, body = b.post_json(STREAM, alice)
            assert status == 200, body
            wait_for(lambda: requests_of(gw, "alice") == 2, SETTLE_S, "alice's two rows")

            # 118 >= 100, counted from rows written by both instances.
            status, headers, body = a.post_json(STREAM, alice)
            assert status == 429, body
            assert int(headers["retry-after"]) > 0
            error = json.loads(body)["error"]
            assert error["code"] == "quota_exceeded"
            assert error["used"] == 2 * TOKENS_PER_REQUEST
            assert error["allowed"] == 100
            assert len(up.requests) == 2  # the refused request never went upstream

            for server in (a, b):
                status, _, body = server.post_json(STREAM, bob)
                assert status == 200, body
    finally:
        gw.stop()


def test_two_instances_share_one_concurrency_limit(tmp_path: Path, pg_cluster: PgCluster) -> None:
    gw = fresh_gateway(tmp_path, pg_cluster)
    gw.admin("add-member", "carol", "--max-concurrent", "1")
    carol = bearer(gw.add_key("carol"))
    try:
        with FakeUpstream() as up:
            a, b = gw.serve(up.url), gw.serve(up.url)
            up.gate = threading.Event()
            up.gate_timeout = 60
            conn, resp = open_stream(a.port, STREAM, headers=carol)
            try:
                assert resp.status == 200
                first = resp.readline()
                assert first.startswith(b"event: response.created"), first

                # Carol's one slot is held by instance A: instance B must see it.
                status, headers, body = b.post_json(STREAM, carol)
                assert status == 429, body
                assert error_code(body) == "concurrency_limit"
                assert headers["retry-after"] == "1"
                assert len(up.requests) == 1

                up.gate.set()
                rest = resp.read()
            finally:
                conn.close()
            assert b"response.completed" in rest
            assert up.gate_timed_out is False

            # The lease goes back when the exchange ends (asynchronously).
            wait_for(
                lambda: b.post_json(STREAM, carol)[0] == 200, SETTLE_S, "carol's slot released"
            )
            wait_for(lambda: requests_of(gw, "carol") == 2, SETTLE_S, "carol's two rows")
    finally:
        gw.stop()


def test_database_outage_loses_no_row(tmp_path: Path, pg_cluster: PgCluster) -> None:
    gw = fresh_gateway(tmp_path, pg_cluster)
    gw.admin("add-member", "alice")
    alice = bearer(gw.add_key("alice"))
    try:
        with FakeUpstream() as up:
            server = gw.serve(up.url)
            for _ in range(3):
                status, _, body = server.post_json(STREAM, alice)
                assert status == 200, body
            wait_for(lambda: requests_of(gw, "alice") == 3, SETTLE_S, "the first three rows")

            # (a) A stream admitted before the outage ends during it: its row must wait.
            up.gate = threading.Event()
            up.gate_timeout = 60
            conn, resp = open_stream(server.port, STREAM, headers=alice)
            try:
                assert resp.status == 200
                pg_cluster.stop()
                up.gate.set()
                rest = resp.read()
            finally:
                conn.close()
            assert b"response.completed" in rest
            assert up.gate_timed_out is False

            # (b) The failed write marks the ledger unhealthy: new requests fail closed.
            def health() -> tuple[int, dict]:
                status, _, body = server.request("GET", "/health", headers=OPERATOR)
                return status, json.loads(body)

            wait_for(lambda: health()[1]["database"] is False, SETTLE_S, "database: false")
            status, doc = health()
            assert status == 503
            assert doc["ok"] is False
            assert doc["ledger_pending_rows"] == 1
            status, headers, body = server.post_json(STREAM, alice)
            assert status == 503, body
            assert error_code(body) == "usage_ledger_unavailable"
            assert "retry-after" in headers
            assert len(up.requests) == 4  # the refused request never went upstream

            # (c) The server is back: the waiting row lands, once; requests are served again.
            pg_cluster.start()
            wait_for(lambda: requests_of(gw, "alice") == 4, SETTLE_S, "the outage's row")
            wait_for(lambda: health()[0] == 200, SETTLE_S, "health ok again")
            usage = gw.usage("--member", "alice")["total"]
            assert usage["requests"] == 4
            assert usage["total_tokens"] == 4 * TOKENS_PER_REQUEST
            assert usage["errors"] == 0

            status, _, body = server.post_json(STREAM, alice)
            assert status == 200, body
            wait_for(lambda: requests_of(gw, "alice") == 5, SETTLE_S, "the row after the outage")
    finally:
        try:
            pg_cluster.start()
        finally:
            gw.stop()


def test_realtime_sockets_are_counted_in_the_ledger(tmp_path: Path, pg_cluster: PgCluster) -> None:
    """A Realtime socket (the openai SDK's client) on PostgreSQL: its open ``ws_connections``
    row is there while it is open, its closed row replaces it, its turn is a usage row."""
    import asyncio

    import openai

    gw = fresh_gateway(tmp_path, pg_cluster)
    gw.admin("add-member", "rita")
    key = gw.add_key("rita")

    def rita() -> dict:
        members = gw.usage("--member", "rita")["members"]
        return members[0] if members else {}

    try:
        with FakeUpstream() as up:
            server = gw.serve(up.url, "--websockets")
            client = openai.AsyncOpenAI(api_key=key, base_url=f"http://127.0.0.1:{server.port}/v1")

            async def session() -> list:
                events = []
                async with client.realtime.connect(model="gpt-realtime") as conn:
                    events.append(await asyncio.wait_for(conn.recv(), 30))
                    loop = asyncio.get_running_loop()
                    await loop.run_in_executor(
                        None,
                        wait_for,
                        lambda: rita().get("ws_open") == 1,
                        SETTLE_S,
                        "the open row",
                    )
                    await conn.response.create()
                    while events[-1].type != "response.done":
                        events.append(await asyncio.wait_for(conn.recv(), 30))
                return events

            events = asyncio.run(session())
            assert events[-1].response.usage.total_tokens == TOKENS_PER_REQUEST
            wait_for(lambda: rita().get("ws_open") == 0, SETTLE_S, "the closed row")
            summary = rita()
            assert summary["ws_connections"] == 1 and summary["requests"] == 1
            assert summary["ws_client_messages"] == 1 and summary["ws_upstream_messages"] == 4
            assert summary["total_tokens"] == TOKENS_PER_REQUEST
    finally:
        gw.stop()


def test_a_0003_ledger_upgrades_to_0004_in_place_on_postgresql(
    tmp_path: Path, pg_cluster: PgCluster
) -> None:
    """Revision 0004 (``usage.warmup``, ``refusals``) on a PostgreSQL ledger with rows in it,
    as on SQLite (tests/test_gateway_units.py)."""
    from tests.test_gateway_units import ROWS_0003, check_upgraded_0003, upgraded_from

    name = f"gw_{uuid.uuid4().hex[:8]}"
    pg_cluster.create_database(name)
    db = upgraded_from(tmp_path, pg_cluster.url(name), "0003", ROWS_0003)
    try:
        check_upgraded_0003(db)
    finally:
        db.dispose()
