"""The gateway's WebSocket transport (``serve --websockets``) with the real Codex CLI
(``supports_websockets = true``) against a WebSocket-capable fake upstream, plus units."""

from __future__ import annotations

import asyncio
import io
import json
import subprocess
import sys
import time
from pathlib import Path

import pytest
from mitmproxy import http
from mitmproxy import io as mitm_io
from mitmproxy.addons.dumper import Dumper
from mitmproxy.test import taddons, tflow

from addons.common import ALLOWED, WEBSOCKET
from addons.compare import load_run
from addons.gateway_mode.quota import usage_limit_error
from addons.gateway_mode.websocket import WebSocketRoute, error_event, is_responses_upgrade
from addons.gateway_mode.windows import Limit, LimitUsage
from addons.recorder import read_ledger
from addons.replay import read_dump_pairs
from addons.websocket_refusal import WebSocketRefusal
from tests.conftest import ROOT, wait_for
from tests.gateway_harness import OPERATOR, UPSTREAM_KEYS, member_env
from tests.responses_events import tool_outputs, tool_then_answer
from tests.test_record_replay import start_replay

MODEL = "gpt-5.5"  # in Codex 0.171's catalog and in the rate card
UPGRADE = {
    "connection": "Upgrade",
    "upgrade": "websocket",
    "sec-websocket-version": "13",
    "sec-websocket-key": "dGhlIHNhbXBsZSBub25jZQ==",
}


def upgrade_flow(path: bytes = b"/v1/responses", method: bytes = b"GET") -> http.HTTPFlow:
    flow = tflow.tflow()
    flow.request.method = method.decode()
    flow.request.data.path = path
    flow.request.headers.update(UPGRADE)
    return flow


# -- units ----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "path, method, expected",
    [
        (b"/v1/responses", b"GET", True),
        (b"/v1/responses?model=x", b"GET", False),
        (b"/v1/responses/", b"GET", False),
        (b"/v1/realtime", b"GET", False),
        (b"/v1/responses", b"POST", False),
    ],
)
def test_only_the_exact_responses_upgrade_is_claimed(path, method, expected):
    assert is_responses_upgrade(upgrade_flow(path, method).request) is expected
    plain = tflow.tflow()
    plain.request.method, plain.request.data.path = "GET", path
    assert not is_responses_upgrade(plain.request)


def test_the_route_claims_upgrades_unless_turned_off_and_the_426_stays_then():
    route, refusal = WebSocketRoute(), WebSocketRefusal()
    with taddons.context(route, refusal) as tctx:
        assert tctx.options.codex_gateway_websockets is True and route.enabled  # the default
        tctx.configure(route, codex_gateway_websockets=False)  # serve --no-websockets
        flow = upgrade_flow()
        route.requestheaders(flow)
        refusal.requestheaders(flow)
        assert WEBSOCKET not in flow.metadata and flow.response.status_code == 426
        tctx.configure(route, codex_gateway_websockets=True)
        flow = upgrade_flow()
        route.requestheaders(flow)
        refusal.requestheaders(flow)
        assert flow.metadata[WEBSOCKET] is True and flow.response is None
        assert ALLOWED not in flow.metadata  # the allowlist marks it; member auth follows


def test_the_quota_error_event_is_codexs_usage_limit_shape():
    limit = Limit("five_hour_tokens", "tokens", 5 * 3_600_000, 100)
    now = 1_800_000_000_000
    retry, message, fields = usage_limit_error("alice", [LimitUsage(limit, 118, now + 60_000)], now)
    event = json.loads(error_event(429, "usage_limit_reached", "quota_exceeded", message, **fields))
    assert event["type"] == "error" and event["status"] == 429
    assert event["error"]["type"] == "usage_limit_reached"
    assert event["error"]["resets_at"] == 1_800_000_060 and retry == 60
    assert event["error"]["used"] == 118 and "alice" in event["error"]["message"]
    assert usage_limit_error("alice", [LimitUsage(limit, 99, None)], now) is None


# -- the real Codex CLI through the gateway -------------------------------------------------


