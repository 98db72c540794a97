"""docs/gateway.md's quick start, pasted by a new operator who installed the **built wheel**
(issue 29: "A test follows docs/gateway.md's quick start from the built wheel in a fresh venv,
with the real Codex CLI and its defaults, and fails if any step needs more than the doc says").

The wheel is built and installed into a fresh venv by ``tests/test_packaging.py``'s fixtures.
The guide's first ``sh`` block is run line by line through ``bash`` with ``./run.sh`` replaced
by the installed ``codex-proxy`` and nothing else added but the test's seams: the upstream keys
``$KEY1``/``$KEY2`` are fakes, ``serve`` gets a free port for ``8080``, a temporary file for
``/tmp/gw.json`` and ``--upstream-url`` of the wheel's own stand-in (``codex-proxy standin``),
and ``HOME`` is a temporary directory (the gateway's data directory is under it). The member's
``config.toml`` is exactly what ``codex-config --gateway`` printed; the real Codex CLI then runs
on its **defaults** (no model: it sends ``gpt-6.2-sol``; its WebSocket transport) and must get
its answer. ``usage`` must show the turn, and the gateway's log no traceback.
(``tests/test_gateway_quickstart.py`` checks the same guide from the checkout in more detail.)
"""

from __future__ import annotations

import json
import os
import re
import shlex
import signal
import socket
import subprocess
import time
from pathlib import Path

import pytest

from tests.conftest import ROOT, wait_for
from tests.gateway_harness import member_env
from tests.test_packaging import clean_env, installed, wheel  # noqa: F401 (fixtures)

pytestmark = [pytest.mark.e2e, pytest.mark.codex]

FAKE_KEYS = {
    "KEY1": "sk-test-QUICKSTART_main_0123456789abcdefghijklmnop",
    "KEY2": "sk-test-QUICKSTART_spare_0123456789abcdefghijklmno",
}


def quick_start_lines() -> list[str]:
    """The lines of docs/gateway.md's first ``sh`` block, trailing comments dropped."""
    block = re.search(r"```sh\n(.*?)```", (ROOT / "docs" / "gateway.md").read_text(), re.S)
    assert block, "docs/gateway.md has no sh block"
    lines = []
    for raw in block.group(1).splitlines():
        words = shlex.split(raw, comments=True)
        if words:
            lines.append(raw.split("  #", 1)[0].strip())
    return lines


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_the_gateway_quick_start_from_the_wheel_answers_codex_on_its_defaults(
    installed: Path,  # noqa: F811
    codex: str,
    tmp_path: Path,
) -> None:
    command = str(installed / "codex-proxy")
    env = clean_env(HOME=str(tmp_path / "home"), **FAKE_KEYS)
    gw_info, serve_log = tmp_path / "gw.json", tmp_path / "serve.log"
    standin_info = tmp_path / "standin.json"
    standin = subprocess.Popen(
        [command, "standin", "--server-info", str(standin_info)],
        stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
        cwd=tmp_path, env=env,
    )  # fmt: skip
    serve: subprocess.Popen[bytes] | None = None
    key = config = ""
    try:
        wait_for(lambda: standin_info.exists() or standin.poll() is not None, 60, "stand-in")
        upstream_url = json.loads(standin_info.read_text())["url"]
        for line in quick_start_lines():
            assert line.count("./run.sh") == 1, line
            step = line.replace("./run.sh", shlex.quote(command))
            step = step.replace("/tmp/gw.json", shlex.quote(str(gw_info)))  # noqa: S108
            if " gateway serve" in step:
                assert "--port 8080" in step, step
                step = step.replace("--port 8080", f"--port {free_port()}")
                step += f" --upstream-url {shlex.quote(upstream_url)}"
                with open(serve_log, "wb") as log:
                    serve = subprocess.Popen(
                        ["bash", "-c", step], stdin=subprocess.DEVNULL, stdout=log,
                        stderr=subprocess.STDOUT, cwd=tmp_path, env=env, start_new_session=True,
                    )  # fmt: skip
                wait_for(lambda s=serve: gw_info.exists() or s.poll() is not None, 60, "serve")
                assert serve.poll() is None, serve_log.read_text()
                continue
            done = subprocess.run(
                ["bash", "-c", step], stdin=subprocess.DEVNULL, capture_output=True, text=True,
                cwd=tmp_path, env=env, timeout=120,
            )  # fmt: skip
            assert done.returncode == 0, (line, done.stdout, done.stderr)
            if " add-key " in step:
                key = done.stdout.strip().splitlines()[-1]
            elif " codex-config " in step:
                config = done.stdout
        assert key.startswith("sk-codex-gw-") and serve is not None
        assert "supports_websockets = true" in config and "\nmodel =" not in config

        home, work = tmp_path / "codex-home", tmp_path / "work"
        home.mkdir()
        work.mkdir()
        (home / "config.toml").write_text(config)  # the printed block, as the doc says
        started_at = time.monotonic()
        answered = subprocess.run(
            [codex, "exec", "--skip-git-repo-check", "Say hello"], stdin=subprocess.DEVNULL,
            capture_output=True, text=True, timeout=180, cwd=work, env=member_env(home, key),
        )  # fmt: skip
        shown = answered.stdout + answered.stderr
        print(f"codex exit {answered.returncode} in {time.monotonic() - started_at:.1f} s:")
        print(shown)
        assert answered.returncode == 0, shown
        assert "local Responses stand-in" in shown, shown

        def member_row() -> dict:
            usage = subprocess.run(
                [command, "gateway", "usage", "--json"], stdin=subprocess.DEVNULL,
                capture_output=True, text=True, cwd=tmp_path, env=env, timeout=120,
            )  # fmt: skip
            assert usage.returncode == 0, usage.stderr
            rows = json.loads(usage.stdout)["members"]
            return rows[0] if rows else {}

        wait_for(lambda: member_row().get("requests") == 1, 20, "the turn's usage row")
        row = member_row()
        assert row["warmups"] >= 1 and row["refused"] == 0 and row["errors"] == 0, row
        assert row["credits"] and row["credits"] > 0, row  # priced by the shipped estimate
        assert row["ws_connections"] >= 1, row  # over Codex's default transport
        data = tmp_path / "home" / ".local" / "share" / "codex-proxy" / "gateway.db"
        assert data.exists()  # the data directory the guide names, outside the package
    finally:
        if serve is not None and serve.poll() is None:
            os.killpg(serve.pid, signal.SIGINT)  # Ctrl-C: the terminal's whole foreground group
            try:
                serve.wait(timeout=60)
            except subprocess.TimeoutExpired:
                os.killpg(serve.pid, signal.SIGKILL)
                serve.wait(timeout=30)
        standin.terminate()
        standin.wait(timeout=30)
    log_text = serve_log.read_text(errors="replace")
    assert "Traceback" not in log_text and "Addon error" not in log_text, log_text
    assert serve.returncode == 0, log_text  # Ctrl-C ends it cleanly, with one line
    assert "SIGINT received" in log_text.rstrip().splitlines()[-1], log_text
