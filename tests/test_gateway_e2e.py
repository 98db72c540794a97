"""Gateway mode end to end: the real ``./run.sh gateway`` processes, a fake upstream that
answers per upstream key, real clients (http.client, the Codex CLI), SQLite."""

from __future__ import annotations

import json
import subprocess
import time

import pytest
import yaml
from mitmproxy import io as mitm_io

from addons import codex_models
from tests.conftest import ROOT, ProxyProcess, open_stream, plain_mitmdump_command, wait_for
from tests.gateway_harness import (
    CODEX_HEADERS,
    METRICS_TOKEN,
    OPERATOR,
    UPSTREAM_KEYS,
    Gateway,
    bearer,
    member_codex_home,
    run_member_codex,
)

pytestmark = pytest.mark.e2e

CODEX_MODEL = {"model": "gpt-5.5", "stream": True, "input": "hi"}
#: The fake upstream's default stream: usage of one request (tests/fake_upstream.py).
TOKENS = {"input": 42, "cached": 8, "cache_write": 3, "output": 17, "reasoning": 5, "total": 59}
#: gpt-5.5 (a model of Codex's catalog, on the published card): ((42-8)*125 + 8*12.5 + 17*750)
#: / 1e6 = 0.0171 credits.
CREDITS = (34 * 125 + 8 * 12.5 + 17 * 750) / 1e6


def members(gw: Gateway, *specs: tuple[str, ...]) -> dict[str, str]:
    keys = {}
    for name, *flags in specs:
        gw.admin("add-member", name, *flags)
        keys[name] = gw.add_key(name)
    return keys


def error_of(body: bytes) -> dict:
    return json.loads(body)["error"]


def set_rates(gw: Gateway, **rates: dict) -> None:
    """Add entries under ``credits.rates`` of the deployment's gateway.yaml."""
    data = yaml.safe_load(gw.config_path.read_text())
    data["credits"]["rates"].update(rates)
    gw.config_path.write_text(yaml.safe_dump(data, sort_keys=False))


#: The model Codex sends when config.toml names none (config/codex-models.yaml).
CODEX_DEFAULT = codex_models.catalog().default_model


def test_member_keys_are_required_and_never_forwarded(gateway, upstream):
    keys = members(gateway, ("alice",))
    server = gateway.serve(upstream.url)
    revoked_key = gateway.add_key("alice")
    cases = {
        "none": {},
        "other scheme": {"authorization": "Basic YWxpY2U6eA=="},
        "malformed": {"authorization": "Bearer sk-codex-gw-short"},
        "sql": {"authorization": "Bearer sk-codex-gw-' OR 1=1; DROP TABLE members; --"},
        "oversized": {"authorization": "Bearer sk-codex-gw-" + "A" * 60_000},
        "unknown": {"authorization": "Bearer sk-codex-gw-" + "B" * 43},
        "two": {"authorization": f"Bearer {keys['alice']}, Bearer {keys['alice']}"},
    }
    for what, headers in cases.items():
        status, _, body = server.post_json(CODEX_MODEL, {**CODEX_HEADERS, **headers})
        assert status in (400, 431), what  # Codex: 400 ends its turn at once (not 401)
        if status == 400:
            assert error_of(body)["code"] in ("missing_member_key", "invalid_member_key"), what
    assert upstream.requests == []
    # A key works, then is revoked: refused within the refresh interval.
    assert server.post_json(CODEX_MODEL, bearer(revoked_key))[0] == 200
    key_id = gateway.admin("list-keys", "alice").stdout.splitlines()[-1].split()[0]
    gateway.admin("revoke-key", key_id)
    wait_for(lambda: server.post_json(CODEX_MODEL, bearer(revoked_key))[0] == 400, 10, "revocation")
    status, _, body = server.post_json(CODEX_MODEL, bearer(revoked_key))
    assert error_of(body)["code"] == "invalid_member_key"
    # Any other client keeps the HTTP status of the refusal.
    plain = {"authorization": f"Bearer {revoked_key}", "user-agent": "curl/8"}
    assert server.post_json({"model": "gpt-5-codex"}, plain)[0] == 401
    assert server.post_json(CODEX_MODEL, bearer(keys["alice"]))[0] == 200
    for request in upstream.requests:
        assert request.header_values("authorization")[0] in {
            f"Bearer {v}" for v in UPSTREAM_KEYS.values()
        }
        assert "sk-codex-gw" not in json.dumps(request.headers)
    # usage counts the refusals: with no member for the bad keys (coalesced rows), as alice's
    # for nothing (a revoked key names no member in the directory); never as errors.
    refused = sum(1 for case in cases if case not in ("oversized",))
    wait_for(
        lambda: gateway.usage()["without_member"]["refusals"]["auth"] >= refused + 2,
        10,
        "the refusals",
    )
    usage = gateway.usage()
    assert usage["total"]["errors"] == 0 and usage["members"][0]["refused"] == 0
    assert usage["total"]["refused"] == usage["without_member"]["refused"]
    assert "(no member key)" in gateway.admin("usage").stdout


