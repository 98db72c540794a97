"""``codex-proxy web [proxy flags] [--web-port N]`` (``./run.sh web``): the proxy with mitmweb
for inspection.

Two processes on loopback, so the one that shows flows never holds the key:

1. the key-holding proxy (``addons.cli``, exactly the headless proxy) as a child on an
   ephemeral port; it inherits stdin and reads the key itself; this process never reads it;
2. mitmweb in this process, a plain reverse proxy in front of it on the port Codex uses
   (``--port``), with the UI on 127.0.0.1 (``--web-port``), protected by mitmweb's own access
   token (printed at start-up) or ``--set web_password=...``.

``--server-info`` and ``--http-shutdown`` apply to the front (the port Codex talks to);
``--dump-dir``, ``--dump-required``, ``--record``, ``--upstream-url``, ``--config`` and the
keyless mode's ``--github-oidc`` flags go to the key-holding proxy.
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence

from addons.invocation import prog

WEB_SCRIPT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "web_ui.py")
#: Options only the front takes; everything else goes to the key-holding proxy.
FRONT_ONLY_SETS = ("web_", "codex_web_")
#: Options both processes take: the front redacts the same headers as the proxy behind it.
SHARED_SETS = ("codex_redact_headers=",)


def build_parser() -> argparse.ArgumentParser:
    """The launcher's parser (same flags as the headless proxy) plus ``--web-port``."""
    from addons.cli import build_parser as proxy_parser

    parser = proxy_parser(prog("web"))
    parser.description = "The proxy behind mitmweb: inspect Codex traffic, key never in the UI."
    parser.add_argument("--web-port", type=int, default=8081, help="mitmweb UI port (8081)")
    return parser


def split_sets(sets: Sequence[str]) -> tuple[list[str], list[str]]:
    """``--set`` specs for (the front, the key-holding proxy); :data:`SHARED_SETS` go to
    both."""
    front: list[str] = []
    inner: list[str] = []
    for spec in sets:
        if spec.startswith(SHARED_SETS):
            front.append(spec)
        (front if spec.startswith(FRONT_ONLY_SETS) else inner).append(spec)
    return front, inner


def inner_command(ns: argparse.Namespace, info_path: str, inner_sets: Sequence[str]) -> list[str]:
    """The key-holding proxy's command line (ephemeral port, its own server-info file)."""
    cmd = [sys.executable, "-m", "addons.cli", "--server-info", info_path, "--config", ns.config]
    # The front says "SIGINT received: stopping" once (the child gets it too from a terminal).
    cmd += ["--set", "codex_stop_message=false"]
    for flag, value in (
        ("--upstream-url", ns.upstream_url),
        ("--dump-dir", ns.dump_dir),
        ("--record", ns.record),
    ):
        if value is not None:
            cmd += [flag, value]
    if ns.github_oidc:  # the keyless mode: stdin carries the GitHub request token
        cmd.append("--github-oidc")
    for flag, value in (
        ("--oidc-audience", ns.oidc_audience),
        ("--identity-provider-id", ns.identity_provider_id),
        ("--service-account-id", ns.service_account_id),
        ("--github-oidc-request-url", ns.github_oidc_request_url),
    ):
        if value is not None:
            cmd += [flag, value]
    if ns.dump_required:
        cmd.append("--dump-required")
    if ns.chat_bridge:
        cmd.append("--chat-bridge")
    if ns.workers != "1":  # the front stays one process; the key-holding proxy may have more
        cmd += ["--workers", ns.workers]
    for spec in inner_sets:
        cmd += ["--set", spec]
    return cmd


def front_args(ns: argparse.Namespace, inner_port: int, front_sets: Sequence[str]) -> list[str]:
    """mitmweb's arguments: reverse proxy to the key-holding proxy, everything on loopback."""
    args = [
        "--mode",
        f"reverse:http://127.0.0.1:{inner_port}",
        "--listen-host",
        "127.0.0.1",
        "--listen-port",
        # A real port, not 0: mitmweb's status bar shows the option's value (0 reads as 8080).
        str(ns.port if ns.port is not None else free_port()),
        "--web-host",
        "127.0.0.1",
        "--web-port",
        str(ns.web_port),
        "--no-web-open-browser",
        "-s",
        WEB_SCRIPT,
        "--set",
        "connection_strategy=lazy",
        "--set",
        "keep_host_header=true",
        "--set",
        f"codex_http_shutdown={'true' if ns.http_shutdown else 'false'}",
    ]
    if ns.server_info:
        args += ["--set", f"codex_server_info={os.path.abspath(ns.server_info)}"]
    from addons.config import load_config

    config = load_config(ns.config)
    args += ["--set", f"codex_web_upstream_url={ns.upstream_url or config.upstream_url}"]
    if not any(spec.startswith(SHARED_SETS) for spec in front_sets):
        # The YAML's redact_headers, as the key-holding proxy gets them from the same file.
        for name in config.redact_headers:
            args += ["--set", f"codex_redact_headers={name}"]
    for spec in front_sets:
        args += ["--set", spec]
    return args


def free_port() -> int:
    """A TCP port on 127.0.0.1 that was free a moment ago (for a front started without
    ``--port``; the benchmark and the tests use it too)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def wait_for_inner(proc: subprocess.Popen[bytes], info_path: str, timeout: float = 120) -> int:
    """The key-holding proxy's port, once it listens. Raises SystemExit with its exit code."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if os.path.exists(info_path):
            with open(info_path, encoding="utf-8") as f:
                return int(json.load(f)["port"])
        if proc.poll() is not None:
            raise SystemExit(proc.returncode)
        time.sleep(0.05)
    proc.terminate()
    raise SystemExit(f"{prog('web')}: the key-holding proxy did not start")


def main(argv: Sequence[str] | None = None) -> int:
    """Run the key-holding proxy as a child and mitmweb in front of it; returns the exit code
    (the child's, e.g. 1 for a bad key, if it fails to start)."""
    parser = build_parser()
    ns = parser.parse_args(argv)
    front_sets, inner_sets = split_sets(ns.setoptions)
    with tempfile.TemporaryDirectory(prefix="codex-proxy-web-") as tmp:
        info_path = os.path.join(tmp, "inner-info.json")
        # stdin is inherited: the key goes straight to the child; this process never reads it.
        inner = subprocess.Popen(inner_command(ns, info_path, inner_sets))
        try:
            inner_port = wait_for_inner(inner, info_path)
            from mitmproxy.tools.main import mitmweb

            try:
                mitmweb(front_args(ns, inner_port, front_sets))
            except SystemExit as e:
                if e.code not in (None, 0):
                    return e.code if isinstance(e.code, int) else 1
            return 0
        except KeyboardInterrupt:  # before mitmweb's own handler (then: addons.clean_stop)
            sys.stderr.write("SIGINT received: stopped\n")
            return 130
        finally:
            if inner.poll() is None:
                inner.terminate()
                try:
                    inner.wait(15)
                except subprocess.TimeoutExpired:
                    inner.kill()


if __name__ == "__main__":
    sys.exit(main())
