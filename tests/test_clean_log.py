"""A clean log (issue 29): a normal Codex session leaves no traceback, ``Addon error`` or error
line in the server's output, and SIGINT/SIGTERM mid-stream end it with one line.

Each end-to-end case starts a real server (the strict proxy, the gateway over HTTP or
WebSocket, ``--workers 2``, ``./run.sh web``), runs the real Codex CLI through it (a turn with
a tool call, then its answer: two turns, on one socket for WebSocket), with the default log
and with mitmproxy's most verbose one (``termlog_verbosity=debug``, ``flow_detail=4``), then
opens a stream the stand-in holds after its first event and stops the server with a signal.
The server's whole stdout + stderr must hold none of :data:`BAD`, exactly one stop line,
and the process must exit 0. What each fixed looked like before: ``Addon error: list index
out of range`` from mitmproxy's ``dumper.py`` on every ended socket turn, ``Error in WebSocket
connection to …: WebSocket Error: ABNORMAL_CLOSURE`` at the end of every Codex socket session,
and ``Exception in callback StreamReaderProtocol…`` with a ``CancelledError`` traceback on a
stop mid-stream.
"""

from __future__ import annotations

import asyncio
import io
import json
import logging
import os
import re
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from mitmproxy.addons.dumper import Dumper
from mitmproxy.test import taddons, tflow

from addons import launch
from addons.clean_stop import CleanStop
from addons.socket_close import (
    ABNORMAL_CLOSURE,
    BETWEEN_TURNS,
    GOING_AWAY,
    NORMAL_CLOSURE,
    POLICY_VIOLATION,
    PROXY_STOPPED,
    WIRE_CLOSE_CODE,
    SocketClose,
    classify_close,
    mark_closed_by_proxy,
)
from addons.socket_turns import SocketTurn
from tests.conftest import ROOT, START_TIMEOUT, TEST_KEY, ProxyProcess, open_stream, wait_for
from tests.gateway_harness import Gateway, bearer, member_env
from tests.responses_events import tool_then_answer

#: What must never be in a server's output during a normal session or a stop by signal.
BAD = re.compile(
    r"Traceback \(most recent call last\)|Addon error|Error in WebSocket|WebSocket Error"
    r"|Exception in callback|CancelledError|Task exception was never retrieved"
    r"|Unhandled|has crashed|^Error:",
    re.M,
)
#: The one line a stop by signal logs (the server, the supervisor, the mitmweb front).
STOP_LINE = re.compile(r"^(\[[\d:.]+\] )?SIG(INT|TERM) received: stopping", re.M)
MODEL = "gpt-5.5"  # in Codex 0.171's catalog and in the gateway's rate card
ANSWER = "The tool ran; all done."
VERBOSE = ("--set", "termlog_verbosity=debug", "--set", "flow_detail=4")


# -- units: how a socket's end is recorded ----------------------------------------------------


REVOKED = "member key revoked"


@pytest.mark.parametrize(
    ("code", "by_client", "open_turns", "stopping", "by_proxy", "expected"),
    [
        # Codex's normal end: TCP closed with no close frame, no turn open.
        (ABNORMAL_CLOSURE, True, 0, False, None, (NORMAL_CLOSURE, BETWEEN_TURNS)),
        (ABNORMAL_CLOSURE, True, 1, False, None, None),  # gone mid-turn: the error it is
        (ABNORMAL_CLOSURE, False, 0, False, None, None),  # the upstream dropped it
        (ABNORMAL_CLOSURE, True, 1, True, None, (GOING_AWAY, PROXY_STOPPED)),  # we stopped
        (ABNORMAL_CLOSURE, False, 0, True, None, (GOING_AWAY, PROXY_STOPPED)),
        # The gateway closed it (a revoked key): a policy close that says why.
        (ABNORMAL_CLOSURE, True, 0, False, REVOKED, (POLICY_VIOLATION, REVOKED)),
        (NORMAL_CLOSURE, True, 0, False, None, None),  # a close frame: as the wire said
        (1011, False, 0, True, REVOKED, None),
        (None, None, 0, False, None, None),
    ],
)
def test_which_socket_ends_are_recorded_as_normal(
    code, by_client, open_turns, stopping, by_proxy, expected
):
    assert classify_close(code, by_client, open_turns, stopping, by_proxy) == expected


