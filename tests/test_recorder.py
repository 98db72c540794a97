import json

import pytest
from mitmproxy import exceptions
from mitmproxy.addons import save, savehar
from mitmproxy.test import taddons, tflow, tutils

from addons.common import ALLOWED, CHUNK_TIMING, DUMP_SEQ
from addons.recorder import Recorder, human_summary, read_ledger, summarize
from addons.responses_turn import usage_of
from tests.conftest import ROOT
from tests.fake_upstream import StreamCompressor, encode_event, responses_sse_events


def test_usage_of():
    assert usage_of(
        {
            "usage": {
                "input_tokens": 3,
                "input_tokens_details": {"cached_tokens": 1, "cache_write_tokens": 2},
                "output_tokens": 4,
                "output_tokens_details": {"reasoning_tokens": 2},
                "total_tokens": 7,
            }
        }
    ) == {
        "input": 3,
        "cached": 1,
        "cache_write": 2,
        "output": 4,
        "reasoning": 2,
        "total": 7,
    }
    assert usage_of({"usage": None}) is None


def sse_flow(seq=1):
    body = b"".join(encode_event(k, p) for k, p in responses_sse_events("a b c", "gpt-r"))
    f = tflow.tflow(
        resp=tutils.tresp(headers=[(b"content-type", b"text/event-stream")], content=body)
    )
    f.request.content = json.dumps({"model": "gpt-r", "stream": True}).encode()
    f.metadata[ALLOWED] = True
    f.metadata[DUMP_SEQ] = seq
    f.metadata[CHUNK_TIMING] = [[0, 10], [5, len(body)]]
    return f


def test_ledger_and_summary(tmp_path):
    addon = Recorder()
    with taddons.context(addon) as tctx:
        tctx.configure(addon, codex_record_dir=str(tmp_path))
        addon.response(sse_flow(1))
        failed = sse_flow(2)
        first_event = responses_sse_events("a b c", "gpt-r")[0]
        failed.response.content = encode_event(*first_event)  # cut before response.completed
        failed.error = tflow.terr("client disconnected")
        addon.error(failed)
        refused = sse_flow(3)
        del refused.metadata[ALLOWED]
        addon.response(refused)
        lines = (tmp_path / "usage.jsonl").read_text().splitlines()
        assert len(lines) == 2
        first = json.loads(lines[0])
        assert first["model"] == "gpt-r" and first["status"] == 200 and first["completed"]
        assert first["events"] == 11  # 3 deltas + 8 other events
        assert first["usage"] == {
            "input": 42,
            "cached": 8,
            "cache_write": 3,
            "output": 17,
            "reasoning": 5,
            "total": 59,
        }
        assert first["chunk_timing"] == [[0, 10], [5, first["chunk_timing"][1][1]]]
        addon.done()
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert summary["totals"]["requests"] == 2 and summary["totals"]["failed"] == 1
    assert summary["totals"]["total"] == 59 and summary["totals"]["cached"] == 8
    text = (tmp_path / "summary.txt").read_text()
    assert "2 request(s), 1 failed" in text and "ERROR client disconnected" in text


def test_human_summary_of_nothing():
    assert "0 request(s)" in human_summary(summarize([]))


def test_completed_stream_cut_by_the_client_is_not_a_failure(tmp_path):
    addon = Recorder()
    with taddons.context(addon) as tctx:
        tctx.configure(addon, codex_record_dir=str(tmp_path))
        f = sse_flow(1)
        f.error = tflow.terr("Client disconnected.")
        addon.error(f)
        addon.done()
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert summary["totals"]["failed"] == 0
    assert "after completion" in (tmp_path / "summary.txt").read_text()


def test_compressed_stream_ledger_has_tokens_and_decoded_timing(tmp_path):
    """A zstd SSE reply cut after response.completed (Codex hangs up there): tokens found,
    chunk timing in decoded bytes (what the dump's body and replay hold), the cut noted."""
    parts = [encode_event(k, p) for k, p in responses_sse_events("a b c", "gpt-r")]
    compressor = StreamCompressor("zstd")
    wire = [compressor.event(p) for p in parts]  # no end(): the frame never closes
    f = sse_flow(1)
    f.response.headers["content-encoding"] = "zstd"
    f.response.raw_content = b"".join(wire)
    f.metadata[CHUNK_TIMING] = [[i, sum(map(len, wire[: i + 1]))] for i in range(len(wire))]
    addon = Recorder()
    with taddons.context(addon) as tctx:
        tctx.configure(addon, codex_record_dir=str(tmp_path))
        addon.response(f)
    rec = json.loads((tmp_path / "usage.jsonl").read_text())
    assert rec["completed"] and rec["events"] == len(parts)
    assert rec["usage"]["total"] == 59 and rec["usage"]["cached"] == 8
    assert rec["content_encoding"] == "zstd"
    assert "truncated" in rec["decode_error"]
    assert rec["chunk_timing"][-1] == [len(parts) - 1, len(b"".join(parts))]