def test_routes_and_the_codex_only_filter(gateway, upstream):
    keys = members(gateway, ("alice",))
    server = gateway.serve(upstream.url)
    auth = bearer(keys["alice"])
    for method, target in [
        ("GET", "/v1/models/gpt-5.5"),  # GET /v1/models: the member's catalog (test_gateway_models)
        ("POST", "/v1/responses?x=1"),
        ("POST", "/v1/chat/completions"),
    ]:
        assert server.request(method, target, b"{}", auth)[0] == 400  # Codex: ends the turn
        other = {"authorization": auth["authorization"], "user-agent": "curl/8"}
        assert server.request(method, target, b"{}", other)[0] == 403
    assert upstream.requests == []
    # /v1/responses/compact is a gateway route.
    status, _, _ = server.request(
        "POST", "/v1/responses/compact", json.dumps({"model": "gpt-5.5"}).encode(), auth
    )
    assert status == 200 and upstream.requests[-1].path_qs == "/v1/responses/compact"
    plain = {"authorization": f"Bearer {keys['alice']}", "user-agent": "curl/8"}
    status, _, body = server.post_json({"model": "gpt-4o", "stream": True}, plain)
    assert status == 403 and error_of(body)["code"] == "not_codex"
    # Any one sign is enough: the model's name, or Codex's session header.
    assert server.post_json({"model": "codex-auto-review", "stream": True}, plain)[0] == 200
    assert server.post_json({"model": "gpt-4o"}, {**plain, "session-id": "s"})[0] == 200


def test_token_quota_429_with_retry_after_while_others_are_served(gateway, upstream):
    keys = members(gateway, ("alice", "--five-hour-quota", "100"), ("bob",))
    server = gateway.serve(upstream.url)
    for _ in range(2):
        assert server.post_json(CODEX_MODEL, bearer(keys["alice"]))[0] == 200
    started = time.time()
    status, headers, body = server.post_json(CODEX_MODEL, bearer(keys["alice"]))
    assert status == 429
    error = error_of(body)
    # Codex's own shape (it ends the turn at once), our fields beside it.
    assert error["type"] == "usage_limit_reached"
    assert error["code"] == "quota_exceeded" and error["limit"] == "five_hour_quota"
    assert error["used"] == 2 * TOKENS["total"] and error["allowed"] == 100
    assert 5 * 3600 - 60 <= int(headers["retry-after"]) <= 5 * 3600
    assert started + 5 * 3600 - 60 <= error["resets_at"] <= time.time() + 5 * 3600 + 1
    assert "5-hour token quota" in error["message"]
    # The member's window in Codex's headers: 118 of 100 tokens, reset when back under.
    assert headers["x-codex-primary-used-percent"] == "118"
    assert headers["x-codex-primary-window-minutes"] == "300"
    assert int(headers["x-codex-primary-reset-at"]) == error["resets_at"]
    assert "x-codex-secondary-used-percent" not in headers
    assert len(upstream.requests) == 2  # refused before anything went upstream
    assert server.post_json(CODEX_MODEL, bearer(keys["bob"]))[0] == 200
    gateway.admin("set-member", "alice", "--five-hour-quota", "0")
    wait_for(lambda: server.post_json(CODEX_MODEL, bearer(keys["alice"]))[0] == 200, 10, "lift")


