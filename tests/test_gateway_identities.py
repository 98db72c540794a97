"""Gateway members without static keys (issue 31), end to end: the admin commands, the real
gateway (HTTP, WebSocket, ``--workers``, PostgreSQL) checking OIDC tokens of a loopback HTTPS
issuer behind a throwaway CA (tests/oidc_issuer.py), the ledger and ``/metrics`` naming the
identity, a leak scan for the tokens, and the real Codex CLI with command-backed auth renewing
a token that expires in the middle of a turn."""

from __future__ import annotations

import asyncio
import json
import re
import sqlite3
import stat
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import jwt
import pytest

from addons.gateway_mode.identities import GITHUB_ISSUER
from tests.conftest import wait_for
from tests.gateway_harness import (
    OPERATOR,
    Gateway,
    bearer,
    member_codex_home,
    member_env,
)
from tests.oidc_issuer import GITHUB_CLAIMS, OidcIssuers
from tests.pg_cluster import PgCluster
from tests.responses_events import tool_outputs, tool_then_answer

pytestmark = pytest.mark.e2e

AUD = "codex-gateway"
STREAM = {"model": "gpt-5.5", "stream": True}
MODEL = "gpt-5.5"


@pytest.fixture
def issuers(tmp_path: Path) -> Iterator[OidcIssuers]:
    directory = tmp_path / "issuer"
    directory.mkdir()
    server = OidcIssuers(directory).start()
    server.add("gh")
    yield server
    server.stop()


def ca_env(issuers: OidcIssuers) -> dict[str, str]:
    return {"SSL_CERT_FILE": str(issuers.ca_file)}


def add_ci_identity(gateway: Gateway, issuers: OidcIssuers, member: str = "ci") -> str:
    gateway.admin("add-member", member, "--five-hour-quota", "100000")
    out = gateway.admin(
        "add-identity",
        member,
        "--issuer",
        issuers.issuers["gh"].url,
        "--audience",
        AUD,
        "--claim",
        "repository_owner=octo-org",
        "--claim",
        "ref=refs/heads/*",
    ).stdout
    match = re.fullmatch(rf"identity (oi_[0-9a-f]{{12}}) for {member} added \([^)]*\)\n", out)
    assert match, out
    return match.group(1)


def error_of(body: bytes) -> dict:
    return json.loads(body)["error"]


def usage_rows(gateway: Gateway) -> list[dict]:
    with sqlite3.connect(gateway.database.removeprefix("sqlite:///")) as db:
        db.row_factory = sqlite3.Row
        return [dict(r) for r in db.execute("SELECT * FROM usage ORDER BY ts_ms")]


def leak_scan(root: Path, tokens: list[str], skip: set[Path]) -> None:
    """No token, nor its signature alone, in any file under ``root`` (logs, database, dumps,
    recordings, flow files, spools), except the files in ``skip``."""
    needles = [t.encode() for t in tokens] + [t.rsplit(".", 1)[1].encode() for t in tokens]
    scanned = 0
    for path in root.rglob("*"):
        if not path.is_file() or path in skip:
            continue
        data = path.read_bytes()
        scanned += 1
        for needle in needles:
            assert needle not in data, f"a token leaked into {path}"
    assert scanned > 5


