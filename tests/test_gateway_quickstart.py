"""docs/gateway.md's quick start, pasted as written, with the real Codex CLI on its defaults
(issue 29, "An operator's first hour"): no ``model`` in its config (it sends ``gpt-6.2-sol``) and
its WebSocket transport. The commands are read from the guide's first ``sh`` block and run
against the shipped config (tests/gateway_harness.py points ``serve`` at the stand-in and its
``--server-info`` at a temporary file); then what an operator reads in ``usage``, and what a
member sees when refused over the socket."""

from __future__ import annotations

import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import ROOT, wait_for
from tests.gateway_harness import Gateway, member_codex_home
from tests.test_gateway_ws import creates
from tests.test_gateway_ws_codex import ENDS_SOON_S, run

pytestmark = [pytest.mark.e2e, pytest.mark.codex]

GUIDE = ROOT / "docs" / "gateway.md"


def quick_start() -> list[list[str]]:
    """The commands of the guide's first ``sh`` block, each split as the shell would (the
    part after ``|`` for the piped ``serve``; comments dropped)."""
    block = re.search(r"```sh\n(.*?)```", GUIDE.read_text(), re.S)
    assert block, "docs/gateway.md has no sh block"
    commands = []
    for line in block.group(1).splitlines():
        line = line.split(" | ")[-1]
        words = shlex.split(line, comments=True)
        if words:
            commands.append(words)
    return commands


def run_quick_start(gw: Gateway, upstream_url: str, tmp_path: Path):
    """Run the quick start's gateway commands and ``codex-config`` as written (``serve`` with
    the harness's upstream, keys and server-info file); returns ``(server, member key,
    config.toml text, add-member's stderr)``."""
    key = added = server = config = None
    for words in quick_start():
        assert words[0] == "./run.sh", words
        if words[1] == "gateway" and words[2] == "serve":
            flags = words[3:]
            for option in ("--port", "--server-info"):  # the harness picks its own
                i = flags.index(option)
                del flags[i : i + 2]
            server = gw.serve(upstream_url, *flags)
        elif words[1] == "gateway" and words[2] == "usage":
            continue  # read below, once Codex has run
        elif words[1] == "gateway":
            proc = gw.admin(*words[2:])
            if words[2] == "add-key":
                key = proc.stdout.strip().splitlines()[-1]
            if words[2] == "add-member":
                added = proc.stderr
        elif words[1] == "codex-config":
            assert server is not None, "codex-config before serve"
            args = words[2:]
            args[args.index("--server-info") + 1] = str(server.info_path)
            config = subprocess.run(
                [sys.executable, "-m", "addons.codex_config", *args],
                capture_output=True,
                text=True,
                timeout=60,
                check=True,
                cwd=ROOT,
            ).stdout
    assert server and key and config is not None and added is not None
    return server, key, config, added


def test_the_quick_start_serves_codex_on_its_defaults_and_usage_tells_the_truth(
    gateway, upstream, codex, tmp_path
):
    server, key, config, added = run_quick_start(gateway, upstream.url, tmp_path)
    member = quick_start()[1][3]  # add-member NAME
    assert "warning" not in added  # the shipped card prices Codex's default model
    assert "supports_websockets = true" in config and "model =" not in config
    # The start-up note: one line (the catalog's three hidden models stay unpriced), not a list.
    wait_for(lambda: "gateway usage --unpriced" in server.output(), 10, "the start-up note")
    log = server.output()
    assert len([ln for ln in log.splitlines() if "rate card cannot price" in ln]) == 1
    assert "Codex's default" not in log and "credits.rates." not in log
    home, work = tmp_path / "codex-home", tmp_path / "work"
    home.mkdir()
    work.mkdir()
    (home / "config.toml").write_text(config)

    code, out, seconds = run(codex, home, work, key)
    assert code == 0, out
    assert upstream.text in out
    sent = creates(upstream)
    assert sent and {m.get("model") for m in sent} == {"gpt-6.2-sol"}  # Codex's default
    assert [m.get("generate") for m in sent][:1] == [False]  # its warm-up came first
    assert not [r for r in upstream.requests if r.method == "POST"]  # all over the socket
    turns = len([m for m in sent if m.get("generate") is not False])
    warmups = len(sent) - turns

    wait_for(lambda: gateway.usage()["total"]["requests"] == turns, 10, "the ledger rows")
    usage = gateway.usage()
    (row,) = usage["members"]
    assert row["member"] == member and row["warmups"] == warmups >= 1
    assert row["requests"] == turns and row["errors"] == 0 and row["refused"] == 0
    assert row["unpriced"] == 0 and row["credits"] and row["credits"] > 0  # the estimate
    text = gateway.admin("usage", "--since", "7d").stdout
    header = text.splitlines()[1].split()
    assert header[:5] == ["member", "requests", "warmups", "errors", "refused"]
    assert "warm-up(s)" in text
    # Their credits are the config's ESTIMATE, and usage says so.
    assert usage["priced_by_same_as"] == {"gpt-6.2-sol": turns}
    assert "an estimate the operator owns" in text

    # Over its 5-hour credit quota, over the socket: Codex ends the turn at once.
    gateway.admin("set-member", member, "--five-hour-credits", "0.000001")
    before = len(creates(upstream))
    code, out, seconds = run(codex, home, work, key)
    assert code != 0 and "You've hit your usage limit" in out.replace("\u2019", "'"), out
    assert seconds < ENDS_SOON_S and len(creates(upstream)) == before
    wait_for(lambda: gateway.usage()["total"]["refused"] >= 1, 10, "the refusal row")
    (row,) = gateway.usage()["members"]
    assert row["refusals"]["quota"] == row["refused"] >= 1 and row["errors"] == 0
    assert row["requests"] == turns  # a refusal is no request
    assert "refused requests by kind" in gateway.admin("usage").stdout


def test_a_member_refused_an_unpriced_model_on_the_socket_is_told_what_to_ask_for(
    gateway, upstream, codex, tmp_path
):
    """A model the card cannot price, for a member with a credit quota, over Codex's default
    transport: the refusal Codex prints says what to ask the gateway's operator for (the
    YAML key, or no credit quota) and a priced model to use meanwhile, as over HTTP."""
    hidden = "gpt-daybreak-blue-latest"  # in Codex's catalog, not priced by the shipped card
    gateway.admin("add-member", "bo", "--weekly-credits", "50")
    key = gateway.add_key("bo")
    server = gateway.serve(upstream.url)  # WebSocket by default
    home, work, _ = member_codex_home(tmp_path, server, hidden)  # codex-config --gateway
    code, out, seconds = run(codex, home, work, key)
    assert code != 0 and seconds < ENDS_SOON_S
    assert "unpriced_model" in out and "ask the gateway's operator" in out
    assert f"credits.rates.{hidden}" in out and "-c model=" in out
    assert "Reconnecting" not in out and creates(upstream) == []
    assert upstream.ws_connections >= 1  # it was refused on the socket, not over HTTP
    wait_for(lambda: gateway.usage()["total"]["refused"] >= 1, 10, "the refusal row")
    (row,) = gateway.usage()["members"]
    assert row["refusals"]["unpriced"] == row["refused"] and row["requests"] == 0
