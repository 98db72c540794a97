"""``codex-proxy token github-actions``: the job's GitHub OIDC token on stdout, against the
loopback HTTPS stand-in of the runner's token endpoint (tests/identity_fakes.py); and the
``token`` command's place in ``codex-proxy help``."""

from __future__ import annotations

import os
import subprocess
import sys
import urllib.parse
from collections.abc import Iterator
from pathlib import Path

import pytest

from addons import commands
from addons.token_helpers import github_actions_token, main
from tests.identity_fakes import JWT_MARK, REQUEST_TOKEN, IdentityFakes

ROOT = Path(__file__).resolve().parent.parent
AUDIENCE = "https://gateway.example.test/codex"


@pytest.fixture
def fakes(tmp_path: Path) -> Iterator[IdentityFakes]:
    server = IdentityFakes(tmp_path).start()
    yield server
    server.stop()


def runner_env(fakes: IdentityFakes, **extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("ACTIONS_")}
    env.update(
        SSL_CERT_FILE=str(fakes.ca_file),
        ACTIONS_ID_TOKEN_REQUEST_URL=fakes.request_url,
        ACTIONS_ID_TOKEN_REQUEST_TOKEN=REQUEST_TOKEN,
    )
    env.update(extra)
    return env


def run_token(*args: str, env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "addons.commands", "token", *args],
        capture_output=True,
        text=True,
        timeout=60,
        cwd=ROOT,
        env=env,
        stdin=subprocess.DEVNULL,
    )


def test_the_job_token_is_printed_alone_on_stdout(fakes):
    """The real command: one line on stdout, the JWT the runner handed out for our audience,
    asked with the request token as the reference asks it (``&audience=`` after the runner's
    own query, ``Authorization: bearer``)."""
    result = run_token("github-actions", "--audience", AUDIENCE, env=runner_env(fakes))
    assert result.returncode == 0, result.stderr
    assert result.stdout == fakes.jwts[-1] + "\n" and JWT_MARK in result.stdout
    assert result.stderr == ""
    (seen,) = fakes.seen
    query = urllib.parse.parse_qs(urllib.parse.urlsplit(seen.path_qs).query)
    assert query == {"api-version": ["2.0"], "audience": [AUDIENCE]}
    assert seen.headers["authorization"] == f"bearer {REQUEST_TOKEN}"


def test_the_request_url_flag_overrides_the_variable(fakes):
    env = runner_env(fakes, ACTIONS_ID_TOKEN_REQUEST_URL="https://127.0.0.1:1/nowhere")  # noqa: S106
    result = run_token(
        "github-actions",
        "--audience",
        "aud-x",
        "--github-oidc-request-url",
        fakes.request_url.replace("api-version=2.0", "api-version=3"),
        env=env,
    )
    assert result.returncode == 0, result.stderr
    assert fakes.seen[0].path_qs == "/github/token?api-version=3&audience=aud-x"


REQUEST_TOKEN_B = REQUEST_TOKEN.encode()
URL_VAR, TOKEN_VAR = b"ACTIONS_ID_TOKEN_REQUEST_URL", b"ACTIONS_ID_TOKEN_REQUEST_TOKEN"


def vars_(url: bytes, token: bytes) -> dict[bytes, bytes]:
    return {URL_VAR: url, TOKEN_VAR: token}


@pytest.mark.parametrize(
    ("env", "expected"),
    [
        ({TOKEN_VAR: REQUEST_TOKEN_B}, "ACTIONS_ID_TOKEN_REQUEST_URL is not"),
        ({URL_VAR: b"https://x/"}, "ACTIONS_ID_TOKEN_REQUEST_TOKEN is not"),
        (
            vars_(b"http://127.0.0.1:9/t", REQUEST_TOKEN_B),
            "GitHub OIDC request URL must be HTTPS without user info or fragment",
        ),
        (
            vars_(b"https://u:p@127.0.0.1:9/t", REQUEST_TOKEN_B),
            "GitHub OIDC request URL must be HTTPS without user info or fragment",
        ),
        (
            vars_(b"https://127.0.0.1:9/t", b"bad token!"),
            "invalid workload identity bearer credential",
        ),
        (
            vars_(b"https://127.0.0.1:9/t", b"ab\ncd"),
            "invalid workload identity bearer credential",
        ),
        (
            vars_(b"https://127.0.0.1:9/t", b"a" * 16386),
            "GitHub OIDC request credential too large",
        ),
    ],
)
def test_broken_runner_settings_are_named_before_any_request(env, expected):
    """The reference's rules (shared with the strict proxy's --github-oidc), and a missing
    variable names the job permission that sets it."""
    from addons.token_helpers import TokenError

    with pytest.raises(TokenError) as info:
        github_actions_token("aud", environ=env)
    assert expected in str(info.value)
    assert "\n" not in str(info.value) and REQUEST_TOKEN not in str(info.value)
    if "is not set" in expected:
        assert "permissions: id-token: write" in str(info.value)


@pytest.mark.parametrize("status", [401, 500])
def test_a_refusing_runner_is_one_line_on_stderr_and_exit_1(fakes, status):
    fakes.github_status = status
    env = runner_env(fakes)
    if status == 401:
        env["ACTIONS_ID_TOKEN_REQUEST_TOKEN"] = "another-token"  # noqa: S105 - a fake
    result = run_token("github-actions", "--audience", AUDIENCE, env=env)
    assert result.returncode == 1 and result.stdout == ""
    assert result.stderr == (
        f"codex-proxy token github-actions: GitHub OIDC token request failed "
        f"(HTTP {status} from the server)\n"
    )
    assert REQUEST_TOKEN not in result.stderr and "another-token" not in result.stderr


def test_an_untrusted_runner_certificate_is_refused(fakes):
    env = runner_env(fakes)
    env.pop("SSL_CERT_FILE")
    env["SSL_CERT_DIR"] = str(fakes.directory / "no-such-dir")
    env["SSL_CERT_FILE"] = str(fakes.directory / "leaf.pem")  # not the CA
    result = run_token("github-actions", "--audience", AUDIENCE, env=env)
    assert result.returncode == 1 and result.stdout == ""
    assert "is not trusted" in result.stderr and len(result.stderr.splitlines()) == 1
    assert fakes.jwts == []


def test_an_empty_audience_is_refused(capsys):
    assert main(["github-actions", "--audience", " "]) == 1
    assert "--audience must not be empty" in capsys.readouterr().err


def test_help_lists_the_token_command(capsys):
    assert commands.main(["help"]) == 0
    out = capsys.readouterr().out
    assert "  token github-actions|oidc ..." in out
    with pytest.raises(SystemExit) as info:
        commands.main(["token", "--help"])
    assert info.value.code == 0
    assert "github-actions" in capsys.readouterr().out
