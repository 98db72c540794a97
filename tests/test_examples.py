"""The documented GitHub Actions example stays consistent with the tool's commands."""

import importlib.metadata
import json
import re

import yaml

from addons.versions import codex_cli_version
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
    """run.sh keeps test; the rest are codex-proxy's, which run.sh hands every other word to."""
    from addons.commands import find

    run_sh = (ROOT / "run.sh").read_text()
    assert "    test)" in run_sh and 'exec "$VENV/bin/codex-proxy" "$@"' in run_sh
    for sub in ("record", "replay", "compare", "codex-config", "web", "demo"):
        assert find(sub) is not None, sub


def test_versions_are_named_in_one_place():
    """The Codex CLI version lives in package.json only; the README and the guides in docs/ name
    no other, and the README states it and the tested mitmproxy range, as pyproject.toml and
    package.json have them."""
    version = codex_cli_version()
    lock = json.loads((ROOT / "package-lock.json").read_text())
    assert lock["packages"]["node_modules/@openai/codex"]["version"] == version
    pattern = re.compile(r"@openai/codex@\d|codex(?:-cli| CLI)? \d+\.\d+\.\d+", re.IGNORECASE)
    docs = [*ROOT.glob("*.md"), *(ROOT / "docs").glob("*.md")]
    assert len(docs) > 1  # the guides in docs/ are scanned too
    for path in [*ROOT.glob("*.sh"), *docs, *(ROOT / "addons").glob("*.py")]:
        text = path.read_text()
        for m in pattern.finditer(text):
            assert version in text[m.start() : m.end() + 10], f"{path.name}: {m.group()}"
    for path in [EXAMPLE, ROOT / "bench" / "bench.py", ROOT / "run.sh"]:
        assert not re.search(r"\b0\.1\d\d\.\d+\b", path.read_text()), path
    readme = (ROOT / "README.md").read_text()
    assert f"Codex CLI {version}" in readme
    pin = re.search(r'"mitmproxy>=(\d+\.\d+),<(\d+\.\d+)"', (ROOT / "pyproject.toml").read_text())
    assert pin is not None and f"mitmproxy {pin.group(1)}.x" in readme
    installed = importlib.metadata.version("mitmproxy")
    assert installed.startswith(pin.group(1) + "."), installed


def test_example_installs_the_pinned_codex():
    steps = yaml.safe_load(EXAMPLE.read_text())["jobs"]["codex-smoke"]["steps"]
    install = next(s["run"] for s in steps if "Codex CLI" in s.get("name", ""))
    assert "package.json" in install
    assert 'npm install -g "@openai/codex@$version"' in install


def test_pull_requests_are_gated_on_compare_with_the_default_branch_baseline():
    doc = yaml.safe_load(EXAMPLE.read_text())
    triggers = doc[True]  # YAML 1.1 reads the key `on` as true
    assert "pull_request" in triggers and triggers["push"]["branches"]
    steps = doc["jobs"]["codex-smoke"]["steps"]
    names = [s.get("name", "") for s in steps]
    stop = names.index(next(n for n in names if n.startswith("Stop the proxy")))
    assert "summary.json" in steps[stop]["run"]  # compare needs the summary the stop writes
    restore = next(s for s in steps if s.get("uses", "").startswith("actions/cache/restore"))
    save = next(s for s in steps if s.get("uses", "").startswith("actions/cache/save"))
    gate = next(s for s in steps if "run.sh compare" in s.get("run", ""))
    keep = next(s for s in steps if s.get("name", "").startswith("Keep this recording"))
    baseline = "${{ runner.temp }}/codex-baseline"
    assert restore["with"]["path"] == save["with"]["path"] == baseline
    # The newest baseline saved by a default-branch run (keys are unique per run).
    assert save["with"]["key"].startswith(restore["with"]["restore-keys"])
    assert "github.run_id" in save["with"]["key"]
    assert restore["if"] == gate["if"] == "github.event_name == 'pull_request'"
    for step in (keep, save):
        assert "github.event_name == 'push'" in step["if"] and "success()" in step["if"]
    assert "codex-recording" in keep["run"] and "codex-baseline" in keep["run"]
    # Order: record and stop, restore, compare, then keep and save, all before the upload.
    upload = names.index(next(n for n in names if n.startswith("Upload")))
    order = [steps.index(s) for s in (restore, gate, keep, save)]
    assert stop < order[0] and order == sorted(order) and order[-1] < upload
    run = gate["run"]
    assert '"$RUNNER_TEMP/codex-baseline" "$RUNNER_TEMP/codex-recording"' in run
    assert '--markdown "$GITHUB_STEP_SUMMARY"' in run
    # Accepting an intended change: a label turns exit 1 (regression) into a pass, never 2.
    assert "accept-codex-change" in gate["env"]["ACCEPT"]
    assert '[ "$status" = 1 ] && [ "$ACCEPT" = true ]' in run and 'exit "$status"' in run
    assert "accept-codex-change" in EXAMPLE.read_text().split("name:")[0]  # the header says how


