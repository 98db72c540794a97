"""The benchmark's targets and process probes, shared by ``./run.sh bench`` (:mod:`bench.bench`),
its session benchmark (:mod:`bench.sessions`) and the tests that watch a process tree.

- :func:`start_target` / :func:`start_gateway`: one target (``direct``, bare ``mitmdump``, the
  Rust ``reference``, ``ours`` and its variants, ``gateway``) in front of a local upstream, as a
  :class:`Target`.
- :func:`wait_listening`, :func:`wait_file`: wait for a port or a server-info file.
- :func:`tree_pids`, :func:`tree_rss_mb`, :func:`tree_cpu_s`, :class:`RssSampler`: a process
  tree's pids, memory and CPU from ``/proc`` (Linux).
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from addons.versions import codex_cli_version
from addons.web import free_port

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "bench" / "results"
#: The strict proxy with ``--workers 2`` (issue 11's "ours x2", typeable).
WORKERS_TARGET = "ours-x2"
BENCH_KEY = b"sk-bench-0123456789abcdefghijklmnopqrstuvwxyz\n"


def wait_listening(port: int, proc: subprocess.Popen[bytes] | None, timeout: float = 60) -> None:
    """Wait until something accepts on 127.0.0.1:``port``. Raises RuntimeError."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc is not None and proc.poll() is not None:
            raise RuntimeError(f"target exited with {proc.returncode}")
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=1):
                return
        except OSError:
            time.sleep(0.05)
    raise RuntimeError(f"nothing listening on {port}")