def codex_home(tmp_path: Path, server, name: str = "home") -> tuple[Path, Path]:
    """A CODEX_HOME with what `./run.sh codex-config --gateway --websockets` prints."""
    home, work = tmp_path / name, tmp_path / "work"
    home.mkdir()
    work.mkdir(exist_ok=True)
    config = subprocess.run(
        [
            sys.executable,
            "-m",
            "addons.codex_config",
            "--server-info",
            str(server.info_path),
            "--model",
            MODEL,
            "--gateway",
            "--websockets",
            "--toml-only",
        ],
        capture_output=True,
        text=True,
        timeout=60,
        check=True,
        cwd=ROOT,
    ).stdout
    assert "supports_websockets = true" in config
    (home / "config.toml").write_text(config)
    return home, work


def run_codex(codex: str, home: Path, work: Path, key: str, prompt: str = "Say hello"):
    started = time.monotonic()
    result = subprocess.run(
        [codex, "exec", "--skip-git-repo-check", "--json", prompt],
        stdin=subprocess.DEVNULL,
        capture_output=True,
        timeout=120,
        cwd=work,
        env=member_env(home, key),
    )
    out = result.stdout.decode(errors="replace") + result.stderr.decode(errors="replace")
    print(
        f"codex exit {result.returncode} after {time.monotonic() - started:.1f} s:\n{out[-2000:]}"
    )
    return result.returncode, out


def rows(gateway) -> list[dict]:
    import sqlite3

    with sqlite3.connect(gateway.database.removeprefix("sqlite:///")) as db:
        db.row_factory = sqlite3.Row
        return [dict(r) for r in db.execute("SELECT * FROM usage ORDER BY ts_ms")]


def connection_rows(gateway) -> list[dict]:
    import sqlite3

    with sqlite3.connect(gateway.database.removeprefix("sqlite:///")) as db:
        db.row_factory = sqlite3.Row
        return [dict(r) for r in db.execute("SELECT * FROM ws_connections ORDER BY opened_ms")]


def summary_warmups(gateway) -> int:
    """``warmups`` of ``gateway usage --json``: Codex's warm-ups, counted apart from requests."""
    return gateway.usage()["total"]["warmups"]


def creates(upstream) -> list[dict]:
    return [m for m in upstream.ws_messages if m.get("type") == "response.create"]