def test_the_admin_commands_and_githubs_safe_rule(gateway, issuers):
    gateway.admin("add-member", "ci")
    refused = gateway.admin(
        "add-identity", "ci", "--issuer", GITHUB_ISSUER, "--audience", AUD, check=False
    )
    assert refused.returncode == 2
    assert "--claim repository_owner=ORG" in refused.stderr
    any_owner = gateway.admin(
        "add-identity",
        "ci",
        "--issuer",
        GITHUB_ISSUER,
        "--audience",
        AUD,
        "--claim",
        "repository_owner=*",
        check=False,
    )
    assert any_owner.returncode == 2
    plain = gateway.admin(
        "add-identity", "ci", "--issuer", "http://idp.example", "--audience", AUD, check=False
    )
    assert plain.returncode == 2 and "https://" in plain.stderr
    nobody = gateway.admin(
        "add-identity", "ghost", "--issuer", GITHUB_ISSUER, "--audience", AUD, check=False
    )
    assert nobody.returncode == 2
    out = gateway.admin(
        "add-identity",
        "ci",
        "--issuer",
        GITHUB_ISSUER,
        "--audience",
        AUD,
        "--claim",
        "repository=octo-org/octo-repo",
        "--claim",
        "ref=refs/heads/main",
    ).stdout
    identity = out.split()[1]
    listed = gateway.admin("list-identities").stdout
    assert identity in listed and "ref=refs/heads/main" in listed
    assert "repository=octo-org/octo-repo" in listed and GITHUB_ISSUER in listed
    assert "removed" not in listed
    gateway.admin("remove-identity", identity)
    assert "removed" in gateway.admin("list-identities", "ci").stdout
    assert gateway.admin("remove-identity", "oi_000000000000", check=False).returncode == 2


def test_a_token_is_a_member_over_http(gateway, upstream, issuers, tmp_path):
    identity = add_ci_identity(gateway, issuers)
    gateway.admin("add-member", "alice")
    static_key = gateway.add_key("alice")
    record = tmp_path / "rec"
    server = gateway.serve(
        upstream.url,
        "--record",
        str(record),
        "--set",
        f"save_stream_file={tmp_path / 'flows.mitm'}",
        env=ca_env(issuers),
    )
    good = issuers.mint("gh", AUD, claims=GITHUB_CLAIMS)
    status, _, body = server.post_json(STREAM, bearer(good))
    assert status == 200, body
    # The upstream saw an upstream key, never the token.
    assert all(good not in str(r.headers) for r in upstream.requests)

    # Refusals say which check failed, stay 401 for Codex (it renews its token), and never
    # echo the token.
    now = time.time()
    cases = {
        "expired": issuers.mint("gh", AUD, claims=GITHUB_CLAIMS, issued=now - 900, lifetime=60),
        "audience": issuers.mint("gh", "other", claims=GITHUB_CLAIMS),
        "no_identity": issuers.mint("gh", AUD, claims={**GITHUB_CLAIMS, "ref": "refs/tags/v1"}),
        "unknown_key": issuers.mint(
            "gh", AUD, claims=GITHUB_CLAIMS, kid="nope", key=issuers.issuers["gh"].keys["gh-rs"]
        ),
    }
    for check, token in cases.items():
        status, headers, body = server.post_json(STREAM, bearer(token))
        assert status == 401, (check, body)
        assert error_of(body)["code"] == "invalid_identity_token"
        assert error_of(body)["check"] == check
        assert "invalid_token" in headers["www-authenticate"]
        assert token.encode() not in body
    # A member key that is wrong still gets Codex's 400 (its retries would be useless).
    status, _, body = server.post_json(STREAM, bearer("sk-codex-gw-" + "x" * 43))
    assert status == 400 and error_of(body)["code"] == "invalid_member_key"
    assert server.post_json(STREAM, bearer(static_key))[0] == 200
    # 1 MB bearer: refused without being read.
    status, _, body = server.post_json(STREAM, bearer("eyJ" + "A" * (1024 * 1024)))
    assert status == 401 and error_of(body)["check"] == "too_large", body

    # The ledger names the identity and the token's subject; /metrics the identity.
    wait_for(lambda: len([r for r in usage_rows(gateway) if r["duration_ms"]]) == 2, 15, "rows")
    rows = {r["key_id"]: r for r in usage_rows(gateway)}
    assert rows[identity]["subject"] == GITHUB_CLAIMS["sub"]
    assert rows[identity]["total_tokens"] == 59
    assert [r["subject"] for k, r in rows.items() if k != identity] == [None]
    summary = gateway.usage()
    assert {m["member"]: m["requests"] for m in summary["members"]} == {"ci": 1, "alice": 1}
    assert summary["without_member"]["refusals"]["auth"] >= len(cases)
    issuer = issuers.issuers["gh"].url
    assert summary["identities"] == [
        {
            "identity": identity,
            "member": "ci",
            "issuer": issuer,
            "requests": 1,
            "total_tokens": 59,
            "subjects": {GITHUB_CLAIMS["sub"]: 1},
        }
    ]
    text = gateway.admin("usage").stdout
    line = f"identity {identity} (ci, {issuer}): 1 request(s), 59 tokens; subjects: "
    assert line + f"{GITHUB_CLAIMS['sub']} (1)" in text
    metrics = server.request("GET", "/metrics", headers=OPERATOR)[2].decode()
    assert (
        f'codex_gateway_identity_accepted_total{{identity="{identity}",issuer="{issuer}",'
        f'member="ci"}} 1.0' in metrics
    )
    assert 'codex_gateway_identity_refused_total{check="expired"} 1.0' in metrics

    # Removed: refused within the directory refresh.
    gateway.admin("remove-identity", identity)

    def refused_now() -> bool:
        fresh = issuers.mint("gh", AUD, claims=GITHUB_CLAIMS)
        return server.post_json(STREAM, bearer(fresh))[0] == 401

    wait_for(refused_now, 10, "the removed identity refused")
    assert server.shutdown() == 0
    # The flow file names where the member came from (and, below, holds no token).
    from mitmproxy import io

    with open(tmp_path / "flows.mitm", "rb") as f:
        members = [fl.metadata.get("codex_gateway.member") for fl in io.FlowReader(f).stream()]
    assert {
        "member": "ci",
        "member_id": 1,
        "key_id": identity,
        "identity": identity,
        "issuer": issuer,
        "subject": GITHUB_CLAIMS["sub"],
        "expires": jwt.decode(good, options={"verify_signature": False})["exp"],
    } in members
    leak_scan(tmp_path, issuers.minted, skip=set())


