"""``./run.sh demo`` (the README's first command) runs to "Demo finished: OK"."""

from __future__ import annotations

import subprocess
import sys

import pytest

from tests.conftest import ROOT

pytestmark = pytest.mark.e2e


def test_demo_passes():
    proc = subprocess.run(
        [sys.executable, "-m", "addons.demo"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=180,
        stdin=subprocess.DEVNULL,
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "Demo finished: OK" in proc.stdout
    assert "measured from a warm client" in proc.stdout
    assert "key found in any dump file: False" in proc.stdout
