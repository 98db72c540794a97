"""The real Codex CLI as a gateway member: its quota language (docs/gateway.md, "What a member
sees in Codex"). Each test prints what Codex showed and how long it took."""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import threading
import time
from pathlib import Path

import pytest

from tests.conftest import ROOT, open_stream, wait_for
from tests.gateway_harness import (
    OPERATOR,
    bearer,
    member_codex_command,
    member_codex_home,
    run_member_codex,
)

pytestmark = [pytest.mark.e2e, pytest.mark.codex]

MODEL = "gpt-5.5"  # in Codex 0.171's catalog and in the rate card
TOKENS_PER_REQUEST = 59  # tests/fake_upstream.py's usage block


def codex_home(tmp_path: Path, server, model: str = MODEL) -> tuple[Path, Path]:
    """Codex over HTTP (``supports_websockets = false``): these are the HTTP refusals; the
    socket's are tests/test_gateway_ws*.py."""
    home, work, _ = member_codex_home(tmp_path, server, model, websockets=False)
    return home, work


def refused(server, reason: str) -> float:
    text = server.request("GET", "/metrics", headers=OPERATOR)[2].decode()
    match = re.search(rf'^codex_gateway_refused_total{{reason="{reason}"}} (\S+)$', text, re.M)
    return float(match.group(1)) if match else 0.0


def recorded_rate_limits(home: Path) -> list[dict]:
    """Every ``rate_limits`` object Codex wrote into its session files."""
    found = []
    for path in (home / "sessions").rglob("*.jsonl"):
        for line in path.read_text().splitlines():
            if '"rate_limits"' not in line:
                continue
            stack = [json.loads(line)]
            while stack:
                item = stack.pop()
                if isinstance(item, dict):
                    if isinstance(item.get("rate_limits"), dict):
                        found.append(item["rate_limits"])
                    stack.extend(item.values())
                elif isinstance(item, list):
                    stack.extend(item)
    return found


def test_a_spent_quota_ends_the_codex_turn_at_once(gateway, upstream, codex, tmp_path):
    gateway.admin("add-member", "alice", "--five-hour-quota", "100")
    key = gateway.add_key("alice")
    server = gateway.serve(upstream.url)
    for _ in range(2):  # 118 of 100 tokens
        assert server.post_json({"model": MODEL, "stream": True}, bearer(key))[0] == 200
    wait_for(lambda: gateway.usage()["total"]["requests"] == 2, 10, "rows")
    home, work = codex_home(tmp_path, server)
    before = len(upstream.requests)
    code, out, _ = run_member_codex(codex, home, work, key, timeout=60)
    assert code != 0
    assert "You've hit your usage limit" in out.replace("\u2019", "'"), out
    assert "Try again at" in out
    assert "Reconnecting" not in out  # no retry: one refusal, not a frozen terminal
    assert refused(server, "quota") == 1
    assert len(upstream.requests) == before  # nothing reached the upstream


def test_codex_records_the_members_gateway_windows(gateway, upstream, codex, tmp_path):
    gateway.admin("add-member", "bob", "--five-hour-quota", "1000", "--weekly-credits", "50")
    key = gateway.add_key("bob")
    # OpenAI's own headers about the operator's account must not reach the member.
    upstream.reply_headers = {
        "x-codex-primary-used-percent": "97",
        "x-codex-primary-window-minutes": "300",
        "x-codex-credits-balance": "123456",
    }
    server = gateway.serve(upstream.url)
    started = time.time()
    for _ in range(2):  # 118 tokens: 11.8 % of the 5-hour window
        assert server.post_json({"model": MODEL, "stream": True}, bearer(key))[0] == 200
    wait_for(lambda: gateway.usage()["total"]["requests"] == 2, 10, "rows")
    home, work = codex_home(tmp_path, server)
    code, out, _ = run_member_codex(codex, home, work, key)
    assert code == 0, out
    limits = recorded_rate_limits(home)
    assert limits, "Codex recorded no rate_limits"
    last = limits[-1]
    print(json.dumps(last, indent=1))
    primary, secondary = last["primary"], last["secondary"]
    # Codex's own turns add 59 tokens each before the next reply's headers are read.
    turns = round(primary["used_percent"] / 5.9)
    assert 2 <= turns <= 4 and primary["used_percent"] == pytest.approx(turns * 5.9), primary
    assert primary["window_minutes"] == 300
    # Under the limit: when the first counted request leaves the 5-hour window.
    assert started + 5 * 3600 - 1 <= primary["resets_at"] <= time.time() + 5 * 3600 + 1
    assert secondary["window_minutes"] == 10080
    # The weekly credits left (50 minus the few thousandths these turns cost), not OpenAI's.
    credits = last["credits"]
    assert credits["has_credits"] is True and credits["unlimited"] is False
    assert 49.9 <= float(credits["balance"]) < 50, credits


