"""The keyless mode (``--github-oidc``): rules against the reference binary, the start-up
exchange, renewal, outages, leaks, and the Codex CLI end to end, with loopback HTTPS fakes of
GitHub's and OpenAI's token endpoints behind a throwaway CA (``tests/identity_fakes.py``)."""

from __future__ import annotations

import asyncio
import io
import json
import os
import socket
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
from mitmproxy import io as mitm_io
from mitmproxy.test import taddons, tflow

from addons import cli, launch
from addons import workload_identity as wi
from addons.common import ALLOWED, KEY_INJECTED, REFUSED
from addons.forward import UpstreamForwarder
from addons.secret_memory import REDACTED
from tests.conftest import ROOT, START_TIMEOUT, ProxyProcess, launcher_cmd, wait_for
from tests.identity_fakes import ACCESS_MARK, JWT_MARK, REQUEST_TOKEN, IdentityFakes

SETTINGS = wi.IdentitySettings("api://openai", "idp_1", "sa_1", "https://127.0.0.1:9/t?x=1")


@pytest.fixture(autouse=True)
def clear_identity() -> Iterator[None]:
    yield
    wi.IDENTITY.clear()


# ---------------------------------------------------------------- the request token


@pytest.mark.parametrize(
    ("stdin", "token"),
    [
        (b"abc\n", b"abc"),
        (b"abc\r\n", b"abc"),
        (b"aZ09-._~+/=", b"aZ09-._~+/="),
        (b"abc\nsecond line! ignored", b"abc"),
        (b"a" * 16384, b"a" * 16384),
        (b"a" * 16384 + b"\r\n", b"a" * 16384),
        (b"a" * 16383 + b"\r\n", b"a" * 16383),
    ],
)
def test_request_token_accepted(stdin, token):
    assert wi.read_request_token(io.BytesIO(stdin)) == bytearray(token)


@pytest.mark.parametrize(
    ("stdin", "message"),
    [
        (b"", wi.MSG_INVALID_CREDENTIAL),
        (b"\n", wi.MSG_INVALID_CREDENTIAL),
        (b"to k", wi.MSG_INVALID_CREDENTIAL),
        (b"\ta", wi.MSG_INVALID_CREDENTIAL),
        (b"a\rb", wi.MSG_INVALID_CREDENTIAL),
        ("é".encode(), wi.MSG_INVALID_CREDENTIAL),
        (b"a" * 16385, wi.MSG_INVALID_CREDENTIAL),
        (b"a" * 16385 + b"\n", wi.MSG_INVALID_CREDENTIAL),
        (b"a" * 16386, wi.MSG_CREDENTIAL_TOO_LARGE),
        (b"a" * 16385 + b"\r\n", wi.MSG_CREDENTIAL_TOO_LARGE),
        (b"a" * 16384 + b"\r\r\n", wi.MSG_CREDENTIAL_TOO_LARGE),
        (b"a" * 20000 + b"\n", wi.MSG_CREDENTIAL_TOO_LARGE),
    ],
)
def test_request_token_refused_with_the_reference_messages(stdin, message):
    with pytest.raises(wi.WorkloadIdentityError) as info:
        wi.read_request_token(io.BytesIO(stdin))
    assert str(info.value) == message


# ---------------------------------------------------------------- settings and URL


@pytest.mark.parametrize(
    ("url", "message"),
    [
        ("https://127.0.0.1:9/t?api-version=2.0", None),
        ("HTTPS://example.test/t", None),
        ("https://@example.test/t", None),
        ("http://example.test/t", wi.MSG_URL_NOT_HTTPS),
        ("https://u:p@example.test/t", wi.MSG_URL_NOT_HTTPS),
        ("https://u@example.test/t", wi.MSG_URL_NOT_HTTPS),
        ("https://example.test/t#f", wi.MSG_URL_NOT_HTTPS),
        ("https://example.test/t#", wi.MSG_URL_NOT_HTTPS),
        ("not a url", wi.MSG_URL_INVALID),
        ("/relative", wi.MSG_URL_INVALID),
    ],
)
def test_request_url_rules(url, message):
    if message is None:
        wi.validate_request_url(url)
        return
    with pytest.raises(wi.WorkloadIdentityError) as info:
        wi.validate_request_url(url)
    assert str(info.value) == message


@pytest.mark.parametrize(
    ("fields", "flag"),
    [
        ({"audience": ""}, "--oidc-audience"),
        ({"audience": " "}, "--oidc-audience"),
        ({"identity_provider_id": "", "service_account_id": ""}, "--identity-provider-id"),
        ({"service_account_id": " "}, "--service-account-id"),
        ({"request_url": "", "audience": "a"}, "--github-oidc-request-url"),
        ({"audience": "", "request_url": "http://x/"}, "--oidc-audience"),  # before the URL
    ],
)
def test_blank_values_are_refused_in_the_reference_order(fields, flag):
    settings = wi.IdentitySettings(**{**SETTINGS.__dict__, **fields})
    with pytest.raises(wi.WorkloadIdentityError) as info:
        wi.validate_settings(settings)
    assert str(info.value) == f"workload identity requires a nonempty {flag}"