def test_requests_priced_in_credits_with_the_rate_card(tmp_path):
    addon = Recorder()
    with taddons.context(addon) as tctx:
        tctx.configure(
            addon,
            codex_record_dir=str(tmp_path),
            codex_rate_card=str(ROOT / "config" / "codex-rate-card.yaml"),
        )
        priced = sse_flow(1)
        priced.request.content = json.dumps(
            {"model": "gpt-5.5", "stream": True, "service_tier": "priority"}
        ).encode()
        addon.response(priced)
        addon.response(sse_flow(2))  # gpt-r: not on the card
        addon.done()
    first, second = (json.loads(x) for x in (tmp_path / "usage.jsonl").read_text().splitlines())
    # usage 42 in (8 cached), 17 out: (34*125 + 8*12.5 + 17*750) / 1e6, fast mode x2.
    assert first["credits"] == "0.034200" and first["rate"] == "gpt-5.5"
    assert first["service_tier"] == "priority"
    assert second["credits"] is None and second["rate"] is None
    totals = json.loads((tmp_path / "summary.json").read_text())["totals"]
    assert totals["credits"] == "0.034200" and totals["usd"] == "0.0014"
    assert totals["unpriced"] == 1
    assert (
        "Codex credits: 0.034200, USD 0.0014 (1 request(s) unpriced)"
        in (tmp_path / "summary.txt").read_text()
    )
    page = (tmp_path / "report.html").read_text()
    assert "0.034200 (fast x2)" in page and "unpriced" in page and "<td>0.0014</td>" in page


@pytest.mark.parametrize("existing", [False, True])
def test_mitmproxys_flow_file_and_har_are_private(tmp_path, existing):
    """mitmproxy opens them with the umask's mode (0644) and keeps a file's mode: the recorder
    makes them 0600 at configure, before a flow is written (issue 30)."""
    flows, har = tmp_path / "flows.mitm", tmp_path / "session.har"
    if existing:
        for path in (flows, har):
            path.write_bytes(b"")
            path.chmod(0o644)
    addon, saver = Recorder(), save.Save()
    with taddons.context(addon, saver, savehar.SaveHar()) as tctx:
        tctx.configure(
            addon, codex_record_dir=str(tmp_path), save_stream_file=str(flows), hardump=str(har)
        )
        assert flows.stat().st_mode & 0o777 == 0o600 and har.stat().st_mode & 0o777 == 0o600
        saver.done()  # closes the flow file mitmproxy opened


def test_a_flow_file_that_cannot_be_made_private_stops_start_up(tmp_path):
    addon = Recorder()
    context = taddons.context(addon, savehar.SaveHar())
    with context as tctx, pytest.raises(exceptions.OptionsError, match="hardump"):
        tctx.configure(
            addon, codex_record_dir=str(tmp_path), hardump=str(tmp_path / "no" / "s.har")
        )


def test_read_ledger_refuses_a_line_of_the_wrong_types(tmp_path):
    record = {
        "seq": 1,
        "started": 1.0,
        "duration_ms": 5,
        "status": 200,
        "model": "m",
        "events": 1,
        "usage": None,
        "completed": True,
    }
    (tmp_path / "usage.jsonl").write_text(json.dumps(record) + "\n")
    assert read_ledger(str(tmp_path))[0].model == "m"
    for bad in (
        {"event_ms": [[]] * 3},
        {"usage": {f"k{i}": 1 for i in range(40)}},
        {"chunk_timing": [[1, 2, 3]]},
        {"completed": "yes"},
        {"status": True},
    ):
        (tmp_path / "usage.jsonl").write_text(json.dumps({**record, **bad}) + "\n")
        with pytest.raises(ValueError, match=r"usage\.jsonl line 1: not a ledger line"):
            read_ledger(str(tmp_path))
