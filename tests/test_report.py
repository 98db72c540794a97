"""The recording's report.html: unit tests of the page, and a recorded Codex session rendered in
headless Chromium (screenshot kept in test-artifacts/)."""

from __future__ import annotations

import json
import re

import pytest
from mitmproxy.test import taddons, tflow, tutils

from addons.common import ALLOWED, REFUSED
from addons.recorder import Recorder
from addons.report import (
    REASON_DUMP_BYTES,
    is_refusal,
    refusals,
    render_report,
    reply_reasons,
)
from tests.conftest import ROOT, wait_for
from tests.test_clients import CATALOG_MODEL, printed_codex_config, run_codex
from tests.test_recorder import sse_flow
from tests.test_web import chrome

ARTIFACTS = ROOT / "test-artifacts"


def sample_summary() -> dict:
    usage = {"input": 1000, "cached": 600, "output": 300, "reasoning": 100, "total": 1300}
    return {
        "totals": {"requests": 2, "failed": 1, "events": 12, **usage},
        "requests": [
            {
                "seq": 1,
                "started": 1_764_000_000.5,
                "model": "gpt-6.2-sol<script>",
                "status": 200,
                "turn_status": "completed",
                "usage": usage,
                "duration_ms": 812,
                "first_event_ms": 41,
                "events": 10,
                "event_ms": [41, 60, 80, 300, 810],
                "failed": False,
            },
            {
                "seq": 2,
                "started": 1_764_000_003.0,
                "model": "gpt-6.2-sol",
                "status": 200,
                "turn_status": None,
                "error": "Client disconnected.",
                "usage": None,
                "duration_ms": 90,
                "first_event_ms": 12,
                "events": 2,
                "event_ms": [12, 30],
                "failed": True,
            },
        ],
    }


def test_page_is_self_contained_escaped_and_complete():
    refused = [
        {
            "time": 1_764_000_001,
            "method": "GET",
            "path": "/v1/models",
            "status": 403,
            "reason": "not-allowlisted",
        }
    ]
    links = {1: ("dumps/000001-1-request.json", "dumps/000001-1-response.json")}
    page = render_report(sample_summary(), refused, links)
    assert "<script" not in page and "gpt-6.2-sol&lt;script&gt;" in page
    assert not re.search(r"""(src|href)=["']?(https?:)?//""", page)  # nothing from a network
    assert '<a href="dumps/000001-1-request.json">request</a>' in page
    assert page.count('class="bar"') == 3  # uncached, cached, output; turn 2 has no usage
    assert page.count("<polyline") == 2
    assert ">tokens</text>" in page and ">events received</text>" in page  # axis titles
    assert page.count('<g class="tick') >= 8  # ticks on both axes of both charts
    assert "/v1/models" in page and "not-allowlisted" in page
    assert "Client disconnected." in page and 'class="fail"' in page
    assert "<td>1300</td>" in page


def test_recorder_writes_the_report_with_refusals(tmp_path):
    addon = Recorder()
    with taddons.context(addon) as tctx:
        tctx.configure(addon, codex_record_dir=str(tmp_path))
        addon.response(sse_flow(1))
        refused = tflow.tflow(resp=True)
        refused.request.path = "/v1/models?api-key=secret"
        refused.metadata[REFUSED] = "not-allowlisted"
        refused.response.status_code = 403
        assert ALLOWED not in refused.metadata
        addon.response(refused)
        addon.done()
    page = (tmp_path / "report.html").read_text()
    assert "gpt-r" in page and "/v1/models?…" in page and "secret" not in page
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert summary["refused"][0]["reason"] == "not-allowlisted"
    assert summary["requests"][0]["failed"] is False