def codex_while_a_slot_is_held(
    server,
    upstream,
    key: str,
    args: list[str],
    env: dict[str, str],
    work: Path,
    hold_s: float = 0.0,
) -> tuple[int, str]:
    """Run ``codex`` (``args``, ``env``) as a member whose only concurrency slot a stream of
    its own holds: once the gateway has refused Codex for the slot (and ``hold_s`` more), the
    stream ends and frees it. Returns Codex's exit code and output."""
    upstream.gate = threading.Event()
    upstream.gate_timeout = 60
    conn, response = open_stream(server.port, {"model": MODEL, "stream": True}, headers=bearer(key))
    assert response.status == 200  # this stream holds the member's only slot
    started = time.monotonic()
    proc = subprocess.Popen(
        args, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
        cwd=work, env=env,
    )  # fmt: skip
    try:
        wait_for(lambda: refused(server, "concurrency") >= 1, 60, "a concurrency refusal")
        time.sleep(hold_s)  # Codex retries on its own meanwhile
        upstream.gate.set()  # the slot frees
        response.read()
        conn.close()
        stdout, stderr = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            proc.kill()
    out = stdout.decode(errors="replace") + stderr.decode(errors="replace")
    print(f"codex exit {proc.returncode} after {time.monotonic() - started:.1f} s:\n{out[-1500:]}")
    return proc.returncode, out


def test_a_busy_concurrency_slot_is_retried_by_codex_and_the_turn_succeeds(
    gateway, upstream, codex, tmp_path
):
    gateway.admin("add-member", "carol", "--max-concurrent", "1")
    key = gateway.add_key("carol")
    server = gateway.serve(upstream.url)
    home, work = codex_home(tmp_path, server)
    args, env = member_codex_command(codex, home, key)
    code, out = codex_while_a_slot_is_held(server, upstream, key, args, env, work)
    assert code == 0, out
    assert upstream.text in out


@pytest.mark.parametrize("cause", ["revoked member key", "unpriced model"])
def test_a_permanent_refusal_ends_the_codex_turn_with_its_cause(
    gateway, upstream, codex, tmp_path, cause
):
    gateway.admin("add-member", "dave", "--weekly-credits", "5")
    key = gateway.add_key("dave")
    server = gateway.serve(upstream.url)
    model, reason = MODEL, "unpriced_model"
    if cause == "revoked member key":
        key_id = gateway.admin("list-keys", "dave").stdout.splitlines()[-1].split()[0]
        gateway.admin("revoke-key", key_id)
        reason = "invalid_member_key"
        wait_for(lambda: server.post_json({"model": MODEL}, bearer(key))[0] == 400, 10, "revoked")
        # A probe sent before the gateway's directory refresh saw the revocation went upstream
        # (the key was still live then): only what Codex sends counts below.
        del upstream.requests[:]
    else:
        model = "gpt-unpriced-test"  # no rate-card entry, and dave has a credit quota
    home, work = codex_home(tmp_path, server, model)
    before = refused(server, reason)
    code, out, _ = run_member_codex(codex, home, work, key, timeout=60)
    assert code != 0
    assert reason in out  # Codex prints the refusal's JSON: its code and message
    assert "Reconnecting" not in out
    assert refused(server, reason) == before + 1  # one request: Codex did not retry
    assert upstream.requests == []


ARTIFACTS = ROOT / "test-artifacts"


def tmux(*args: str) -> str:
    return subprocess.run(
        ["tmux", *args], capture_output=True, text=True, timeout=30, check=True
    ).stdout


