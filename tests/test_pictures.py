"""The HTML pages people read at a glance (``report.html``, ``compare.html``), rendered in headless
Chromium at 1 400 px: every chart has axes with tick labels and titles, BASE and NEW share their
axes, nothing overflows the page sideways, the dump links are in view, and every refusal is
listed. The recordings are written by the recorder's own writer (``write_summary``) from ledger
lines like a replay's: a BASE of 2 turns, a NEW of 8 with two 409 replay mismatches, an
upstream 500, a WebSocket turn and local refusals. Screenshots are kept in test-artifacts/."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from addons import compare
from addons.recorder import RequestRecord, append_line, write_summary
from tests.conftest import ROOT, wait_for

ARTIFACTS = ROOT / "test-artifacts"
WIDTH = 1400
LONG_MODEL = "gpt-5.3-codex-2026-01-15-preview-with-a-very-long-deployment-name<b>"
T0 = 1_764_000_000.0


def mismatch(n: int) -> str:
    return (
        f"request {n} differs from recorded exchange {n:06d}: input: recorded "
        "['message:user', 'function_call', 'function_call_output'], got ['message:user']"
    )


def turn(seq: int, *, status: int = 200, tokens: int = 0, events: int = 0, **kw: Any) -> dict:
    """A ledger line (``RequestRecord`` fields) plus its reply for the dump (``reply``)."""
    usage = (
        {
            "input": tokens,
            "cached": tokens * 3 // 5,
            "output": tokens // 8,
            "reasoning": tokens // 40,
            "total": tokens + tokens // 8,
        }
        if tokens
        else None
    )
    event_ms = [40 * seq + i * (90 + 20 * seq) for i in range(events)]
    return {
        "seq": seq,
        "started": T0 + 7 * seq,
        "duration_ms": (event_ms[-1] + 5) if event_ms else 35,
        "status": status,
        "model": "gpt-5.3-codex",
        "events": events,
        "usage": usage,
        "completed": status == 200,
        "turn_status": "completed" if status == 200 else None,
        "first_event_ms": event_ms[0] if event_ms else None,
        "event_ms": event_ms,
        **kw,
    }


BASE_TURNS = [turn(1, tokens=9_000, events=12), turn(2, tokens=11_500, events=20)]
NEW_TURNS = [
    turn(1, tokens=9_000, events=12),
    turn(2, tokens=12_000, events=24),
    turn(3, tokens=14_800, events=31, model=LONG_MODEL),
    turn(4, status=409, reply={"code": "replay_mismatch", "message": mismatch(4)}),
    turn(5, tokens=19_000, events=40, transport="websocket"),
    turn(6, status=500, reply={"code": "server_error", "message": "The server had an error"}),
    turn(7, tokens=23_500, events=18, error="Client disconnected."),
    turn(8, status=409, reply={"code": "replay_mismatch", "message": mismatch(8)}),
]
LOCAL_REFUSALS = [
    {
        "time": T0 + 3,
        "method": "GET",
        "path": "/v1/models",
        "status": 403,
        "reason": "not-allowlisted",
    },
    {
        "time": T0 + 4,
        "method": "GET",
        "path": "/v1/responses",
        "status": 426,
        "reason": "websocket",
    },
]


def write_recording(directory: Path, turns: list[dict], refused: list[dict]) -> Path:
    """A recording directory as the proxy leaves it: dump pairs, ``usage.jsonl``, and
    ``summary.json`` + ``report.html`` from :func:`addons.recorder.write_summary`."""
    dumps = directory / "dumps"
    dumps.mkdir(parents=True)
    records = []
    for t in turns:
        line = {k: v for k, v in t.items() if k != "reply"}
        record = RequestRecord(**line)
        records.append(record)
        append_line(str(directory / "usage.jsonl"), json.dumps(line) + "\n")
        request = {
            "method": "POST",
            "url": "http://127.0.0.1/v1/responses",
            "headers": [],
            "body": {"model": t["model"], "stream": True, "input": [{"role": "user"}]},
        }
        body = {"error": t["reply"]} if "reply" in t else "event: response.completed\n\n"
        response = {"status": t["status"], "headers": [], "body": body}
        for kind, doc in (("request", request), ("response", response)):
            (dumps / f"{t['seq']:06d}-1-{kind}.json").write_text(json.dumps(doc))
    write_summary(str(directory), records, refused, None, str(dumps))
    return directory


@pytest.fixture(scope="module")
def pages(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("pictures")
    base = write_recording(root / "base", BASE_TURNS, [])
    new = write_recording(root / "new", NEW_TURNS, LOCAL_REFUSALS)
    assert compare.main([str(base), str(new), "--html", str(root / "compare.html")]) == 1
    return {"report": new / "report.html", "compare": root / "compare.html"}


@pytest.fixture(scope="module")
def driver() -> Iterator[Any]:
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    if not (shutil.which("chromium") and shutil.which("chromedriver")):
        if os.environ.get("CI"):
            pytest.fail("chromium/chromedriver missing in CI: ./run.sh test installs them")
        pytest.skip("chromium/chromedriver not installed (./run.sh test installs them)")
    os.environ["SE_OFFLINE"] = "true"  # never let Selenium Manager download anything
    profile = tempfile.mkdtemp(prefix="pictures-chromium-")
    options = webdriver.ChromeOptions()
    options.binary_location = shutil.which("chromium")
    for arg in (
        "--headless=new",
        "--no-sandbox",
        "--disable-gpu",
        "--disable-dev-shm-usage",
        "--no-first-run",
        "--disable-background-networking",
        "--disable-component-update",
        "--disable-sync",
        f"--user-data-dir={profile}",
        f"--window-size={WIDTH},1000",
    ):
        options.add_argument(arg)
    chrome = webdriver.Chrome(service=Service(shutil.which("chromedriver")), options=options)
    try:
        yield chrome
    finally:
        chrome.quit()
        shutil.rmtree(profile, ignore_errors=True)


def open_page(driver: Any, page: Path, marker: str) -> None:
    driver.get(page.as_uri())
    # A loaded machine was seen handing back an empty page source right after get().
    wait_for(lambda: marker in driver.page_source, 30, page.name)
    assert driver.execute_script("return window.innerWidth") == WIDTH


def screenshot(driver: Any, name: str) -> Path:
    """The whole page at 1 400 px wide, into test-artifacts/."""
    height = driver.execute_script("return document.documentElement.scrollHeight")
    driver.execute_cdp_cmd(
        "Emulation.setDeviceMetricsOverride",
        {"width": WIDTH, "height": height, "deviceScaleFactor": 1, "mobile": False},
    )
    try:
        ARTIFACTS.mkdir(exist_ok=True)
        path = ARTIFACTS / name
        driver.save_screenshot(str(path))
    finally:
        driver.execute_cdp_cmd("Emulation.clearDeviceMetricsOverride", {})
    assert path.stat().st_size > 20_000
    return path


#: Per chart: its axis ends, its tick labels per axis and its axis titles.
CHARTS_JS = """
return [...document.querySelectorAll('svg.chart')].map(svg => ({
  label: svg.getAttribute('aria-label'),
  side: svg.closest('.side') ? svg.closest('.side').querySelector('h3').textContent : '',
  xMax: svg.dataset.xMax, yMax: svg.dataset.yMax,
  x: [...svg.querySelectorAll('g.tick.x text')].map(t => t.textContent),
  y: [...svg.querySelectorAll('g.tick.y text')].map(t => t.textContent),
  titles: [...svg.querySelectorAll('.axis-title')].map(t => t.textContent),
  inView: svg.getBoundingClientRect().right <= window.innerWidth,
}));
"""

#: Each dump link, scrolled into view inside its box: is it then inside the box and the window?
LINKS_JS = """
return [...document.querySelectorAll(arguments[0])].map(a => {
  a.scrollIntoView({block: 'center', inline: 'nearest'});
  const r = a.getBoundingClientRect(), box = a.closest('.box').getBoundingClientRect();
  return {href: a.getAttribute('href'), visible: r.width > 0 && r.left >= box.left &&
    r.right <= box.right && r.left >= 0 && r.right <= window.innerWidth &&
    r.top >= 0 && r.bottom <= window.innerHeight};
});
"""


def page_width(driver: Any) -> int:
    return driver.execute_script(
        "return Math.max(document.documentElement.scrollWidth, document.body.scrollWidth)"
    )


def assert_axes(chart: dict, x_title: str, y_title: str) -> None:
    assert len(chart["x"]) >= 2 and len(chart["y"]) >= 3, chart
    assert chart["y"][0] == "0" and chart["titles"] == [y_title, x_title], chart
    assert chart["inView"], chart


@pytest.mark.e2e
def test_report_in_chromium_has_axes_fits_1400_and_lists_every_refusal(pages, driver):
    open_page(driver, pages["report"], "Refused requests")
    charts = {c["label"]: c for c in driver.execute_script(CHARTS_JS)}
    assert_axes(charts["tokens per turn"], "request # (dump sequence)", "tokens")
    assert_axes(charts["event arrival"], "ms since the response headers", "events received")
    # 26 437 tokens at most (input + output): 0..30k by 10k; 40 events: 0..40 by 10.
    assert charts["tokens per turn"]["y"] == ["0", "10k", "20k", "30k"]
    assert charts["event arrival"]["y"] == ["0", "10", "20", "30", "40"]
    assert charts["tokens per turn"]["x"] == [str(n) for n in range(1, 9)]
    assert page_width(driver) <= WIDTH
    links = driver.execute_script(LINKS_JS, "table.requests td.dumps a")
    assert len(links) == 16 and all(link["visible"] for link in links), links
    refused = [row.text for row in driver.find_elements("css selector", "table.refused tr")[1:]]
    assert len(refused) == 2 + 3, refused  # 403 and 426 by the proxy, two 409s and a 500
    assert any("409" in row and "replay_mismatch: request 4 differs" in row for row in refused)
    assert any("500" in row and "server_error" in row for row in refused)
    assert any("403" in row and "not-allowlisted" in row for row in refused)
    assert all(link["visible"] for link in driver.execute_script(LINKS_JS, "table.refused a"))
    screenshot(driver, "report-1400.png")


@pytest.mark.e2e
def test_compare_in_chromium_puts_base_and_new_on_the_same_axes(pages, driver):
    open_page(driver, pages["compare"], "Event arrival per stream")
    charts = driver.execute_script(CHARTS_JS)
    assert [(c["label"], c["side"]) for c in charts] == [
        ("tokens per turn", "BASE"),
        ("tokens per turn", "NEW"),
        ("event arrival", "BASE"),
        ("event arrival", "NEW"),
    ]
    for base, new in (charts[0:2], charts[2:4]):
        assert_axes(base, base["titles"][1], base["titles"][0])
        assert_axes(new, new["titles"][1], new["titles"][0])
        assert (base["xMax"], base["yMax"], base["y"]) == (new["xMax"], new["yMax"], new["y"])
    # BASE's 2 turns sit in the same 6 slots as NEW's 6 (NEW's 8 requests are 6 turns: the
    # requests after the failed 4 and 6 repeat their bodies, so compare folds them as retries).
    assert charts[0]["xMax"] == "6" and charts[0]["x"] == ["1", "2"]
    assert charts[2]["x"] == charts[3]["x"]  # the same ms ticks
    assert page_width(driver) <= WIDTH
    verdict = driver.find_element("css selector", "p.verdict").text
    assert verdict.startswith("REGRESSION")
    screenshot(driver, "compare-1400.png")


@pytest.mark.e2e
def test_a_replays_mismatches_are_listed_as_refused(tmp_path):
    """The real proxy records a turn; ``./run.sh replay --record`` answers requests of
    another shape 400: its report lists each one with the replay's message (it once said
    "Refused requests: None" beside them)."""
    from tests.conftest import ProxyProcess
    from tests.fake_upstream import FakeUpstream
    from tests.test_compare import BASE, body, play, start_recording_proxy

    recording, replayed = tmp_path / "rec", tmp_path / "replayed"
    with FakeUpstream() as upstream:
        proxy = start_recording_proxy(recording, upstream.url)
        try:
            play(proxy, upstream, BASE[:1])
            assert proxy.shutdown() == 0, proxy.output()
        finally:
            proxy.stop()
    info, log_path = tmp_path / "replay-info.json", tmp_path / "replay.log"
    with open(log_path, "wb") as log:
        proc = subprocess.Popen(
            [
                *(sys.executable, "-m", "addons.replay", str(recording)),
                *("--server-info", str(info), "--http-shutdown", "--record", str(replayed)),
            ],
            stdin=subprocess.DEVNULL,
            stdout=log,
            stderr=subprocess.STDOUT,
            cwd=ROOT,
        )
        try:
            wait_for(lambda: info.exists() or proc.poll() is not None, 60, "replay server-info")
            assert proc.poll() is None, log_path.read_text()
            port = json.loads(info.read_text())["port"]
            handle = ProxyProcess(proc, port, info, log_path, log_path, None, True)
            for rounds in (3, 4):  # not the recorded shape: 400 each (Codex stops at once)
                assert handle.post_json(body(rounds))[0] == 400
            play(handle, None, [("refuse",)])  # and a 403 of the proxy's own
            assert handle.shutdown() == 0
        finally:
            if proc.poll() is None:
                proc.kill()
    page = (replayed / "report.html").read_text()
    refused = page.split("<h2>Refused requests</h2>", 1)[1]
    assert refused.count("<td>400</td>") == 2 and refused.count("<td>403</td>") == 1, refused
    # The replay stays at its first exchange; each refusal names its own request.
    for n in (1, 2):
        assert f"replay_mismatch: request {n} differs from recorded exchange 000001" in refused
    assert "None: every request got a 2xx answer" not in page