def test_credit_quota_priority_costs_twice_and_usage_shows_credits(gateway, upstream):
    keys = members(gateway, ("carol", "--five-hour-credits", "0.04"), ("dave",))
    server = gateway.serve(upstream.url)
    assert server.post_json(CODEX_MODEL, bearer(keys["carol"]))[0] == 200
    priority = {**CODEX_MODEL, "service_tier": "priority"}
    assert server.post_json(priority, bearer(keys["carol"]))[0] == 200
    # CREDITS + 2 x CREDITS = 0.0513 >= 0.04 (at 1x it would be 0.0342 and pass).
    wait_for(lambda: gateway.usage()["total"]["requests"] == 2, 10, "rows")
    status, headers, body = server.post_json(CODEX_MODEL, bearer(keys["carol"]))
    assert status == 429 and int(headers["retry-after"]) > 0
    error = error_of(body)
    assert error["kind"] == "credits" and error["limit"] == "five_hour_credits"
    assert error["used"] == pytest.approx(3 * CREDITS, abs=5e-6) and error["allowed"] == 0.04
    assert "credit quota" in error["message"]
    assert server.post_json(CODEX_MODEL, bearer(keys["dave"]))[0] == 200
    # A model the card cannot price is refused for a member with a credit quota, not free.
    status, _, body = server.post_json({"model": "codex-unknown"}, bearer(keys["carol"]))
    assert status == 400 and "credits.rates" in error_of(body)["message"]  # 403 but to Codex
    assert server.post_json({"model": "codex-unknown"}, bearer(keys["dave"]))[0] == 200
    wait_for(lambda: gateway.usage()["total"]["requests"] == 4, 10, "rows")
    usage = {m["member"]: m for m in gateway.usage()["members"]}
    assert usage["carol"]["credits"] == pytest.approx(3 * CREDITS, abs=5e-6)
    assert usage["carol"]["usd"] == pytest.approx(3 * CREDITS * 0.04, abs=1e-4)
    assert usage["dave"]["unpriced"] == 1 and usage["dave"]["requests"] == 2
    assert usage["carol"]["total_tokens"] == 2 * TOKENS["total"]
    total = gateway.usage()["total"]
    assert total["credits"] == pytest.approx(4 * CREDITS, abs=5e-6)
    assert usage["dave"]["credits_complete"] is False and usage["carol"]["credits_complete"]
    # carol's two refusals (the credit quota, the unpriced model) are counted by kind.
    assert usage["carol"]["refused"] == 2 and usage["carol"]["errors"] == 0
    assert {k: n for k, n in usage["carol"]["refusals"].items() if n} == {
        "quota": 1,
        "unpriced": 1,
    }
    assert usage["dave"]["refused"] == 0
    text = gateway.admin("usage").stdout
    assert "carol" in text and "1 request(s) unpriced" in text
    dave = next(line for line in text.splitlines() if line.startswith("dave "))
    assert ">=" in dave  # its credits leave the unpriced request out: not a plain sum
    assert "refused requests by kind" in text
    # Both codex-unknown requests are counted: carol's refused one and dave's unpriced row.
    metrics = server.request("GET", "/metrics", headers=OPERATOR)[2].decode()
    assert 'codex_gateway_unpriced_requests_total{model="codex-unknown"} 2.0' in metrics