async def socket_turn(port: int, token: str) -> list[str]:
    """One ``response.create`` on the gateway's WebSocket route with ``token`` as the
    upgrade's bearer: the event types received until ``response.completed`` or the close."""
    import aiohttp

    headers = {"authorization": f"Bearer {token}", "user-agent": "codex_exec/0.171.0 (test)"}
    kinds: list[str] = []
    async with aiohttp.ClientSession() as client:
        url = f"ws://127.0.0.1:{port}/v1/responses"
        async with client.ws_connect(url, headers=headers) as ws:
            await ws.send_str(json.dumps({"type": "response.create", "model": MODEL}))
            while not kinds or kinds[-1] != "response.completed":
                msg = await asyncio.wait_for(ws.receive(), 30)
                if msg.type != aiohttp.WSMsgType.TEXT:
                    break
                kinds.append(json.loads(msg.data)["type"])
    return kinds


def test_workers_and_postgresql(tmp_path: Path, pg_cluster: PgCluster, upstream, issuers) -> None:
    import uuid

    name = f"gw_{uuid.uuid4().hex[:8]}"
    pg_cluster.create_database(name)
    gw = Gateway(tmp_path, database=pg_cluster.url(name))
    gw.admin("init")
    try:
        identity = add_ci_identity(gw, issuers)
        server = gw.serve(upstream.url, "--workers", "2", env=ca_env(issuers))
        for i in range(6):  # new connections: both workers see tokens
            token = issuers.mint("gh", AUD, alg="ES256" if i % 2 else "RS256", claims=GITHUB_CLAIMS)
            assert server.post_json(STREAM, bearer(token))[0] == 200
        # And a turn on the WebSocket route, its upgrade carrying the token.
        token = issuers.mint("gh", AUD, claims=GITHUB_CLAIMS)
        kinds = asyncio.run(socket_turn(server.port, token))
        assert kinds[-1] == "response.completed", kinds
        wait_for(lambda: gw.usage()["total"]["requests"] == 7, 15, "rows")
        (member,) = gw.usage()["members"]
        assert member["member"] == "ci" and member["total_tokens"] == 7 * 59
        # Each worker fetched the key set once at most (a process's own cache).
        assert 1 <= issuers.jwks_fetches("gh") <= 2
        import psycopg

        with psycopg.connect(pg_cluster.conninfo(name)) as conn:
            subjects = conn.execute("SELECT key_id, subject FROM usage").fetchall()

            def sockets() -> list[tuple]:
                query = "SELECT key_id, closed_ms FROM ws_connections"
                return conn.execute(query).fetchall()

            wait_for(lambda: sockets() and sockets()[0][1] is not None, 15, "the socket's row")
            assert [key_id for key_id, _ in sockets()] == [identity]
        assert set(subjects) == {(identity, GITHUB_CLAIMS["sub"])}
        assert server.shutdown() == 0
    finally:
        gw.stop()


