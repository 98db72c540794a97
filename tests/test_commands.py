"""``codex-proxy`` (``addons/commands.py``) and ``./run.sh``, which hands over to it: one
program, every mode, help and errors naming the command as invoked."""

from __future__ import annotations

import http.client
import io
import json
import os
import subprocess
from pathlib import Path

import pytest

from addons import cli, commands, invocation
from tests.conftest import ROOT, TEST_KEY, wait_for

RUN_SH = str(ROOT / "run.sh")
#: Every command codex-proxy has (run.sh's own: test, bench, refresh-models).
EXPECTED = [
    "gateway", "web", "record", "replay", "compare", "demo", "standin", "codex-config", "token",
    "help",
]  # fmt: skip


@pytest.fixture(autouse=True)
def console_script(monkeypatch: pytest.MonkeyPatch) -> None:
    """In-process tests run as the console script (no run.sh around them)."""
    monkeypatch.delenv(invocation.PROG_ENV, raising=False)


def test_the_commands_are_run_sh_s_and_each_one_loads() -> None:
    assert [c.name for c in commands.COMMANDS] == EXPECTED
    for command in (*commands.COMMANDS, commands.PROXY):
        assert callable(command.load()), command.name


def test_help_lists_every_command_and_run_sh_s_own(capsys: pytest.CaptureFixture[str]) -> None:
    assert commands.main(["help"]) == 0
    out, err = capsys.readouterr()
    assert err == ""
    assert out.startswith("usage: codex-proxy [COMMAND] [ARGS...]\n")
    listed = [line.split()[0] for line in out.splitlines() if line.startswith("  ") and
              not line.startswith(("   ", "  printenv"))]  # fmt: skip
    assert listed == [*EXPECTED, "test", "bench", "refresh-models"]
    assert "printenv OPENAI_API_KEY | env -u OPENAI_API_KEY codex-proxy --server-info" in out


def test_an_unknown_command_exits_2_with_the_list(capsys: pytest.CaptureFixture[str]) -> None:
    assert commands.main(["foo"]) == 2
    out, err = capsys.readouterr()
    assert out == ""
    assert err.startswith("codex-proxy: unknown command 'foo'\n\nusage: codex-proxy [COMMAND]")
    assert "  standin [--port N]" in err
    assert commands.main(["gatway", "init"]) == 2
    assert capsys.readouterr().err.startswith(
        "codex-proxy: unknown command 'gatway' (did you mean gateway?)\n"
    )
    assert commands.main(["help", "nope"]) == 2
    assert "unknown command 'nope'" in capsys.readouterr().err
    assert commands.main(["help", "help"]) == 0
    assert capsys.readouterr().out == commands.command_list()


@pytest.mark.parametrize(
    ("argv", "passed"),
    [([], []), (["--port", "0"], ["--port", "0"]), (["--help"], ["--help"])],
)
def test_no_command_or_a_flag_first_is_the_strict_proxy(
    monkeypatch: pytest.MonkeyPatch, argv: list[str], passed: list[str]
) -> None:
    seen: list[list[str]] = []
    monkeypatch.setattr(cli, "command_main", lambda a: seen.append(a) or 7)
    assert commands.main(argv) == 7
    assert seen == [passed]


def test_the_strict_proxy_s_help_is_the_drop_in_s_and_points_at_the_others(
    capsys: pytest.CaptureFixture[str],
) -> None:
    with pytest.raises(SystemExit) as info:
        commands.main(["--help"])
    assert info.value.code == 0
    out = capsys.readouterr().out
    assert out.startswith("usage: codex-proxy [-h] [--port PORT]")
    assert " ".join(out.split()).endswith(
        "The other commands (gateway, web, record, replay, compare, demo, standin, ...): "
        "codex-proxy help"
    )
    with pytest.raises(SystemExit):
        cli.main(["--help"])  # the console script codex-responses-api-proxy
    out = capsys.readouterr().out
    assert out.startswith("usage: codex-responses-api-proxy [-h]")
    assert out.rstrip().endswith("codex-proxy help")


