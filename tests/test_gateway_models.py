"""Models per member, end to end: ``add-member`` / ``set-member --models``, the refusal the real
Codex CLI shows over HTTP and over the WebSocket route, its reasoning-effort and fast-mode
variants of an allowed model passing, and ``GET /v1/models`` merged by Codex (docs/gateway.md,
"Models per member")."""

from __future__ import annotations

import json
import re
import subprocess
import time
from pathlib import Path

import pytest

from addons.codex_models import full_catalog
from tests.conftest import wait_for
from tests.gateway_harness import OPERATOR, bearer, member_codex_home, member_env
from tests.test_gateway_ws import creates

pytestmark = [pytest.mark.e2e]

#: Codex ends a turn the gateway refuses for good at once (about 1 s here); generous bound.
ENDS_SOON_S = 30
ALLOWED = "gpt-5.6-luna,gpt-6-*"


def run_codex(codex: str, home: Path, work: Path, key: str, *args: str) -> tuple[int, str, float]:
    """One ``codex exec`` turn with extra ``args``: (exit code, what it printed, seconds)."""
    started = time.monotonic()
    result = subprocess.run(
        [codex, "exec", "--skip-git-repo-check", "--json", *args, "Say hello"],
        stdin=subprocess.DEVNULL,
        capture_output=True,
        timeout=180,
        cwd=work,
        env=member_env(home, key),
    )
    seconds = time.monotonic() - started
    out = result.stdout.decode(errors="replace") + result.stderr.decode(errors="replace")
    print(f"codex {' '.join(args)} exit {result.returncode} after {seconds:.1f} s:\n{out[-2000:]}")
    return result.returncode, out, seconds


def refused_metric(server, reason: str) -> float:
    text = server.request("GET", "/metrics", headers=OPERATOR)[2].decode()
    found = re.search(rf'^codex_gateway_refused_total\{{reason="{reason}"\}} (\S+)$', text, re.M)
    return float(found.group(1)) if found else 0.0


def posts(upstream) -> list[dict]:
    return [json.loads(r.body) for r in upstream.requests if r.method == "POST"]


def test_models_are_set_listed_and_cleared_by_the_admin_commands(gateway):
    gateway.admin("add-member", "ivy", "--models", " gpt-5.6-luna , gpt-6-*")
    gateway.admin("add-member", "max")
    listing = gateway.admin("list-members").stdout
    print(listing)
    assert re.search(r"^ivy .* gpt-5.6-luna,gpt-6-\*\s*$", listing, re.M)
    assert re.search(r"^max .* all\s*$", listing, re.M)
    gateway.admin("set-member", "max", "--models", "gpt-5.5")
    assert re.search(r"^max .* gpt-5.5\s*$", gateway.admin("list-members").stdout, re.M)
    gateway.admin("set-member", "max", "--models", "")
    assert re.search(r"^max .* all\s*$", gateway.admin("list-members").stdout, re.M)
    bad = gateway.admin("set-member", "max", "--models", "gpt 5", check=False)
    assert bad.returncode == 2 and "only letters, digits" in bad.stderr
    assert "--models" in gateway.admin("set-member", "max", check=False).stderr


@pytest.mark.codex
@pytest.mark.parametrize("websockets", [False, True], ids=["http", "websocket"])
def test_codex_ends_the_turn_at_once_naming_the_model_and_what_the_member_may_use(
    gateway, upstream, codex, tmp_path, websockets
):
    gateway.admin("add-member", "ivy", "--models", ALLOWED)
    key = gateway.add_key("ivy")
    server = gateway.serve(upstream.url)  # the socket is served by default
    home, work, _ = member_codex_home(tmp_path, server, "gpt-5.5", websockets=websockets)
    code, out, seconds = run_codex(codex, home, work, key)
    assert code != 0 and seconds < ENDS_SOON_S
    assert "model_not_allowed" in out
    assert "model 'gpt-5.5' is not allowed for member 'ivy'" in out
    assert "it may use: gpt-5.6-luna, gpt-6-*" in out and "codex -m gpt-5.6-luna" in out
    assert "Reconnecting" not in out
    assert posts(upstream) == [] and creates(upstream) == []  # nothing went upstream
    if websockets:
        assert upstream.ws_connections >= 1  # refused on the socket, not over HTTP
    wait_for(lambda: gateway.usage()["total"]["refused"] >= 1, 10, "the refusal row")
    (row,) = gateway.usage()["members"]
    assert row["refusals"]["model"] == row["refused"] >= 1 and row["requests"] == 0
    assert refused_metric(server, "model_not_allowed") >= 1
    assert "model" in gateway.admin("usage").stdout.split("refused requests by kind")[1]


