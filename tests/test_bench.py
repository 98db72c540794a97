"""The benchmark still runs end to end (tiny settings; no timing is asserted, by design)."""

import json
import os
import shutil
import subprocess
import sys

import pytest

from bench.upstreams import ECHO_MODULE, nginx_binary
from tests.conftest import ROOT

pytestmark = pytest.mark.e2e


def test_benchmark_smoke_run(tmp_path):
    missing = [
        name
        for name, present in (
            ("wrk", shutil.which("wrk") is not None),
            ("nginx", nginx_binary() is not None),
            ("libnginx-mod-http-echo", ECHO_MODULE.exists()),
        )
        if not present
    ]
    if missing:
        if os.environ.get("CI"):
            pytest.fail(f"{', '.join(missing)} missing in CI: ./run.sh test installs them")
        pytest.skip(f"{', '.join(missing)} not installed (./run.sh test installs them)")
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "bench.bench",
            "--seconds",
            "1",
            "--streams",
            "20",
            "--repeat",
            "1",
            "--targets",
            "direct,mitmdump,ours+dumps,ours+bridge,ours-x2,gateway",
            "--out",
            str(tmp_path),
        ],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-2000:]
    data = json.loads((tmp_path / "latest.json").read_text())
    results = data["results"]
    assert set(results) == {"direct", "mitmdump", "ours+dumps", "ours+bridge", "ours-x2", "gateway"}
    for name, r in results.items():
        assert r["wrk_c32"]["rps"] > 0 and r["wrk_c32"]["errors"] == 0, name
        assert r["sse_many"]["ok"] == 20 and r["sse_many"]["failed"] == 0, name
    assert results["ours+dumps"]["ratios"]["rps_c32_vs_mitmdump"] is not None
    # The targets' own CPU per request is measured from their process trees.
    assert results["gateway"]["wrk_c32"]["cpu_ms_per_req"] > 0
    assert results["direct"]["wrk_c32"]["cpu_ms_per_req"] is None
    assert results["gateway"]["ratios"]["cpu_c32_vs_mitmdump"] is not None
    # The gateway metered every one of the concurrent streams.
    assert results["gateway"]["sse_many"]["usage_rows"] == 20
    assert "| req/s, 32 conns |" in (tmp_path / "latest.md").read_text()
    assert results["ours+bridge"]["sse_1"]["ok"] == 1  # the chat-bridge stream was read back
