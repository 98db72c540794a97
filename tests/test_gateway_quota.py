"""``QuotaGate`` (``addons/gateway_mode/quota.py``) with taddons/tflow against a real SQLite
database: each check (the usage ledger down, a key revoked since ``requestheaders``, an unpriced
model under a credit quota, a window's limit reached, every concurrency slot taken) with the
reply it gives, and the order in which the checks run."""

from __future__ import annotations

import asyncio
import json
import math
import time
import uuid
from typing import Any

import pytest
from mitmproxy import http
from mitmproxy.test import taddons, tflow
from sqlalchemy.exc import OperationalError

from addons.common import ALLOWED, REFUSED, WEBSOCKET
from addons.gateway_mode.config import DEFAULT_GATEWAY_CONFIG, load_gateway_config
from addons.gateway_mode.core import MEMBER, GatewayCore
from addons.gateway_mode.database import Database
from addons.gateway_mode.ledger import UsageLedger
from addons.gateway_mode.quota import (
    CODEX_LIMITS,
    CONCURRENCY_RETRY_S,
    UNAVAILABLE_RETRY_S,
    QuotaGate,
)
from addons.gateway_mode.windows import FIVE_HOURS_MS
from tests.conftest import wait_for

PRICED = "gpt-5.5"  # in the shipped rate card
UNPRICED = "gpt-not-on-the-card"


@pytest.fixture
def setup(tmp_path):
    """A gateway core on a migrated SQLite file, the shipped rate card, and a usage ledger
    that is never started (its rows stay pending, as between two flushes)."""
    db = Database(f"sqlite:///{tmp_path / 'gateway.db'}")
    db.migrate()
    core = GatewayCore()
    core.db = db
    core.ledger = UsageLedger(db)
    core.card = load_gateway_config(DEFAULT_GATEWAY_CONFIG).rate_card()
    gate = QuotaGate(core)
    with taddons.context(gate):
        yield core, gate
    core.executor.shutdown()
    db.dispose()


def add_member(core: GatewayCore, name: str = "ana", **settings: int) -> dict[str, Any]:
    """A member with one key, in the directory; the ``MEMBER`` mark MemberAuth would set."""
    assert core.db is not None
    member_id = core.db.add_member(name, **settings)
    key_id, _key = core.db.add_key(name)
    core.refresh_directory()
    return {"member": name, "member_id": member_id, "key_id": key_id}


def member_flow(member: dict[str, Any], model: str = PRICED) -> http.HTTPFlow:
    """A member's ``POST /v1/responses`` as the allowlist and MemberAuth leave it."""
    flow = tflow.tflow()
    flow.request.method = "POST"
    flow.request.path = "/v1/responses"
    flow.request.headers["content-type"] = "application/json"
    flow.request.content = json.dumps({"model": model, "stream": True}).encode()
    flow.metadata[ALLOWED] = True
    flow.metadata[MEMBER] = dict(member)
    return flow


def usage_row(member: dict[str, Any], ts_ms: int, tokens: int = 0, credits_micro: int = 0):
    """A finished ledger row of ``member`` at ``ts_ms``."""
    return {
        "row_id": str(uuid.uuid4()),
        "ts_ms": ts_ms,
        "member_id": member["member_id"],
        "key_id": member["key_id"],
        "upstream_key": "alpha",
        "model": PRICED,
        "route": "/v1/responses",
        "status": 200,
        "input_tokens": tokens,
        "cached_tokens": 0,
        "cache_write_tokens": 0,
        "output_tokens": 0,
        "reasoning_tokens": 0,
        "total_tokens": tokens,
        "credits_micro": credits_micro,
        "rate": PRICED,
        "service_tier": None,
        "duration_ms": 100,
        "ttfb_ms": 10,
        "events": 0,
        "attempts": 1,
        "error": None,
        "instance": "test",
    }


def record_usage(
    core: GatewayCore, member: dict[str, Any], ago_ms: int, tokens: int = 0, credits_micro: int = 0
) -> None:
    """A finished row of ``member``'s, ``ago_ms`` before now, written to the database."""
    assert core.db is not None
    now = int(time.time() * 1000)
    core.db.insert_usage([usage_row(member, now - ago_ms, tokens, credits_micro)])


def error_of(flow: http.HTTPFlow) -> dict[str, Any]:
    assert flow.response is not None
    assert flow.response.headers["content-type"] == "application/json"
    return json.loads(flow.response.content or b"")["error"]