@pytest.mark.parametrize("name", [n for n in EXPECTED if n != "help"])
def test_each_command_s_help_names_it_as_invoked(
    name: str, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    for prog in ("codex-proxy", "./run.sh"):
        if prog == "./run.sh":
            monkeypatch.setenv(invocation.PROG_ENV, prog)
        try:
            code = commands.main([name, "--help"])
        except SystemExit as e:
            code = e.code
        assert code == 0
        out = capsys.readouterr().out
        assert out.startswith(f"usage: {prog} {name} "), out[:200]
    # `help NAME` is NAME's help.
    try:
        commands.main(["help", name])
    except SystemExit:
        pass
    assert capsys.readouterr().out.startswith(f"usage: ./run.sh {name} ")


def test_record_needs_its_directory_first(capsys: pytest.CaptureFixture[str]) -> None:
    stdin = io.BytesIO(b"sk-abc\n")
    assert cli.record_main([]) == 2
    assert cli.record_main(["--port", "1"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("usage: codex-proxy record DIR [FLAGS]")
    assert "codex-proxy record: error: the recording directory DIR comes first" in err
    with pytest.raises(SystemExit) as info:  # a bad flag: exit 2 before the key is read
        cli.main(["--record", "d", "--bogus"], stdin=stdin, harden=lambda: None)
    assert info.value.code == 2 and stdin.tell() == 0


def test_the_terminal_hint_is_one_line_and_only_on_a_terminal() -> None:
    err = io.StringIO()
    master, slave = os.openpty()
    read_end, write_end = os.pipe()
    try:
        with open(slave, "rb", buffering=0, closefd=False) as tty:
            cli.stdin_hint(tty, "codex-proxy", False, err)
        with open(read_end, "rb", buffering=0, closefd=False) as pipe:
            cli.stdin_hint(pipe, "codex-proxy", False, err)
        cli.stdin_hint(io.BytesIO(b""), "codex-proxy", False, err)
        cli.stdin_hint(tty, "codex-proxy", True, err)  # closed: never raises
    finally:
        for fd in (master, slave, read_end, write_end):
            os.close(fd)
    assert err.getvalue() == (
        "codex-proxy: waiting for the API key on stdin, up to Enter (typing shows it; pipe it: "
        "printenv OPENAI_API_KEY | env -u OPENAI_API_KEY codex-proxy ...)\n"
    )


def test_gateway_serve_on_a_terminal_says_it_waits_for_the_upstream_keys(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    from addons.gateway_mode.cli import upstream_keys_hint

    monkeypatch.delenv(invocation.PROG_ENV, raising=False)
    err = io.StringIO()
    master, slave = os.openpty()
    read_end, write_end = os.pipe()
    try:
        with open(slave, "rb", buffering=0, closefd=False) as tty:
            upstream_keys_hint(tty, err)
        with open(read_end, "rb", buffering=0, closefd=False) as pipe:
            upstream_keys_hint(pipe, err)  # a pipe: silent
        upstream_keys_hint(io.BytesIO(b""), err)
    finally:
        for fd in (master, slave, read_end, write_end):
            os.close(fd)
    assert err.getvalue() == (
        "codex-proxy gateway serve: waiting for the upstream keys on stdin, NAME KEY per line, "
        "then Ctrl-D (typing shows them; pipe them: printf 'main %s\\n' \"$KEY1\" | "
        "codex-proxy gateway serve ...)\n"
    )


def test_a_ctrl_c_while_a_command_loads_is_one_line_and_exit_130(
    capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv(invocation.PROG_ENV, raising=False)

    def interrupted(argv: list[str]) -> int:
        raise KeyboardInterrupt

    chosen = commands.Command("x", "m:f", "", "")
    monkeypatch.setattr(commands.Command, "load", lambda self: interrupted)
    assert commands.run(chosen, []) == 130
    assert capsys.readouterr().err == "codex-proxy: SIGINT received: stopped\n"


# -- ./run.sh, as a user types it -----------------------------------------------------------


def run_sh(*args: str, stdin: bytes = b"") -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if k != invocation.PROG_ENV}
    return subprocess.run(
        [RUN_SH, *args], input=stdin.decode(), capture_output=True, text=True, timeout=120,
        env=env,
    )  # fmt: skip


def test_run_sh_help_and_an_unknown_word_list_the_commands() -> None:
    helped = run_sh("help")
    assert helped.returncode == 0, helped.stderr
    assert helped.stdout.startswith(f"usage: {RUN_SH} [COMMAND] [ARGS...]\n")
    assert "  gateway [--config F]" in helped.stdout and "  test [ARGS]" in helped.stdout
    unknown = run_sh("foo")
    assert unknown.returncode == 2
    assert unknown.stdout == ""
    assert unknown.stderr.startswith(f"{RUN_SH}: unknown command 'foo'\n")
    assert "  standin [--port N]" in unknown.stderr


def test_run_sh_demo_help_helps_and_runs_nothing() -> None:
    helped = run_sh("demo", "--help")
    assert helped.returncode == 0, helped.stderr
    assert helped.stdout.startswith(f"usage: {RUN_SH} demo [-h]")
    assert "stand-in listening" not in helped.stdout  # the demo did not run


def test_run_sh_errors_name_run_sh() -> None:
    bad = run_sh("gateway", "bogus-command")
    assert bad.returncode == 2
    assert f"usage: {RUN_SH} gateway " in bad.stderr
    assert f"{RUN_SH} gateway: error: argument COMMAND" in bad.stderr
    record = run_sh("record")
    assert record.returncode == 2 and record.stderr.startswith(f"usage: {RUN_SH} record DIR")


def test_bare_run_sh_on_a_terminal_says_it_waits_for_the_key(tmp_path: Path) -> None:
    """stdin a terminal: one line saying what the proxy waits for; Ctrl-D then gives the
    reference's empty-key error. With a pipe the reference's silence is kept."""
    master, slave = os.openpty()
    try:
        proc = subprocess.Popen(
            [RUN_SH, "--upstream-url", "http://127.0.0.1:9/v1/responses"],
            stdin=slave, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
            cwd=tmp_path, env={k: v for k, v in os.environ.items() if k != invocation.PROG_ENV},
        )  # fmt: skip
        os.write(master, b"\x04")  # Ctrl-D at the start of a line: end of input
        _, err = proc.communicate(timeout=120)
    finally:
        os.close(master)
        os.close(slave)
    assert proc.returncode == 1
    assert err.splitlines() == [
        f"{RUN_SH}: waiting for the API key on stdin, up to Enter (typing shows it; pipe it: "
        f"printenv OPENAI_API_KEY | env -u OPENAI_API_KEY {RUN_SH} ...)",
        "Error: API key must be provided via stdin (e.g. printenv OPENAI_API_KEY | env -u "
        "OPENAI_API_KEY codex-responses-api-proxy)",
    ]
    piped = run_sh("--upstream-url", "http://127.0.0.1:9/v1/responses")
    assert piped.returncode == 1
    assert piped.stderr.splitlines() == err.splitlines()[1:]  # silent before the error


@pytest.mark.e2e
def test_the_key_on_stdin_reaches_the_proxy_through_run_sh(tmp_path: Path, upstream) -> None:
    info = tmp_path / "info.json"
    with open(tmp_path / "err.log", "wb") as log:
        proc = subprocess.Popen(
            [RUN_SH, "--upstream-url", upstream.url, "--server-info", str(info),
             "--http-shutdown"],
            stdin=subprocess.PIPE, stdout=log, stderr=log, cwd=tmp_path,
        )  # fmt: skip
        try:
            assert proc.stdin is not None
            proc.stdin.write(TEST_KEY.encode() + b"\n")
            proc.stdin.close()
            wait_for(lambda: info.exists() or proc.poll() is not None, 60, "server-info")
            assert proc.poll() is None, (tmp_path / "err.log").read_text()
            port = json.loads(info.read_text())["port"]
            conn = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
            conn.request("POST", "/v1/responses", json.dumps({"model": "m", "input": "hi"}),
                         {"content-type": "application/json"})  # fmt: skip
            assert conn.getresponse().status == 200
            conn.close()
            assert upstream.requests[-1].header_values("authorization") == [f"Bearer {TEST_KEY}"]
            conn = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
            conn.request("GET", "/shutdown")
            assert conn.getresponse().status == 200
            conn.close()
            assert proc.wait(30) == 0
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.wait(10)
    assert "waiting for the API key" not in (tmp_path / "err.log").read_text()


@pytest.mark.e2e
@pytest.mark.codex
def test_the_readme_s_codex_exec_runs_as_pasted(
    tmp_path: Path, upstream, start_proxy, codex: str
) -> None:
    """The README's one-off `codex exec` block, outside any git repository, against the
    proxy in front of the stand-in: Codex prints the stand-in's answer."""
    readme = (ROOT / "README.md").read_text()
    block = readme.split("```sh\nport=", 1)[1].split("```", 1)[0]
    proxy = start_proxy(upstream.url)
    (tmp_path / "home").mkdir()
    (tmp_path / "work").mkdir()
    script = "port=" + block.replace("/tmp/info.json", str(proxy.info_path))  # noqa: S108
    env = {k: v for k, v in os.environ.items() if not k.startswith("OPENAI")}
    env.update(CODEX_HOME=str(tmp_path / "home"), PATH=f"{Path(codex).parent}:{env['PATH']}")
    done = subprocess.run(
        ["bash", "-c", script], cwd=tmp_path / "work", env=env, stdin=subprocess.DEVNULL,
        capture_output=True, text=True, timeout=180,
    )  # fmt: skip
    assert done.returncode == 0, done.stdout + done.stderr
    assert "Hello from the local Responses stand-in!" in done.stdout
    assert [r.path_qs for r in upstream.requests] == ["/v1/responses"]