def test_the_member_caps_an_identity_and_removal_closes_its_socket(gateway, upstream, issuers):
    """The quota is the member's, shared by its key and its identity; an identity's refusal
    row names the identity; a removed identity's open socket is closed with an event naming
    it, and a new upgrade with a fresh token is refused 401 before anything goes upstream."""
    import aiohttp

    identity = add_ci_identity(gateway, issuers)
    gateway.admin("set-member", "ci", "--five-hour-quota", "100")
    key = gateway.add_key("ci")
    server = gateway.serve(upstream.url, env=ca_env(issuers))

    def token() -> str:
        return issuers.mint("gh", AUD, claims=GITHUB_CLAIMS)

    assert server.post_json(STREAM, bearer(token()))[0] == 200
    assert server.post_json(STREAM, bearer(key))[0] == 200  # 118 of 100 tokens now
    upstream_calls = len(upstream.requests)
    status, _, body = server.post_json(STREAM, bearer(token()))
    assert status == 429 and error_of(body)["limit"] == "five_hour_quota", body
    assert len(upstream.requests) == upstream_calls

    def refusal_rows() -> list[dict]:
        with sqlite3.connect(gateway.database.removeprefix("sqlite:///")) as db:
            db.row_factory = sqlite3.Row
            return [dict(r) for r in db.execute("SELECT * FROM refusals")]

    wait_for(lambda: any(r["kind"] == "quota" for r in refusal_rows()), 15, "the refusal row")
    (quota,) = [r for r in refusal_rows() if r["kind"] == "quota"]
    assert quota["key_id"] == identity and quota["member_id"] == 1
    gateway.admin("set-member", "ci", "--five-hour-quota", "0")
    wait_for(lambda: server.post_json(STREAM, bearer(token()))[0] == 200, 10, "the quota lifted")

    headers = {"authorization": f"Bearer {token()}", "user-agent": "codex_exec/0.171.0 (test)"}

    async def session() -> list[dict]:
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
                            None, gateway.admin, "remove-identity", identity
                        )
        return received

    received = asyncio.run(session())
    kinds = [e["type"] for e in received]
    assert "response.completed" in kinds
    error = received[-1]
    assert error["type"] == "error", kinds
    assert error["error"]["code"] == "invalid_identity_token"
    assert f"identity {identity} removed" in error["error"]["message"]
    wait_for(lambda: upstream.ws_open == 0, 10, "the upstream side closed too")
    upgrades = len(upstream.requests)
    upgrade = {
        "connection": "Upgrade",
        "upgrade": "websocket",
        "sec-websocket-version": "13",
        "sec-websocket-key": "dGhlIHNhbXBsZSBub25jZQ==",
    }
    fresh = {**headers, "authorization": f"Bearer {token()}"}
    status, _, body = server.request("GET", "/v1/responses", headers={**fresh, **upgrade})
    # The issuer's only identity is gone: its tokens now name an issuer the gateway does not know.
    assert status == 401 and error_of(body)["check"] == "unknown_issuer", body
    assert len(upstream.requests) == upgrades

    def socket_rows() -> list[dict]:
        return [r for r in usage_rows(gateway) if r["route"] == "ws:/v1/responses"]

    wait_for(lambda: socket_rows() and socket_rows()[0]["duration_ms"], 15, "the socket's row")
    (row,) = socket_rows()
    assert row["key_id"] == identity and row["subject"] == GITHUB_CLAIMS["sub"]
    assert server.shutdown() == 0


# -- the real Codex CLI -----------------------------------------------------------------------


