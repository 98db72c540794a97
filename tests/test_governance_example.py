"""docs/gateway.md's Governance worked example, run as written (the commands of its
``governance-example`` block, each through the gateway's CLI), then what its table says each
member sees in the real Codex CLI: the intern's model refused naming the team, the allowed one
served, a CI key past its 7 days refused, and the audit log naming the actor of every change."""

from __future__ import annotations

import json
import re
import shlex
import sqlite3
import subprocess
import time
from pathlib import Path

import pytest

from tests.conftest import ROOT, wait_for
from tests.gateway_harness import bearer, member_codex_home, member_env

pytestmark = [pytest.mark.e2e]

#: Codex ends a turn the gateway refuses for good at once (about 1 s here); generous bound.
ENDS_SOON_S = 30


def example_commands() -> list[list[str]]:
    """The ``./run.sh gateway …`` lines of the marked block, as argument lists after ``gateway``."""
    text = (ROOT / "docs" / "gateway.md").read_text()
    block = text.split("<!-- governance-example -->", 1)[1].split("```sh\n", 1)[1]
    block = block.split("```", 1)[0]
    commands = []
    for line in block.splitlines():
        argv = shlex.split(line, comments=True)
        assert argv[:2] == ["./run.sh", "gateway"], line
        commands.append(argv[2:])
    return commands


def codex_turn(codex: str, home: Path, work: Path, key: str, *args: str) -> tuple[int, str, float]:
    started = time.monotonic()
    result = subprocess.run(
        [codex, "exec", "--skip-git-repo-check", "--json", *args, "Say hello"],
        stdin=subprocess.DEVNULL,
        capture_output=True,
        timeout=180,
        cwd=work,
        env=member_env(home, key),
    )
    out = result.stdout.decode(errors="replace") + result.stderr.decode(errors="replace")
    seconds = time.monotonic() - started
    print(f"codex {' '.join(args)} exit {result.returncode} after {seconds:.1f} s:\n{out[-1500:]}")
    return result.returncode, out, seconds


def test_the_block_is_the_whole_example():
    commands = example_commands()
    assert [c[2] for c in commands if c[:2] == ["--actor", "lead"]][:2] == ["add-team"] * 2
    assert ["list-teams"] in commands and ["audit"] in commands


@pytest.mark.codex
def test_the_governance_example_as_written(gateway, upstream, codex, tmp_path):
    keys: dict[str, str] = {}
    outputs: dict[str, str] = {}
    for argv in example_commands():
        out = gateway.admin(*argv).stdout
        outputs[argv[-1] if argv[-1] in ("list-teams", "list-keys", "audit") else ""] = out
        if "add-key" in argv:
            member = argv[argv.index("add-key") + 1]
            keys[member] = out.strip().splitlines()[-1]
    assert set(keys) == {"dana", "ivy", "ci"}
    teams = outputs["list-teams"]
    assert re.search(r"^interns .*gpt-5\.6-luna", teams, re.M), teams
    assert re.search(r"^platform .*2000", teams, re.M), teams
    ci_line = next(line for line in outputs["list-keys"].splitlines() if " ci " in f" {line} ")
    assert re.search(r"\d{4}-\d\d-\d\d", ci_line.split("ci", 1)[1]), ci_line
    audit = outputs["audit"]
    assert len(re.findall(r"\blead\b", audit)) >= 9, audit  # every change, by its actor

    server = gateway.serve(upstream.url)
    # The intern's gpt-5.5: refused at once, naming the team and what it may use.
    home, work, _ = member_codex_home(tmp_path, server, "gpt-5.5")
    code, out, seconds = codex_turn(codex, home, work, keys["ivy"])
    assert code != 0 and seconds < ENDS_SOON_S
    assert "is not allowed for member 'ivy' (its team 'interns')" in out
    assert "it may use: gpt-5.6-luna" in out
    # Luna, in fast mode with a high effort: served.
    code, out, _ = codex_turn(
        codex, home, work, keys["ivy"], "-m", "gpt-5.6-luna", "-c", "service_tier=priority"
    )
    assert code == 0 and upstream.text in out, out
    # The CI key, 7 days later (its expiry moved to the past, as time would).
    with sqlite3.connect(gateway.database.removeprefix("sqlite:///")) as conn:
        conn.execute(
            "UPDATE member_keys SET expires_ms = ? WHERE member_id = "
            "(SELECT id FROM members WHERE name = 'ci')",
            (int(time.time() * 1000) - 1000,),
        )
    probe = {"model": "gpt-5.5", "input": "hi", "stream": True}
    wait_for(
        lambda: server.post_json(probe, bearer(keys["ci"]))[0] == 400,
        10,
        "the gateway's directory to carry the new expiry",
    )
    (tmp_path / "ci").mkdir()
    home_ci, work_ci, _ = member_codex_home(tmp_path / "ci", server, "gpt-5.5")
    code, out, seconds = codex_turn(codex, home_ci, work_ci, keys["ci"])
    assert code != 0 and seconds < ENDS_SOON_S
    assert "member key expired on" in out and "ask the gateway's admin for a new key" in out
    # Dana (platform, no limit of her own) is served under the team's credits.
    code, out, _ = codex_turn(codex, home_ci, work_ci, keys["dana"])
    assert code == 0 and upstream.text in out, out
    rows = [json.loads(line) for line in gateway.admin("audit", "--json").stdout.splitlines()]
    assert {r["actor"] for r in rows if r["action"] != "init"} == {"lead"}