def wait_file(path: Path, proc: subprocess.Popen[bytes], timeout: float = 60) -> dict:
    """Wait for a server-info style JSON file and return it. Raises RuntimeError."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if path.exists() and path.stat().st_size:
            return json.loads(path.read_text())
        if proc.poll() is not None:
            raise RuntimeError(f"target exited with {proc.returncode}")
        time.sleep(0.05)
    raise RuntimeError(f"{path} never appeared")


def tree_pids(pid: int) -> list[int]:
    """``pid`` and all its descendants, from ``/proc/*/stat`` (Linux). Shared with the tests."""
    children: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                stat = Path(f"/proc/{entry}/stat").read_text()
            except OSError:
                continue
            children.setdefault(int(stat.rsplit(")", 1)[1].split()[1]), []).append(int(entry))
    out, todo = [], [pid]
    while todo:
        p = todo.pop()
        out.append(p)
        todo += children.get(p, [])
    return out


def tree_rss_mb(pid: int | None) -> float | None:
    """Resident memory (MB) of a process and its descendants; ``None`` without a pid."""
    if pid is None:
        return None
    total = 0
    for p in tree_pids(pid):
        try:
            for line in Path(f"/proc/{p}/status").read_text().splitlines():
                if line.startswith("VmRSS:"):
                    total += int(line.split()[1])
        except OSError:
            pass
    return round(total / 1024, 1)


def tree_cpu_s(pid: int | None) -> float | None:
    """CPU seconds (user + system) used so far by a process and its descendants (Linux
    ``/proc/<pid>/stat``); ``None`` without a pid."""
    if pid is None:
        return None
    ticks = 0
    for p in tree_pids(pid):
        try:
            fields = Path(f"/proc/{p}/stat").read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        ticks += int(fields[11]) + int(fields[12])
    return ticks / os.sysconf("SC_CLK_TCK")


class RssSampler:
    """Peak RSS (MB) of a process tree, sampled every 50 ms on a thread."""

    def __init__(self, pid: int | None) -> None:
        self.pid = pid
        self.peak = 0.0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.is_set():
            rss = tree_rss_mb(self.pid)
            if rss is not None:
                self.peak = max(self.peak, rss)
            time.sleep(0.05)

    def __enter__(self) -> RssSampler:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(5)


@dataclass
class Target:
    """A benchmark target: where it listens and, unless ``direct``, its process."""

    name: str
    port: int
    proc: subprocess.Popen[bytes] | None = None
    notes: str = ""
    extra: dict[str, Any] = field(default_factory=dict)

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(20)
            except subprocess.TimeoutExpired:
                self.proc.kill()


def start_with_secret(
    cmd: list[str], secret: bytes, info: Path
) -> tuple[subprocess.Popen[bytes], int]:
    """Start ``cmd`` (in the checkout, output discarded) with ``secret`` on its stdin, as a
    key-holding proxy is started; wait for its server-info file ``info``. Returns the process
    and the port it listens on. Raises RuntimeError when it exits first or never writes it."""
    proc = subprocess.Popen(
        cmd,
        stdin=subprocess.PIPE,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        cwd=ROOT,
    )
    assert proc.stdin is not None
    proc.stdin.write(secret)
    proc.stdin.close()
    return proc, wait_file(info, proc)["port"]


def start_target(name: str, upstream_port: int, tmp: Path) -> Target:
    """Start one target (``direct``, ``mitmdump``, ``reference``, ``ours``, ``ours+dumps``,
    ``ours+bridge``)
    in front of the benchmark upstream. Raises RuntimeError when it does not come up."""
    up_url = f"http://127.0.0.1:{upstream_port}/v1/responses"
    quiet = ["--set", "flow_detail=0", "--set", "termlog_verbosity=warn"]
    if name == "direct":
        return Target(name, upstream_port, None, "client straight to the upstream")
    if name == "mitmdump":
        port = free_port()
        proc = subprocess.Popen(
            [
                str(Path(sys.executable).parent / "mitmdump"),
                "--mode",
                f"reverse:http://127.0.0.1:{upstream_port}",
                "--listen-host",
                "127.0.0.1",
                "--listen-port",
                str(port),
                "--set",
                "connection_strategy=lazy",
                "--set",
                "stream_large_bodies=1",
                *quiet,
            ],
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        wait_listening(port, proc)
        return Target(name, port, proc, "bare mitmdump, reverse mode, no addons")
    if name == "reference":
        codex = ROOT / "node_modules" / ".bin" / "codex"
        if not codex.exists():
            raise RuntimeError(
                "the reference proxy needs ./node_modules (./run.sh bench sets it up)"
            )
        info = tmp / "ref-info.json"
        proc, port = start_with_secret(
            [str(codex), "responses-api-proxy", "--upstream-url", up_url,
             "--server-info", str(info)],
            BENCH_KEY,
            info,
        )  # fmt: skip
        return Target(name, port, proc, f"Rust codex responses-api-proxy {codex_cli_version()}")
    if name in ("ours", "ours+dumps", "ours+bridge", WORKERS_TARGET):
        info = tmp / f"{name}-info.json"
        cmd = [
            sys.executable,
            "-m",
            "addons.cli",
            "--upstream-url",
            up_url,
            "--server-info",
            str(info),
            *quiet,
        ]
        if name == "ours+dumps":
            cmd += ["--dump-dir", str(tmp / "dumps")]
        if name == "ours+bridge":
            cmd.append("--chat-bridge")
        if name == WORKERS_TARGET:
            cmd += ["--workers", "2"]
        proc, port = start_with_secret(cmd, BENCH_KEY, info)
        notes = {
            "ours+dumps": ", dumps on",
            "ours+bridge": ", streams through the chat bridge",
            WORKERS_TARGET: ", --workers 2",
        }
        return Target(
            name,
            port,
            proc,
            "full addon stack" + notes.get(name, ""),
            {"bridge": name == "ours+bridge"},
        )
    if name == "gateway":
        return start_gateway(up_url, tmp, quiet)
    raise ValueError(name)


def start_gateway(
    up_url: str, tmp: Path, quiet: list[str], serve_args: list[str] | None = None
) -> Target:
    """Gateway mode on SQLite: one member without limits (so every request is metered, none
    refused), one upstream key, Codex's session header on every request; ``serve_args`` are
    added to ``serve`` (``--websockets`` for the session benchmark)."""
    db = f"sqlite:///{tmp / 'gateway.db'}"
    admin = [sys.executable, "-m", "addons.gateway_mode.cli", "--database", db]
    for args in (["init"], ["add-member", "bench"]):
        subprocess.run([*admin, *args], check=True, cwd=ROOT, capture_output=True)
    key = subprocess.run(
        [*admin, "add-key", "bench"], check=True, cwd=ROOT, capture_output=True, text=True
    ).stdout.split()[-1]
    info = tmp / "gateway-info.json"
    proc, port = start_with_secret(
        [*admin, "serve", "--upstream-url", up_url, "--server-info", str(info), *quiet,
         *(serve_args or [])],
        b"bench " + BENCH_KEY,
        info,
    )  # fmt: skip
    return Target(
        "gateway",
        port,
        proc,
        "gateway mode, SQLite ledger, one member key",
        {"headers": {"Authorization": f"Bearer {key}", "session-id": "bench"}, "database": db},
    )