def test_concurrency_limit(gateway, upstream):
    import threading

    keys = members(gateway, ("erin", "--max-concurrent", "1"), ("frank",))
    server = gateway.serve(upstream.url)
    upstream.gate = threading.Event()
    conn, first = open_stream(server.port, CODEX_MODEL, headers=bearer(keys["erin"]))
    try:
        assert first.status == 200
        status, _, body = server.post_json(CODEX_MODEL, bearer(keys["erin"]))
        assert status == 429 and error_of(body)["code"] == "concurrency_limit"
        upstream.gate.set()
        assert b"response.completed" in first.read()
    finally:
        conn.close()
    wait_for(lambda: server.post_json(CODEX_MODEL, bearer(keys["erin"]))[0] == 200, 10, "slot")


def test_key_pool_retries_cools_down_disables_and_runs_out(gateway, upstream):
    keys = members(gateway, ("alice",))
    server = gateway.serve(
        upstream.url, keys="alpha " + UPSTREAM_KEYS["alpha"] + "\n" + UPSTREAM_KEYS["beta"] + "\n"
    )
    upstream.key_status = {UPSTREAM_KEYS["alpha"]: 429}
    upstream.key_retry_after = "30"
    status, _, body = server.post_json(CODEX_MODEL, bearer(keys["alice"]))
    assert status == 200 and b"response.completed" in body  # the same request, on key-2
    used = [r.header_values("authorization")[0].split()[1] for r in upstream.requests]
    assert used == [UPSTREAM_KEYS["alpha"], UPSTREAM_KEYS["beta"]]
    health = json.loads(server.request("GET", "/health", headers=OPERATOR)[2])
    assert health["upstream_keys"] == {"healthy": ["key-2"], "cooling": ["alpha"], "disabled": []}
    # The cooling key is not tried again: one upstream request per client request.
    assert server.post_json(CODEX_MODEL, bearer(keys["alice"]))[0] == 200
    assert len(upstream.requests) == 3
    # key-2 starts answering 401: disabled; alpha still cooling -> 503 with Retry-After.
    upstream.key_status[UPSTREAM_KEYS["beta"]] = 401
    status, headers, body = server.post_json(CODEX_MODEL, bearer(keys["alice"]))
    # No other key to try: the pool's state, never the upstream's words about our key.
    assert status == 503 and error_of(body)["code"] == "no_upstream_key", body
    assert UPSTREAM_KEYS["beta"][-4:].encode() not in body
    status, headers, body = server.post_json(CODEX_MODEL, bearer(keys["alice"]))
    assert status == 503 and error_of(body)["code"] == "no_upstream_key"
    assert 1 <= int(headers["retry-after"]) <= 30
    health = json.loads(server.request("GET", "/health", headers=OPERATOR)[2])
    assert health["ok"] is False and health["upstream_keys"]["disabled"] == ["key-2"]
    log = server.output()
    assert "key-2 disabled" in log and "alpha cooling down" in log
    wait_for(lambda: gateway.usage()["total"]["requests"] == 3, 10, "rows")
    rows = {r["upstream_key"] for r in _rows(gateway)}
    assert rows == {"key-2"}


def _rows(gw: Gateway) -> list[dict]:
    from addons.gateway_mode.database import Database

    db = Database(gw.database)
    try:
        return db.usage_rows(0)
    finally:
        db.dispose()


def test_a_stream_that_started_is_never_retried(gateway, upstream):
    keys = members(gateway, ("alice",))
    server = gateway.serve(upstream.url)
    upstream.fault, upstream.fault_after = "truncate", 3
    conn, response = open_stream(server.port, CODEX_MODEL, headers=bearer(keys["alice"]))
    try:
        assert response.status == 200
        with pytest.raises(Exception):  # noqa: B017 - http.client's IncompleteRead
            response.read()
    finally:
        conn.close()
    wait_for(lambda: gateway.usage()["total"]["requests"] == 1, 10, "row")
    assert len(upstream.requests) == 1
    (row,) = _rows(gateway)
    assert row["error"] and row["attempts"] == 1 and row["total_tokens"] == 0