@pytest.mark.codex
@pytest.mark.parametrize("websockets", [False, True], ids=["http", "websocket"])
def test_reasoning_effort_and_fast_mode_of_an_allowed_model_pass(
    gateway, upstream, codex, tmp_path, websockets
):
    """Codex sends an effort as ``reasoning.effort`` and its fast mode as ``service_tier:
    priority``, with the model's own slug: both judged by the model, and forwarded."""
    gateway.admin("add-member", "ivy", "--models", ALLOWED)
    key = gateway.add_key("ivy")
    server = gateway.serve(upstream.url)
    home, work, _ = member_codex_home(tmp_path, server, "gpt-5.6-luna", websockets=websockets)
    args = ("-c", "model_reasoning_effort=xhigh", "-c", "service_tier=priority")
    code, out, _ = run_codex(codex, home, work, key, *args)
    assert code == 0, out
    assert upstream.text in out and "model_not_allowed" not in out
    sent = creates(upstream) if websockets else posts(upstream)
    turns = [m for m in sent if m.get("generate") is not False]
    assert turns, sent
    for body in turns:
        assert body["model"] == "gpt-5.6-luna"
        assert body["reasoning"]["effort"] == "xhigh"
        assert body["service_tier"] == "priority"
    assert refused_metric(server, "model_not_allowed") == 0


def test_get_v1_models_answers_the_members_catalog(gateway, upstream):
    gateway.admin("add-member", "ivy", "--models", ALLOWED)
    gateway.admin("add-member", "max")
    ivy, mx = gateway.add_key("ivy"), gateway.add_key("max")
    server = gateway.serve(upstream.url)
    version, entries = full_catalog()
    target = f"/v1/models?client_version={version}"
    status, headers, body = server.request("GET", target, headers=bearer(ivy))
    assert status == 200 and headers["content-type"] == "application/json"
    slugs = [m["slug"] for m in json.loads(body)["models"]]
    assert slugs == ["gpt-6-astra", "gpt-6-sol", "gpt-6-luna", "gpt-5.6-luna"]
    assert json.loads(body)["models"][0] == next(e for e in entries if e["slug"] == slugs[0])
    everything = json.loads(server.request("GET", "/v1/models", headers=bearer(mx))[2])
    assert [m["slug"] for m in everything["models"]] == [e["slug"] for e in entries]
    other = server.request("GET", "/v1/models?client_version=0.1.0", headers=bearer(ivy))
    assert other[0] == 200 and json.loads(other[2]) == {"models": []}
    assert server.request("GET", "/v1/models")[0] == 401  # a member key is required
    only_key = {"authorization": f"Bearer {ivy}"}
    assert server.request("GET", "/v1/models/gpt-5.5", headers=only_key)[0] == 403
    assert upstream.requests == []  # answered by the gateway, nothing forwarded
    # The 401 and the 403 are refusals; the answered catalogs are neither refusals nor rows.
    wait_for(lambda: gateway.usage()["total"]["refused"] == 2, 10, "the refusal rows")
    total = gateway.usage()["total"]
    assert total["refusals"]["auth"] == total["refusals"]["route"] == 1
    assert total["requests"] == 0