@pytest.mark.e2e
@pytest.mark.codex
def test_codex_turns_use_the_socket_with_a_tool_call_metered_and_no_key_leaks(
    gateway, upstream, codex, tmp_path
):
    gateway.admin("add-member", "alice", "--five-hour-quota", "100000")
    key = gateway.add_key("alice")
    record = tmp_path / "rec"
    server = gateway.serve(upstream.url, "--websockets", "--record", str(record))

    upstream.responder = tool_then_answer("echo ws-tool-ran", "All done over the socket.", MODEL)
    home, work = codex_home(tmp_path, server)
    code, out = run_codex(codex, home, work, key, "Run echo ws-tool-ran")
    assert code == 0, out
    assert "All done over the socket." in out
    assert "Falling back" not in out and "Reconnecting" not in out
    # Every turn went over the socket: the upstream saw upgrades, never a POST.
    assert upstream.requests and {r.method for r in upstream.requests} == {"GET"}
    sent = creates(upstream)
    assert sent[0].get("generate") is False  # Codex's warm-up
    outputs = [item for m in sent for item in tool_outputs(m)]
    assert outputs and outputs[0]["call_id"] == "call_0"  # the tool ran, its output went back
    for request in upstream.requests:
        assert request.header_values("authorization")[0] in {
            f"Bearer {v}" for v in UPSTREAM_KEYS.values()
        }
        assert request.header_values("host") == [f"127.0.0.1:{upstream.port}"]
    # One ledger row per response.create answered (warm-up, tool call, final answer).
    wait_for(lambda: len(rows(gateway)) == len(sent), 10, "ledger rows")
    ledger = rows(gateway)
    assert {r["route"] for r in ledger} == {"ws:/v1/responses"}
    assert all(r["model"] == MODEL and r["status"] == 200 and r["error"] is None for r in ledger)
    assert sum(r["total_tokens"] for r in ledger) == 59 * (len(sent) - 1)  # warm-up: no usage
    metrics = server.request("GET", "/metrics", headers=OPERATOR)[2].decode()
    assert 'codex_gateway_websocket_connections_total{member="alice"}' in metrics
    assert 'codex_gateway_websocket_messages_total{member="alice",sender="client"}' in metrics
    assert server.shutdown() == 0
    # Each socket is a ws_connections row, closed, counting the messages each way.
    sockets = connection_rows(gateway)
    assert sockets and all(s["closed_ms"] and s["route"] == "ws:/v1/responses" for s in sockets)
    assert sum(s["client_messages"] for s in sockets) == len(sent)
    warmups = [m for m in sent if m.get("generate") is False]
    assert sum(s["turns"] for s in sockets) == len(sent) - len(warmups)  # not the warm-ups
    assert summary_warmups(gateway) == len(warmups) >= 1
    assert sum(s["upstream_messages"] for s in sockets) > len(sent)
    summary = gateway.usage()["members"][0]
    assert summary["ws_connections"] == len(sockets)
    assert summary["ws_client_messages"] == len(sent)
    # Each socket turn is a dump pair and a ledger line of its own, read like an HTTP turn's.
    turns = [p for p in read_dump_pairs(record) if p.request.get("transport") == "websocket"]
    assert [p.request["body"]["type"] for p in turns] == ["response.create"] * len(sent)
    assert all(p.request["route"] == "ws:/v1/responses" for p in turns)
    assert all(p.response["status"] == 200 for p in turns)
    assert all("event: response.completed" in p.response["body"] for p in turns)
    socket_lines = [r for r in read_ledger(str(record)) if r.transport == "websocket"]
    assert [r.seq for r in socket_lines] == [p.seq for p in turns]
    assert sum((r.usage or {}).get("total", 0) for r in socket_lines) == 59 * (len(sent) - 1)
    assert all(r.completed and r.model == MODEL and r.events > 0 for r in socket_lines)
    assert all(r.first_event_ms is not None for r in socket_lines)
    assert (record / "report.html").read_text().count("WebSocket turn") == len(sent)
    run = load_run(record)  # the upgrade (101) is no turn of its own
    assert len(run.turns) == len(sent) and {t.outcome for t in run.turns} == {"completed"}
    assert [c for t in run.turns for c in t.calls] == [("exec_command", ("cmd",))]
    # Leak scan: the recording (flows with their WebSocket messages, HAR, dumps of the upgrade
    # and of each socket turn, the ledger and report), logs, DB.
    places = {str(p): p.read_bytes() for p in record.rglob("*") if p.is_file()}
    places["stdout"] = server.stdout_path.read_bytes()
    places["stderr"] = server.stderr_path.read_bytes()
    places["database"] = (tmp_path / "gateway.db").read_bytes()
    for name, data in places.items():
        for secret in [*UPSTREAM_KEYS.values(), key]:
            assert secret.encode() not in data, f"a key in {name}"
    with open(record / "flows.mitm", "rb") as f:
        flows = [fl for fl in mitm_io.FlowReader(f).stream() if fl.websocket is not None]
    assert flows, "no WebSocket flow recorded"
    messages = [m.content for fl in flows for m in fl.websocket.messages]
    assert any(b"response.create" in m for m in messages)  # the messages were scanned above
    # A recorded socket keeps every message in its flow (an unrecorded one drops each ended
    # turn's: test_an_unrecorded_socket_holds_only_its_open_turn).
    client_sent = [m for fl in flows for m in fl.websocket.messages if m.from_client]
    assert len(client_sent) == len(sent)
    assert all(fl.request.headers.get("authorization") in (None, "[REDACTED]") for fl in flows)

    # Replay (offline, the strict proxy in front): the socket turns answer Codex over HTTP,
    # the warm-up and the upgrade left out; the tool runs again and the turn ends the same.
    upstream.stop()
    replay, port, log = start_replay(tmp_path, record)
    try:
        replay_home = tmp_path / "replay-home"
        replay_home.mkdir()
        toml = (home / "config.toml").read_text().replace(f":{server.port}/", f":{port}/")
        toml = toml.replace("supports_websockets = true", "supports_websockets = false")
        (replay_home / "config.toml").write_text(toml)
        code, out = run_codex(codex, replay_home, work, "unused", "Run echo ws-tool-ran")
        assert code == 0, out + (tmp_path / "replay.log").read_text()
        assert "All done over the socket." in out and "ws-tool-ran" in out
    finally:
        import http.client

        conn = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
        conn.request("GET", "/shutdown")
        assert conn.getresponse().status == 200
        conn.close()
        assert replay.wait(30) == 0
        log.close()  # type: ignore[attr-defined]


