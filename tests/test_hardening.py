"""Process hardening: the key holder's process is not dumpable, has no core limit, no LD_*."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from addons.hardening import remove_ld_variables
from tests.conftest import wait_for

pytestmark = pytest.mark.e2e

# A process of the same user (uid 0 here) stripped of every capability: it can read the
# /proc files of a same-user, equally capless process, unless that one is non-dumpable.
CAPLESS = ["setpriv", "--bounding-set=-all", "--inh-caps=-all", "--"]


def test_remove_ld_variables():
    env = {"LD_PRELOAD": "/x.so", "LD_LIBRARY_PATH": "/y", "PATH": "/bin", "OLD_LD": "k"}
    assert sorted(remove_ld_variables(env)) == ["LD_LIBRARY_PATH", "LD_PRELOAD"]
    assert env == {"PATH": "/bin", "OLD_LD": "k"}


def attacker_can_read(path: str) -> bool:
    result = subprocess.run([*CAPLESS, "head", "-c", "16", path], capture_output=True, timeout=10)
    return result.returncode == 0


def attacker_can_open(path: str) -> bool:
    code = f"open({path!r}, 'rb').close()"
    result = subprocess.run([*CAPLESS, sys.executable, "-c", code], capture_output=True, timeout=30)
    return result.returncode == 0


def test_same_user_cannot_read_environ_or_mem(upstream, start_proxy):
    # Control: an ordinary (dumpable) capless process of the same user is readable, so a
    # failure to read the proxy below is the proxy's doing, not the harness's.
    control = subprocess.Popen([*CAPLESS, sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        wait_for(
            lambda: attacker_can_read(f"/proc/{control.pid}/environ"),
            10,
            "the control process to be readable",
        )
        assert attacker_can_open(f"/proc/{control.pid}/mem")
    finally:
        control.kill()
        control.wait()

    proxy = start_proxy(upstream.url, wrap=CAPLESS, env={"LD_TEST_MARKER": "1"})
    pid = proxy.proc.pid
    assert not attacker_can_read(f"/proc/{pid}/environ")
    # mem: opening it is the check (a dumpable process's mem opens for its peer, then a read
    # at offset 0 fails with EIO; here the open itself is refused).
    assert not attacker_can_open(f"/proc/{pid}/mem")
    limits = Path(f"/proc/{pid}/limits").read_text()
    core = next(line for line in limits.splitlines() if line.startswith("Max core file size"))
    assert core.split()[4:6] == ["0", "0"]
    assert proxy.post_json({"model": "m"})[0] == 200  # still serving
    assert proxy.shutdown() == 0
