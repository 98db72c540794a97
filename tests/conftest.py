"""Shared fixtures: the fake upstream, the real proxy process, the test key."""

from __future__ import annotations

import http.client
import json
import os
import shutil
import subprocess
import sys
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from addons import keyholder
from addons.versions import codex_cli_version
from tests.fake_upstream import FakeUpstream
from tests.pg_cluster import PgCluster

ROOT = Path(__file__).resolve().parent.parent
#: A recognisable fake key: leak checks grep for it everywhere.
TEST_KEY = "sk-test-LEAKCHECK_0123456789abcdefghijklmnopqrstuvwxyz"
START_TIMEOUT = 60.0


def wait_for(predicate: Callable[[], bool], timeout: float, what: str) -> None:
    """Poll ``predicate`` until true; fail the test after ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return
        time.sleep(0.02)
    raise AssertionError(f"timed out after {timeout}s waiting for {what}")


@pytest.fixture
def loaded_key() -> Iterator[str]:
    """The test key loaded into the process-wide holder (unit tests of the forwarder)."""
    keyholder.API_KEY.set_key(bytearray(TEST_KEY.encode()))
    yield TEST_KEY
    keyholder.API_KEY.clear()


@pytest.fixture
def upstream() -> Iterator[FakeUpstream]:
    with FakeUpstream() as up:
        yield up


@pytest.fixture(scope="session")
def pg_cluster() -> Iterator[PgCluster]:
    """A started throwaway PostgreSQL server shared by the session (``tests/pg_cluster.py``),
    destroyed at the end. Skipped when the server binaries are missing, but a failure under
    ``CI=true``: CI must really test PostgreSQL."""
    if PgCluster.available() is None:
        reason = (
            "PostgreSQL server binaries not installed (/usr/lib/postgresql/*/bin; "
            "./run.sh test installs Debian's postgresql when run as root)"
        )
        if os.environ.get("CI") == "true":
            pytest.fail(f"{reason}, and CI=true requires them")
        pytest.skip(reason)
    cluster = PgCluster()
    try:
        cluster.start()
        yield cluster
    finally:
        cluster.destroy()


def plain_mitmdump_command(
    script: str, upstream_url: str, info: Path, sets: Iterable[str], *args: str
) -> list[str]:
    """``mitmdump -s addons/<script>`` as docs/proxy.md shows it: reverse mode to
    ``upstream_url``'s origin, an ephemeral loopback port, server-info at ``info``, HTTP
    shutdown on, then ``sets`` (``--set`` specs) and ``args``."""
    cmd = [
        str(Path(sys.executable).with_name("mitmdump")),
        "-s",
        str(ROOT / "addons" / script),
        "--mode",
        f"reverse:{upstream_url.rsplit('/v1/', 1)[0]}",
        "--listen-host",
        "127.0.0.1",
        "--listen-port",
        "0",
        *args,
    ]
    for spec in (
        "connection_strategy=lazy",
        "keep_host_header=true",
        f"codex_upstream_url={upstream_url}",
        f"codex_server_info={info}",
        "codex_http_shutdown=true",
        *sets,
    ):
        cmd += ["--set", spec]
    return cmd


@dataclass
class ProxyProcess:
    """A running launcher subprocess (``python -m addons.cli``) on 127.0.0.1."""

    proc: subprocess.Popen[bytes]
    port: int
    info_path: Path
    stdout_path: Path
    stderr_path: Path
    dump_dir: Path | None
    http_shutdown: bool
    extra: dict[str, object] = field(default_factory=dict)

    @property
    def base(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def connection(self, timeout: float = 30) -> http.client.HTTPConnection:
        return http.client.HTTPConnection("127.0.0.1", self.port, timeout=timeout)

    def request(
        self,
        method: str,
        target: str,
        body: bytes | None = None,
        headers: dict[str, str] | None = None,
    ) -> tuple[int, dict[str, str], bytes]:
        conn = self.connection()
        try:
            conn.request(method, target, body=body, headers=headers or {})
            resp = conn.getresponse()
            data = resp.read()
            return resp.status, {k.lower(): v for k, v in resp.getheaders()}, data
        finally:
            conn.close()

    def post_json(self, payload: dict, headers: dict[str, str] | None = None):
        return self.request(
            "POST",
            "/v1/responses",
            json.dumps(payload).encode(),
            {"content-type": "application/json", **(headers or {})},
        )

    def shutdown(self, timeout: float = 30) -> int:
        """``GET /shutdown`` (needs --http-shutdown) and wait for the exit code."""
        status, _, body = self.request("GET", "/shutdown")
        assert status == 200 and body == b""
        return self.proc.wait(timeout)

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(15)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(5)

    def output(self) -> str:
        return self.stdout_path.read_text(errors="replace") + self.stderr_path.read_text(
            errors="replace"
        )

    def dump_files(self) -> list[Path]:
        assert self.dump_dir is not None
        return sorted(p for p in self.dump_dir.iterdir() if not p.name.startswith("."))


def launcher_cmd() -> list[str]:
    return [sys.executable, "-m", "addons.cli"]


def run_launcher_once(
    tmp_path: Path, *args: str, stdin: bytes = TEST_KEY.encode() + b"\n"
) -> tuple[subprocess.CompletedProcess[bytes], Path]:
    """Run the launcher to completion (for start-up refusals): returns the finished process
    and its server-info path (which must not exist when it refused to start)."""
    info = tmp_path / "refused-info.json"
    proc = subprocess.run(
        [
            *launcher_cmd(),
            "--server-info",
            str(info),
            "--upstream-url",
            "http://127.0.0.1:9/r",
            *args,
        ],
        input=stdin,
        capture_output=True,
        timeout=60,
        cwd=ROOT,
    )
    return proc, info


def open_stream(
    port: int,
    payload: dict | None = None,
    timeout: float = 60,
    headers: dict[str, str] | None = None,
) -> tuple[http.client.HTTPConnection, http.client.HTTPResponse]:
    """POST a streaming Responses request to 127.0.0.1:``port`` (with extra ``headers``);
    returns the connection and the response with its headers read (the body is left to the
    caller)."""
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=timeout)
    conn.request(
        "POST",
        "/v1/responses",
        json.dumps(payload or {"model": "m", "stream": True}),
        {"content-type": "application/json", **(headers or {})},
    )
    return conn, conn.getresponse()


@pytest.fixture
def start_proxy(tmp_path: Path) -> Iterator[Callable[..., ProxyProcess]]:
    """Factory: start the real proxy on an ephemeral port with ``TEST_KEY`` on stdin."""
    started: list[ProxyProcess] = []
    counter = iter(range(1000))

    def start(
        upstream_url: str,
        *args: str,
        dumps: bool = True,
        http_shutdown: bool = True,
        key: bytes = TEST_KEY.encode() + b"\n",
        env: dict[str, str] | None = None,
        wrap: list[str] | None = None,
    ) -> ProxyProcess:
        n = next(counter)
        info = tmp_path / f"info-{n}.json"
        dump_dir = tmp_path / f"dumps-{n}" if dumps else None
        cmd = [
            *(wrap or []),
            *launcher_cmd(),
            "--server-info",
            str(info),
            "--upstream-url",
            upstream_url,
        ]
        if http_shutdown:
            cmd.append("--http-shutdown")
        if dump_dir is not None:
            cmd += ["--dump-dir", str(dump_dir)]
        cmd += list(args)
        out, err = tmp_path / f"stdout-{n}.log", tmp_path / f"stderr-{n}.log"
        with open(out, "wb") as fo, open(err, "wb") as fe:
            proc = subprocess.Popen(
                cmd,
                stdin=subprocess.PIPE,
                stdout=fo,
                stderr=fe,
                cwd=ROOT,
                env={**os.environ, **(env or {})},
            )
        assert proc.stdin is not None
        proc.stdin.write(key)
        proc.stdin.close()
        handle = ProxyProcess(proc, 0, info, out, err, dump_dir, http_shutdown)
        started.append(handle)
        wait_for(lambda: info.exists() or proc.poll() is not None, START_TIMEOUT, "server-info")
        if proc.poll() is not None:
            raise AssertionError(f"proxy exited {proc.returncode}:\n{handle.output()}")
        handle.port = json.loads(info.read_text())["port"]
        return handle

    yield start
    for handle in started:
        handle.stop()


def codex_binary() -> str | None:
    """The Codex CLI installed by run.sh (node_modules), else one on PATH."""
    local = ROOT / "node_modules" / ".bin" / "codex"
    if local.exists():
        return str(local)
    return shutil.which("codex")


@pytest.fixture
def codex() -> str:
    path = codex_binary()
    if path is None:
        if os.environ.get("CI"):
            pytest.fail("the Codex CLI is missing in CI: ./run.sh test installs it with npm")
        pytest.skip("Codex CLI not installed (./run.sh test installs it)")
    version = subprocess.run(
        [path, "--version"], capture_output=True, text=True, timeout=60, stdin=subprocess.DEVNULL
    ).stdout.split()
    # The one the tests are about: package.json's, not whatever else is on PATH.
    assert version[-1:] == [codex_cli_version()], f"{path} is {version}"
    return path


@pytest.fixture
def gateway(tmp_path: Path) -> Iterator[object]:
    """An initialised SQLite gateway deployment in ``tmp_path`` (tests/gateway_harness.py)."""
    from tests.gateway_harness import Gateway

    gw = Gateway(tmp_path)
    gw.admin("init")
    yield gw
    gw.stop()