@pytest.mark.e2e
@pytest.mark.codex
def test_a_spent_quota_on_the_socket_ends_the_codex_turn_at_once(
    gateway, upstream, codex, tmp_path
):
    gateway.admin("add-member", "bob", "--five-hour-quota", "100")
    key = gateway.add_key("bob")
    server = gateway.serve(upstream.url, "--websockets")
    home, work = codex_home(tmp_path, server)
    code, out = run_codex(codex, home, work, key)  # 59 tokens: under the quota
    assert code == 0, out
    code, out = run_codex(codex, home, work, key)  # 118 of 100 tokens now
    assert code == 0, out
    wait_for(lambda: sum(r["total_tokens"] for r in rows(gateway)) == 118, 10, "rows")
    before = len(creates(upstream))
    code, out = run_codex(codex, home, work, key)
    assert code != 0
    assert "You've hit your usage limit" in out.replace("\u2019", "'"), out
    assert "Try again at" in out
    assert "Reconnecting" not in out and "Falling back" not in out
    assert len(creates(upstream)) == before  # the refused response.create never went upstream
    assert not [r for r in upstream.requests if r.method == "POST"]


@pytest.mark.e2e
@pytest.mark.codex
def test_codex_records_the_members_windows_from_the_socket(gateway, upstream, codex, tmp_path):
    """Over a socket Codex reads its windows from a ``codex.rate_limits`` event (the 101's
    headers are not read): each admitted turn starts with one."""
    from tests.test_gateway_codex import recorded_rate_limits

    gateway.admin("add-member", "carol", "--five-hour-quota", "1000", "--weekly-credits", "50")
    key = gateway.add_key("carol")
    server = gateway.serve(upstream.url, "--websockets")
    home, work = codex_home(tmp_path, server)
    code, out = run_codex(codex, home, work, key)
    assert code == 0, out
    wait_for(lambda: sum(r["total_tokens"] for r in rows(gateway)) == 59, 10, "the first row")
    code, out = run_codex(codex, home, work, key)  # a second session: 59 tokens counted
    assert code == 0, out
    limits = recorded_rate_limits(home)
    assert limits, "Codex recorded no rate_limits from the socket"
    # Session files are read in no particular order: the second session's snapshot.
    last = max(limits, key=lambda limit: limit["primary"]["used_percent"])
    print(json.dumps(last, indent=1))
    assert last["primary"]["window_minutes"] == 300
    assert last["primary"]["used_percent"] == pytest.approx(5.9)  # 59 of 1000 tokens
    assert time.time() < last["primary"]["resets_at"] <= time.time() + 5 * 3600 + 1
    assert last["secondary"]["window_minutes"] == 10080
    assert last["credits"]["has_credits"] is True
    assert 49 < float(last["credits"]["balance"]) < 50
    # The event is the gateway's own: it never went upstream, and the ledger is unchanged.
    assert not [m for m in upstream.ws_messages if m.get("type") == "codex.rate_limits"]


@pytest.mark.e2e
@pytest.mark.codex
def test_revoking_a_member_key_mid_turn_ends_the_codex_turn_with_the_reason(
    gateway, upstream, codex, tmp_path
):
    import threading

    gateway.admin("add-member", "zed")
    key = gateway.add_key("zed")
    key_id = gateway.admin("list-keys", "zed").stdout.split("\n")[1].split()[0]
    server = gateway.serve(upstream.url, "--websockets")
    home, work = codex_home(tmp_path, server)
    upstream.gate = threading.Event()  # the turn stays open upstream
    proc = subprocess.Popen(
        [codex, "exec", "--skip-git-repo-check", "--json", "Say hello"],
        stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        cwd=work,
        env=member_env(home, key),
    )
    try:
        wait_for(lambda: len(creates(upstream)) >= 2, 60, "Codex's turn upstream")
        gateway.admin("revoke-key", key_id)
        out = proc.communicate(timeout=60)[0].decode(errors="replace")
    finally:
        upstream.gate.set()
        if proc.poll() is None:
            proc.kill()
    print(out[-1500:])
    assert proc.returncode != 0
    assert "invalid_member_key" in out and "member key revoked" in out
    assert "Reconnecting" not in out and upstream.text not in out
    wait_for(lambda: upstream.ws_open == 0, 10, "the upstream side closed too")
    wait_for(lambda: len(rows(gateway)) == 2, 10, "ledger rows")
    warm_up, turn = rows(gateway)
    assert warm_up["error"] is None and "socket closed" in turn["error"]


