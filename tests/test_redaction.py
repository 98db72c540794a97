import pytest
from mitmproxy import http
from mitmproxy.test import taddons, tflow, tutils

from addons.redaction import (
    REDACTED,
    HeaderRedaction,
    has_redacted,
    redact_fields,
    redact_in_place,
    should_redact,
)
from addons.sse_stream import Tee


@pytest.mark.parametrize(
    ("name", "redacted"),
    [
        ("Authorization", True),
        ("authorization", True),
        ("AUTHORIZATION", True),
        ("Proxy-Authorization", True),
        ("Cookie", True),
        ("Set-Cookie", True),
        ("x-my-cookie-jar", True),
        ("Content-Type", False),
        ("x-api-key", False),
        ("authorization-hint", False),
    ],
)
def test_should_redact(name, redacted):
    assert should_redact(name) is redacted


def test_extra_redaction_names():
    assert should_redact("X-Api-Key", frozenset({"x-api-key"}))


def test_redact_fields_keeps_order_case_and_duplicates():
    fields = [(b"Host", b"h"), (b"authorization", b"Bearer k"), (b"X-A", b"1"), (b"X-A", b"2")]
    assert redact_fields(fields) == [
        {"name": "Host", "value": "h"},
        {"name": "authorization", "value": "[REDACTED]"},
        {"name": "X-A", "value": "1"},
        {"name": "X-A", "value": "2"},
    ]


def test_redact_in_place_keeps_names_order_and_duplicates():
    headers = http.Headers(
        [(b"Set-Cookie", b"a=1"), (b"X-Keep", b"v"), (b"set-cookie", b"b=2"), (b"X-Api-Key", b"k")]
    )
    assert has_redacted(headers, frozenset({"x-api-key"}))
    assert redact_in_place(headers, frozenset({"x-api-key"}))
    assert headers.fields == (
        (b"Set-Cookie", b"[REDACTED]"),
        (b"X-Keep", b"v"),
        (b"set-cookie", b"[REDACTED]"),
        (b"X-Api-Key", b"[REDACTED]"),
    )
    assert not has_redacted(headers, frozenset({"x-api-key"}))
    assert not redact_in_place(headers, frozenset({"x-api-key"}))


SECRET_REQUEST = [
    (b"Cookie", b"session=client-cookie"),
    (b"X-Api-Key", b"client-api-key"),
    (b"Content-Type", b"application/json"),
]


def flow_with_cookies(body: bytes = b'{"ok": true}') -> http.HTTPFlow:
    f = tflow.tflow(
        resp=tutils.tresp(
            headers=[
                (b"content-type", b"application/json"),
                (b"set-cookie", b"__cf_bm=one"),
                (b"set-cookie", b"_cfuvid=two"),
            ],
            content=body,
        )
    )
    f.request.headers = http.Headers(SECRET_REQUEST)
    return f


def test_request_headers_redacted_once_the_request_went_upstream():
    addon = HeaderRedaction()
    with taddons.context(addon):
        f = flow_with_cookies()
        addon.requestheaders(f)
        assert f.request.headers["cookie"] == "session=client-cookie"  # not yet on the wire
        addon.responseheaders(f)
        assert f.request.headers["cookie"] == REDACTED
        assert f.request.headers["x-api-key"] == REDACTED
        assert f.request.headers["content-type"] == "application/json"


def test_reply_with_cookies_is_streamed_and_redacted_after_its_head_went():
    addon = HeaderRedaction()
    with taddons.context(addon):
        f = flow_with_cookies()
        addon.requestheaders(f)
        addon.responseheaders(f)
        # mitmproxy sends the head after responseheaders: still intact for the client.
        assert f.response.headers.get_all("set-cookie") == ["__cf_bm=one", "_cfuvid=two"]
        stream = f.response.stream
        assert callable(stream)
        assert stream(b'{"ok": ') == b'{"ok": '
        assert f.response.headers.get_all("set-cookie") == [REDACTED, REDACTED]
        assert stream(b"true}") == b"true}" and stream(b"") == b""
        f.response.raw_content = b""  # mitmproxy keeps no streamed body
        addon.response(f)
        assert f.response.raw_content == b'{"ok": true}' and not f.response.stream


def test_an_existing_stream_is_wrapped_not_replaced():
    addon = HeaderRedaction()
    with taddons.context(addon):
        f = flow_with_cookies()
        sse_tee = Tee()
        f.response.stream = sse_tee
        addon.responseheaders(f)
        assert f.response.stream is not sse_tee
        f.response.stream(b"data: 1\n\n")
        assert sse_tee.data == b"data: 1\n\n"
        assert f.response.headers.get_all("set-cookie") == [REDACTED, REDACTED]


def test_local_reply_headers_are_left_for_the_wire_request_redacted():
    """A reply made by the proxy itself (sent after the response hook) keeps its headers; the
    refused request never left, so its headers are redacted at once."""
    addon = HeaderRedaction()
    with taddons.context(addon):
        f = flow_with_cookies()
        addon.requestheaders(f)
        addon.response(f)
        assert f.request.headers["cookie"] == REDACTED
        assert f.response.headers.get_all("set-cookie") == ["__cf_bm=one", "_cfuvid=two"]


def test_error_and_shutdown_redact_everything():
    addon = HeaderRedaction()
    with taddons.context(addon):
        failed, open_flow = flow_with_cookies(), flow_with_cookies()
        for f in (failed, open_flow):
            addon.requestheaders(f)
        failed.error = tflow.terr()
        addon.error(failed)
        addon.done()
        for f in (failed, open_flow):
            assert f.request.headers["x-api-key"] == REDACTED
            assert f.response.headers.get_all("set-cookie") == [REDACTED, REDACTED]


def test_configured_names_replace_the_defaults():
    addon = HeaderRedaction()
    with taddons.context(addon) as tctx:
        tctx.configure(addon, codex_redact_headers=["X-Team-Token"])
        f = flow_with_cookies()
        f.request.headers["x-team-token"] = "t"
        addon.responseheaders(f)
        assert f.request.headers["x-team-token"] == REDACTED
        assert f.request.headers["x-api-key"] == "client-api-key"
        assert f.request.headers["cookie"] == REDACTED  # cookies always


def test_fails_closed(monkeypatch):
    addon = HeaderRedaction()
    with taddons.context(addon):
        f = flow_with_cookies()

        def boom(*_a, **_k):
            raise RuntimeError("x")

        monkeypatch.setattr("addons.redaction.has_redacted", boom)
        addon.responseheaders(f)
        assert f.error is not None and f.error.msg == "Connection killed."