def _ended_socket(addon: SocketClose, turns_left_open: int, by_client: bool = True):
    flow = tflow.twebsocketflow(messages=False)
    turn = SocketTurn("ws:/v1/responses", b"{}", time.time(), 0)
    for _ in range(2):
        addon.socket_turn_start(flow, turn)
    for _ in range(2 - turns_left_open):
        addon.socket_turn_end(flow, turn)
    flow.websocket.close_code = ABNORMAL_CLOSURE
    flow.websocket.closed_by_client = by_client
    return flow


@pytest.mark.parametrize(
    ("left_open", "by_client", "stopping", "revoked", "logged"),
    [
        (0, True, False, False, "WebSocket connection closed by client: 1000 " + BETWEEN_TURNS),
        (1, True, False, False, "Error in WebSocket connection to"),
        (0, False, False, False, "Error in WebSocket connection to"),
        (1, True, True, False, "WebSocket connection closed by client: 1001 " + PROXY_STOPPED),
        (0, True, False, True, f"WebSocket Error: POLICY_VIOLATION (reason: {REVOKED})"),
    ],
)
def test_what_mitmproxys_flow_log_prints_at_a_socket_end(
    left_open, by_client, stopping, revoked, logged
):
    """``SocketClose`` runs before mitmproxy's ``Dumper`` (every script addon does); the line
    that follows is the Dumper's own."""
    addon, out = SocketClose(), io.StringIO()
    dumper = Dumper(out)
    with taddons.context(addon, dumper):
        flow = _ended_socket(addon, left_open, by_client)
        if revoked:
            mark_closed_by_proxy(flow, REVOKED)
        if stopping:
            addon.done()
        addon.websocket_end(flow)
        dumper.websocket_end(flow)
    assert logged in out.getvalue()
    assert (WIRE_CLOSE_CODE in flow.metadata) == (stopping or revoked or "1000" in logged)
    assert addon.open_turns == {}  # nothing kept per closed socket


@pytest.mark.parametrize("message", [True, False])
async def test_stop_signals_log_one_line_and_ask_mitmproxy_to_shut_down(caplog, message):
    """The line once, however many signals (an impatient Ctrl-C); none in a ``--workers``
    worker or under ``./run.sh web``'s inner proxy (``codex_stop_message=false``)."""
    stop = CleanStop()
    shutdowns: list[bool] = []
    caplog.set_level(logging.INFO, logger="addons.clean_stop")
    with taddons.context(stop) as tctx:
        tctx.configure(stop, codex_stop_message=message)
        tctx.master.shutdown = lambda: shutdowns.append(True)  # type: ignore[method-assign]
        stop.stop(signal.SIGINT)
        stop.stop(signal.SIGTERM)
    lines = [r.getMessage() for r in caplog.records if r.name == "addons.clean_stop"]
    assert lines == (["SIGINT received: stopping"] if message else [])
    assert shutdowns == [True, True]


@pytest.mark.parametrize("signum", [signal.SIGINT, signal.SIGTERM])
def test_a_stop_signal_while_the_secret_is_read_is_one_line(signum):
    """Before mitmproxy takes the signals over, a stop is one line and 128 + the signal's
    number, not a ``KeyboardInterrupt`` traceback (nor a silent kill by SIGTERM); the holder
    is wiped all the same."""
    cleared = []

    def load() -> None:
        os.kill(os.getpid(), signum)
        pytest.fail("the signal did not stop the launcher")

    secret = launch.Secret(
        load=load,
        take=bytearray,
        clear=lambda: cleared.append(True),
        worker_load=lambda fd: None,
    )
    err = io.StringIO()
    before = signal.getsignal(signum)
    code = launch.launch(secret, lambda: pytest.fail("no args"), 1, lambda: None, err)
    assert code == 128 + signum
    assert err.getvalue() == f"{signal.Signals(signum).name} received: stopped\n"
    assert cleared  # wiped, though it stopped halfway through reading it
    assert signal.getsignal(signum) == before


# -- end to end: real Codex sessions, then a stop mid-stream -----------------------------------