def test_audience_is_added_url_encoded_to_the_runner_query():
    url = wi.github_request_url("https://h/t?api-version=2.0", "api://openai x")
    assert url == "https://h/t?api-version=2.0&audience=api%3A%2F%2Fopenai+x"
    assert wi.github_request_url("https://h/t", "a") == "https://h/t?audience=a"


# ---------------------------------------------------------------- the exchange reply

GOOD_REPLY = {
    "access_token": "at-1",
    "issued_token_type": wi.ISSUED_TOKEN_TYPE,
    "token_type": "Bearer",
    "expires_in": 3600,
}


@pytest.mark.parametrize(
    ("change", "message"),
    [
        (
            {"issued_token_type": "urn:ietf:params:oauth:token-type:id_token"},
            wi.MSG_UNSUPPORTED_TYPE,
        ),
        ({"issued_token_type": None}, wi.MSG_UNSUPPORTED_TYPE),
        ({"token_type": "DPoP"}, wi.MSG_UNSUPPORTED_TYPE),
        ({"expires_in": "3600"}, wi.MSG_INVALID_LIFETIME),
        ({"expires_in": 1.5}, wi.MSG_INVALID_LIFETIME),
        ({"expires_in": True}, wi.MSG_INVALID_LIFETIME),
        ({"expires_in": 86401}, wi.MSG_INVALID_LIFETIME),
        ({"expires_in": None}, wi.MSG_INVALID_LIFETIME),
        ({"expires_in": 0}, wi.MSG_EXPIRED),
        ({"expires_in": -5}, wi.MSG_EXPIRED),
        ({"access_token": ""}, wi.MSG_UNREADABLE),
        ({"access_token": "a b"}, wi.MSG_UNREADABLE),
        ({"access_token": 12}, wi.MSG_UNREADABLE),
    ],
)
def test_exchange_reply_rules(change, message):
    with pytest.raises(wi.WorkloadIdentityError) as info:
        wi.parse_exchange_reply({**GOOD_REPLY, **change})
    assert str(info.value) == message
    assert "at-1" not in str(info.value)


def test_exchange_reply_gives_the_token_and_lifetime():
    token = wi.parse_exchange_reply({**GOOD_REPLY, "token_type": "bearer"})
    assert token.token == bytearray(b"at-1") and token.expires_in == 3600
    assert "at-1" not in repr(token)


# ---------------------------------------------------------------- the holder


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def test_holder_hands_out_the_token_until_just_before_expiry_and_redacts():
    clock = Clock()
    holder = wi.WorkloadIdentity(clock)
    source = bytearray(b"ghreq-secret")
    holder.configure(SETTINGS, source)
    assert source == bytearray(len(source))  # zeroed: the holder owns its copy
    with pytest.raises(wi.IdentityUnavailable):
        holder.header_value()
    holder.install(wi.AccessToken(bytearray(b"at-secret-1"), 100))
    assert holder.header_value() == "Bearer at-secret-1"
    clock.now += 89.9
    assert holder.header_value() == "Bearer at-secret-1"
    clock.now += 0.2  # inside the last tenth of the lifetime
    with pytest.raises(wi.IdentityUnavailable) as info:
        holder.header_value()
    assert str(info.value) == wi.MSG_UNAVAILABLE
    holder.install(wi.AccessToken(bytearray(b"at-secret-2"), 100))
    assert holder.matches("Bearer at-secret-2") and holder.matches("Bearer at-secret-1")
    assert not holder.matches("Bearer other")
    for text in (repr(holder), str(holder)):
        assert "secret" not in text
    holder.clear()
    assert not holder.active and not holder.matches("Bearer at-secret-2")


def test_renewal_is_due_at_about_80_percent_and_retries_back_off_within_the_lifetime():
    clock = Clock()
    holder = wi.WorkloadIdentity(clock)
    holder.configure(SETTINGS, bytearray(b"t"))
    holder.install(wi.AccessToken(bytearray(b"at"), 1000))
    for _ in range(50):
        assert 750 <= holder.next_renewal_in() <= 850
    assert all(0.4 <= holder.retry_delay(1) <= 0.6 for _ in range(20))
    assert all(holder.retry_delay(20) <= 30 * 1.2 for _ in range(20))
    holder.install(wi.AccessToken(bytearray(b"at"), 3))
    assert all(holder.retry_delay(10) <= 1.2 for _ in range(20))  # 3 s lifetime: cap 1 s