@pytest.mark.e2e
def test_revoking_a_member_key_closes_its_open_socket(gateway, upstream, tmp_path):
    import asyncio

    import aiohttp

    gateway.admin("add-member", "carol")
    key = gateway.add_key("carol")
    key_id = gateway.admin("list-keys", "carol").stdout.split("\n")[1].split()[0]
    server = gateway.serve(upstream.url, "--websockets")
    headers = {"authorization": f"Bearer {key}", "user-agent": "codex_exec/0.171.0 (test)"}

    async def session() -> tuple[list[dict], int | None]:
        received: list[dict] = []
        async with aiohttp.ClientSession() as client:
            url = f"ws://127.0.0.1:{server.port}/v1/responses"
            async with client.ws_connect(url, headers=headers) as ws:
                await ws.send_str(json.dumps({"type": "response.create", "model": MODEL}))
                while True:
                    msg = await asyncio.wait_for(ws.receive(), 30)
                    if msg.type != aiohttp.WSMsgType.TEXT:
                        break
                    received.append(json.loads(msg.data))
                    if received[-1]["type"] == "response.completed":
                        await asyncio.get_running_loop().run_in_executor(
                            None, gateway.admin, "revoke-key", key_id
                        )
                return received, ws.close_code

    received, close_code = asyncio.run(session())
    kinds = [e["type"] for e in received]
    assert "response.completed" in kinds
    assert kinds[-1] == "error" and received[-1]["error"]["code"] == "invalid_member_key"
    print("close code", close_code)
    wait_for(lambda: upstream.ws_open == 0, 10, "the upstream side closed too")
    # And a new upgrade with the revoked key is refused before anything goes upstream.
    upgrades = len(upstream.requests)
    status = server.request("GET", "/v1/responses", headers={**headers, **UPGRADE})[0]
    assert status in (400, 401) and len(upstream.requests) == upgrades


@pytest.mark.e2e
@pytest.mark.codex
def test_codex_reconnects_through_the_gateway_when_the_upstream_closes_its_socket(
    gateway, upstream, codex, tmp_path
):
    """OpenAI closes a socket after 60 minutes; here the upstream closes after each message."""
    gateway.admin("add-member", "dave")
    key = gateway.add_key("dave")
    server = gateway.serve(upstream.url, "--websockets")
    upstream.ws_close_after = 1
    home, work = codex_home(tmp_path, server)
    code, out = run_codex(codex, home, work, key)
    assert code == 0, out
    assert upstream.text in out
    assert upstream.ws_connections >= 2  # Codex opened a new socket through the gateway
    assert not [r for r in upstream.requests if r.method == "POST"]
    wait_for(lambda: len(rows(gateway)) == len(creates(upstream)), 10, "ledger rows")
    metrics = server.request("GET", "/metrics", headers=OPERATOR)[2].decode()
    assert "codex_gateway_websocket_open 0.0" in metrics


@pytest.mark.e2e
@pytest.mark.codex
def test_a_busy_slot_on_the_socket_is_waited_out_by_codex(gateway, upstream, codex, tmp_path):
    """Measured: with an ``error`` 429 event Codex ended the turn at once ("exceeded retry
    limit"); with :func:`busy_event` it retries and the turn succeeds once the slot frees."""
    from tests.test_gateway_codex import codex_while_a_slot_is_held

    gateway.admin("add-member", "carol", "--max-concurrent", "1")
    key = gateway.add_key("carol")
    server = gateway.serve(upstream.url, "--websockets")
    home, work = codex_home(tmp_path, server)
    args = [codex, "exec", "--skip-git-repo-check", "Say hello"]
    code, out = codex_while_a_slot_is_held(
        server, upstream, key, args, member_env(home, key), work, hold_s=2
    )
    assert code == 0, out
    assert upstream.text in out
    assert "Reconnecting..." in out  # what the member sees while waiting
    assert "Falling back" not in out  # freed within Codex's five socket retries
    assert not [r for r in upstream.requests[1:] if r.method == "POST"]