def refused(core: GatewayCore, reason: str) -> float | None:
    return core.metrics.registry.get_sample_value("codex_gateway_refused_total", {"reason": reason})


def leases(core: GatewayCore, member: dict[str, Any]) -> int:
    """Concurrency slots of ``member`` held now (probed with a lease that is given back)."""
    assert core.db is not None
    lease, active = core.db.acquire_lease(member["member_id"], 1_000, "probe", 60_000)
    assert lease is not None
    core.db.release_leases([lease])
    return active - 1


async def test_a_member_without_limits_passes_without_a_slot_or_rate_limit_headers(setup):
    core, gate = setup
    member = add_member(core)
    flow = member_flow(member, UNPRICED)  # no credit quota: an unpriced model is fine
    await gate.request(flow)
    assert flow.response is None and flow.metadata[ALLOWED] is True
    assert CODEX_LIMITS not in flow.metadata and core.leases == {}


async def test_under_its_limits_a_member_passes_takes_a_slot_and_gets_its_windows(setup):
    core, gate = setup
    member = add_member(core, five_hour_quota=1000, max_concurrent=2)
    record_usage(core, member, 3_600_000, tokens=250)
    flow = member_flow(member)
    await gate.request(flow)
    assert flow.response is None and flow.metadata[ALLOWED] is True
    assert flow.metadata[CODEX_LIMITS]["x-codex-primary-used-percent"] == "25"
    assert "x-codex-secondary-used-percent" not in flow.metadata[CODEX_LIMITS]
    assert list(core.leases) == [flow.id] and leases(core, member) == 1


async def test_the_ledger_down_is_a_503_that_fails_closed(setup):
    core, gate = setup
    member = add_member(core)  # no limits: the check needs no database, and still refuses
    core.ledger.healthy = False  # type: ignore[union-attr]
    flow = member_flow(member)
    await gate.request(flow)
    assert flow.response is not None and flow.response.status_code == 503
    assert flow.response.headers["retry-after"] == str(UNAVAILABLE_RETRY_S)
    assert error_of(flow)["code"] == "usage_ledger_unavailable"
    assert ALLOWED not in flow.metadata and flow.metadata[REFUSED] == "database-unavailable"
    assert refused(core, "database_unavailable") == 1


async def test_a_database_error_in_the_check_is_a_503_and_marks_the_ledger_unhealthy(
    setup, monkeypatch, caplog
):
    core, gate = setup
    member = add_member(core, weekly_quota=1000)

    def broken(*_args: Any) -> Any:
        raise OperationalError("SELECT", {}, Exception("disk I/O error"))

    monkeypatch.setattr(core.db, "window_usage", broken)
    flow = member_flow(member)
    await gate.request(flow)
    assert flow.response is not None and flow.response.status_code == 503
    assert error_of(flow)["code"] == "usage_ledger_unavailable"
    assert core.ledger.healthy is False  # type: ignore[union-attr]
    assert "quota check failed: database error (OperationalError)" in caplog.text
    assert core.leases == {}


async def test_a_key_revoked_since_requestheaders_is_a_401(setup):
    core, gate = setup
    member = add_member(core)
    core.db.revoke_key(member["key_id"])  # type: ignore[union-attr]
    core.refresh_directory()
    flow = member_flow(member)
    await gate.request(flow)
    assert flow.response is not None and flow.response.status_code == 401
    assert error_of(flow)["code"] == "invalid_member_key"
    assert ALLOWED not in flow.metadata and flow.metadata[REFUSED] == "member-auth"


@pytest.mark.parametrize(
    "settings, model, refused_403",
    [
        ({"weekly_credits_micro": 5_000_000}, UNPRICED, True),
        ({"five_hour_credits_micro": 5_000_000}, UNPRICED, True),
        ({"weekly_credits_micro": 5_000_000}, PRICED, False),
        ({"weekly_quota": 5_000}, UNPRICED, False),  # a token quota needs no price
    ],
)
async def test_an_unpriced_model_under_a_credit_quota_is_a_403_naming_it(
    setup, settings, model, refused_403
):
    core, gate = setup
    member = add_member(core, **settings)
    flow = member_flow(member, model)
    await gate.request(flow)
    if not refused_403:
        assert flow.response is None
        return
    assert flow.response is not None and flow.response.status_code == 403
    error = error_of(flow)
    assert error["code"] == "unpriced_model" and error["model"] == UNPRICED
    assert repr(UNPRICED) in error["message"] and f"credits.rates.{UNPRICED}" in error["message"]
    assert "ask the gateway's operator" in error["message"]  # the member reads it in Codex
    assert flow.metadata[REFUSED] == "unpriced-model"
    assert refused(core, "unpriced_model") == 1
    assert (
        core.metrics.registry.get_sample_value(
            "codex_gateway_unpriced_requests_total", {"model": UNPRICED}
        )
        == 1
    )


