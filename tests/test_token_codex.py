"""The real Codex CLI with the config ``codex-config --gateway --auth-command`` prints, in front of
the Responses stand-in (which records the ``Authorization`` header): Codex runs our token
helper, sends what it printed as the bearer and, on a 401, runs it again and finishes the turn
with the new token (the GitHub Actions helper against the runner stand-in); and a person's ID
token from the real OpenID provider after one device-flow sign-in (the oidc helper)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.fake_upstream import FakeUpstream
from tests.identity_fakes import JWT_MARK, REQUEST_TOKEN, IdentityFakes
from tests.oidc_provider import (
    OidcProvider,
    device_sign_in,
    env_for,
    provider,
    store_file,
    token_argv,
)

ROOT = Path(__file__).resolve().parent.parent
CODEX_PROXY = str(Path(sys.executable).parent / "codex-proxy")  # the installed console script


def codex_home(
    tmp_path: Path, port: int, auth_command: str, websockets: bool = False
) -> tuple[Path, Path, str]:
    """CODEX_HOME with what ``codex-config --gateway [--no-websockets] --auth-command`` prints."""
    home, work = tmp_path / "codex-home", tmp_path / "work"
    home.mkdir()
    work.mkdir()
    config = subprocess.run(
        [
            sys.executable,
            "-m",
            "addons.codex_config",
            "--port",
            str(port),
            "--gateway",
            *([] if websockets else ["--no-websockets"]),
            "--toml-only",
            "--auth-command",
            auth_command,
        ],
        capture_output=True,
        text=True,
        timeout=60,
        check=True,
        cwd=ROOT,
    ).stdout
    (home / "config.toml").write_text(config)
    return home, work, config


def run_codex(codex: str, home: Path, work: Path, env: dict[str, str]) -> tuple[int, str, str]:
    env = {k: v for k, v in env.items() if not k.startswith(("OPENAI_", "CODEX_"))}
    env["CODEX_HOME"] = str(home)
    started = time.monotonic()
    result = subprocess.run(
        [codex, "exec", "--skip-git-repo-check", "--json", "Say hello"],
        stdin=subprocess.DEVNULL,
        capture_output=True,
        timeout=180,
        cwd=work,
        env=env,
    )
    out, err = result.stdout.decode(errors="replace"), result.stderr.decode(errors="replace")
    print(f"codex exit {result.returncode} after {time.monotonic() - started:.1f} s:\n{out}{err}")
    return result.returncode, out, err


def agent_text(out: str) -> list[str]:
    items = [json.loads(line) for line in out.splitlines() if line.startswith("{")]
    return [i["item"]["text"] for i in items if i.get("item", {}).get("type") == "agent_message"]


@pytest.fixture
def runner(tmp_path: Path) -> Iterator[IdentityFakes]:
    server = IdentityFakes(tmp_path / "runner").start()
    yield server
    server.stop()


@pytest.mark.codex
@pytest.mark.parametrize("websockets", [False, True], ids=["http", "websocket"])
def test_codex_renews_the_github_token_through_the_helper_after_a_401(
    codex, runner, tmp_path, websockets
):
    """Over HTTP a 401 on ``POST /v1/responses``, over Codex's WebSocket transport a 401 on the
    upgrade (``GET /v1/responses``): either way Codex runs the helper again and the turn ends
    normally with the next token."""
    first_jwt = f"eyJhbGciOiJSUzI1NiJ9.{JWT_MARK}1.c2lnbmF0dXJl"  # identity_fakes' first
    with FakeUpstream() as upstream:
        upstream.key_status = {first_jwt: 401}  # as a gateway answers an expired token
        home, work, config = codex_home(
            tmp_path,
            upstream.port,
            f"{CODEX_PROXY} token github-actions --audience gw-aud",
            websockets,
        )
        assert "env_key" not in config
        env = {
            **os.environ,
            "SSL_CERT_FILE": str(runner.ca_file),
            "ACTIONS_ID_TOKEN_REQUEST_URL": runner.request_url,
            "ACTIONS_ID_TOKEN_REQUEST_TOKEN": REQUEST_TOKEN,
        }
        code, out, err = run_codex(codex, home, work, env)
        assert code == 0, out + err
        assert agent_text(out) == [upstream.text]  # the turn finished normally
        # ... and the person saw no retry: no error event, no "Reconnecting... (401 ...)".
        events = [json.loads(line) for line in out.splitlines() if line.startswith("{")]
        assert [e["type"] for e in events] == [
            "thread.started",
            "turn.started",
            "item.completed",
            "turn.completed",
        ]
        assert "Reconnecting" not in err and "401" not in out + err
        turns = [r for r in upstream.requests if r.path_qs == "/v1/responses"]
        assert {r.method for r in turns} == {"GET" if websockets else "POST"}
        bearers = [r.header_values("authorization") for r in turns]
    # Codex sent the helper's token, got a 401, ran the helper again and retried with its next.
    assert bearers == [[f"Bearer {first_jwt}"], [f"Bearer {runner.jwts[1]}"]]
    assert runner.jwts[0] == first_jwt and len(runner.jwts) == 2
    assert all("audience=gw-aud" in s.path_qs for s in runner.seen)
    # Codex asked the provider's /models with the same bearer (a 404 there is ignored).
    models = [r for r in upstream.requests if r.path_qs != "/v1/responses"]
    assert models and all(r.path_qs.startswith("/v1/models?") for r in models)
    assert REQUEST_TOKEN not in out + err


@pytest.fixture
def idp(tmp_path: Path) -> Iterator[OidcProvider]:
    yield from provider(tmp_path)


@pytest.mark.codex
def test_codex_sends_the_device_flow_id_token(codex, idp, tmp_path):
    """After one sign-in in a terminal (played here), Codex's runs of the helper print the
    cached ID token without asking, and Codex sends it on every request."""
    config_dir = tmp_path / "config"
    env = env_for(idp, config_dir)
    signed = device_sign_in(idp, token_argv(idp), env, login="dana")
    assert signed.returncode == 0, signed.stderr
    token = signed.stdout.strip()
    command = f"{CODEX_PROXY} token oidc --issuer {idp.issuer} --client-id {idp.client_id}"
    with FakeUpstream() as upstream:
        home, work, _ = codex_home(tmp_path, upstream.port, command)
        code, out, err = run_codex(codex, home, work, env)
        assert code == 0, out + err
        assert agent_text(out) == [upstream.text]
        bearers = {v for r in upstream.requests for v in r.header_values("authorization")}
    assert bearers == {f"Bearer {token}"}
    assert json.loads(store_file(config_dir).read_text())["id_token"] == token
