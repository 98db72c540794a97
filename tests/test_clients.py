"""Real clients through the real proxy: the openai Python SDK and the Codex CLI."""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

import openai
import pytest

from tests.conftest import TEST_KEY, codex_binary

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


def codex_config(port: int) -> str:
    """The provider block for Codex (verified rules in CODEX.md): top-level keys first."""
    return (
        'model = "test-model"\n'
        'model_provider = "proxy"\n\n'
        "[model_providers.proxy]\n"
        'name = "Local proxy"\n'
        f'base_url = "http://127.0.0.1:{port}/v1"\n'
        'wire_api = "responses"\n'
        "supports_websockets = false\n"
    )


def run_codex(codex: str, home: Path, workdir: Path, prompt: str = "Say hello"):
    env = {k: v for k, v in os.environ.items() if not k.startswith(("OPENAI_", "CODEX_"))}
    env["CODEX_HOME"] = str(home)
    return subprocess.run(
        [codex, "exec", "--skip-git-repo-check", "--json", prompt],
        stdin=subprocess.DEVNULL,
        capture_output=True,
        timeout=180,
        cwd=workdir,
        env=env,
    )


@pytest.fixture
def codex() -> str:
    path = codex_binary()
    if path is None:
        if os.environ.get("CI"):
            pytest.fail("the Codex CLI is missing in CI: ./run.sh test installs it with npm")
        pytest.skip("Codex CLI not installed (./run.sh test installs it)")
    return path


@pytest.mark.codex
def test_codex_exec_through_the_proxy(upstream, start_proxy, codex, tmp_path):
    proxy = start_proxy(upstream.url)
    home, work = tmp_path / "codex-home", tmp_path / "work"
    home.mkdir()
    work.mkdir()
    (home / "config.toml").write_text(codex_config(proxy.port))
    result = run_codex(codex, home, work)
    out = result.stdout.decode(errors="replace")
    assert result.returncode == 0, out + result.stderr.decode(errors="replace")
    messages = [json.loads(line) for line in out.splitlines() if line.startswith("{")]
    assert any(upstream.text in json.dumps(m) for m in messages), out
    assert len(upstream.requests) == 1
    got = upstream.requests[0]
    assert got.header_values("authorization") == [f"Bearer {TEST_KEY}"]
    assert got.header_values("user-agent")[0].startswith("codex_exec/")
    assert json.loads(got.body)["model"] == "test-model"
    assert proxy.shutdown() == 0
    files = proxy.dump_files()
    assert len(files) == 2
    for f in files:
        assert TEST_KEY not in f.read_text()