def test_concurrency_slots_count_open_turns_not_idle_sockets(gateway, upstream, tmp_path):
    import asyncio
    import threading

    import aiohttp

    gateway.admin("add-member", "erin", "--max-concurrent", "1")
    key = gateway.add_key("erin")
    server = gateway.serve(upstream.url, "--websockets")
    headers = {"authorization": f"Bearer {key}", "user-agent": "codex_exec/0.171.0 (test)"}
    upstream.gate = threading.Event()

    async def scenario() -> tuple[list[dict], list[dict], list[dict]]:
        async with aiohttp.ClientSession() as client:
            url = f"ws://127.0.0.1:{server.port}/v1/responses"
            async with (
                client.ws_connect(url, headers=headers) as first,
                client.ws_connect(url, headers=headers) as second,
            ):
                # Two idle sockets hold no slot; a turn on the first takes the one slot.
                await first.send_str(json.dumps({"type": "response.create", "model": MODEL}))
                held = [json.loads((await first.receive()).data)]
                await second.send_str(json.dumps({"type": "response.create", "model": MODEL}))
                refused = [json.loads((await second.receive()).data)]
                assert upstream.gate is not None
                upstream.gate.set()
                async for msg in first:
                    held.append(json.loads(msg.data))
                    if held[-1]["type"] == "response.completed":
                        break
                # The turn ended: its slot is free for the other socket.
                await second.send_str(json.dumps({"type": "response.create", "model": MODEL}))
                served = []
                async for msg in second:
                    served.append(json.loads(msg.data))
                    if served[-1]["type"] == "response.completed":
                        break
                return held, refused, served

    held, refused, served = asyncio.run(scenario())
    assert held[0]["type"] == "response.created" and held[-1]["type"] == "response.completed"
    # The busy answer Codex waits out and retries (busy_event), not an error that ends it.
    assert refused[0]["type"] == "response.failed"
    error = refused[0]["response"]["error"]
    assert error["code"] == "rate_limit_exceeded"
    assert "max_concurrent 1" in error["message"]
    assert error["message"].endswith("Please try again in 1s.")
    assert served[-1]["type"] == "response.completed"
    assert len(creates(upstream)) == 2  # the refused one never went upstream


# -- turn accounting, driven through the hooks ----------------------------------------------


class _Ledger:
    healthy = True

    def __init__(self) -> None:
        self.rows: list[dict] = []

    def add(self, row: dict) -> None:
        self.rows.append(row)


class _Forwarder:
    """Stands in for the pool forwarder: records which flows gave their upstream key back."""

    def __init__(self) -> None:
        self.ended: list[str] = []

    def finished(self, flow) -> None:
        self.ended.append(flow.id)


def _turns():
    from addons.gateway_mode.config import DEFAULT_GATEWAY_CONFIG, load_gateway_config
    from addons.gateway_mode.core import GatewayCore
    from addons.gateway_mode.websocket import WebSocketTurns

    core = GatewayCore()
    core.card = load_gateway_config(DEFAULT_GATEWAY_CONFIG).rate_card()
    core.ledger = _Ledger()  # type: ignore[assignment]
    core.db = object()  # type: ignore[assignment]  # no limits: never asked
    core.directory.load(
        [{"key_hash": "h", "key_id": "k1", "member": "alice", "member_id": 1, "max_concurrent": 0}]
    )
    forwarder = _Forwarder()
    turns = WebSocketTurns(core, forwarder)  # type: ignore[arg-type]
    return core, turns, forwarder


def _ws_flow() -> http.HTTPFlow:
    from addons.gateway_mode.core import MEMBER, UPSTREAM_KEY

    flow = tflow.twebsocketflow(messages=False)
    flow.metadata[WEBSOCKET] = True
    flow.metadata[MEMBER] = {"member": "alice", "member_id": 1, "key_id": "k1"}
    flow.metadata[UPSTREAM_KEY] = "alpha"
    return flow


async def _say(turns, flow, from_client: bool, payload: dict | bytes) -> None:
    from mitmproxy.websocket import WebSocketMessage

    content = payload if isinstance(payload, bytes) else json.dumps(payload).encode()
    flow.websocket.messages.append(WebSocketMessage(1, from_client, content))
    await turns.websocket_message(flow)