def test_a_follower_gets_each_token_over_the_pipe():
    """``--workers``: the supervisor's feed writes the current token at attach and each
    renewed one; the worker's follower installs them, keeping the age of the token."""
    from addons.workers.identity_feed import IdentityFeed, follow

    clock = Clock()
    leader, follower = wi.WorkloadIdentity(clock), wi.WorkloadIdentity(clock)
    leader.configure(SETTINGS, bytearray(b"ghreq"))
    leader.install(wi.AccessToken(bytearray(b"at-feed-1"), 100))
    clock.now += 30
    feed = IdentityFeed(leader)
    read_end, write_end = os.pipe()
    feed.attach(0, write_end)
    follow(read_end, follower)
    assert follower.active and not follower.can_renew
    assert follower.header_value() == "Bearer at-feed-1"
    assert follower.usable_until() == pytest.approx(leader.usable_until(), abs=0.01)
    leader.install(wi.AccessToken(bytearray(b"at-feed-2"), 100))
    feed.publish()
    wait_for(lambda: follower.matches("Bearer at-feed-2"), 10, "the renewed token")
    assert follower.header_value() == "Bearer at-feed-2"
    assert "feed" not in repr(follower) and "at-" not in repr(feed)
    feed.stop()
    follower.clear()


def test_a_malformed_feed_line_is_refused_and_zeroed():
    holder = wi.WorkloadIdentity()
    holder.follow()
    line = bytearray(b"nonsense at-secret\n")
    with pytest.raises(wi.WorkloadIdentityError):
        holder.install_shared(line)
    assert line == bytearray(len(line))


# ---------------------------------------------------------------- the forwarder


def allowed_flow():
    f = tflow.tflow()
    f.request.method, f.request.path = "POST", "/v1/responses"
    f.request.headers["authorization"] = "Bearer client-side"
    f.metadata[ALLOWED] = True
    return f


def test_forwarder_injects_the_access_token_and_scrubs_it():
    wi.IDENTITY.configure(SETTINGS, bytearray(b"ghreq"))
    wi.IDENTITY.install(wi.AccessToken(bytearray(b"at-forward-1"), 3600))
    addon = UpstreamForwarder()
    with taddons.context(addon):
        f = allowed_flow()
        addon.requestheaders(f)
        assert f.response is None and f.metadata[KEY_INJECTED] is True
        assert f.request.headers.get_all("authorization") == ["Bearer at-forward-1"]
        wi.IDENTITY.install(wi.AccessToken(bytearray(b"at-forward-2"), 3600))  # renewed
        addon.responseheaders(f)
        assert f.request.headers.get_all("authorization") == [REDACTED]


def test_forwarder_answers_503_without_a_valid_token_and_sends_nothing():
    wi.IDENTITY.configure(SETTINGS, bytearray(b"ghreq"))
    addon = UpstreamForwarder()
    with taddons.context(addon):
        f = allowed_flow()
        addon.requestheaders(f)
    assert f.response is not None and f.response.status_code == 503
    assert json.loads(f.response.content)["error"]["message"] == wi.MSG_UNAVAILABLE
    assert f.response.headers["retry-after"] == "1"
    assert f.metadata[REFUSED] == "workload-identity-unavailable"
    assert KEY_INJECTED not in f.metadata
    assert f.request.headers.get("authorization") == "Bearer client-side"  # never routed


@pytest.mark.parametrize(
    ("options", "needle"),
    [
        ({}, "codex_oidc_request_token_file"),
        ({"codex_oidc_request_token_file": "-", "codex_oidc_token_url": "http://h/t"}, "https"),
        ({"codex_oidc_request_token_file": "-", "codex_oidc_audience": ""}, "nonempty"),
    ],
)
def test_plain_mitmdump_options_are_checked_at_start_up(options, needle):
    from mitmproxy import exceptions

    addon = wi.WorkloadIdentityRenewal()
    base = {
        "codex_oidc_audience": "a",
        "codex_identity_provider_id": "i",
        "codex_service_account_id": "s",
        "codex_github_oidc_request_url": "https://h/t",
    }
    with taddons.context(addon) as tctx:
        with pytest.raises(exceptions.OptionsError, match=needle):
            tctx.configure(addon, codex_github_oidc=True, **{**base, **options})
    assert not wi.IDENTITY.active


# ---------------------------------------------------------------- the launcher's flags


@pytest.mark.parametrize(
    "argv",
    [
        ["--oidc-audience", "a"],
        ["--identity-provider-id", "i"],
        ["--github-oidc", "--oidc-audience", "a"],
    ],
)
def test_flag_errors_exit_2_before_reading_stdin(argv):
    stdin = io.BytesIO(b"tok\n")
    with pytest.raises(SystemExit) as info:
        cli.main(argv, stdin=stdin, harden=lambda: None)
    assert info.value.code == 2
    assert stdin.tell() == 0


def test_mitmdump_args_carry_the_settings_not_the_secrets():
    args = cli.mitmdump_args(
        cli.resolve_config(cli.build_parser().parse_args([])),
        cli.parse_upstream_url("https://api.openai.com/v1/responses"),
        ["codex_oidc_token_url=https://127.0.0.1:1/oauth/token"],
        SETTINGS,
    )
    sets = [args[i + 1] for i, a in enumerate(args) if a == "--set"]
    assert "codex_github_oidc=true" in sets
    assert "codex_oidc_audience=api://openai" in sets
    assert "codex_github_oidc_request_url=https://127.0.0.1:9/t?x=1" in sets
    assert sets.count("codex_oidc_token_url=https://127.0.0.1:1/oauth/token") == 1


