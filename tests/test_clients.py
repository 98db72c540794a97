"""Real clients through the real proxy: the openai Python SDK and the Codex CLI."""

from __future__ import annotations

import json
import os
import shlex
import subprocess
import sys
from pathlib import Path

import openai
import pytest

from tests.conftest import TEST_KEY

#: A model of the pinned Codex's catalog (config/codex-models.yaml), not its default: the
#: printed config's --model reaches the upstream, and Codex knows the model (no fallback
#: metadata warning).
CATALOG_MODEL = "gpt-6-luna"

pytestmark = pytest.mark.e2e


def test_openai_sdk_streams_through_the_proxy(upstream, start_proxy):
    proxy = start_proxy(upstream.url)
    deltas, kinds = [], []
    with (
        openai.OpenAI(
            base_url=proxy.base + "/v1", api_key="sk-client-side-dummy", max_retries=0, timeout=60
        ) as client,
        client.responses.create(model="gpt-sdk", input="Say hello", stream=True) as stream,
    ):
        for event in stream:
            kinds.append(event.type)
            if event.type == "response.output_text.delta":
                deltas.append(event.delta)
            if event.type == "response.completed":
                usage = event.response.usage
    assert "".join(deltas) == upstream.text
    assert kinds[0] == "response.created" and kinds[-1] == "response.completed"
    assert usage.total_tokens == 59
    got = upstream.requests[0]
    assert got.header_values("authorization") == [f"Bearer {TEST_KEY}"]
    assert json.loads(got.body)["model"] == "gpt-sdk"
    assert proxy.shutdown() == 0
    assert len(proxy.dump_files()) == 2


def test_openai_sdk_non_streaming(upstream, start_proxy):
    proxy = start_proxy(upstream.url, dumps=False)
    with openai.OpenAI(
        base_url=proxy.base + "/v1", api_key="x", max_retries=0, timeout=60
    ) as client:
        response = client.responses.create(model="gpt-sdk", input="Say hello")
    assert response.output_text == upstream.text


def printed_codex_config(proxy, *extra: str) -> str:
    """What ``./run.sh codex-config`` prints for this proxy (the module it runs)."""
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "addons.codex_config",
            "--server-info",
            str(proxy.info_path),
            "--model",
            CATALOG_MODEL,
            *extra,
        ],
        capture_output=True,
        text=True,
        timeout=60,
        check=True,
    )
    return result.stdout


def run_codex(
    codex: str, home: Path, workdir: Path, prompt: str = "Say hello", extra: list[str] | None = None
):
    env = {k: v for k, v in os.environ.items() if not k.startswith(("OPENAI_", "CODEX_"))}
    env["CODEX_HOME"] = str(home)
    return subprocess.run(
        [codex, "exec", *(extra or []), "--skip-git-repo-check", "--json", prompt],
        stdin=subprocess.DEVNULL,
        capture_output=True,
        timeout=180,
        cwd=workdir,
        env=env,
    )


@pytest.mark.codex
def test_codex_exec_through_the_proxy(upstream, start_proxy, codex, tmp_path):
    proxy = start_proxy(upstream.url)
    home, work = tmp_path / "codex-home", tmp_path / "work"
    home.mkdir()
    work.mkdir()
    (home / "config.toml").write_text(printed_codex_config(proxy, "--toml-only"))
    result = run_codex(codex, home, work)
    out = result.stdout.decode(errors="replace")
    assert result.returncode == 0, out + result.stderr.decode(errors="replace")
    messages = [json.loads(line) for line in out.splitlines() if line.startswith("{")]
    assert any(upstream.text in json.dumps(m) for m in messages), out
    # A catalog model: Codex has its metadata (no "Model metadata for ... not found" item).
    assert not [m for m in messages if m.get("item", {}).get("type") == "error"], out
    assert len(upstream.requests) == 1
    got = upstream.requests[0]
    assert got.header_values("authorization") == [f"Bearer {TEST_KEY}"]
    assert got.header_values("user-agent")[0].startswith("codex_exec/")
    assert json.loads(got.body)["model"] == CATALOG_MODEL
    assert proxy.shutdown() == 0
    files = proxy.dump_files()
    assert len(files) == 2
    for f in files:
        assert TEST_KEY not in f.read_text()


@pytest.mark.codex
def test_codex_exec_with_the_printed_one_liner(upstream, start_proxy, codex, tmp_path):
    proxy = start_proxy(upstream.url, dumps=False)
    home, work = tmp_path / "codex-home", tmp_path / "work"
    home.mkdir()
    work.mkdir()
    printed = printed_codex_config(proxy)
    line = next(
        ln.removeprefix("# ") for ln in printed.splitlines() if ln.startswith("# codex exec ")
    )
    args = shlex.split(line)
    assert args[:2] == ["codex", "exec"] and args[-1] == "your prompt"
    # As pasted outside a git repository (run_codex passes the flag itself, once).
    assert "--skip-git-repo-check" in args
    extra = [a for a in args[2:-1] if a != "--skip-git-repo-check"]
    result = run_codex(codex, home, work, prompt="Say hello", extra=extra)
    out = result.stdout.decode(errors="replace")
    assert result.returncode == 0, out + result.stderr.decode(errors="replace")
    assert upstream.text in out
    assert json.loads(upstream.requests[0].body)["model"] == CATALOG_MODEL