@pytest.mark.parametrize("where", ["database", "pending"])
async def test_a_reached_token_quota_is_a_429_codex_ends_the_turn_on(setup, where):
    core, gate = setup
    member = add_member(core, five_hour_quota=100, max_concurrent=5)
    now = int(time.time() * 1000)
    first, second = now - 2 * 3_600_000, now - 3_600_000
    rows = [usage_row(member, first, tokens=80), usage_row(member, second, tokens=70)]
    if where == "database":
        core.db.insert_usage(rows)  # type: ignore[union-attr]
    else:  # this instance's rows not written yet count at once
        for row in rows:
            core.ledger.add(row)  # type: ignore[union-attr]
    flow = member_flow(member)
    await gate.request(flow)
    assert flow.response is not None and flow.response.status_code == 429
    error = error_of(flow)
    # Codex's own shape (CODEX.md: it stops at once with "You've hit your usage limit").
    assert error["type"] == "usage_limit_reached" and error["code"] == "quota_exceeded"
    # 150 of 100: under again once the older row (80) leaves the window.
    resets_at = math.ceil((first + FIVE_HOURS_MS) / 1000)
    assert error["resets_at"] == resets_at
    retry = int(flow.response.headers["retry-after"])
    assert 0 < retry <= resets_at - now // 1000 + 1
    assert (error["limit"], error["kind"], error["used"], error["allowed"]) == (
        "five_hour_quota",
        "tokens",
        150,
        100,
    )
    assert flow.metadata[REFUSED] == "quota" and refused(core, "quota") == 1
    assert flow.metadata[CODEX_LIMITS]["x-codex-primary-used-percent"] == "150"
    assert flow.metadata[CODEX_LIMITS]["x-codex-primary-reset-at"] == str(resets_at)
    assert core.leases == {} and leases(core, member) == 0  # refused before the slot


async def test_a_reached_credit_quota_names_credits(setup):
    core, gate = setup
    member = add_member(core, weekly_credits_micro=2_000_000)
    record_usage(core, member, 60_000, credits_micro=2_500_000)
    flow = member_flow(member)
    await gate.request(flow)
    assert flow.response is not None and flow.response.status_code == 429
    error = error_of(flow)
    assert (error["limit"], error["kind"], error["used"], error["allowed"]) == (
        "weekly_credits",
        "credits",
        2.5,
        2.0,
    )
    assert "used 2.5 credits of its weekly credit quota of 2 credits" in error["message"]
    assert error["message"].endswith("or ask the gateway's operator to raise it")
    assert flow.metadata[CODEX_LIMITS]["x-codex-credits-balance"] == "0"


async def test_every_slot_taken_is_a_429_concurrency_limit(setup):
    core, gate = setup
    member = add_member(core, max_concurrent=2)
    flows = [member_flow(member) for _ in range(3)]
    for flow in flows:
        await gate.request(flow)
    assert [f.response is None for f in flows] == [True, True, False]
    assert set(core.leases) == {flows[0].id, flows[1].id} and leases(core, member) == 2
    last = flows[2]
    assert last.response is not None and last.response.status_code == 429
    assert last.response.headers["retry-after"] == str(CONCURRENCY_RETRY_S)
    error = error_of(last)
    assert error["code"] == "concurrency_limit" and error["type"] == "codex_gateway"
    assert (error["limit"], error["used"], error["allowed"]) == ("max_concurrent", 2, 2)
    assert last.metadata[REFUSED] == "concurrency" and refused(core, "concurrency") == 1


async def test_a_websocket_upgrade_gets_its_windows_but_no_check_and_no_slot(setup):
    core, gate = setup
    member = add_member(core, five_hour_quota=100, max_concurrent=1)
    record_usage(core, member, 60_000, tokens=500)
    flow = member_flow(member)
    flow.metadata[WEBSOCKET] = True
    await gate.request(flow)
    assert flow.response is None  # the socket's addon checks each response.create
    assert flow.metadata[CODEX_LIMITS]["x-codex-primary-used-percent"] == "500"
    assert core.leases == {}