def stop_codex_daemons(home: Path) -> None:
    """The TUI starts a background `codex app-server` under CODEX_HOME that outlives it."""
    for proc in Path("/proc").iterdir():
        try:
            cmdline = (proc / "cmdline").read_bytes()
        except OSError:
            continue
        if proc.name.isdigit() and str(home).encode() in cmdline:
            try:
                os.kill(int(proc.name), signal.SIGKILL)
            except OSError:
                pass


def require_tmux() -> None:
    """Skip without tmux, except in CI, where ``./run.sh test`` installs it."""
    if shutil.which("tmux") is None:
        if os.environ.get("CI"):
            pytest.fail("tmux is missing in CI: ./run.sh test installs it")
        pytest.skip("tmux not installed (./run.sh test installs it)")


def codex_tui_status(
    codex: str, home: Path, work: Path, env: dict[str, str], reply: str, artifact: str
) -> str:
    """Drive Codex's TUI in tmux (160x45): say hello, wait for ``reply`` on the screen, then
    ``/status``; return the screen, also saved as ``test-artifacts/<artifact>``."""
    session = f"codex-gw-{os.getpid()}"
    env_args = [f"{k}={v}" for k, v in env.items() if k in ("CODEX_HOME", "CODEX_GATEWAY_KEY")]
    tmux(
        "new-session", "-d", "-s", session, "-x", "160", "-y", "45", "-c", str(work),
        "env", *env_args, codex,
    )  # fmt: skip

    def screen() -> str:
        return tmux("capture-pane", "-t", session, "-p")

    try:
        wait_for(lambda: "Ask Codex" in screen(), 60, "the Codex prompt")

        def submit(text: str) -> None:
            tmux("send-keys", "-t", session, "-l", text)
            wait_for(
                lambda: f"\N{SINGLE RIGHT-POINTING ANGLE QUOTATION MARK} {text}" in screen(),
                10,
                f"{text!r} typed",
            )
            # Keys that arrive together are read as a paste, where Enter is a newline: this
            # pause is the input pacing Codex's paste detection needs, not synchronisation.
            time.sleep(0.5)
            tmux("send-keys", "-t", session, "Enter")

        submit("Say hello")
        wait_for(lambda: reply in " ".join(screen().split()), 60, "the reply")
        submit("/status")
        wait_for(lambda: "Limits:" in screen(), 30, "/status")
        shown = screen()
    except AssertionError:
        print(screen())
        raise
    finally:
        subprocess.run(["tmux", "kill-session", "-t", session], capture_output=True, timeout=30)
        stop_codex_daemons(home)
    ARTIFACTS.mkdir(exist_ok=True)
    (ARTIFACTS / artifact).write_text(shown)
    print(shown)
    return shown


def test_the_codex_tui_with_a_gateway_member(gateway, upstream, codex, tmp_path):
    """What a member sees in Codex's TUI (docs/gateway.md): the turn works, the session records the
    windows, and `/status` and the status line do not show them (0.171, API-key provider)."""
    require_tmux()
    gateway.admin("add-member", "erin", "--five-hour-quota", "1000", "--weekly-quota", "10000")
    key = gateway.add_key("erin")
    server = gateway.serve(upstream.url)
    model = "gpt-6.2-sol"  # Codex 0.171's default: no "try the new model" screen
    home, work = codex_home(tmp_path, server, model)
    with (home / "config.toml").open("a") as f:
        f.write('\n[tui]\nstatus_line = ["five-hour-limit", "weekly-limit"]\n')
    _, env = member_codex_command(codex, home, key)
    shown = codex_tui_status(codex, home, work, env, upstream.text, "codex-tui-gateway-status.txt")
    assert key not in shown
    limits_line = next(line for line in shown.splitlines() if "Limits:" in line)
    # Codex 0.171 with an API-key provider: the windows are recorded, not displayed.
    assert "data not available yet" in limits_line, limits_line
    recorded = recorded_rate_limits(home)
    assert recorded and recorded[-1]["primary"]["window_minutes"] == 300
    assert recorded[-1]["secondary"]["window_minutes"] == 10080
