"""Issue 31 end to end with every part real. A CI job: ``codex-proxy token github-actions``
fetches the job's token from a runner-like endpoint of a loopback HTTPS issuer (tests/
oidc_issuer.py, the GitHub claims), the gateway maps it to a member, and the real Codex runs
the helper for its bearer; the member's quota caps it. A person: signs in once with the device flow
against a real OpenID provider (npm ``oidc-provider``, HTTPS with a throwaway CA), the team
gateway maps that provider's ID tokens to a member (``add-identity``), and the real Codex CLI,
configured by ``codex-config --gateway --auth-command``, runs ``codex-proxy token oidc`` for its
bearer: the turn is served, the ledger names the identity and the subject, and no token lands
in the gateway's log, database or recording."""

from __future__ import annotations

import json
import os
import re
import sqlite3
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.oidc_issuer import ACTIONS_REQUEST_TOKEN, OidcIssuers
from tests.oidc_provider import OidcProvider, device_sign_in, env_for, provider, token_argv
from tests.test_token_codex import CODEX_PROXY, agent_text, codex_home, run_codex

pytestmark = [pytest.mark.e2e]


@pytest.fixture
def issuers(tmp_path: Path) -> Iterator[OidcIssuers]:
    directory = tmp_path / "issuer"
    directory.mkdir()
    server = OidcIssuers(directory).start()
    server.add("gh")
    yield server
    server.stop()


@pytest.mark.codex
def test_a_ci_job_with_its_github_token_is_a_capped_gateway_member_in_codex(
    gateway, upstream, codex, issuers, tmp_path
):
    from tests.test_gateway_identities import AUD, add_ci_identity

    identity = add_ci_identity(gateway, issuers)
    gateway.admin("set-member", "ci", "--five-hour-quota", "1")  # one turn, then capped
    server = gateway.serve(upstream.url, env={"SSL_CERT_FILE": str(issuers.ca_file)})
    command = f"{CODEX_PROXY} token github-actions --audience {AUD}"
    home, work, config = codex_home(tmp_path, server.port, command)
    assert "env_key" not in config
    env = {
        **os.environ,
        "SSL_CERT_FILE": str(issuers.ca_file),
        "ACTIONS_ID_TOKEN_REQUEST_URL": issuers.actions_request_url("gh"),
        "ACTIONS_ID_TOKEN_REQUEST_TOKEN": ACTIONS_REQUEST_TOKEN,
    }
    code, out, err = run_codex(codex, home, work, env)
    assert code == 0, out + err
    assert agent_text(out) == [upstream.text]
    assert issuers.fetches["/gh/actions-token"] >= 1 and issuers.minted
    (entry,) = gateway.usage()["identities"]
    assert entry["identity"] == identity and entry["member"] == "ci"
    assert set(entry["subjects"]) == {"repo:octo-org/octo-repo:ref:refs/heads/main"}
    # Capped as a member: the next turn is refused at once in Codex's words.
    code, out, err = run_codex(codex, home, work, env)
    assert code != 0 and "usage limit" in out + err, out + err
    for path in (p for p in gateway.tmp.rglob("*") if p.is_file()):
        if path.is_relative_to(home):
            continue
        data = path.read_bytes()
        assert not any(t.rsplit(".", 1)[1].encode() in data for t in issuers.minted), path
        assert ACTIONS_REQUEST_TOKEN.encode() not in data, path


@pytest.fixture
def idp(tmp_path: Path) -> Iterator[OidcProvider]:
    yield from provider(tmp_path)


@pytest.mark.codex
@pytest.mark.parametrize("websockets", [False, True], ids=["http", "websocket"])
def test_a_device_flow_sign_in_is_a_gateway_member_in_codex(
    gateway, upstream, codex, idp, tmp_path, websockets
):
    gateway.admin("add-member", "dana", "--five-hour-quota", "100000")
    added = gateway.admin(
        "add-identity", "dana", "--issuer", idp.issuer, "--audience", idp.client_id,
        "--claim", "sub=dana", "--claim", "email=*@example.test",
    ).stdout  # fmt: skip
    identity = re.search(r"identity (oi_[0-9a-f]{12})", added).group(1)
    record = tmp_path / "recording"
    server = gateway.serve(
        upstream.url, "--record", str(record), env={"SSL_CERT_FILE": str(idp.ca_file)}
    )

    config_dir = tmp_path / "config"
    env = env_for(idp, config_dir)
    signed = device_sign_in(idp, token_argv(idp), env, login="dana")
    assert signed.returncode == 0, signed.stderr
    token = signed.stdout.strip()

    command = f"{CODEX_PROXY} token oidc --issuer {idp.issuer} --client-id {idp.client_id}"
    home, work, config = codex_home(tmp_path, server.port, command, websockets=websockets)
    assert "env_key" not in config and "[model_providers.codex-gateway.auth]" in config
    code, out, err = run_codex(codex, home, work, env)
    assert code == 0, out + err
    assert agent_text(out) == [upstream.text]
    # The upstream saw an upstream key, never the person's token.
    assert upstream.requests or upstream.ws_connections
    assert all(token not in str(r.headers) for r in upstream.requests)

    usage = gateway.usage()
    (row,) = usage["members"]
    assert row["member"] == "dana" and row["requests"] >= 1
    (entry,) = usage["identities"]
    assert entry["identity"] == identity and entry["member"] == "dana"
    assert set(entry["subjects"]) == {"dana"}

    # No token anywhere the gateway writes: its logs, its database, the recording.
    # (The person's own sign-in file, config_dir, holds it by design; Codex's home is Codex's.)
    theirs = (config_dir, home)
    written = [
        p
        for p in gateway.tmp.rglob("*")
        if p.is_file() and not any(p.is_relative_to(d) for d in theirs)
    ]
    assert any(p.is_relative_to(record) for p in written)
    assert written
    signature = token.rsplit(".", 1)[1].encode()
    for path in written:
        assert signature not in path.read_bytes(), path
    db = gateway.database.removeprefix("sqlite:///")
    with sqlite3.connect(db) as conn:
        subjects = {r[0] for r in conn.execute("SELECT subject FROM usage")}
    assert subjects == {"dana"}
    assert json.dumps(usage).find(token) == -1