@pytest.mark.codex
def test_codex_with_command_backed_auth_merges_the_members_catalog(
    gateway, upstream, codex, tmp_path
):
    """With ``[model_providers.X.auth] command = ...`` Codex asks ``GET /v1/models
    ?client_version=…`` and merges the answer (CODEX.md): it decodes ours (a catalog it cannot
    decode makes it print "failed to decode models response"), caches it in
    ``models_cache.json``, and the turn of an allowed model goes on."""
    gateway.admin("add-member", "ivy", "--models", ALLOWED)
    key = gateway.add_key("ivy")
    server = gateway.serve(upstream.url)
    home, work, config = member_codex_home(tmp_path, server, "gpt-5.6-luna", websockets=False)
    command = tmp_path / "member-key.sh"
    command.write_text('#!/bin/sh\nprintf "%s\\n" "$CODEX_GATEWAY_KEY"\n')
    command.chmod(0o700)
    config = config.replace('env_key = "CODEX_GATEWAY_KEY"\n', "")
    config += f'\n[model_providers.codex-gateway.auth]\ncommand = "{command}"\n'
    (home / "config.toml").write_text(config)
    code, out, _ = run_codex(codex, home, work, key)
    assert code == 0 and upstream.text in out, out
    assert "failed to refresh available models" not in out and "decode" not in out
    cache = json.loads((home / "models_cache.json").read_text())
    assert [m["slug"] for m in cache["models"]] == [
        "gpt-6-astra",
        "gpt-6-sol",
        "gpt-6-luna",
        "gpt-5.6-luna",
    ]
    listed = subprocess.run(
        [codex, "debug", "models"],
        capture_output=True,
        timeout=120,
        stdin=subprocess.DEVNULL,
        env=member_env(home, key),
        cwd=work,
    )
    merged = [m["slug"] for m in json.loads(listed.stdout)["models"]]
    print("codex debug models after the merge:", merged)
    assert "gpt-5.6-luna" in merged and len(merged) == len(full_catalog()[1])


#: A 0004 database with a member, a live key and a refusal row.
ROWS_0004 = [
    "INSERT INTO members (name, five_hour_quota, weekly_quota, five_hour_credits_micro,"
    " weekly_credits_micro, max_concurrent, created_ms) VALUES ('a', 7, 0, 0, 0, 2, 1)",
    "INSERT INTO member_keys (id, member_id, key_hash, created_ms) VALUES ('mk_a', 1, 'ab', 1)",
    "INSERT INTO refusals (row_id, ts_ms, member_id, key_id, kind, code, status, route,"
    " count, instance) VALUES ('f1', 5, 1, 'mk_a', 'quota', 'quota_exceeded', 429,"
    " '/v1/responses', 1, 'i')",
]


def check_upgraded_0004(db) -> None:
    """The 0004 rows survive 0006: the member keeps every model until one is set."""
    (member,) = db.members()
    assert member["models"] is None and member["five_hour_quota"] == 7
    (entry,) = db.directory()
    assert entry["models"] is None and entry["max_concurrent"] == 2
    assert [r["code"] for r in db.refusal_rows(0)] == ["quota_exceeded"]
    db.set_member("a", models=" gpt-6-* ,gpt-5.5")
    assert db.directory()[0]["models"] == "gpt-6-*,gpt-5.5"
    db.set_member("a", five_hour_quota=9)  # models untouched
    assert db.members()[0]["models"] == "gpt-6-*,gpt-5.5"
    db.set_member("a", models="")
    assert db.members()[0]["models"] is None
    with pytest.raises(ValueError, match="model pattern"):
        db.add_member("b", models="gpt 5")


def test_a_0004_database_upgrades_to_member_models_in_place(tmp_path) -> None:
    from tests.test_gateway_units import upgraded_from

    db = upgraded_from(tmp_path, f"sqlite:///{tmp_path / 'old.db'}", "0004", ROWS_0004)
    try:
        check_upgraded_0004(db)
    finally:
        db.dispose()


def test_a_0004_database_upgrades_to_member_models_on_postgresql(tmp_path, pg_cluster) -> None:
    import uuid

    from tests.test_gateway_units import upgraded_from

    name = f"gw_{uuid.uuid4().hex[:8]}"
    pg_cluster.create_database(name)
    db = upgraded_from(tmp_path, pg_cluster.url(name), "0004", ROWS_0004)
    try:
        check_upgraded_0004(db)
    finally:
        db.dispose()


