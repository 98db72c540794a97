import pytest
from mitmproxy.test import taddons, tflow, tutils

from addons.common import ALLOWED
from addons.sse_stream import SseStreaming, Tee, is_event_stream


@pytest.mark.parametrize(
    ("ctype", "expected"),
    [
        ("text/event-stream", True),
        ("text/event-stream; charset=utf-8", True),
        ("Text/Event-Stream", True),
        ("application/json", False),
        ("", False),
    ],
)
def test_is_event_stream(ctype, expected):
    resp = tutils.tresp(headers=[(b"content-type", ctype.encode())] if ctype else [])
    assert is_event_stream(resp) is expected


def test_tee_passes_chunks_unchanged_and_keeps_them():
    tee = Tee()
    assert tee(b"data: 1\n\n") == b"data: 1\n\n"
    assert tee(b"data: 2\n\n") == b"data: 2\n\n"
    assert tee(b"") == b""
    assert bytes(tee.data) == b"data: 1\n\ndata: 2\n\n" and tee.chunks == 2


def sse_flow(allowed=True, ctype=b"text/event-stream"):
    f = tflow.tflow(resp=tutils.tresp(headers=[(b"content-type", ctype)], content=b""))
    if allowed:
        f.metadata[ALLOWED] = True
    return f


def test_sse_reply_is_streamed_and_body_restored():
    addon = SseStreaming()
    with taddons.context(addon):
        f = sse_flow()
        addon.responseheaders(f)
        assert callable(f.response.stream)
        f.response.stream(b"event: a\ndata: {}\n\n")
        f.response.stream(b"event: b\ndata: {}\n\n")
        addon.response(f)
        assert f.response.raw_content == b"event: a\ndata: {}\n\nevent: b\ndata: {}\n\n"
        assert not f.response.stream


def test_partial_body_restored_on_error():
    addon = SseStreaming()
    with taddons.context(addon):
        f = sse_flow()
        addon.responseheaders(f)
        f.response.stream(b"data: 1\n\n")
        f.error = tflow.terr("client disconnected")
        addon.error(f)
        assert f.response.raw_content == b"data: 1\n\n"


@pytest.mark.parametrize(
    ("allowed", "ctype"), [(True, b"application/json"), (False, b"text/event-stream")]
)
def test_other_replies_are_not_streamed(allowed, ctype):
    addon = SseStreaming()
    with taddons.context(addon):
        f = sse_flow(allowed, ctype)
        addon.responseheaders(f)
        assert not f.response.stream
