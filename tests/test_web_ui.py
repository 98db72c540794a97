"""Unit tests of the mitmweb front's addons (``addons/web_ui.py``)."""

from mitmproxy import http
from mitmproxy.test import taddons, tflow, tutils

from addons.common import LOCAL_REPLY_HEADER
from addons.web_ui import FlowNotes, LiveSse


def sse_flow(ctype: bytes = b"text/event-stream") -> http.HTTPFlow:
    return tflow.tflow(resp=tutils.tresp(headers=[(b"content-type", ctype)], content=b""))


def test_live_sse_shows_the_whole_body_when_the_client_leaves_before_the_last_chunk():
    # Codex closes the connection right after response.completed: the flow errors before the
    # final empty chunk, and the throttled copy in the flow would stay at the first event.
    addon = LiveSse()
    with taddons.context(addon) as tctx:
        tctx.configure(addon, codex_web_refresh_ms=60_000)
        f = sse_flow()
        addon.responseheaders(f)
        assert f.response.stream(b"event: response.created\n\n") == b"event: response.created\n\n"
        f.response.stream(b"event: response.completed\n\n")
        assert f.response.raw_content == b"event: response.created\n\n"  # throttled
        f.error = tflow.terr("client disconnected")
        addon.error(f)
        assert f.response.raw_content == (
            b"event: response.created\n\nevent: response.completed\n\n"
        )
        assert not f.response.stream


def test_live_sse_keeps_the_whole_body_at_the_end():
    addon = LiveSse()
    with taddons.context(addon) as tctx:
        tctx.configure(addon, codex_web_refresh_ms=60_000)
        f = sse_flow()
        addon.responseheaders(f)
        for chunk in (b"data: 1\n\n", b"data: 2\n\n", b""):
            f.response.stream(chunk)
        addon.response(f)
        assert f.response.raw_content == b"data: 1\n\ndata: 2\n\n"
        assert not f.response.stream


def test_live_sse_leaves_other_replies_alone():
    addon = LiveSse()
    with taddons.context(addon):
        f = sse_flow(b"application/json")
        f.response.raw_content = b"{}"
        addon.responseheaders(f)
        assert not f.response.stream
        addon.error(f)
        assert f.response.raw_content == b"{}"


def test_flow_notes_mark_refusals_and_redact_forwarded_posts():
    addon = FlowNotes()
    with taddons.context(addon):
        refused = tflow.tflow(resp=tutils.tresp(status_code=403))
        refused.response.headers[LOCAL_REPLY_HEADER] = "forbidden"
        addon.responseheaders(refused)
        assert refused.marked and "allowlist" in refused.comment

        forwarded = tflow.tflow(resp=True)
        forwarded.request.method = "POST"
        addon.responseheaders(forwarded)
        assert not forwarded.marked
        assert forwarded.request.headers["authorization"] == "[REDACTED]"


def test_flow_notes_tell_a_complete_stream_from_a_failed_one():
    addon = FlowNotes()
    with taddons.context(addon):
        complete = sse_flow()
        complete.response.raw_content = b"event: response.completed\ndata: {}\n\n"
        complete.error = tflow.terr("Client disconnected.")
        addon.error(complete)
        assert complete.comment.startswith("stream complete")

        cut = sse_flow()
        cut.response.raw_content = b"event: response.created\ndata: {}\n\n"
        cut.error = tflow.terr("Client disconnected.")
        addon.error(cut)
        assert cut.comment == "failed: Client disconnected."


def test_live_sse_runs_before_flow_notes():
    from addons import web_ui

    kinds = [type(a) for a in web_ui.addons]
    assert kinds.index(LiveSse) < kinds.index(FlowNotes)