def auth_script(tmp_path: Path, tokens: list[str]) -> tuple[Path, Path]:
    """A command for Codex's ``[model_providers.gw.auth]``: each run prints the next token of
    ``tokens`` (the last one again once they run out) and counts its runs in a file."""
    directory = tmp_path / "auth"
    directory.mkdir()
    for i, token in enumerate(tokens):
        (directory / f"token{i}").write_text(token)
    runs = directory / "runs"
    runs.write_text("")
    script = directory / "print-token"
    script.write_text(
        f"#!{sys.executable}\n"
        "import pathlib\n"
        f"d = pathlib.Path({str(directory)!r})\n"
        "runs = d / 'runs'\n"
        "n = len(runs.read_text().splitlines())\n"
        "runs.write_text(runs.read_text() + 'run\\n')\n"
        f"i = min(n, {len(tokens) - 1})\n"
        "print((d / f'token{i}').read_text())\n"
    )
    script.chmod(script.stat().st_mode | stat.S_IXUSR)
    return script, runs


def command_auth_home(tmp_path: Path, server, script: Path, websockets: bool) -> tuple[Path, Path]:
    """codex-config's member config with ``env_key`` replaced by command-backed auth (what
    ``codex-config --auth-command`` prints; that flag is another branch's)."""
    home, work, config = member_codex_home(tmp_path, server, MODEL, websockets=websockets)
    lines = [line for line in config.splitlines() if not line.startswith("env_key")]
    table = next(i for i, line in enumerate(lines) if line.startswith("[model_providers."))
    name = lines[table].strip("[]").split(".", 1)[1]
    lines += ["", f"[model_providers.{name}.auth]", f'command = "{script}"', "timeout_ms = 5000"]
    (home / "config.toml").write_text("\n".join(lines) + "\n")
    return home, work


def run_codex(codex: str, home: Path, work: Path, prompt: str) -> tuple[int, str, float]:
    env = member_env(home, "unused")
    env.pop("CODEX_GATEWAY_KEY")
    started = time.monotonic()
    result = subprocess.run(
        [codex, "exec", "--skip-git-repo-check", "--json", prompt],
        stdin=subprocess.DEVNULL,
        capture_output=True,
        timeout=180,
        cwd=work,
        env=env,
    )
    seconds = time.monotonic() - started
    out = result.stdout.decode(errors="replace") + result.stderr.decode(errors="replace")
    print(f"codex exit {result.returncode} after {seconds:.1f} s:\n{out[-2500:]}")
    return result.returncode, out, seconds


@pytest.mark.codex
@pytest.mark.parametrize("websockets", [False, True], ids=["http", "websocket"])
def test_codex_renews_a_token_that_expires_mid_turn(
    gateway, upstream, issuers, codex, tmp_path, websockets
):
    """Token 1 is valid for a few seconds more (its exp is inside the 60 s leeway); the turn
    asks Codex to run a tool that waits until token 1 is past the leeway, so the turn's next
    request carries an expired token: 401, Codex runs its command again, token 2, 200, and
    the turn ends normally."""
    identity = add_ci_identity(gateway, issuers)
    server = gateway.serve(upstream.url, env=ca_env(issuers))
    now = time.time()
    # exp + leeway = now + 8: accepted for the first request, refused after the tool.
    first = issuers.mint("gh", AUD, claims=GITHUB_CLAIMS, issued=now - 600, lifetime=600 - 52)
    second = issuers.mint("gh", AUD, claims=GITHUB_CLAIMS, lifetime=600)
    dead_at = now + 8 + 1
    wait = f"python3 -c 'import time; time.sleep(max(0, {dead_at} - time.time()))'"
    upstream.responder = tool_then_answer(wait, "Renewed without a hitch.", MODEL)
    script, runs = auth_script(tmp_path, [first, second])
    home, work = command_auth_home(tmp_path, server, script, websockets)
    code, out, _seconds = run_codex(codex, home, work, "Wait for the token to expire")
    assert code == 0, out
    assert "Renewed without a hitch." in out
    assert '"type":"turn.completed"' in out.replace(" ", "")
    assert "401" not in out and "Reconnecting" not in out and "turn.failed" not in out
    assert len(runs.read_text().splitlines()) >= 2  # Codex ran its command again
    methods = [r.method for r in upstream.requests]
    if websockets:
        # Socket 1 (token 1) ran the tool; its next response.create found the token expired:
        # a 401 event closed it. Codex reopened with token 1 (401 at the upgrade), ran its
        # command, reopened with token 2: the turn ended on the socket, never over HTTP.
        assert methods == ["GET", "GET"], methods
    else:
        assert set(methods) == {"POST"}
        assert any(tool_outputs(json.loads(r.body)) for r in upstream.requests)
    metrics = server.request("GET", "/metrics", headers=OPERATOR)[2].decode()
    assert 'codex_gateway_identity_refused_total{check="expired"} 1.0' in metrics
    wait_for(lambda: any(r["key_id"] == identity for r in usage_rows(gateway)), 15, "rows")
    assert {r["key_id"] for r in usage_rows(gateway)} == {identity}
    assert server.shutdown() == 0
    leak_scan(tmp_path, issuers.minted, skip={script.parent / "token0", script.parent / "token1"})