def test_health_metrics_and_the_usage_row(gateway, upstream):
    keys = members(gateway, ("alice",))
    server = gateway.serve(upstream.url)
    assert server.post_json(CODEX_MODEL, bearer(keys["alice"]))[0] == 200
    status, headers, body = server.request("GET", "/health", headers=OPERATOR)
    assert status == 200 and json.loads(body)["database"] is True
    wait_for(lambda: gateway.usage()["total"]["requests"] == 1, 10, "row")
    (row,) = _rows(gateway)
    assert row["member"] == "alice" and row["model"] == "gpt-5.5"
    assert (row["input_tokens"], row["cached_tokens"], row["output_tokens"]) == (42, 8, 17)
    assert (row["reasoning_tokens"], row["total_tokens"], row["status"]) == (5, 59, 200)
    assert row["credits_micro"] == round(CREDITS * 1e6) and row["rate"] == "gpt-5.5"
    assert row["events"] > 5 and row["duration_ms"] >= 0 and row["ttfb_ms"] is not None
    assert row["key_id"].startswith("mk_") and row["upstream_key"] in UPSTREAM_KEYS
    status, headers, body = server.request("GET", "/metrics", headers=OPERATOR)
    text = body.decode()
    assert status == 200 and headers["content-type"].startswith("text/plain")
    assert 'codex_gateway_tokens_total{kind="total",member="alice"} 59.0' in text
    assert 'codex_gateway_credits_total{member="alice",model="gpt-5.5"}' in text
    assert 'codex_gateway_requests_total{route="/v1/responses",status="200"} 1.0' in text
    assert "codex_gateway_upstream_key_state" in text and "codex_gateway_in_flight 0.0" in text


def test_no_key_appears_in_any_artifact(gateway, upstream, tmp_path):
    keys = members(gateway, ("alice",))
    record = tmp_path / "rec"
    server = gateway.serve(upstream.url, "--record", str(record), "--set", "flow_detail=4")
    upstream.key_status = {UPSTREAM_KEYS["alpha"]: 429}
    for _ in range(3):
        assert server.post_json(CODEX_MODEL, bearer(keys["alice"]))[0] == 200
    server.post_json(CODEX_MODEL, {"authorization": "Bearer sk-codex-gw-" + "Z" * 43})
    metrics = server.request("GET", "/metrics", headers=OPERATOR)[2]
    assert server.shutdown() == 0
    # The recording is priced with the gateway's own rate card.
    totals = json.loads((record / "summary.json").read_text())["totals"]
    assert float(totals["credits"]) == pytest.approx(3 * CREDITS, abs=5e-6) and "usd" in totals
    assert "credits" in (record / "report.html").read_text().lower()
    places = {str(p): p.read_bytes() for p in record.rglob("*") if p.is_file()}
    places["stdout"] = server.stdout_path.read_bytes()
    places["stderr"] = server.stderr_path.read_bytes()
    places["metrics"] = metrics
    places["usage"] = gateway.admin("usage", "--json").stdout.encode()
    places["usage table"] = gateway.admin("usage").stdout.encode()
    places["list-keys"] = gateway.admin("list-keys").stdout.encode()
    places["audit"] = gateway.admin("audit", "--json").stdout.encode()
    places["database"] = (tmp_path / "gateway.db").read_bytes() + b"".join(
        p.read_bytes() for p in tmp_path.glob("gateway.db-*")
    )
    secrets = [*UPSTREAM_KEYS.values(), keys["alice"], "Z" * 43, METRICS_TOKEN]
    assert any(p.endswith("flows.mitm") for p in places) and any(p.endswith(".har") for p in places)
    for name, data in places.items():
        for secret in secrets:
            assert secret.encode() not in data, f"a key in {name}"
    with open(record / "flows.mitm", "rb") as f:
        flows = [fl for fl in mitm_io.FlowReader(f).stream() if fl.request.method == "POST"]
    assert flows and all(
        fl.request.headers.get("authorization") in (None, "[REDACTED]") for fl in flows
    )


