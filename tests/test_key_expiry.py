"""Member keys that expire (issue 32): refused from their expiry on, with their own message,
judged with the clock of each request (not the directory refresh), over HTTP and WebSocket,
and what the real Codex CLI shows."""

from __future__ import annotations

import asyncio
import json
import re
import time
from typing import Any

import pytest
from mitmproxy.test import taddons, tflow

from addons.common import ALLOWED, REFUSED
from addons.gateway_mode import members
from addons.gateway_mode.auth import MemberAuth
from addons.gateway_mode.core import MEMBER, GatewayCore
from tests.conftest import wait_for
from tests.gateway_harness import OPERATOR, bearer, member_codex_home, run_member_codex

MODEL = {"model": "gpt-5.5"}


class Clock:
    """``time.time`` under test control (epoch seconds)."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch) -> None:
        self.now = time.time()
        monkeypatch.setattr(time, "time", lambda: self.now)

    @property
    def ms(self) -> int:
        return int(self.now * 1000)


def entry(key: str, expires_ms: int | None) -> dict[str, Any]:
    return {
        "key_id": "mk_1",
        "key_hash": members.key_hash(key),
        "member_id": 1,
        "member": "ci",
        "expires_ms": expires_ms,
        "max_concurrent": 0,
    }


def authenticate(addon: MemberAuth, key: str) -> Any:
    flow = tflow.tflow()
    flow.metadata[ALLOWED] = True
    flow.request.headers["authorization"] = f"Bearer {key}"
    asyncio.run(addon.requestheaders(flow))
    assert "authorization" not in flow.request.headers
    return flow


def test_a_key_is_refused_from_its_expiry_on_without_a_directory_refresh(monkeypatch) -> None:
    clock = Clock(monkeypatch)
    core = GatewayCore()
    key = members.new_member_key()
    core.directory.load([entry(key, clock.ms + 60_000)])  # read once: expires in a minute
    addon = MemberAuth(core)
    with taddons.context(addon):
        flow = authenticate(addon, key)
        assert flow.response is None and flow.metadata[MEMBER]["key_id"] == "mk_1"
        assert core.directory.by_key_id("mk_1") is not None
        clock.now += 60  # its expiry: no refresh since
        flow = authenticate(addon, key)
    assert flow.response is not None and flow.response.status_code == 401
    error = json.loads(flow.response.content)["error"]
    assert error["code"] == "expired_member_key"
    assert re.fullmatch(
        r"member key expired on \d{4}-\d\d-\d\d \d\d:\d\d UTC; ask the gateway's admin for a "
        r"new key",
        error["message"],
    )
    assert MEMBER not in flow.metadata and flow.metadata[REFUSED] == "member-auth"
    assert key not in flow.response.text  # type: ignore[operator]
    # Every later check of the same key id sees it gone, with the reason.
    assert core.directory.by_key_id("mk_1") is None
    assert core.directory.refusal("mk_1")[0] == "expired_member_key"
    core.directory.load([])
    assert core.directory.refusal("mk_1") == ("invalid_member_key", "unknown or revoked member key")


def test_an_open_socket_is_closed_when_its_key_expires(monkeypatch) -> None:
    from tests.test_gateway_ws import _turns, _ws_flow

    clock = Clock(monkeypatch)
    core, turns, _ = _turns()
    core.directory.load([entry(members.new_member_key(), clock.ms + 5_000)])
    closed: list[tuple[str, str]] = []
    turns._close = lambda socket, code, text: closed.append((code, text))  # type: ignore[method-assign]
    with taddons.context(turns):
        flow = _ws_flow()
        flow.metadata[MEMBER]["key_id"] = "mk_1"
        turns.websocket_start(flow)
        turns._close_revoked()
        assert closed == []
        clock.now += 5
        turns._close_revoked()
    ((code, text),) = closed
    assert code == "expired_member_key" and text.startswith("member key expired on ")


# -- end to end: the real gateway, plain HTTP and the real Codex CLI --------------------------


def set_expiry(gateway, key_id: str, in_ms: int) -> None:
    """Move a key's expiry to ``in_ms`` from now in the database (``add-key`` refuses a past
    expiry, and a short one could pass before a loaded machine has started the gateway)."""
    import sqlalchemy as sa

    from addons.gateway_mode.database import Database

    db = Database(gateway.database)
    with db.engine.begin() as conn:
        conn.execute(
            sa.text("UPDATE member_keys SET expires_ms = :ms WHERE id = :id"),
            {"ms": int(time.time() * 1000) + in_ms, "id": key_id},
        )
    db.dispose()


def key_id_of(gateway, member: str) -> str:
    return gateway.admin("list-keys", member).stdout.splitlines()[-1].split()[0]


@pytest.mark.e2e
def test_a_key_that_expires_mid_session_is_refused_from_then_on(gateway, upstream) -> None:
    gateway.admin("add-member", "ci")
    key = gateway.admin("add-key", "ci", "--expires", "1h").stdout.strip().splitlines()[-1]
    server = gateway.serve(upstream.url)
    status, _, body = server.post_json(MODEL, bearer(key))
    assert status == 200, body
    set_expiry(gateway, key_id_of(gateway, "ci"), 2_000)  # now it expires in 2 s
    wait_for(lambda: server.post_json(MODEL, bearer(key))[0] != 200, 30, "the key's expiry")
    status, _, body = server.post_json(MODEL, bearer(key))
    assert status == 400  # Codex's headers: a permanent refusal ends its turn
    error = json.loads(body)["error"]
    assert error["code"] == "expired_member_key"
    assert error["message"].startswith("member key expired on ")
    plain = {"authorization": f"Bearer {key}"}  # another client keeps the 401
    assert server.post_json(MODEL, plain)[0] == 401
    metrics = server.request("GET", "/metrics", headers=OPERATOR)[2].decode()
    assert re.search(r'codex_gateway_refused_total\{reason="expired_member_key"\} [1-9]', metrics)
    wait_for(lambda: gateway.usage()["total"]["refusals"]["auth"] >= 2, 15, "the refusal rows")
    assert "expired" in gateway.admin("list-keys", "ci").stdout


@pytest.mark.e2e
@pytest.mark.codex
@pytest.mark.parametrize("websockets", [False, True], ids=["http", "websocket"])
def test_codex_shows_an_expired_key_and_stops_at_once(
    gateway, upstream, codex, tmp_path, websockets
) -> None:
    gateway.admin("add-member", "ci")
    key = gateway.admin("add-key", "ci", "--expires", "7d").stdout.strip().splitlines()[-1]
    set_expiry(gateway, key_id_of(gateway, "ci"), -60_000)
    server = gateway.serve(upstream.url)
    home, work, _ = member_codex_home(tmp_path, server, websockets=websockets)
    code, out, _ = run_member_codex(codex, home, work, key, timeout=60)  # prints its time
    assert code != 0
    assert "expired_member_key" in out and "member key expired on " in out
    assert "Reconnecting" not in out
    text = server.request("GET", "/metrics", headers=OPERATOR)[2].decode()
    found = dict(
        re.findall(r'^codex_gateway_requests_total\{route="/v1/responses",status="(\d+)"\} (\S+)$',
                   text, re.M)
    )  # fmt: skip
    # Stopped at once: one POST, no retry (and over WebSocket one refused upgrade first, 426:
    # Codex then posts the turn over HTTP at once).
    assert {k: float(v) for k, v in found.items()} == (
        {"426": 1.0, "400": 1.0} if websockets else {"400": 1.0}
    )
    assert upstream.requests == []


@pytest.fixture
def quota_gate(tmp_path):
    """The quota check on a migrated SQLite file (tests/test_gateway_quota.py's setup)."""
    from addons.gateway_mode.database import Database
    from addons.gateway_mode.ledger import UsageLedger
    from addons.gateway_mode.quota import QuotaGate

    db = Database(f"sqlite:///{tmp_path / 'gateway.db'}")
    db.migrate()
    core = GatewayCore()
    core.db, core.ledger = db, UsageLedger(db)
    gate = QuotaGate(core)
    with taddons.context(gate):
        yield core, gate
    core.executor.shutdown()
    db.dispose()


async def test_a_key_expired_since_requestheaders_is_refused_by_the_quota_check(
    quota_gate, monkeypatch
) -> None:
    """Passed member auth, then expired before the quota check: refused there, saying so."""
    from tests.test_gateway_quota import add_member, member_flow

    core, gate = quota_gate
    clock = Clock(monkeypatch)
    member = add_member(core)
    core.directory.load(
        [{**row, "expires_ms": clock.ms + 1} for row in core.db.directory()]  # type: ignore[union-attr]
    )
    clock.now += 0.001
    flow = member_flow(member)
    await gate.request(flow)
    assert flow.response is not None and flow.response.status_code == 401
    error = json.loads(flow.response.content)["error"]  # type: ignore[arg-type]
    assert error["code"] == "expired_member_key" and "expired on" in error["message"]
    assert ALLOWED not in flow.metadata and flow.metadata[REFUSED] == "member-auth"