def test_keyless_variant_holds_no_secret_and_uses_the_reference_flags():
    """The ``--github-oidc`` job: ``id-token: write``, no OpenAI secret anywhere, the runner's
    request token on the proxy's stdin only, a command line our launcher accepts."""
    import shlex

    from addons import cli

    job = yaml.safe_load(EXAMPLE.read_text())["jobs"]["codex-smoke-keyless"]
    assert job["permissions"]["id-token"] == "write"
    assert "secrets." not in json.dumps(job)
    steps = job["steps"]
    proxy = next(s for s in steps if s.get("name", "").startswith("Start the proxy"))
    agent = next(s for s in steps if s.get("name", "").startswith("Run the Codex agent"))
    run = proxy["run"]
    assert run.startswith(
        "printenv ACTIONS_ID_TOKEN_REQUEST_TOKEN | env -u ACTIONS_ID_TOKEN_REQUEST_TOKEN"
    )
    assert '--github-oidc-request-url "$ACTIONS_ID_TOKEN_REQUEST_URL"' in run
    # The launcher's own parser takes the command line (variables filled in).
    command = run.split("run.sh record", 1)[1].split(">", 1)[0].replace("\\\n", " ")
    filled = {
        "$RUNNER_TEMP": "runner-temp",
        "$OIDC_AUDIENCE": "api://openai",
        "$IDENTITY_PROVIDER_ID": "idp_1",
        "$SERVICE_ACCOUNT_ID": "sa_1",
        "$ACTIONS_ID_TOKEN_REQUEST_URL": "https://runner.test/token?api-version=2.0",
    }
    for name, value in filled.items():
        command = command.replace(name, value)
    argv = shlex.split(command)[1:]  # after the recording directory
    settings = cli.identity_settings(cli.build_parser().parse_args(argv))
    assert settings is not None and settings.request_url.startswith("https://runner.test/")
    assert set(proxy["env"]) == {"OIDC_AUDIENCE", "IDENTITY_PROVIDER_ID", "SERVICE_ACCOUNT_ID"}
    assert all(v.startswith("${{ vars.") for v in proxy["env"].values())
    # The agent runs without the runner's request variables.
    assert "env -u ACTIONS_ID_TOKEN_REQUEST_TOKEN -u ACTIONS_ID_TOKEN_REQUEST_URL" in agent["run"]
    assert "env" not in agent and "run.sh codex-config" in agent["run"]
    assert any("/shutdown" in s.get("run", "") for s in steps)
    assert any(s.get("uses", "").startswith("actions/upload-artifact") for s in steps)


def test_gateway_variant_holds_no_secret_and_codex_runs_the_token_helper(tmp_path, monkeypatch):
    """The team-gateway job: ``id-token: write``, no secret anywhere, the gateway's URL and
    audience from repository variables; the codex-config line (variables filled in) prints a
    provider at that URL whose ``auth`` command is the checkout's run.sh with a
    ``token github-actions`` command line the helper's own parser takes, and no ``env_key``."""
    import contextlib
    import io
    import shlex
    import tomllib

    from addons import codex_config, token_helpers

    job = yaml.safe_load(EXAMPLE.read_text())["jobs"]["codex-smoke-gateway"]
    assert job["permissions"]["id-token"] == "write"
    assert "secrets." not in json.dumps(job)
    steps = job["steps"]
    check = next(s for s in steps if s.get("name", "") == "Check the token helper")
    agent = next(s for s in steps if s.get("name", "").startswith("Run the Codex agent"))
    assert steps.index(check) < steps.index(agent)
    assert check["run"].startswith(".proxy/run.sh token github-actions --audience")
    assert check["run"].endswith("> /dev/null")  # the token is never printed to the log
    for step in (check, agent):
        assert all(v.startswith("${{ vars.CODEX_GATEWAY_") for v in step["env"].values())
    assert set(agent["env"]) == {"GATEWAY_URL", "GATEWAY_AUDIENCE"}
    run = agent["run"]
    assert "ACTIONS_ID_TOKEN_REQUEST" not in run  # the helper needs the runner's variables
    line = run.split("run.sh codex-config", 1)[1].split(">", 1)[0].replace("\\\n", " ")
    line = line.replace("$GATEWAY_URL", "https://gw.example.test")
    line = line.replace("$GATEWAY_AUDIENCE", "https://gw.example.test/codex")
    argv = shlex.split(line)
    monkeypatch.chdir(tmp_path)
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        assert codex_config.main(argv) == 0
    provider = tomllib.loads(out.getvalue())["model_providers"]["codex-gateway"]
    assert provider["base_url"] == "https://gw.example.test/v1" and "env_key" not in provider
    auth = provider["auth"]
    assert auth["command"] == str(tmp_path / ".proxy" / "run.sh")
    assert auth["args"] == [
        "token",
        "github-actions",
        "--audience",
        "https://gw.example.test/codex",
    ]
    ns = token_helpers.parser().parse_args(auth["args"][1:])
    assert ns.helper == "github-actions" and ns.audience == "https://gw.example.test/codex"
    assert "codex exec" in run and "upload-artifact" in json.dumps(steps)