def test_run_sh_web_hands_the_keyless_flags_to_the_credential_holding_proxy():
    from addons import web

    argv = oidc_argv("https://h/t?x=1")
    ns = web.build_parser().parse_args(argv)
    cmd = web.inner_command(ns, "info.json", [])
    assert cmd[cmd.index("--github-oidc") :] == argv


def test_replay_refuses_the_keyless_flags_before_loading_anything(capsys):
    from addons import replay

    with pytest.raises(SystemExit) as info:
        replay.main(["no-such-recording", *oidc_argv("https://h/t")])
    assert info.value.code == 2
    assert "drop --github-oidc" in capsys.readouterr().err


# ---------------------------------------------------------------- against the reference binary


def closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def oidc_argv(url: str, change: dict[str, str] | None = None) -> list[str]:
    """``--github-oidc`` and the four flags for request URL ``url`` (``change``: other values
    by flag)."""
    values = {
        "--oidc-audience": "api://openai",
        "--identity-provider-id": "idp_1",
        "--service-account-id": "sa_1",
        "--github-oidc-request-url": url,
        **(change or {}),
    }
    argv = ["--github-oidc"]
    for flag, value in values.items():
        argv += [flag, value]
    return argv


def run_reference(codex: str, argv: list[str], stdin: bytes) -> tuple[int, str]:
    proc = subprocess.run(
        [codex, "responses-api-proxy", *argv],
        input=stdin,
        capture_output=True,
        timeout=60,
        env={k: v for k, v in os.environ.items() if not k.startswith(("OPENAI_", "CODEX_"))},
    )
    return proc.returncode, proc.stderr.decode(errors="replace").splitlines()[0]


def run_ours(argv: list[str], stdin: bytes, capsys) -> tuple[int, str]:
    try:
        code = cli.main(argv, stdin=io.BytesIO(stdin), harden=lambda: None)
    except SystemExit as e:
        code = int(e.code or 0)
    return code, capsys.readouterr().err.splitlines()[0]


REFERENCE_CASES = {
    # name: (argv builder (closed https URL -> argv), stdin)
    "good token, GitHub unreachable": (lambda u: oidc_argv(u), b"tok\n"),
    "empty token": (lambda u: oidc_argv(u), b""),
    "bad character": (lambda u: oidc_argv(u), b"to k\n"),
    "16 384 bytes": (lambda u: oidc_argv(u), b"a" * 16384 + b"\r\n"),
    "16 385 bytes": (lambda u: oidc_argv(u), b"a" * 16385),
    "16 386 bytes": (lambda u: oidc_argv(u), b"a" * 16386),
    "http URL": (lambda u: oidc_argv(u.replace("https:", "http:")), b"tok\n"),
    "user info": (lambda u: oidc_argv(u.replace("https://", "https://u:p@")), b"tok\n"),
    "fragment": (lambda u: oidc_argv(u + "#f"), b"tok\n"),
    "not a URL": (lambda u: oidc_argv("not a url"), b"tok\n"),
    "URL before token": (lambda u: oidc_argv("http://x/"), b"to k\n"),
    "blank audience": (lambda u: oidc_argv(u, {"--oidc-audience": " "}), b"tok\n"),
    "blank service account": (lambda u: oidc_argv(u, {"--service-account-id": ""}), b"tok\n"),
    "upstream URL": (
        lambda u: [*oidc_argv(u), "--upstream-url", "http://127.0.0.1:9/v1/responses"],
        b"to k\n",
    ),
    "default upstream URL given": (
        lambda u: [*oidc_argv(u), "--upstream-url", "https://api.openai.com/v1/responses"],
        b"tok\n",
    ),
    "flag without --github-oidc": (lambda u: ["--oidc-audience", "a"], b"tok\n"),
    "--github-oidc without the rest": (lambda u: ["--github-oidc", "--oidc-audience", "a"], b""),
}


@pytest.mark.codex
@pytest.mark.parametrize("case", list(REFERENCE_CASES))
def test_same_message_and_exit_code_as_the_reference(case, codex, capsys):
    build, stdin = REFERENCE_CASES[case]
    argv = build(f"https://127.0.0.1:{closed_port()}/token?api-version=2.0")
    ref_code, ref_line = run_reference(codex, argv, stdin)
    our_code, our_line = run_ours(argv, stdin, capsys)
    assert our_code == ref_code
    if ref_code == 1:
        assert our_line == ref_line
    else:
        assert ref_code == 2 and "error" in our_line


# ---------------------------------------------------------------- start-up, end to end


@pytest.fixture
def fakes(tmp_path: Path) -> Iterator[IdentityFakes]:
    (tmp_path / "fakes").mkdir()
    f = IdentityFakes(tmp_path / "fakes").start()
    yield f
    f.stop()


def keyless_argv(fakes: IdentityFakes, upstream_url: str | None = None) -> list[str]:
    argv = [
        *oidc_argv(fakes.request_url),
        "--set",
        f"codex_oidc_token_url={fakes.token_url}",
    ]
    if upstream_url:
        argv += ["--set", f"codex_upstream_url={upstream_url}"]
    return argv


