import os
import shutil
import tomllib

import pytest

from addons.codex_config import (
    exec_one_liner,
    main,
    parse_auth_command,
    port_from_server_info,
    provider_toml,
)


def test_provider_toml_parses_with_top_level_keys_first():
    text = provider_toml(4321, "gpt-x")
    assert text.index("model_provider") < text.index("[model_providers")
    doc = tomllib.loads(text)
    assert doc["model"] == "gpt-x" and doc["model_provider"] == "codex-proxy"
    provider = doc["model_providers"]["codex-proxy"]
    assert provider["base_url"] == "http://127.0.0.1:4321/v1"
    assert provider["wire_api"] == "responses" and provider["supports_websockets"] is False
    assert "env_key" not in provider and "query_params" not in provider


def test_one_liner_names_the_port():
    assert "http://127.0.0.1:4321/v1" in exec_one_liner(4321)


def test_port_from_server_info(tmp_path):
    info = tmp_path / "info.json"
    info.write_text('{"port":5555,"pid":1}\n')
    assert port_from_server_info(str(info)) == 5555
    info.write_text("{}")
    with pytest.raises(ValueError):
        port_from_server_info(str(info))


def test_main_requires_a_port_source(capsys):
    with pytest.raises(SystemExit) as info:
        main([])
    assert info.value.code == 2
    assert main(["--port", "7000", "--toml-only"]) == 0
    assert "127.0.0.1:7000" in capsys.readouterr().out


def test_whole_stdout_is_valid_toml(capsys):
    """``./run.sh codex-config ... > config.toml`` must give a file Codex can read."""
    assert main(["--port", "7000", "--model", "gpt-6.2-sol"]) == 0
    out = capsys.readouterr().out
    doc = tomllib.loads(out)
    assert doc["model_providers"]["codex-proxy"]["base_url"] == "http://127.0.0.1:7000/v1"
    assert "# codex exec --skip-git-repo-check -c " in out


def test_a_gateway_block_says_websockets_unless_told_not_and_the_flags_are_for_a_gateway(capsys):
    """Codex's default transport is the gateway's default: ``--gateway`` prints
    ``supports_websockets = true``; ``--websockets`` is kept (a no-op) for old scripts;
    ``--no-websockets`` is for a gateway started with it."""
    for flags, expected in [([], True), (["--websockets"], True), (["--no-websockets"], False)]:
        assert main(["--port", "4321", "--gateway", *flags, "--toml-only"]) == 0
        provider = tomllib.loads(capsys.readouterr().out)["model_providers"]["codex-gateway"]
        assert provider["supports_websockets"] is expected, flags
    assert main(["--port", "4321", "--gateway"]) == 0
    assert "supports_websockets = true" in capsys.readouterr().out
    for flags in (
        ["--websockets"],
        ["--no-websockets"],
        ["--gateway", "--websockets", "--no-websockets"],
    ):
        with pytest.raises(SystemExit) as exit_info:
            main(["--port", "4321", *flags])
        assert exit_info.value.code == 2


def test_an_auth_command_replaces_env_key_with_codexs_auth_table(capsys, tmp_path):
    """``--auth-command``: split as a shell would, the program resolved on PATH, the table
    Codex's command-backed auth reads (CODEX.md), and no ``env_key``."""
    assert (
        main(
            [
                "--port",
                "4321",
                "--gateway",
                "--toml-only",
                "--auth-command",
                "sh -c 'echo \"tok en\"' --x",
                "--auth-timeout-ms",
                "7000",
            ]
        )
        == 0
    )
    provider = tomllib.loads(capsys.readouterr().out)["model_providers"]["codex-gateway"]
    assert "env_key" not in provider
    assert provider["auth"] == {
        "command": shutil.which("sh"),
        "args": ["-c", 'echo "tok en"', "--x"],
        "timeout_ms": 7000,
        "refresh_interval_ms": 300000,
    }
    assert provider["auth"]["command"].startswith("/")
    # The full output stays valid TOML and says how a first device-flow sign-in is done.
    assert main(["--port", "4321", "--gateway", "--auth-command", "./run.sh token oidc"]) == 0
    out = capsys.readouterr().out
    auth = tomllib.loads(out)["model_providers"]["codex-gateway"]["auth"]
    assert auth["command"] == os.path.abspath("./run.sh") and auth["args"] == ["token", "oidc"]
    assert "once in a terminal" in out and "CODEX_GATEWAY_KEY" not in out


def test_parse_auth_command_keeps_an_unknown_program_and_refuses_bad_input():
    assert parse_auth_command("no-such-prog-xyz a", which=lambda _: None).program == (
        "no-such-prog-xyz"
    )
    for text in ("", "   ", "'unbalanced"):
        with pytest.raises(ValueError):
            parse_auth_command(text)
    with pytest.raises(ValueError):
        parse_auth_command("sh", timeout_ms=0)


def test_auth_command_needs_gateway(capsys):
    with pytest.raises(SystemExit) as info:
        main(["--port", "4321", "--auth-command", "sh"])
    assert info.value.code == 2
    assert "--auth-command needs --gateway" in capsys.readouterr().err


@pytest.mark.parametrize(
    ("url", "base"),
    [
        ("https://gw.example.test", "https://gw.example.test/v1"),
        ("https://gw.example.test/v1/", "https://gw.example.test/v1"),
        ("http://10.0.0.2:8080/team", "http://10.0.0.2:8080/team/v1"),
    ],
)
def test_a_gateway_elsewhere_is_named_by_its_url(capsys, url, base):
    assert main(["--url", url, "--gateway", "--toml-only", "--auth-command", "sh"]) == 0
    assert (
        tomllib.loads(capsys.readouterr().out)["model_providers"]["codex-gateway"]["base_url"]
        == base
    )


@pytest.mark.parametrize("url", ["ftp://x", "https://gw/?a=1", "https://gw/#f", "gw.example"])
def test_a_bad_gateway_url_is_a_usage_error(capsys, url):
    with pytest.raises(SystemExit) as info:
        main(["--url", url, "--gateway"])
    assert info.value.code == 2 and "--url must be" in capsys.readouterr().err