@dataclass(frozen=True)
class Case:
    """One server and how it is stopped. ``target``: ``proxy`` (the strict proxy), ``gateway``
    or ``web`` (the strict proxy behind mitmweb); ``socket``: Codex talks WebSocket."""

    target: str
    socket: bool
    verbose: bool
    stop: signal.Signals
    workers: int = 1

    @property
    def id(self) -> str:
        parts = [self.target, "ws" if self.socket else "http", "verbose" if self.verbose else ""]
        parts += [f"workers{self.workers}" if self.workers > 1 else "", self.stop.name]
        return "-".join(p for p in parts if p)


CASES = [
    Case("proxy", False, False, signal.SIGINT),
    Case("proxy", False, True, signal.SIGTERM),
    Case("gateway", False, False, signal.SIGTERM),
    Case("gateway", False, True, signal.SIGINT),
    Case("gateway", True, False, signal.SIGINT),
    Case("gateway", True, True, signal.SIGTERM),
    Case("gateway", True, False, signal.SIGTERM, workers=2),
    Case("web", False, False, signal.SIGINT),
]


@pytest.fixture(scope="module")
def deployment(tmp_path_factory) -> Iterator[tuple[Gateway, str]]:
    """One gateway database with one member for every gateway case: ``(gateway, key)``."""
    gateway = Gateway(tmp_path_factory.mktemp("gateway"))
    gateway.admin("init")
    gateway.admin("add-member", "ann")
    yield gateway, gateway.add_key("ann")
    gateway.stop()


def _codex_config(port: int, socket: bool, member: bool) -> str:
    """What ``./run.sh codex-config`` prints (``--gateway``: ``env_key``; ``--websockets``)."""
    provider = "codex-gateway" if member else "proxy"
    lines = [
        f'model = "{MODEL}"',
        f'model_provider = "{provider}"',
        "",
        f"[model_providers.{provider}]",
        f'name = "{provider}"',
        f'base_url = "http://127.0.0.1:{port}/v1"',
        'wire_api = "responses"',
        *(['env_key = "CODEX_GATEWAY_KEY"'] if member else []),
        f"supports_websockets = {'true' if socket else 'false'}",
    ]
    return "\n".join(lines) + "\n"


def _start_web(upstream_url: str, tmp_path: Path, *args: str) -> ProxyProcess:
    """``./run.sh web`` (the module it runs) with the test key on stdin."""
    from addons.web import free_port

    info, out, err = tmp_path / "web-info.json", tmp_path / "web.out", tmp_path / "web.err"
    cmd = [sys.executable, "-m", "addons.web", "--server-info", str(info)]
    cmd += ["--upstream-url", upstream_url, "--web-port", str(free_port()), *args]
    with open(out, "wb") as fo, open(err, "wb") as fe:
        proc = subprocess.Popen(cmd, stdin=subprocess.PIPE, stdout=fo, stderr=fe, cwd=ROOT)
    assert proc.stdin is not None
    proc.stdin.write(TEST_KEY.encode() + b"\n")
    proc.stdin.close()
    handle = ProxyProcess(proc, 0, info, out, err, None, False)
    wait_for(lambda: info.exists() or proc.poll() is not None, START_TIMEOUT, "server-info")
    assert proc.poll() is None, handle.output()
    handle.port = json.loads(info.read_text())["port"]
    return handle


def _run_codex(codex: str, home: Path, work: Path, key: str | None) -> str:
    """One ``codex exec`` (a tool call, then the answer); prints what Codex showed and how long
    it took; returns its output."""
    env = member_env(home, key or "")  # the strict proxy's provider names no env_key
    started = time.monotonic()
    result = subprocess.run(
        [codex, "exec", "--skip-git-repo-check", "--json", "Run echo hi, then say done"],
        stdin=subprocess.DEVNULL,
        capture_output=True,
        timeout=120,
        cwd=work,
        env=env,
    )
    seconds = time.monotonic() - started
    out = result.stdout.decode(errors="replace") + result.stderr.decode(errors="replace")
    shown = "\n".join(line for line in out.splitlines() if '"item.started"' not in line)
    print(f"codex exit {result.returncode} after {seconds:.1f} s:\n{shown[-1500:]}")
    assert result.returncode == 0, out
    return out


