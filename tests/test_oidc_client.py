"""``codex-proxy token oidc`` against a real OpenID provider on loopback (npm's
``oidc-provider``, tests/oidc_provider.py): the device-flow sign-in, the 0600 store, the cached
ID token, the refresh grant, a denied sign-in, a revoked refresh token; and the polling rules
(RFC 8628 ``interval``/``slow_down``) with a scripted token endpoint."""

from __future__ import annotations

import asyncio
import io
import json
import os
import stat
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from addons import oidc_client
from tests.oidc_provider import (
    OidcProvider,
    device_sign_in,
    env_for,
    provider,
    store_file,
    token_argv,
)

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture
def idp(tmp_path: Path) -> Iterator[OidcProvider]:
    yield from provider(tmp_path)


@pytest.fixture
def short_idp(tmp_path: Path) -> Iterator[OidcProvider]:
    """ID tokens that live less than the cache margin: every run refreshes."""
    yield from provider(tmp_path, id_token_ttl=oidc_client.CACHE_MARGIN_S // 2)


def run_again(idp: OidcProvider, env: dict[str, str], *extra: str):
    return subprocess.run(
        token_argv(idp, *extra),
        capture_output=True,
        text=True,
        timeout=60,
        env=env,
        stdin=subprocess.DEVNULL,
        cwd=ROOT,
    )


def test_first_sign_in_then_cached_token_without_asking(idp, tmp_path):
    """The person signs in once (URL and code on stderr, the token alone on stdout); the
    refresh token lands in a 0600 file in 0700 directories; the next run prints the same ID
    token with no request at all (Codex's periodic runs are cheap)."""
    config = tmp_path / "config"
    env = env_for(idp, config)
    run = device_sign_in(idp, token_argv(idp), env, login="alice")
    assert run.returncode == 0, run.stderr
    assert "Sign-in Success" in run.page
    assert f"open {idp.issuer}/device?user_code=" in run.stderr and "Signed in." in run.stderr
    token = run.stdout.strip()
    assert run.stdout == token + "\n"
    claims = oidc_client.jwt_claims(token)
    assert claims["iss"] == idp.issuer and claims["aud"] == idp.client_id
    assert claims["sub"] == "alice" and claims["email"] == "alice@example.test"
    assert token not in run.stderr
    path = store_file(config)
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    for d in (path.parent, path.parent.parent):
        assert stat.S_IMODE(d.stat().st_mode) == 0o700
    saved = json.loads(path.read_text())
    assert saved["refresh_token"] and saved["id_token"] == token
    before = idp.paths()
    again = run_again(idp, env)
    assert again.returncode == 0, again.stderr
    assert again.stdout == token + "\n" and again.stderr == ""
    assert idp.paths() == before  # no request: the cached token


def test_an_expiring_token_is_refreshed_and_the_rotated_refresh_token_kept(short_idp, tmp_path):
    config = tmp_path / "config"
    env = env_for(short_idp, config)
    first = device_sign_in(short_idp, token_argv(short_idp), env, login="bob")
    assert first.returncode == 0, first.stderr
    saved = json.loads(store_file(config).read_text())
    before = short_idp.paths()
    again = run_again(short_idp, env)
    assert again.returncode == 0, again.stderr
    assert again.stderr == ""  # no sign-in asked
    second = again.stdout.strip()
    # A refreshed ID token issued in the same second as the first is byte for byte the same
    # (same claims, same iat), so the refresh shows in the provider's log, not in the token.
    assert oidc_client.jwt_claims(second)["sub"] == "bob"
    new = short_idp.paths()[len(before) :]
    assert "POST /token" in new and not any("/device" in p for p in new)
    rotated = json.loads(store_file(config).read_text())["refresh_token"]
    assert rotated != saved["refresh_token"]  # a public client's refresh token rotates
    # And the rotated one works in turn.
    before = short_idp.paths()
    third = run_again(short_idp, env)
    assert third.returncode == 0 and oidc_client.jwt_claims(third.stdout.strip())["sub"] == "bob"
    assert "POST /token" in short_idp.paths()[len(before) :]


def test_a_revoked_sign_in_without_a_terminal_says_to_run_it_in_one(short_idp, tmp_path):
    """``invalid_grant`` on refresh, stderr not a terminal (Codex's run): one clear line."""
    config = tmp_path / "config"
    env = env_for(short_idp, config)
    assert device_sign_in(short_idp, token_argv(short_idp), env).returncode == 0
    path = store_file(config)
    saved = json.loads(path.read_text())
    saved["refresh_token"] = "revoked-" + saved["refresh_token"][8:]
    path.write_text(json.dumps(saved))
    result = run_again(short_idp, env)
    assert result.returncode == 1 and result.stdout == ""
    (line,) = result.stderr.splitlines()
    assert "the sign-in has expired or was revoked (invalid_grant)" in line
    assert "once in a terminal" in line and "token oidc --issuer" in line
    assert saved["refresh_token"] not in line


def test_a_revoked_sign_in_in_a_terminal_starts_the_device_flow_again(short_idp, tmp_path):
    """Same, with stderr a terminal (a pty): a new sign-in instead of the error."""
    import pty

    config = tmp_path / "config"
    env = env_for(short_idp, config)
    assert device_sign_in(short_idp, token_argv(short_idp), env).returncode == 0
    path = store_file(config)
    saved = json.loads(path.read_text())
    saved["refresh_token"] = "revoked"  # noqa: S105 - a fake
    path.write_text(json.dumps(saved))
    master, slave = pty.openpty()
    proc = subprocess.Popen(
        token_argv(short_idp),
        stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        stderr=slave,
        env=env,
        cwd=ROOT,
    )
    os.close(slave)
    from tests.oidc_provider import sign_in

    seen = b""
    with os.fdopen(master, "rb", buffering=0) as terminal:
        while b"and check that it shows the code" not in seen:
            chunk = terminal.read(4096)
            assert chunk, seen
            seen += chunk
        text = seen.decode()
        assert "signing in again" in text
        url = next(w for w in text.split() if w.startswith("https://") and "user_code" in w)
        assert "Sign-in Success" in sign_in(short_idp, url, login="carol")
        out, _ = proc.communicate(timeout=60)
    assert proc.returncode == 0
    assert oidc_client.jwt_claims(out.decode().strip())["sub"] == "carol"


def test_a_denied_sign_in_ends_with_access_denied(idp, tmp_path):
    config = tmp_path / "config"
    run = device_sign_in(idp, token_argv(idp), env_for(idp, config), deny=True)
    assert run.returncode == 1 and run.stdout == ""
    assert run.stderr.splitlines()[-1] == (
        "codex-proxy token oidc: the sign-in was denied at the provider (access_denied)"
    )


def test_audience_picks_a_token_whose_aud_holds_it(idp, tmp_path):
    config = tmp_path / "config"
    env = env_for(idp, config)
    run = device_sign_in(idp, token_argv(idp, "--audience", idp.client_id), env)
    assert run.returncode == 0, run.stderr
    assert oidc_client.jwt_claims(run.stdout.strip())["aud"] == idp.client_id
    wrong = run_again(idp, env, "--audience", "https://other.example.test")
    # The cache is per audience: a refresh, whose tokens do not carry that audience.
    assert wrong.returncode == 1 and wrong.stdout == ""
    assert "no token for audience 'https://other.example.test'" in wrong.stderr


def test_an_http_issuer_or_an_untrusted_one_is_refused(idp, tmp_path):
    env = env_for(idp, tmp_path / "config")
    plain = idp.issuer.replace("https://", "http://")
    result = subprocess.run(
        [*token_argv(idp)[:6], plain, "--client-id", "x"],
        capture_output=True,
        text=True,
        timeout=60,
        env=env,
        stdin=subprocess.DEVNULL,
        cwd=ROOT,
    )
    assert result.returncode == 1
    assert "--issuer must be an https URL" in result.stderr
    env["SSL_CERT_FILE"] = str(idp.directory / "leaf.pem")
    result = run_again(idp, env)
    assert result.returncode == 1 and "is not trusted" in result.stderr
    assert idp.paths() == []


class Scripted:
    """A token endpoint that answers from a list, and a clock the sleeps move."""

    def __init__(self, device: dict[str, Any], polls: list[tuple[int, dict[str, Any]]]):
        self.device, self.polls = device, list(polls)
        self.slept: list[float] = []
        self.now = 0.0

    async def post_form(self, session, url, form, step):
        if form.get("grant_type") == oidc_client.DEVICE_GRANT:
            return self.polls.pop(0)
        return 200, self.device

    async def sleep(self, seconds: float) -> None:
        self.slept.append(seconds)
        self.now += seconds


DEVICE = {
    "device_code": "dc",
    "user_code": "ABCD-EFGH",
    "verification_uri": "https://idp.example.test/device",
    "expires_in": 60,
    "interval": 2,
}
ENDPOINTS = oidc_client.Endpoints(
    "https://idp.example.test", "https://idp.example.test/device", "https://idp.example.test/t"
)


def run_flow(script: Scripted, monkeypatch) -> tuple[dict[str, Any], str]:
    monkeypatch.setattr(oidc_client, "post_form", script.post_form)
    err = io.StringIO()
    tokens = asyncio.run(
        oidc_client.device_flow(
            None, ENDPOINTS, "cid", "openid", None, err, script.sleep, lambda: script.now
        )
    )
    return tokens, err.getvalue()


def test_polling_honours_interval_and_slow_down(monkeypatch):
    pending = (400, {"error": "authorization_pending"})
    script = Scripted(
        DEVICE, [pending, (400, {"error": "slow_down"}), pending, (200, {"id_token": "x"})]
    )
    tokens, err = run_flow(script, monkeypatch)
    assert tokens == {"id_token": "x"}
    assert script.slept == [2, 2, 7, 7]
    assert "open https://idp.example.test/device\n  and enter the code ABCD-EFGH" in err


@pytest.mark.parametrize(
    ("polls", "message"),
    [
        ([(400, {"error": "expired_token"})], "expired_token"),
        ([(400, {"error": "access_denied"})], "access_denied"),
        ([(400, {"error": "authorization_pending"})] * 40, "(expired); run again"),
        ([(401, {"error": "invalid_client"})], "HTTP 401 (invalid_client)"),
    ],
)
def test_polling_ends_with_a_clear_message(monkeypatch, polls, message):
    with pytest.raises(oidc_client.OidcError) as info:
        run_flow(Scripted(DEVICE, polls), monkeypatch)
    assert message in str(info.value)


def test_the_store_lives_under_xdg_config_home_or_dot_config(monkeypatch, tmp_path):
    assert oidc_client.config_dir({"XDG_CONFIG_HOME": "/x/y"}) == Path("/x/y/codex-proxy")
    monkeypatch.setenv("HOME", str(tmp_path))
    assert oidc_client.config_dir({"XDG_CONFIG_HOME": "relative"}) == (
        tmp_path / ".config" / "codex-proxy"
    )
    a = oidc_client.TokenStore.for_client("https://a", "c", tmp_path)
    b = oidc_client.TokenStore.for_client("https://a", "d", tmp_path)
    assert a.path != b.path and a.path.parent == tmp_path / "oidc"
    a.data["refresh_token"] = "secret-rt"  # noqa: S105 - a fake
    assert "secret-rt" not in repr(a)


def test_a_hostile_device_reply_cannot_drive_the_terminal(monkeypatch):
    script = Scripted(
        {**DEVICE, "verification_uri": "https://idp/\x1b]0;pwned\x07d", "user_code": "A\x1b[2JB"},
        [(200, {"id_token": "x"})],
    )
    _, err = run_flow(script, monkeypatch)
    assert "\x1b" not in err and "\x07" not in err
    assert "open https://idp/?]0;pwned?d" in err and "code A?[2JB" in err


def jwt_with(claims: dict[str, Any]) -> str:
    import base64

    payload = base64.urlsafe_b64encode(json.dumps(claims).encode()).rstrip(b"=").decode()
    return f"eyJhbGciOiJSUzI1NiJ9.{payload}.c2ln"


def test_pick_token_prefers_the_id_token_and_takes_a_jwt_access_token_for_an_api_audience():
    id_token = jwt_with({"aud": "cli", "exp": 2})
    access = jwt_with({"aud": ["https://api.example.test", "x"], "exp": 2})
    tokens = {"id_token": id_token, "access_token": access}
    assert oidc_client.pick_token(tokens, None) == id_token
    assert oidc_client.pick_token(tokens, "cli") == id_token
    assert oidc_client.pick_token(tokens, "https://api.example.test") == access
    with pytest.raises(oidc_client.OidcError) as info:
        oidc_client.pick_token(tokens, "other")
    assert "audiences: ['cli', 'https://api.example.test', 'x']" in str(info.value)
    with pytest.raises(oidc_client.OidcError, match="no ID token"):
        oidc_client.pick_token({"access_token": access}, None)


def test_concurrent_runs_share_one_rotating_refresh_token(short_idp, tmp_path):
    """Codex may run the helper several times at once: the file lock serialises them, so no
    run spends a refresh token another run has already rotated (oidc-provider revokes the
    whole grant on such a reuse, which would sign the person out)."""
    config = tmp_path / "config"
    env = env_for(short_idp, config)
    assert device_sign_in(short_idp, token_argv(short_idp), env).returncode == 0
    before = len(short_idp.paths())
    procs = [
        subprocess.Popen(
            token_argv(short_idp),
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            env=env,
            cwd=ROOT,
        )
        for _ in range(4)
    ]
    results = [(p.communicate(timeout=120), p.returncode) for p in procs]
    for (out, err), code in results:
        assert code == 0, err.decode()
        assert oidc_client.jwt_claims(out.decode().strip())["iss"] == short_idp.issuer
    new = short_idp.paths()[before:]
    assert new.count("POST /token") == 4  # four refreshes, one after the other, none refused
    assert run_again(short_idp, env).returncode == 0  # and the sign-in still holds