def test_serve_refuses_bad_upstream_keys_and_an_uninitialised_database(tmp_path):
    gw = Gateway(tmp_path)
    proc = subprocess.run(
        gw.cmd("serve", "--upstream-url", "http://127.0.0.1:9/v1/responses"),
        input=b"k sk-x\n",
        capture_output=True,
        timeout=60,
        cwd=ROOT,
    )
    assert proc.returncode == 2 and b"gateway init" in proc.stderr
    gw.admin("init")
    for keys, message in [(b"", b"must be provided"), (b"n sk-SECRET$\n", b"may only contain")]:
        proc = subprocess.run(
            gw.cmd("serve", "--upstream-url", "http://127.0.0.1:9/v1/responses"),
            input=keys,
            capture_output=True,
            timeout=60,
            cwd=ROOT,
        )
        assert proc.returncode == 1 and message in proc.stderr and b"SECRET" not in proc.stderr
    proc = subprocess.run(
        gw.cmd("serve", "--listen-host", "0.0.0.0"),
        input=b"k sk-x\n",
        capture_output=True,
        timeout=60,
        cwd=ROOT,
    )
    assert proc.returncode == 2 and b"--insecure-listen" in proc.stderr


def test_add_key_prints_the_key_alone_as_the_last_line(gateway):
    gateway.admin("add-member", "alice")
    proc = gateway.admin("add-key", "alice")
    lines = proc.stdout.splitlines()
    assert len(lines) == 1 and lines[0].startswith("sk-codex-gw-")
    assert lines[0] not in gateway.admin("list-keys").stdout
    assert gateway.admin("add-member", "x;rm -rf /", check=False).returncode == 2
    assert gateway.admin("add-key", "nobody", check=False).returncode == 2


@pytest.mark.codex
def test_codex_cli_with_a_member_key(gateway, upstream, codex, tmp_path):
    """Codex with its default model (codex-config names no model) over HTTP through a gateway
    with the shipped config, whose ESTIMATE prices Codex's default model like gpt-5.5: a
    member with a credit quota is served and metered in credits, and Codex knows its model
    (no fallback-metadata warning). (Over the socket, Codex's default transport:
    tests/test_gateway_quickstart.py.)"""
    keys = members(gateway, ("alice", "--weekly-credits", "100"))
    server = gateway.serve(upstream.url)
    home, work, config = member_codex_home(tmp_path, server, websockets=False)
    assert 'env_key = "CODEX_GATEWAY_KEY"' in config and "supports_websockets = false" in config
    assert "model =" not in config  # the model is left to Codex
    code, out, _ = run_member_codex(codex, home, work, keys["alice"])
    assert code == 0, out
    assert upstream.text in out
    assert "Model metadata for" not in out and "fallback metadata" not in out
    assert upstream.requests, "nothing reached the upstream"
    for request in upstream.requests:
        assert request.header_values("authorization")[0] in {
            f"Bearer {v}" for v in UPSTREAM_KEYS.values()
        }
        assert keys["alice"].encode() not in request.body
        assert keys["alice"] not in json.dumps(request.headers)
        assert json.loads(request.body)["model"] == CODEX_DEFAULT
    n = len(upstream.requests)
    wait_for(lambda: gateway.usage()["total"]["requests"] == n, 10, "rows")
    total = gateway.usage("--member", "alice")["total"]
    assert total["total_tokens"] == TOKENS["total"] * n and total["unpriced"] == 0
    assert total["credits"] == pytest.approx(n * CREDITS, abs=5e-6)  # gpt-5.5's rates
    assert {row["rate"] for row in _rows(gateway)} == {CODEX_DEFAULT}


def test_usage_since_and_member_filters(gateway, upstream):
    keys = members(gateway, ("alice",), ("bob",))
    server = gateway.serve(upstream.url)
    assert server.post_json(CODEX_MODEL, bearer(keys["alice"]))[0] == 200
    wait_for(lambda: gateway.usage()["total"]["requests"] == 1, 10, "row")
    assert gateway.usage("--member", "bob")["total"]["requests"] == 0
    assert gateway.usage("--since", "2099-01-01T00:00:00Z")["total"]["requests"] == 0
    assert gateway.usage("--since", "5h")["members"][0]["member"] == "alice"
    assert gateway.admin("usage", "--member", "zed", check=False).returncode == 2
    time.sleep(0)