async def test_each_turn_end_is_a_ledger_row_and_a_closed_socket_leaves_one_too():
    from tests.fake_upstream import response_object

    core, turns, forwarder = _turns()
    with taddons.context(turns):
        flow = _ws_flow()
        turns.websocket_start(flow)
        await _say(turns, flow, True, {"type": "response.create", "model": MODEL})
        await _say(turns, flow, False, {"type": "response.created", "response": {}})
        done = response_object("resp_1", MODEL, "hi")
        await _say(turns, flow, False, {"type": "response.completed", "response": done})
        await _say(turns, flow, True, {"type": "response.create", "model": MODEL})
        await _say(turns, flow, False, {"type": "error", "status": 500, "error": {"code": "x"}})
        await _say(turns, flow, True, {"type": "response.create", "model": MODEL})
        await _say(turns, flow, True, b"\xff not json")
        assert flow.websocket.messages[-1].dropped  # nothing unread goes upstream
        assert not flow.websocket.messages[-2].dropped
        flow.websocket.close_code = 1006
        flow.websocket.closed_by_client = False
        turns.websocket_end(flow)
    rows_ = [r for r in core.ledger.rows if "table" not in r]  # type: ignore[union-attr]
    assert [r["route"] for r in rows_] == ["ws:/v1/responses"] * 3
    opened, closed = [r for r in core.ledger.rows if r.get("table") == "ws_connections"]  # type: ignore[union-attr]
    assert opened["row_id"] == closed["row_id"] and opened["closed_ms"] is None
    assert (closed["client_messages"], closed["upstream_messages"], closed["turns"]) == (4, 3, 3)
    assert closed["route"] == "ws:/v1/responses" and closed["upstream_key"] == "alpha"
    assert closed["close_reason"] == "closed by the upstream (1006)"
    first, second, third = rows_
    assert first["total_tokens"] == 59 and first["events"] == 2 and first["error"] is None
    assert first["upstream_key"] == "alpha" and first["credits_micro"]
    assert second["status"] == 500 and second["error"] == "error event: x"
    assert third["status"] is None and "socket closed (1006)" in third["error"]
    assert forwarder.ended == [flow.id] and not turns.sockets


async def test_codexs_warm_up_is_a_row_marked_warmup_and_no_turn_of_its_socket():
    """Codex's first message on a socket is a warm-up (``"generate": false``): metered (its
    row keeps what the server reports) but marked, so ``usage`` counts it apart from requests,
    and the socket's ``turns`` counts only the real turn."""
    from tests.fake_upstream import response_object

    core, turns, _ = _turns()
    with taddons.context(turns):
        flow = _ws_flow()
        turns.websocket_start(flow)
        for create in (
            {"type": "response.create", "model": MODEL, "generate": False},
            {"type": "response.create", "model": MODEL, "previous_response_id": "resp_w"},
        ):
            await _say(turns, flow, True, create)
            done = response_object("resp_w", MODEL, "hi")
            await _say(turns, flow, False, {"type": "response.completed", "response": done})
        turns.websocket_end(flow)
    rows_ = [r for r in core.ledger.rows if "table" not in r]  # type: ignore[union-attr]
    assert [r["warmup"] for r in rows_] == [1, 0]
    closed = [r for r in core.ledger.rows if r.get("table") == "ws_connections"][-1]  # type: ignore[union-attr]
    assert closed["turns"] == 1 and closed["client_messages"] == 2


@pytest.mark.parametrize("kept_by", [None, "hardump", "web_port"])
async def test_an_unrecorded_socket_holds_only_its_open_turn(kept_by):
    """Every message of an hour-long socket stayed on its flow (~160 KB a 400-event reply,
    measured: 110 → 205 MB over 600 turns); now an ended turn's go once no turn is open,
    unless a flow file, a HAR or an interactive front reads them later. Each turn still hands
    the dumps and the recording its own events."""
    from tests.fake_upstream import response_object

    core, turns, _ = _turns()
    ended = []

    class Taker:
        def socket_turn_end(self, flow, turn):
            ended.append([json.loads(data)["type"] for _, data in turn.events])

    # mitmproxy's flow log runs after every script addon and reads the message being handled
    # as ``messages[-1]`` ("Addon error: list index out of range" on every ended turn when the
    # gateway had dropped it).
    log = io.StringIO()
    dumper = Dumper(log)
    with taddons.context(turns, Taker(), dumper) as tctx:
        if kept_by is not None:
            if kept_by == "hardump":
                tctx.options.add_option("hardump", str, "", "")
                tctx.options.update(hardump="run.har")
            else:
                tctx.options.add_option("web_port", int, 8081, "")
        flow = _ws_flow()
        turns.websocket_start(flow)
        left = []

        async def say(from_client: bool, payload: dict) -> None:
            await _say(turns, flow, from_client, payload)
            assert json.loads(flow.websocket.messages[-1].content) == payload
            dumper.websocket_message(flow)

        for n in (1, 2):
            await say(True, {"type": "response.create", "model": MODEL})
            await say(False, {"type": "response.created", "response": {}})
            await say(False, {"type": "response.output_text.delta", "delta": "x"})
            done = response_object(f"resp_{n}", MODEL, "x")
            await say(False, {"type": "response.completed", "response": done})
            left.append(len(flow.websocket.messages))
        await say(True, {"type": "response.create", "model": MODEL})
        await say(False, {"type": "response.created", "response": {}})
        left.append(len(flow.websocket.messages))
        if kept_by is None:
            # The ended turn's last event (the one being handled), then the open turn's two.
            assert left == [1, 1, 3]
        else:
            assert left[0] >= 4 and left[1] >= left[0] + 4 and left[2] >= left[1] + 2
        assert log.getvalue().count("WebSocket text message") == 10
        turns.websocket_end(flow)
    both = ["response.created", "response.output_text.delta", "response.completed"]
    assert ended == [both, both, ["response.created"]]
    rows_ = [r for r in core.ledger.rows if "table" not in r]  # type: ignore[union-attr]
    assert [r["total_tokens"] for r in rows_] == [59, 59, 0]