def test_startup_exchange_follows_the_protocol(fakes, upstream, monkeypatch, capsys):
    monkeypatch.setenv("SSL_CERT_FILE", str(fakes.ca_file))
    ran: list[list[str]] = []

    def fake_run(args):
        ran.append(list(args))
        return 0

    monkeypatch.setattr(launch, "run_mitmdump", fake_run)
    stdin = io.BytesIO(REQUEST_TOKEN.encode() + b"\n")
    assert cli.main(keyless_argv(fakes, upstream.url), stdin=stdin, harden=lambda: None) == 0
    github, exchange = fakes.seen
    assert github.method == "GET"
    assert github.path_qs == "/github/token?api-version=2.0&audience=api%3A%2F%2Fopenai"
    assert github.headers["authorization"] == f"bearer {REQUEST_TOKEN}"
    assert exchange.method == "POST" and exchange.headers["content-type"] == "application/json"
    assert json.loads(exchange.body) == {
        "grant_type": "urn:ietf:params:oauth:grant-type:token-exchange",
        "subject_token_type": "urn:ietf:params:oauth:token-type:jwt",
        "subject_token": fakes.jwts[0],
        "identity_provider_id": "idp_1",
        "service_account_id": "sa_1",
    }
    assert len(ran) == 1 and "--set" in ran[0]
    assert not wi.IDENTITY.active  # cleared once mitmdump returned


@pytest.mark.parametrize(
    ("steer", "message"),
    [
        # The reference's line, then ours: the cause (never the token).
        ({"github_status": 500}, f"{wi.MSG_GITHUB_FAILED}\n  cause: HTTP 500 from the server"),
        (
            {"exchange_status": 401},
            "the workload identity token exchange was rejected with HTTP 401",
        ),
        ({"reply": {**GOOD_REPLY, "issued_token_type": "x"}}, wi.MSG_UNSUPPORTED_TYPE),
        ({"reply": {**GOOD_REPLY, "expires_in": "soon"}}, wi.MSG_INVALID_LIFETIME),
        ({"reply": {**GOOD_REPLY, "expires_in": 0}}, wi.MSG_EXPIRED),
    ],
)
def test_startup_failures_exit_1_before_listening(fakes, monkeypatch, capsys, steer, message):
    monkeypatch.setenv("SSL_CERT_FILE", str(fakes.ca_file))
    monkeypatch.setattr(launch, "run_mitmdump", lambda args: pytest.fail("must not start"))
    for name, value in steer.items():
        setattr(fakes, name, value)
    stdin = io.BytesIO(REQUEST_TOKEN.encode())
    assert cli.main(keyless_argv(fakes), stdin=stdin, harden=lambda: None) == 1
    err = capsys.readouterr().err
    assert err == f"Error: {message}\n"
    assert not wi.IDENTITY.active


def test_untrusted_ca_is_a_failed_github_request(fakes, monkeypatch, capsys, tmp_path):
    other = tmp_path / "empty-ca.pem"
    other.write_text("")
    monkeypatch.setenv("SSL_CERT_FILE", str(other))
    monkeypatch.setenv("SSL_CERT_DIR", str(tmp_path))
    stdin = io.BytesIO(REQUEST_TOKEN.encode())
    assert cli.main(keyless_argv(fakes), stdin=stdin, harden=lambda: None) == 1
    first, second = capsys.readouterr().err.splitlines()
    assert first == f"Error: {wi.MSG_GITHUB_FAILED}"
    assert second.startswith("  cause: TLS: the certificate of 127.0.0.1:")
    assert "CERTIFICATE_VERIFY_FAILED" in second and REQUEST_TOKEN not in second
    assert fakes.seen == []  # the TLS handshake failed: the request token never left


@pytest.mark.parametrize(
    ("url", "cause"),
    [
        ("https://127.0.0.1:{closed}/token", "  cause: cannot connect to 127.0.0.1:{closed} ("),
        ("https://no-such-host.invalid/token", "  cause: DNS: cannot resolve no-such-host.invalid"),
    ],
)
def test_an_unreachable_request_url_names_the_cause_on_a_second_line(url, cause, capsys):
    """Offline: the reference's line, then why (refused, DNS), never the request token."""
    closed = closed_port()
    argv = oidc_argv(url.format(closed=closed))
    assert cli.main(argv, stdin=io.BytesIO(b"tok-SECRET\n"), harden=lambda: None) == 1
    err = capsys.readouterr().err
    first, second = err.splitlines()
    assert first == f"Error: {wi.MSG_GITHUB_FAILED}"
    assert second.startswith(cause.format(closed=closed)), second
    assert "tok-SECRET" not in err