def test_a_row_is_written_when_codex_hangs_up_after_response_completed(gateway, upstream):
    from tests.fake_upstream import responses_sse_events

    keys = members(gateway, ("alice",))
    server = gateway.serve(upstream.url)
    events = responses_sse_events(upstream.text, "gpt-5.5", "resp_hangup")
    upstream.events = [*events, ("response.output_text.delta", {"delta": "never sent"})]
    upstream.fault, upstream.fault_after = "stall", len(events)  # silent after completed
    conn, response = open_stream(server.port, CODEX_MODEL, headers=bearer(keys["alice"]))
    try:
        seen = b""
        while b"response.completed" not in seen:
            line = response.fp.readline()
            assert line, "the stream ended before response.completed"
            seen += line
    finally:
        conn.close()  # as Codex does, before the upstream has finished
    wait_for(lambda: gateway.usage()["total"]["requests"] == 1, 30, "the row")
    (row,) = _rows(gateway)
    assert row["total_tokens"] == TOKENS["total"] and row["credits_micro"]
    assert row["error"] and row["error"].startswith("after response.completed")


def test_plain_mitmdump_with_the_gateway_script(gateway, upstream, tmp_path):
    keys = members(gateway, ("alice",))
    info = tmp_path / "plain-info.json"
    cmd = plain_mitmdump_command(
        "gateway.py",
        upstream.url,
        info,
        [
            "codex_gateway_keys_file=-",
            f"codex_gateway_config={gateway.config_path}",
            f"codex_gateway_database={gateway.database}",
            "codex_extra_routes=/v1/responses/compact",
        ],
    )
    proc = subprocess.Popen(
        cmd, stdin=subprocess.PIPE, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, cwd=ROOT
    )
    try:
        assert proc.stdin is not None
        proc.stdin.write(f"main {UPSTREAM_KEYS['alpha']}\n".encode())
        proc.stdin.close()
        wait_for(lambda: info.exists() or proc.poll() is not None, 60, "server-info")
        port = json.loads(info.read_text())["port"]
        handle = ProxyProcess(proc, port, info, tmp_path / "x", tmp_path / "y", None, True)
        assert handle.post_json(CODEX_MODEL, bearer(keys["alice"]))[0] == 200
        assert handle.post_json(CODEX_MODEL, {"authorization": "Bearer x"})[0] == 401
        assert upstream.requests[-1].header_values("authorization") == [
            f"Bearer {UPSTREAM_KEYS['alpha']}"
        ]
        assert handle.shutdown() == 0
    finally:
        if proc.poll() is None:
            proc.kill()
    wait_for(lambda: gateway.usage()["total"]["requests"] == 1, 10, "row")


def drop_estimates(gw: Gateway) -> None:
    """Remove the shipped ESTIMATE entries (``same_as``) from the deployment's card: only
    OpenAI's published rates are left, as an operator who deleted them would have."""
    data = yaml.safe_load(gw.config_path.read_text())
    rates = data["credits"]["rates"]
    data["credits"]["rates"] = {k: v for k, v in rates.items() if "same_as" not in v}
    gw.config_path.write_text(yaml.safe_dump(data, sort_keys=False))