def _stop_mid_http_stream(server: ProxyProcess, stop: signal.Signals, key: str | None) -> None:
    """Open a stream the stand-in holds after its first event, read that event through the
    server, then send ``stop`` to the server."""
    headers = bearer(key) if key else {}
    conn, resp = open_stream(
        server.port, {"model": MODEL, "stream": True, "input": "hi"}, headers=headers
    )
    try:
        assert resp.status == 200
        assert b"response.created" in resp.read1(65536)  # mid-stream at the server
        server.proc.send_signal(stop)
        assert server.proc.wait(60) == 0
    finally:
        conn.close()


def _stop_mid_socket_turn(server: ProxyProcess, stop: signal.Signals, key: str) -> None:
    """Open a member socket, start a turn the stand-in holds after its first event, read that
    event, then send ``stop`` to the server and see the socket end."""
    import aiohttp

    async def session() -> None:
        async with aiohttp.ClientSession() as client:
            url = f"ws://127.0.0.1:{server.port}/v1/responses"
            async with client.ws_connect(url, headers=bearer(key)) as ws:
                await ws.send_str(json.dumps({"type": "response.create", "model": MODEL}))
                while True:  # the member's windows come first, then the upstream's event
                    event = json.loads((await asyncio.wait_for(ws.receive(), 30)).data)
                    if event["type"] == "response.created":
                        break
                server.proc.send_signal(stop)
                closed = await asyncio.wait_for(ws.receive(), 60)
                assert closed.type in (aiohttp.WSMsgType.CLOSE, aiohttp.WSMsgType.CLOSED)

    asyncio.run(session())
    assert server.proc.wait(60) == 0


@pytest.mark.e2e
@pytest.mark.codex
@pytest.mark.parametrize("case", CASES, ids=lambda c: c.id)
def test_a_codex_session_and_a_stop_mid_stream_leave_a_clean_log(
    case: Case, upstream, codex, start_proxy, deployment, tmp_path
):
    upstream.responder = tool_then_answer("echo hi", ANSWER, MODEL)
    args = [*(VERBOSE if case.verbose else ()), *(["--workers", "2"] if case.workers > 1 else [])]
    key: str | None = None
    if case.target == "gateway":
        gateway, key = deployment
        gateway.tmp = tmp_path
        server = gateway.serve(upstream.url, *(["--websockets"] if case.socket else []), *args)
    elif case.target == "web":
        server = _start_web(upstream.url, tmp_path, *args)
    else:
        server = start_proxy(upstream.url, *args)
    try:
        home, work = tmp_path / "codex-home", tmp_path / "work"
        home.mkdir()
        work.mkdir()
        (home / "config.toml").write_text(_codex_config(server.port, case.socket, key is not None))
        out = _run_codex(codex, home, work, key)
        assert ANSWER in out
        creates = [m for m in upstream.ws_messages if m.get("type") == "response.create"]
        posts = [r for r in upstream.requests if r.method == "POST"]
        if case.socket:  # the warm-up, the tool call's turn and the answer's, on one socket
            assert len(creates) == 3 and not posts and upstream.ws_connections == 1
        else:
            assert len(posts) == 2 and not creates

        upstream.responder = None
        upstream.gate = threading.Event()
        upstream.gate_timeout = 60
        if case.socket:
            assert key is not None
            _stop_mid_socket_turn(server, case.stop, key)
        else:
            _stop_mid_http_stream(server, case.stop, key)
    finally:
        if upstream.gate is not None:
            upstream.gate.set()
        server.stop()

    output = server.output()
    print(output[-6000:])
    bad = [line for line in output.splitlines() if BAD.search(line)]
    assert not bad, "\n".join(bad)
    assert len(STOP_LINE.findall(output)) == 1, "not one stop line"
    if case.target == "proxy":  # the dumps recorded the cut exchange before it was closed
        assert server.dump_dir is not None
        last = json.loads(sorted(server.dump_dir.glob("*-response.json"))[-1].read_text())
        assert last["error"] == "proxy shut down before the exchange finished"
    if case.socket:  # the Codex session's end, then the socket the stop closed
        assert f"closed by client: {NORMAL_CLOSURE} {BETWEEN_TURNS}" in output
        assert f"closed by client: {GOING_AWAY} {PROXY_STOPPED}" in output
