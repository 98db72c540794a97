import json

from mitmproxy.net.http import http1
from mitmproxy.proxy.layers.http import _http1
from mitmproxy.test import taddons

from addons.error_replies import JsonErrorReplies, render_error_reply


def test_render_error_reply_is_json():
    raw = render_error_reply(502, "Connection refused")
    head, body = raw.split(b"\r\n\r\n", 1)
    resp = http1.read_response_head(head.split(b"\r\n"))
    assert resp.status_code == 502
    assert resp.headers["content-type"] == "application/json"
    assert resp.headers["connection"] == "close"
    assert json.loads(body) == {
        "error": {"type": "codex_proxy", "code": "upstream_error", "message": "Connection refused"}
    }


def test_installed_on_load_and_restored_on_done():
    original = _http1.make_error_response
    addon = JsonErrorReplies()
    with taddons.context(addon):
        assert _http1.make_error_response is render_error_reply
        addon.done()
    assert _http1.make_error_response is original