def test_unpriced_catalog_models_are_named_at_start_up_in_usage_and_metrics(gateway, upstream):
    drop_estimates(gateway)
    keys = members(gateway, ("alice",))
    proc = gateway.admin("add-member", "carol", "--weekly-credits", "5")
    assert proc.stderr.count("warning:") == 1 and CODEX_DEFAULT in proc.stderr  # once
    assert "unpriced_model" in proc.stderr and f"credits.rates.{CODEX_DEFAULT}" in proc.stderr
    assert "warning" not in gateway.admin("add-member", "dan").stderr  # no credit quota
    server = gateway.serve(upstream.url)
    key = f"credits.rates.{CODEX_DEFAULT}  (Codex's default model)"
    wait_for(lambda: "gateway usage --unpriced" in server.output(), 10, "the start-up note")
    log = server.output()
    (note,) = [line for line in log.splitlines() if "the rate card cannot price" in line]
    assert f"Codex's default {CODEX_DEFAULT} among them" in note  # one line, not the list
    assert key not in log
    for _ in range(2):
        assert (
            server.post_json({**CODEX_MODEL, "model": CODEX_DEFAULT}, bearer(keys["alice"]))[0]
            == 200
        )
    assert server.post_json(CODEX_MODEL, bearer(keys["alice"]))[0] == 200
    wait_for(lambda: gateway.usage()["total"]["requests"] == 3, 10, "rows")
    text = server.request("GET", "/metrics", headers=OPERATOR)[2].decode()
    assert f'codex_gateway_unpriced_requests_total{{model="{CODEX_DEFAULT}"}} 2.0' in text
    assert 'codex_gateway_unpriced_requests_total{model="gpt-5.5"}' not in text
    usage = gateway.usage()
    assert usage["total"]["unpriced"] == 2
    gaps = {g["model"]: g for g in usage["unpriced_models"]}
    assert gaps[CODEX_DEFAULT] == {
        "model": CODEX_DEFAULT,
        "yaml_key": f"credits.rates.{CODEX_DEFAULT}",
        "codex_default": True,
    }
    assert "gpt-5.5" not in gaps
    text = gateway.admin("usage").stdout
    assert key not in text and "gateway usage --unpriced" in text  # the one line
    assert key in gateway.admin("usage", "--unpriced").stdout  # the list, with the keys
    alice = next(line for line in text.splitlines() if line.startswith("alice "))
    assert ">=" in alice  # 2 of its 3 requests unpriced: never shown as a plain sum
    (bob,) = members(gateway, ("bob",)).values()
    assert server.post_json({**CODEX_MODEL, "model": CODEX_DEFAULT}, bearer(bob))[0] == 200
    wait_for(lambda: gateway.usage()["total"]["requests"] == 4, 10, "bob's row")
    usage = {m["member"]: m for m in gateway.usage()["members"]}
    assert usage["bob"]["credits"] is None and usage["bob"]["usd"] is None  # not 0
    text = gateway.admin("usage").stdout
    bob_line = next(line for line in text.splitlines() if line.startswith("bob "))
    assert bob_line.split().count("unpriced") == 2  # credits and USD


def test_a_mapped_default_model_is_no_longer_named_and_is_charged(gateway, upstream):
    set_rates(gateway, **{CODEX_DEFAULT: {"same_as": "gpt-5.5"}, "default": {"same_as": "gpt-5.5"}})
    keys = members(gateway, ("alice", "--weekly-credits", "10"))
    server = gateway.serve(upstream.url)
    assert (
        server.post_json({**CODEX_MODEL, "model": CODEX_DEFAULT}, bearer(keys["alice"]))[0] == 200
    )
    wait_for(lambda: gateway.usage()["total"]["requests"] == 1, 10, "row")
    assert "the rate card cannot price" not in server.output()
    (row,) = _rows(gateway)
    assert row["credits_micro"] == round(CREDITS * 1e6) and row["rate"] == CODEX_DEFAULT
    assert gateway.usage()["unpriced_models"] == []
    metrics = server.request("GET", "/metrics", headers=OPERATOR)[2].decode()
    assert "unpriced_requests_total{" not in metrics


@pytest.mark.parametrize(
    ("rates", "message"),
    [
        ({"gpt-6.2-sol": {"same_as": "gpt-9"}}, "same_as 'gpt-9' is not an entry"),
        ({"a": {"same_as": "b"}, "b": {"same_as": "a"}}, "same_as cycle: a -> b -> a"),
    ],
)
def test_a_bad_same_as_stops_every_command(gateway, rates, message):
    set_rates(gateway, **rates)
    proc = gateway.admin("usage", check=False)
    assert proc.returncode != 0 and message in proc.stderr
    assert str(gateway.config_path) in proc.stderr