def start_keyless(
    tmp_path: Path, fakes: IdentityFakes, upstream_url: str, *args: str, name: str = "k"
) -> ProxyProcess:
    """The launcher in the keyless mode, the request token on stdin, trusting the fakes' CA
    through ``SSL_CERT_FILE``; the upstream through the ``codex_upstream_url`` seam."""
    info = tmp_path / f"info-{name}.json"
    dump_dir = tmp_path / f"dumps-{name}"
    cmd = [
        *launcher_cmd(),
        "--server-info",
        str(info),
        "--http-shutdown",
        "--dump-dir",
        str(dump_dir),
        *keyless_argv(fakes, upstream_url),
        *args,
    ]
    out, err = tmp_path / f"stdout-{name}.log", tmp_path / f"stderr-{name}.log"
    with open(out, "wb") as fo, open(err, "wb") as fe:
        proc = subprocess.Popen(
            cmd,
            stdin=subprocess.PIPE,
            stdout=fo,
            stderr=fe,
            cwd=ROOT,
            env={**os.environ, "SSL_CERT_FILE": str(fakes.ca_file)},
        )
    assert proc.stdin is not None
    proc.stdin.write(REQUEST_TOKEN.encode() + b"\n")
    proc.stdin.close()
    handle = ProxyProcess(proc, 0, info, out, err, dump_dir, True)
    try:
        wait_for(lambda: info.exists() or proc.poll() is not None, START_TIMEOUT, "server-info")
    except AssertionError:
        handle.stop()
        raise
    if proc.poll() is not None:
        raise AssertionError(f"proxy exited {proc.returncode}:\n{handle.output()}")
    handle.port = json.loads(info.read_text())["port"]
    return handle


@pytest.fixture
def keyless(tmp_path: Path) -> Iterator[list[ProxyProcess]]:
    started: list[ProxyProcess] = []
    yield started
    for handle in started:
        handle.stop()


def bearer_tokens(upstream) -> list[str]:
    return [
        value.removeprefix("Bearer ")
        for r in upstream.requests
        for value in r.header_values("authorization")
    ]


@pytest.mark.e2e
def test_renewal_while_requests_flow(tmp_path, fakes, upstream, keyless):
    fakes.lifetime = 3
    proxy = start_keyless(tmp_path, fakes, upstream.url)
    keyless.append(proxy)
    assert fakes.access_tokens == [f"at-{ACCESS_MARK}-1"]  # exchanged before listening
    statuses = []

    def renewed_twice() -> bool:
        statuses.append(proxy.post_json({"model": "m", "stream": True})[0])
        return len(fakes.access_tokens) >= 3 and len(set(bearer_tokens(upstream))) >= 3

    wait_for(renewed_twice, 60, "two renewals seen upstream")
    assert set(statuses) == {200}, statuses
    seen = bearer_tokens(upstream)
    assert len(seen) == len(upstream.requests)  # every request carried exactly one token
    assert set(seen) <= set(fakes.access_tokens)
    # In order: a request never goes out with an older token than the one before it.
    order = [fakes.access_tokens.index(t) for t in seen]
    assert order == sorted(order)
    assert proxy.shutdown() == 0
    assert "workload identity renewed" in proxy.output()


@pytest.mark.e2e
def test_token_endpoint_down_then_back(tmp_path, fakes, upstream, keyless):
    fakes.lifetime = 3
    proxy = start_keyless(tmp_path, fakes, upstream.url)
    keyless.append(proxy)
    fakes.exchange_status = 503
    replies: list[tuple[int, bytes]] = []

    def refused() -> bool:
        status, _headers, body = proxy.post_json({"model": "m"})
        replies.append((status, body))
        return status == 503

    wait_for(refused, 60, "a 503 once the token expired during the outage")
    assert json.loads(replies[-1][1]) == {
        "error": {
            "type": "codex_proxy",
            "code": "workload_identity_unavailable",
            "message": "workload identity renewal temporarily unavailable; retry later",
        }
    }
    assert {s for s, _ in replies[:-1]} <= {200}
    upstream_before = len(upstream.requests)
    assert proxy.post_json({"model": "m"})[0] == 503  # still down: nothing goes upstream
    assert len(upstream.requests) == upstream_before
    fakes.exchange_status = 200
    wait_for(lambda: proxy.post_json({"model": "m"})[0] == 200, 60, "recovery")
    assert bearer_tokens(upstream)[-1] == fakes.access_tokens[-1]
    assert all(bearer_tokens(upstream))  # never a request without the credential
    assert proxy.shutdown() == 0
    out = proxy.output()
    assert "workload identity renewal failed" in out and "rejected with HTTP 503" in out


