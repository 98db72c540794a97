import io

import pytest

from addons import cli, keyholder
from addons.config import ProxyConfig
from addons.routing import parse_upstream_url


def sets(args):
    return [args[i + 1] for i, a in enumerate(args) if a == "--set"]


def test_mitmdump_args_reverse_mode_and_options():
    config = ProxyConfig(
        port=8080,
        http_shutdown=True,
        dump_dir="d",
        server_info="i",
        extra_routes=["/v1/responses/compact"],
        mitmproxy={"connection_strategy": "lazy", "flow_detail": 1},
    )
    up = parse_upstream_url("https://api.openai.com/v1/responses?x=1")
    args = cli.mitmdump_args(config, up, [])
    assert args[:4] == ["--mode", "reverse:http://api.openai.com:443", "-s", cli.SCRIPT_PATH]
    s = sets(args)
    assert "listen_host=127.0.0.1" in s and "listen_port=8080" in s
    assert "codex_upstream_url=https://api.openai.com/v1/responses?x=1" in s
    assert "codex_http_shutdown=true" in s and "connection_strategy=lazy" in s
    assert "codex_extra_routes=/v1/responses/compact" in s
    assert any(x.startswith("codex_dump_dir=/") for x in s)


def test_ephemeral_port_by_default():
    args = cli.mitmdump_args(ProxyConfig(), parse_upstream_url("http://127.0.0.1:1/r"), [])
    assert "listen_port=0" in sets(args)


def test_user_set_replaces_every_value_for_that_name():
    args = cli.mitmdump_args(
        ProxyConfig(mitmproxy={"flow_detail": 1}),
        parse_upstream_url("http://h:1/r"),
        ["flow_detail=3", "codex_redact_headers=a", "codex_redact_headers=b"],
    )
    s = sets(args)
    assert s.count("flow_detail=3") == 1 and "flow_detail=1" not in s
    assert [x for x in s if x.startswith("codex_redact_headers")] == [
        "codex_redact_headers=a",
        "codex_redact_headers=b",
    ]


@pytest.mark.parametrize(
    "argv",
    [
        ["--port", "abc"],
        ["--port", "70000"],
        ["--bogus"],
        ["--set", "noequals"],
        ["--upstream-url", "api.openai.com"],
    ],
)
def test_argument_errors_exit_2_before_reading_the_key(argv, capsys):
    stdin = io.BytesIO(b"sk-abc\n")
    with pytest.raises(SystemExit) as info:
        cli.main(argv, stdin=stdin, harden=lambda: None)
    assert info.value.code == 2
    assert stdin.tell() == 0


@pytest.mark.parametrize(
    ("stdin", "message"),
    [
        (b"", keyholder.MSG_EMPTY),
        (b"bad key\n", keyholder.MSG_CHARSET),
        (b"a" * 2000, keyholder.MSG_TOO_LARGE),
    ],
)
def test_key_errors_exit_1_with_one_line(stdin, message, capsys):
    assert (
        cli.main(
            ["--upstream-url", "http://127.0.0.1:9/r"], stdin=io.BytesIO(stdin), harden=lambda: None
        )
        == 1
    )
    err = capsys.readouterr().err
    assert err == f"Error: {message}\n"


def test_hardening_failure_is_fatal_before_the_key_is_read(capsys):
    from addons.hardening import HardeningError

    def fail():
        raise HardeningError("prctl(PR_SET_DUMPABLE, 0) failed: Operation not permitted")

    stdin = io.BytesIO(b"sk-abc\n")
    assert cli.main(["--upstream-url", "http://127.0.0.1:9/r"], stdin=stdin, harden=fail) == 1
    assert stdin.tell() == 0
    assert capsys.readouterr().err == (
        "Error: prctl(PR_SET_DUMPABLE, 0) failed: Operation not permitted\n"
    )