#: Each check in the order QuotaGate runs them, with the refusal it gives.
ORDER = [
    ("ledger_down", "database-unavailable", 503),
    ("revoked", "member-auth", 401),
    ("unpriced", "unpriced-model", 403),
    ("over_quota", "quota", 429),
    ("slots_full", "concurrency", 429),
]


@pytest.mark.parametrize("first", range(len(ORDER) + 1))
async def test_the_checks_run_in_order(setup, first):
    """Every check from ``first`` on would refuse: the earliest of them answers."""
    core, gate = setup
    failing = {name for name, _, _ in ORDER[first:]}
    member = add_member(core, five_hour_quota=100, weekly_credits_micro=5_000_000, max_concurrent=1)
    assert core.db is not None and core.ledger is not None
    if "over_quota" in failing:
        record_usage(core, member, 60_000, tokens=100)
    if "slots_full" in failing:
        other, _ = core.db.acquire_lease(member["member_id"], 1, "another-instance", 60_000)
        assert other is not None
    if "revoked" in failing:
        core.db.revoke_key(member["key_id"])
        core.refresh_directory()
    if "ledger_down" in failing:
        core.ledger.healthy = False
    flow = member_flow(member, UNPRICED if "unpriced" in failing else PRICED)
    await gate.request(flow)
    if first == len(ORDER):
        assert flow.response is None and list(core.leases) == [flow.id]
        return
    _, reason, status = ORDER[first]
    assert flow.response is not None and flow.response.status_code == status
    assert flow.metadata[REFUSED] == reason
    assert core.leases == {}


async def test_a_slot_given_back_is_free_for_the_next_request_at_once(setup):
    """Codex sends its next socket turn as soon as the last one's final event arrives: the
    release of that turn's slot (on a worker thread) must be written before the next acquire
    reads the slots, even when the release is the slower of the two."""
    core, _gate = setup
    member = add_member(core, max_concurrent=1)
    lease, _ = await core.acquire_lease(member["member_id"], 1)
    assert lease is not None
    core.leases["turn-1"] = lease
    assert core.db is not None
    release = core.db.release_leases

    def slow_release(leases):
        time.sleep(0.3)  # a busy database
        release(leases)

    core.db.release_leases = slow_release  # type: ignore[method-assign]
    assert core.ledger is not None
    core.ledger.start()  # the release waits for the ledger's next write, as in the gateway
    try:
        core.release_lease("turn-1")
        assert "turn-1" not in core.leases
        lease, active = await core.acquire_lease(member["member_id"], 1)
        assert lease is not None, f"refused with {active} active: the release had not landed"
    finally:
        core.ledger.stop()


async def test_a_member_with_a_quota_and_no_max_concurrent_gets_the_default_slots(setup):
    """``quota_max_concurrent`` (4 by default): the quota's overshoot is bounded under the
    defaults; a member without a quota keeps no slot."""
    core, gate = setup
    member = add_member(core, five_hour_quota=1000)
    free = add_member(core, "ben")
    core.quota_concurrency = 2
    core.refresh_directory()
    for _ in range(2):
        flow = member_flow(member)
        await gate.request(flow)
        assert flow.response is None
    third = member_flow(member)
    await gate.request(third)
    error = error_of(third)
    assert error["code"] == "concurrency_limit" and error["allowed"] == 2
    assert "quota_max_concurrent" in error["message"]
    flow = member_flow(free)
    await gate.request(flow)
    assert flow.response is None and flow.id not in core.leases


async def test_a_slot_is_free_again_only_once_its_row_is_written(setup):
    """Accounting gives a slot back after its row (``release_lease(after_rows=True)``): an
    admission that finds the slot free also finds the usage of the request that held it."""
    core, gate = setup
    member = add_member(core, five_hour_quota=100, max_concurrent=1)
    first = member_flow(member)
    await gate.request(first)
    assert first.response is None
    assert core.ledger is not None and core.db is not None
    core.ledger.add(usage_row(member, int(time.time() * 1000), tokens=150))
    core.release_lease(first.id)  # as accounting does, after queueing the row
    await asyncio.sleep(0)  # the barrier is set at the end of the loop's step
    # The ledger's thread is not running: the row is not written, the slot not free.
    assert leases(core, member) == 1
    core.ledger.flush()
    core.ledger._fire_barriers()
    wait_for(lambda: leases(core, member) == 0, 10, "the slot given back")
    second = member_flow(member)
    await gate.request(second)
    assert error_of(second)["code"] == "quota_exceeded"  # the usage was found with the slot