@pytest.mark.e2e
def test_no_secret_in_logs_dumps_flows_or_har(tmp_path, fakes, upstream, keyless):
    fakes.lifetime = 3
    record = tmp_path / "rec"
    proxy = start_keyless(
        tmp_path,
        fakes,
        upstream.url,
        "--record",
        str(record),
        "--set",
        "termlog_verbosity=debug",
        "--set",
        "flow_detail=4",
    )
    keyless.append(proxy)
    for pid_file in ("cmdline", "environ"):
        data = Path(f"/proc/{proxy.proc.pid}/{pid_file}").read_bytes()
        assert REQUEST_TOKEN.encode() not in data
    wait_for(
        lambda: (
            proxy.post_json({"model": "m", "stream": True})[0] == 200
            and len(fakes.access_tokens) >= 2
        ),
        60,
        "a renewal",
    )
    fakes.exchange_status = 503
    wait_for(lambda: proxy.post_json({"model": "m"})[0] == 503, 60, "a 503 during an outage")
    fakes.exchange_status = 200
    wait_for(lambda: proxy.post_json({"model": "m"})[0] == 200, 60, "recovery")
    assert proxy.request("GET", "/v1/models")[0] == 403
    assert proxy.shutdown() == 0

    places = {"stdout": proxy.stdout_path.read_bytes(), "stderr": proxy.stderr_path.read_bytes()}
    for path in [*record.rglob("*"), *proxy.dump_files()]:
        if path.is_file():
            places[str(path.relative_to(tmp_path))] = path.read_bytes()
    assert any(name.endswith("flows.mitm") and data for name, data in places.items())
    assert any(name.endswith("session.har") and data for name, data in places.items())
    secrets = fakes.secrets()
    assert len(secrets) >= 1 + 3 + 3
    for name, data in places.items():
        for secret in secrets:
            assert secret.encode() not in data, f"a secret found in {name}"
        for mark in (JWT_MARK, ACCESS_MARK, "REQLEAKCHECK"):
            assert mark.encode() not in data, f"{mark} found in {name}"
    with open(record / "flows.mitm", "rb") as f:
        flows = [fl for fl in mitm_io.FlowReader(f).stream() if fl.request.port == upstream.port]
    assert flows and all(fl.request.headers.get_all("authorization") == [REDACTED] for fl in flows)


@pytest.mark.e2e
def test_plain_mitmdump_reads_the_request_token_file(tmp_path, fakes, upstream):
    token_file = tmp_path / "request-token"
    token_file.write_text(REQUEST_TOKEN + "\n")
    info = tmp_path / "plain-info.json"
    from tests.conftest import plain_mitmdump_command

    cmd = plain_mitmdump_command(
        "proxy.py",
        upstream.url,
        info,
        [
            "codex_github_oidc=true",
            "codex_oidc_audience=api://openai",
            "codex_identity_provider_id=idp_1",
            "codex_service_account_id=sa_1",
            f"codex_github_oidc_request_url={fakes.request_url}",
            f"codex_oidc_token_url={fakes.token_url}",
            f"codex_oidc_request_token_file={token_file}",
        ],
    )
    log = tmp_path / "plain.log"
    with open(log, "wb") as out:
        proc = subprocess.Popen(
            cmd,
            stdin=subprocess.DEVNULL,
            stdout=out,
            stderr=subprocess.STDOUT,
            env={**os.environ, "SSL_CERT_FILE": str(fakes.ca_file)},
        )
    handle = ProxyProcess(proc, 0, info, log, log, None, True)
    try:
        wait_for(lambda: info.exists() or proc.poll() is not None, START_TIMEOUT, "server-info")
        assert proc.poll() is None, log.read_text()
        handle.port = json.loads(info.read_text())["port"]
        assert handle.post_json({"model": "m"})[0] == 200
        assert bearer_tokens(upstream) == [fakes.access_tokens[0]]
        assert handle.shutdown() == 0
    finally:
        handle.stop()
    data = log.read_bytes()
    assert REQUEST_TOKEN.encode() not in data and ACCESS_MARK.encode() not in data


@pytest.mark.e2e
def test_two_workers_share_one_identity(tmp_path, fakes, upstream, keyless):
    # The first token lasts 15 s (renewal due after 12 s), so the count below is read before
    # any renewal: both workers listen after one exchange, not one each.
    fakes.lifetime = 15
    proxy = start_keyless(tmp_path, fakes, upstream.url, "--workers", "2")
    keyless.append(proxy)
    assert len(fakes.exchanges()) == 1
    fakes.lifetime = 3
    statuses: list[int] = []

    def renewed_twice() -> bool:
        statuses.append(proxy.post_json({"model": "m", "stream": True})[0])
        return len(fakes.access_tokens) >= 3 and len(set(bearer_tokens(upstream))) >= 3

    wait_for(renewed_twice, 60, "two renewals seen upstream")
    # Past two renewals of a 3 s token, every request of both workers succeeded: the
    # followers got each renewed token (an unrenewed one expires and answers 503).
    assert set(statuses) == {200}, statuses
    assert set(bearer_tokens(upstream)) <= set(fakes.access_tokens)
    assert len(fakes.exchanges()) == len(fakes.access_tokens) == len(fakes.jwts)
    from tests.test_workers import children

    workers = children(proxy.proc.pid)
    for pid in workers:
        for name in ("cmdline", "environ"):
            data = Path(f"/proc/{pid}/{name}").read_bytes()
            assert not any(secret.encode() in data for secret in fakes.secrets())
    # A replacement worker gets the current token at spawn and serves with it.
    victim = min(workers)
    os.kill(victim, 9)
    wait_for(
        lambda: victim not in children(proxy.proc.pid) and len(children(proxy.proc.pid)) >= 2,
        30,
        "a replacement worker",
    )
    issued = len(fakes.access_tokens)
    statuses.clear()
    wait_for(
        lambda: (
            statuses.append(proxy.post_json({"model": "m"})[0]) is None
            and len(fakes.access_tokens) >= issued + 1
            and len(statuses) >= 10
        ),
        60,
        "a renewal after the replacement",
    )
    assert set(statuses) == {200}, statuses
    assert proxy.shutdown() == 0
    numbers = {int(p.name[:6]) for p in proxy.dump_files() if p.name[:6].isdigit()}
    assert {n % 2 for n in numbers} == {0, 1}, "both workers served requests"
    for secret in fakes.secrets():
        assert secret not in proxy.output()


