"""Drives the real gateway: admin commands and ``serve`` as subprocesses on 127.0.0.1."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

from tests.conftest import ROOT, START_TIMEOUT, ProxyProcess, wait_for

#: Recognisable upstream keys: leak checks grep for them everywhere.
UPSTREAM_KEYS = {
    "alpha": "sk-up-LEAKCHECK_alpha_0123456789abcdefghij",
    "beta": "sk-up-LEAKCHECK_beta_0123456789abcdefghijk",
    "gamma": "sk-up-LEAKCHECK_gamma_0123456789abcdefghi",
}
CODEX_HEADERS = {"user-agent": "codex_exec/0.171.0 (test)", "session-id": "sess-1"}
#: The operator's metrics token (``metrics_token_file``), which every test gateway is given
#: unless its config says otherwise; leak checks grep for it too.
METRICS_TOKEN = "LEAKCHECK-metrics-0123456789abcdef0123456789abcdef"  # noqa: S105 - a fake
#: Headers that read ``/metrics`` and ``/health``'s detail, as Prometheus sends them.
OPERATOR = {"authorization": f"Bearer {METRICS_TOKEN}"}


class Gateway:
    """One gateway deployment: a config file and a database, admin commands, servers."""

    def __init__(self, tmp_path: Path, database: str | None = None, **config: object) -> None:
        self.tmp = tmp_path
        self.config_path = tmp_path / "gateway.yaml"
        self.database = database or f"sqlite:///{tmp_path / 'gateway.db'}"
        base = (ROOT / "config" / "gateway.yaml").read_text()
        if "metrics_token_file" not in config:
            (tmp_path / "metrics.token").write_text(METRICS_TOKEN + "\n")
            config["metrics_token_file"] = "metrics.token"  # noqa: S105 - a file name
        extra = "".join(f"{k}: {json.dumps(v)}\n" for k, v in config.items())
        self.config_path.write_text(base + "\n" + extra)
        self.servers: list[ProxyProcess] = []
        self._n = 0

    def cmd(self, *args: str) -> list[str]:
        return [
            sys.executable,
            "-m",
            "addons.gateway_mode.cli",
            "--config",
            str(self.config_path),
            "--database",
            self.database,
            *args,
        ]

    def admin(self, *args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
        proc = subprocess.run(
            self.cmd(*args),
            capture_output=True,
            text=True,
            timeout=60,
            cwd=ROOT,
            stdin=subprocess.DEVNULL,
        )
        if check and proc.returncode != 0:
            raise AssertionError(f"gateway {args} exited {proc.returncode}:\n{proc.stderr}")
        return proc

    def add_key(self, member: str) -> str:
        return self.admin("add-key", member).stdout.strip().splitlines()[-1]

    def usage(self, *args: str) -> dict:
        return json.loads(self.admin("usage", "--json", *args).stdout)

    def serve(
        self,
        upstream_url: str,
        *args: str,
        keys: str | None = None,
        env: dict[str, str] | None = None,
    ) -> ProxyProcess:
        n = self._n = self._n + 1
        info = self.tmp / f"gw-info-{n}.json"
        out, err = self.tmp / f"gw-stdout-{n}.log", self.tmp / f"gw-stderr-{n}.log"
        stdin = (
            keys if keys is not None else "".join(f"{k} {v}\n" for k, v in UPSTREAM_KEYS.items())
        )
        with open(out, "wb") as fo, open(err, "wb") as fe:
            proc = subprocess.Popen(
                self.cmd(
                    "serve",
                    "--server-info",
                    str(info),
                    "--upstream-url",
                    upstream_url,
                    "--http-shutdown",
                    "--set",
                    "codex_gateway_refresh_ms=200",
                    *args,
                ),
                stdin=subprocess.PIPE,
                stdout=fo,
                stderr=fe,
                cwd=ROOT,
                env={**os.environ, **(env or {})},
            )
        assert proc.stdin is not None
        proc.stdin.write(stdin.encode())
        proc.stdin.close()
        handle = ProxyProcess(proc, 0, info, out, err, None, True)
        self.servers.append(handle)
        wait_for(lambda: info.exists() or proc.poll() is not None, START_TIMEOUT, "server-info")
        if proc.poll() is not None:
            raise AssertionError(f"gateway exited {proc.returncode}:\n{handle.output()}")
        handle.port = json.loads(info.read_text())["port"]
        return handle

    def stop(self) -> None:
        for server in self.servers:
            server.stop()


def bearer(key: str) -> dict[str, str]:
    return {"authorization": f"Bearer {key}", **CODEX_HEADERS}


def member_codex_home(
    tmp_path: Path, server: ProxyProcess, model: str | None = None, websockets: bool = True
) -> tuple[Path, Path, str]:
    """A CODEX_HOME for a gateway member: ``(home, workdir, config.toml text)``, the config
    being what ``./run.sh codex-config --gateway`` prints (``--model`` only when given;
    ``--no-websockets`` with ``websockets=False``, for tests of Codex over HTTP)."""
    home, work = tmp_path / f"codex-home-{model or 'default'}", tmp_path / "work"
    home.mkdir()
    work.mkdir(exist_ok=True)
    config = subprocess.run(
        [
            sys.executable,
            "-m",
            "addons.codex_config",
            "--server-info",
            str(server.info_path),
            *(["--model", model] if model else []),
            *([] if websockets else ["--no-websockets"]),
            "--gateway",
            "--toml-only",
        ],
        capture_output=True,
        text=True,
        timeout=60,
        check=True,
        cwd=ROOT,
    ).stdout
    (home / "config.toml").write_text(config)
    return home, work, config


def member_env(home: Path, key: str) -> dict[str, str]:
    """Codex's environment as a member: ``CODEX_HOME``, the key in ``CODEX_GATEWAY_KEY``, and
    no OPENAI_/CODEX_ variable of ours leaking in."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("OPENAI_", "CODEX_"))}
    env["CODEX_HOME"] = str(home)
    env["CODEX_GATEWAY_KEY"] = key
    return env


def member_codex_command(binary: str, home: Path, key: str) -> tuple[list[str], dict[str, str]]:
    """``codex exec`` of one "Say hello" turn as a member and its environment
    (:func:`member_env`)."""
    return [binary, "exec", "--skip-git-repo-check", "--json", "Say hello"], member_env(home, key)


def run_member_codex(
    binary: str, home: Path, work: Path, key: str, timeout: float = 180
) -> tuple[int, str, float]:
    """Run one member turn; returns (exit code, stdout + stderr, seconds), and prints what
    Codex showed and how long it took."""
    import time

    args, env = member_codex_command(binary, home, key)
    started = time.monotonic()
    result = subprocess.run(
        args, stdin=subprocess.DEVNULL, capture_output=True, timeout=timeout, cwd=work, env=env
    )
    seconds = time.monotonic() - started
    out = result.stdout.decode(errors="replace") + result.stderr.decode(errors="replace")
    print(f"codex exit {result.returncode} after {seconds:.1f} s:\n{out[-1500:]}")
    return result.returncode, out, seconds