def test_every_non_2xx_answer_is_a_refusal_with_its_replys_message(tmp_path):
    """A replay's 409 mismatch (forwarded, answered upstream) is listed beside the proxy's own
    403, with the error message its response dump holds."""
    dumps = tmp_path / "dumps"
    dumps.mkdir()
    mismatch = {"code": "replay_mismatch", "message": "request 2 differs: model <x>"}
    addon = Recorder()
    with taddons.context(addon) as tctx:
        tctx.configure(addon, codex_record_dir=str(tmp_path))
        tctx.options.add_option("codex_dump_dir", str, str(dumps), "the dumps addon's option")
        addon.response(sse_flow(1))
        answered = sse_flow(2)
        answered.response = tutils.tresp(
            status_code=409,
            headers=[(b"content-type", b"application/json")],
            content=json.dumps({"error": mismatch}).encode(),
        )
        addon.response(answered)
        refused = tflow.tflow(resp=True)
        refused.request.path = "/v1/models"
        refused.metadata[REFUSED] = "not-allowlisted"
        refused.response.status_code = 403
        addon.response(refused)
        for seq, status, body in ((1, 200, "event: x"), (2, 409, {"error": mismatch})):
            for kind, doc in (("request", {}), ("response", {"status": status, "body": body})):
                (dumps / f"{seq:06d}-1-{kind}.json").write_text(json.dumps(doc))
        addon.done()
    page = (tmp_path / "report.html").read_text()
    refused_table = page.split("<h2>Refused requests</h2>", 1)[1]
    assert refused_table.count("<tr>") == 1 + 2  # heading, the 403, the 409
    assert "not-allowlisted" in refused_table and "<td>403</td>" in refused_table
    assert "<td>409</td>" in refused_table and "upstream" in refused_table
    assert "replay_mismatch: request 2 differs: model &lt;x&gt;" in refused_table
    assert 'href="dumps/000002-1-response.json"' in refused_table
    # summary.json keeps the proxy's own refusals only (compare counts forwarded ones as turns).
    assert len(json.loads((tmp_path / "summary.json").read_text())["refused"]) == 1


def test_reply_reasons_skip_what_they_cannot_read(tmp_path):
    (tmp_path / "big.json").write_text(json.dumps({"body": {"error": "x" * REASON_DUMP_BYTES}}))
    (tmp_path / "text.json").write_text("not json")
    (tmp_path / "plain.json").write_text(json.dumps({"body": {"error": "y" * 400}}))
    links = {n: ("-", f"{name}.json") for n, name in enumerate(["big", "text", "plain"], 1)}
    links[4] = ("-", "missing.json")
    reasons = reply_reasons(str(tmp_path), links, [1, 2, 3, 4, None, 5])
    assert list(reasons) == [3] and len(reasons[3]) == 300 and reasons[3].endswith("…")


def test_a_refusal_in_both_lists_is_listed_once():
    summary = {"requests": [{"seq": 3, "started": 5.5, "status": 503, "model": "m"}]}
    local = [{"time": 5.5, "method": "POST", "path": "/v1/responses", "status": 503}]
    assert [x["by"] for x in refusals(summary, local)] == ["proxy"]
    assert [x["by"] for x in refusals(summary, [{**local[0], "time": 9}])] == [
        "upstream",
        "proxy",
    ]


@pytest.mark.parametrize(
    ("status", "refused"),
    [(200, False), (204, False), (101, False), (304, True), (409, True), (500, True), (None, True)],
)
def test_what_counts_as_refused(status, refused):
    assert is_refusal(status) is refused


@pytest.mark.e2e
@pytest.mark.codex
def test_report_of_a_recorded_codex_session_in_chromium(upstream, start_proxy, codex, tmp_path):
    record = tmp_path / "rec"
    upstream.event_delay = 0.01
    proxy = start_proxy(upstream.url, "--record", str(record), dumps=False)
    home, work = tmp_path / "codex-home", tmp_path / "work"
    home.mkdir()
    work.mkdir()
    (home / "config.toml").write_text(printed_codex_config(proxy, "--toml-only"))
    assert run_codex(codex, home, work).returncode == 0
    assert proxy.request("GET", "/v1/models")[0] == 403
    assert proxy.shutdown() == 0
    report = record / "report.html"
    driver = chrome()
    try:
        driver.get(report.as_uri())
        # A loaded machine was seen handing back an empty page source right after get().
        wait_for(lambda: CATALOG_MODEL in driver.page_source, 30, "the report page")
        page = driver.page_source
        ARTIFACTS.mkdir(exist_ok=True)
        driver.save_screenshot(str(ARTIFACTS / "recording-report.png"))
        links = [a.get_attribute("href") for a in driver.find_elements("css selector", "a")]
        ticks = driver.find_elements("css selector", "svg.chart g.tick text")
        wide = driver.execute_script("return document.documentElement.scrollWidth")
    finally:
        driver.quit()
    assert CATALOG_MODEL in page and "completed" in page and "/v1/models" in page
    assert "1 request(s) unpriced" in page  # gpt-6-luna is not on the shipped rate card
    assert "/shutdown" not in page  # answered locally with 200: not a refusal
    assert len(ticks) >= 10 and wide <= 1400  # axes with ticks; nothing wider than the window
    assert len(links) == 2 and all(link.startswith(record.as_uri() + "/dumps/") for link in links)
    for link in links:
        assert (record / link.removeprefix(record.as_uri() + "/")).exists()
    assert (ARTIFACTS / "recording-report.png").stat().st_size > 10_000