# ---------------------------------------------------------------- the real Codex CLI


@pytest.mark.e2e
@pytest.mark.codex
def test_codex_session_in_the_keyless_mode_across_a_renewal(
    tmp_path, fakes, upstream, keyless, codex
):
    from tests.test_clients import printed_codex_config, run_codex

    fakes.lifetime = 3
    proxy = start_keyless(tmp_path, fakes, upstream.url)
    keyless.append(proxy)
    home, work = tmp_path / "codex-home", tmp_path / "work"
    home.mkdir()
    work.mkdir()
    (home / "config.toml").write_text(printed_codex_config(proxy, "--toml-only"))
    first = run_codex(codex, home, work)
    assert first.returncode == 0, first.stdout.decode() + first.stderr.decode()
    issued = len(fakes.access_tokens)
    wait_for(lambda: len(fakes.access_tokens) > issued, 30, "a renewal between the turns")
    # The second turn of the same session, after the renewal.
    second = run_codex(codex, home, work, extra=["resume", "--last"], prompt="Say hello again")
    assert second.returncode == 0, second.stdout.decode() + second.stderr.decode()
    last = json.loads(upstream.requests[-1].body)
    assert "Say hello again" in json.dumps(last["input"])
    assert upstream.text in json.dumps(last["input"])  # the first turn's reply: one session
    for result in (first, second):
        assert upstream.text in result.stdout.decode()
    seen = bearer_tokens(upstream)
    assert len(seen) == len(upstream.requests) >= 2
    assert len(set(seen)) >= 2 and set(seen) <= set(fakes.access_tokens)
    assert all(
        r.header_values("user-agent")[0].startswith("codex_exec/") for r in upstream.requests
    )
    assert proxy.shutdown() == 0
    for f in proxy.dump_files():
        assert ACCESS_MARK not in f.read_text()


def test_start_runs_on_a_helper_thread_inside_a_running_loop(fakes, monkeypatch):
    """Under plain ``mitmdump -s`` the start-up exchange runs in ``configure``, inside
    mitmproxy's event loop."""
    monkeypatch.setenv("SSL_CERT_FILE", str(fakes.ca_file))
    settings = wi.IdentitySettings("aud", "i", "s", fakes.request_url, fakes.token_url)

    async def inside_a_loop() -> None:
        wi.start(settings, bytearray(REQUEST_TOKEN.encode()))

    asyncio.run(inside_a_loop())
    assert wi.IDENTITY.header_value() == f"Bearer {fakes.access_tokens[0]}"
    assert sys.modules["addons.workload_identity"].IDENTITY is wi.IDENTITY


@pytest.mark.e2e
@pytest.mark.codex
def test_codex_shows_the_503_and_rides_out_a_token_outage(
    tmp_path, fakes, upstream, keyless, codex
):
    """During an outage Codex gets the JSON 503, shows its message while it retries, and the
    turn succeeds once the token endpoint is back."""
    from tests.test_clients import printed_codex_config

    fakes.lifetime = 3
    proxy = start_keyless(tmp_path, fakes, upstream.url)
    keyless.append(proxy)
    home, work = tmp_path / "codex-home", tmp_path / "work"
    home.mkdir()
    work.mkdir()
    (home / "config.toml").write_text(printed_codex_config(proxy, "--toml-only"))
    fakes.exchange_status = 503
    wait_for(lambda: proxy.post_json({"model": "m"})[0] == 503, 60, "the outage")
    env = {k: v for k, v in os.environ.items() if not k.startswith(("OPENAI_", "CODEX_"))}
    env["CODEX_HOME"] = str(home)
    proc = subprocess.Popen(
        [codex, "exec", "--skip-git-repo-check", "--json", "Say hello"],
        stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
        cwd=work,
        env=env,
    )
    events = []
    try:
        assert proc.stdout is not None
        for raw in proc.stdout:
            event = json.loads(raw) if raw.startswith(b"{") else {}
            events.append(event)
            if "Reconnecting... 1/5" in event.get("message", ""):
                assert wi.MSG_UNAVAILABLE in event["message"]
                fakes.exchange_status = 200
        assert proc.wait(120) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(10)
        if proc.stdout is not None:
            proc.stdout.close()
    assert fakes.exchange_status == 200, "Codex never reported the 503"
    assert events[-1]["type"] == "turn.completed"
    assert any(upstream.text in json.dumps(e) for e in events)
    assert bearer_tokens(upstream) and bearer_tokens(upstream)[-1] in fakes.access_tokens
    assert proxy.shutdown() == 0