def test_the_chat_bridge_refuses_another_model_and_serves_an_effort_variant(gateway, upstream):
    """``serve --chat-bridge``: the openai SDK's request for another model gets 403
    ``model_not_allowed`` (its HTTP status kept for a client that is not Codex); an effort
    name of an allowed model (``gpt-5.6-luna-high``) is judged by its base model and served."""
    import openai

    gateway.admin("add-member", "ivy", "--models", ALLOWED)
    key = gateway.add_key("ivy")
    server = gateway.serve(upstream.url, "--chat-bridge")
    messages = [{"role": "user", "content": "Say hello"}]
    with openai.OpenAI(
        base_url=f"http://127.0.0.1:{server.port}/v1", api_key=key, max_retries=0, timeout=30
    ) as sdk:
        with pytest.raises(openai.PermissionDeniedError) as refused:
            sdk.chat.completions.create(model="gpt-5.5", messages=messages)
        print("openai SDK:", refused.value)
        assert refused.value.status_code == 403
        assert refused.value.code == "model_not_allowed"
        assert "it may use: gpt-5.6-luna, gpt-6-*" in str(refused.value)
        assert posts(upstream) == []
        reply = sdk.chat.completions.create(model="gpt-5.6-luna-high", messages=messages)
        assert reply.choices[0].message.content == upstream.text
    (sent,) = posts(upstream)
    assert sent["model"] == "gpt-5.6-luna" and sent["reasoning"]["effort"] == "high"
    # The bridge's own list stays the bare GET /v1/models, without a key (docs/bridge.md).
    status, _, body = server.request("GET", "/v1/models")
    assert status == 200 and "gpt-5.5" in [m["id"] for m in json.loads(body)["data"]]
    status, _, body = server.request("GET", "/v1/models?client_version=x", headers=bearer(key))
    assert status == 200 and json.loads(body) == {"models": []}


@pytest.mark.codex
def test_a_teams_models_bind_its_members_and_the_refusal_names_the_team(
    gateway, upstream, codex, tmp_path
):
    """A team's ``--models`` binds each member as the member's own does (both must allow):
    Codex's turn ends at once naming the team and its patterns; the member's catalog is the
    team's; a member's own list narrower than the team's is what it is held to."""
    gateway.admin("add-team", "interns", "--models", "gpt-5.6-luna,gpt-6-luna")
    gateway.admin("add-member", "ivy", "--team", "interns")
    gateway.admin("add-member", "jo", "--team", "interns", "--models", "gpt-6-*")
    ivy, jo = gateway.add_key("ivy"), gateway.add_key("jo")
    server = gateway.serve(upstream.url)
    home, work, _ = member_codex_home(tmp_path, server, "gpt-5.5", websockets=False)
    code, out, seconds = run_codex(codex, home, work, ivy)
    assert code != 0 and seconds < ENDS_SOON_S
    assert "model 'gpt-5.5' is not allowed for member 'ivy' (its team 'interns')" in out
    assert "it may use: gpt-5.6-luna, gpt-6-luna" in out
    assert posts(upstream) == []
    version, _ = full_catalog()
    target = f"/v1/models?client_version={version}"
    slugs = {
        m["slug"]
        for m in json.loads(server.request("GET", target, headers=bearer(ivy))[2])["models"]
    }
    assert slugs == {"gpt-5.6-luna", "gpt-6-luna"}
    slugs = {
        m["slug"]
        for m in json.loads(server.request("GET", target, headers=bearer(jo))[2])["models"]
    }
    assert slugs == {"gpt-6-luna"}  # the member's gpt-6-* and the team's list
    body = {"model": "gpt-6-sol", "input": "hi", "stream": True}
    status, _, reply = server.post_json(body, bearer(jo))
    assert status == 400, reply  # 403 model_not_allowed, as Codex gets it
    error = json.loads(reply)["error"]
    assert error.get("allowed") == ["gpt-5.6-luna", "gpt-6-luna"], reply
    (tmp_path / "jo").mkdir()
    home2, work2, _ = member_codex_home(tmp_path / "jo", server, "gpt-6-luna", websockets=True)
    code, out, _ = run_codex(codex, home2, work2, jo)
    assert code == 0 and upstream.text in out, out