async def test_a_revoked_key_is_answered_and_its_message_dropped():
    core, turns, _ = _turns()
    sent: list[bytes] = []
    turns._inject = lambda flow, data: sent.append(data)  # type: ignore[method-assign]
    closed: list = []
    turns._drop_connection = closed.append  # type: ignore[method-assign]
    with taddons.context(turns):
        flow = _ws_flow()
        turns.websocket_start(flow)
        core.directory.load([])  # revoked
        await _say(turns, flow, True, {"type": "response.create", "model": MODEL})
        assert flow.websocket.messages[-1].dropped
        assert json.loads(sent[0])["error"]["code"] == "invalid_member_key"
        for _ in range(500):  # the connection is dropped just after the error event
            if closed:
                break
            await asyncio.sleep(0.01)
        assert closed == [flow]
    opened, refused = core.ledger.rows  # type: ignore[union-attr]
    assert opened["table"] == "ws_connections" and opened["closed_ms"] is None  # no turn row
    assert refused["table"] == "refusals" and refused["kind"] == "auth"
    assert refused["code"] == "invalid_member_key" and refused["member_id"] == 1
    assert turns.sockets[flow.id].close_reason == "unknown or revoked member key"


@pytest.mark.e2e
@pytest.mark.codex
@pytest.mark.parametrize("status", [429, 500, 401])
def test_a_failed_handshake_is_retried_on_another_upstream_key(
    gateway, upstream, codex, tmp_path, status
):
    """The upstream's 429 on the upgrade would end Codex's turn, and a 5xx would be retried on
    the same key until Codex falls back to HTTP (measured): the member gets a local 503 and
    its next upgrade another key."""
    gateway.admin("add-member", "fay")
    key = gateway.add_key("fay")
    server = gateway.serve(upstream.url, "--websockets")
    home, work = codex_home(tmp_path, server)
    upstream.key_status = {v: status for name, v in UPSTREAM_KEYS.items() if name != "gamma"}
    code, out = run_codex(codex, home, work, key)
    assert code == 0, out
    assert upstream.text in out and "Falling back" not in out
    names = {f"Bearer {v}": name for name, v in UPSTREAM_KEYS.items()}
    used = [(r.method, names[r.header_values("authorization")[0]]) for r in upstream.requests]
    assert {method for method, _ in used} == {"GET"}  # every turn on the socket
    assert used[-1] == ("GET", "gamma") and len(used) <= 3
    wait_for(lambda: len(rows(gateway)) == len(creates(upstream)), 10, "ledger rows")
    assert {r["upstream_key"] for r in rows(gateway)} == {"gamma"}


async def test_a_check_that_raises_drops_the_message_and_says_so():
    core, turns, _ = _turns()
    sent: list[bytes] = []
    turns._inject = lambda flow, data: sent.append(data)  # type: ignore[method-assign]

    def broken(key_id):
        raise RuntimeError("boom")

    with taddons.context(turns):
        flow = _ws_flow()
        turns.websocket_start(flow)
        core.directory.by_key_id = broken  # type: ignore[method-assign]
        await _say(turns, flow, True, {"type": "response.create", "model": MODEL})
        assert flow.websocket.messages[-1].dropped
        assert json.loads(sent[0])["error"]["code"] == "gateway_internal_error"
        unmetered = _ws_flow()  # a socket never registered: its messages never go upstream
        await _say(turns, unmetered, True, {"type": "response.create", "model": MODEL})
        assert unmetered.websocket.messages[-1].dropped