def test_an_identity_is_held_to_its_teams_models_and_its_lifetime_and_is_audited(
    gateway, upstream, issuers
):
    """Governance (issue 32) applies to an identity as to a key: its member's team's models,
    ``add-identity --expires`` (an expired identity is refused as an expired key is: 400 to
    Codex, since a new token would not help) and audit rows for its addition and removal."""
    gateway.admin("add-team", "ci-team", "--models", "gpt-5.6-luna")
    identity = add_ci_identity(gateway, issuers)
    gateway.admin("set-member", "ci", "--team", "ci-team")
    later = gateway.admin(
        "add-identity", "ci", "--issuer", issuers.issuers["gh"].url, "--audience", "other",
        "--claim", "repository=octo-org/x", "--expires", "7d",
    ).stdout  # fmt: skip
    assert re.search(r"added \(expires \d{4}-\d\d-\d\d \d\d:\d\d UTC\)", later), later
    listed = gateway.admin("list-identities", "ci").stdout
    assert len(re.findall(r" expires \d{4}-", listed)) == 1, listed
    server = gateway.serve(upstream.url, env=ca_env(issuers))
    token = issuers.mint("gh", AUD, claims=GITHUB_CLAIMS)
    status, _, body = server.post_json(STREAM, bearer(token))
    assert status == 400 and error_of(body)["code"] == "model_not_allowed", body
    assert "for member 'ci' (its team 'ci-team')" in error_of(body)["message"]
    luna = {"model": "gpt-5.6-luna", "stream": True}
    assert server.post_json(luna, bearer(token))[0] == 200
    assert len(upstream.requests) == 1

    with sqlite3.connect(gateway.database.removeprefix("sqlite:///")) as conn:
        conn.execute("UPDATE member_identities SET expires_ms = 1000 WHERE id = ?", (identity,))

    seen: list[bytes] = []

    def refused() -> bool:
        status, _, body = server.post_json(luna, bearer(token))
        seen.append(body)
        return status == 400

    wait_for(refused, 10, "the expired identity refused")
    body = seen[-1]
    assert error_of(body)["code"] == "expired_member_key"
    assert f"identity {identity} expired on 1970-01-01 00:00 UTC" in error_of(body)["message"]
    assert token.encode() not in body
    forwarded = len(upstream.requests)  # the ones served before the directory's refresh
    assert server.post_json(luna, bearer(token))[0] == 400
    assert len(upstream.requests) == forwarded

    gateway.admin("remove-identity", identity)
    rows = [json.loads(line) for line in gateway.admin("audit", "--json").stdout.splitlines()]
    mine = [(r["action"], r["target"]) for r in rows if r["target"] == identity]
    assert mine == [("add-identity", identity), ("remove-identity", identity)], rows
    added = next(r for r in rows if r["action"] == "add-identity" and r["target"] == identity)
    assert added["after"]["claims"] == {"repository_owner": "octo-org", "ref": "refs/heads/*"}
    assert token not in json.dumps(rows)
