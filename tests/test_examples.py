"""The documented GitHub Actions example stays consistent with the tool's commands."""

import yaml

from tests.conftest import ROOT

EXAMPLE = ROOT / "examples" / "github-actions-codex-smoke.yml"


def test_workflow_separates_the_key_from_the_agent():
    doc = yaml.safe_load(EXAMPLE.read_text())
    steps = doc["jobs"]["codex-smoke"]["steps"]
    names = [s.get("name", "") for s in steps]
    proxy = next(s for s in steps if s.get("name", "").startswith("Start the proxy"))
    agent = next(s for s in steps if s.get("name", "").startswith("Run the Codex agent"))
    assert names.index(proxy["name"]) < names.index(agent["name"])
    # Only the privileged step sees the key, and it reaches the proxy on stdin.
    assert "OPENAI_API_KEY" in proxy["env"]
    assert "printenv OPENAI_API_KEY | env -u OPENAI_API_KEY" in proxy["run"]
    assert "env" not in agent and "OPENAI_API_KEY" not in agent["run"]
    assert "run.sh record" in proxy["run"] and "--http-shutdown" in proxy["run"]
    assert "run.sh codex-config" in agent["run"] and "--toml-only" in agent["run"]
    assert any("/shutdown" in s.get("run", "") for s in steps)
    assert any(s.get("uses", "").startswith("actions/upload-artifact") for s in steps)


def test_run_sh_knows_the_subcommands_used():
    run_sh = (ROOT / "run.sh").read_text()
    for sub in ("record)", "replay)", "codex-config)", "web)", "demo)", "test)"):
        assert f"    {sub}" in run_sh
