import pytest
from mitmproxy.test import taddons, tflow

from addons.common import ALLOWED
from addons.dumps import DumpWriter
from addons.request_stream import RequestStreaming


def post(**headers):
    f = tflow.tflow()
    f.request.method = "POST"
    f.request.path = "/v1/responses"
    f.request.headers.clear()
    for k, v in headers.items():
        f.request.headers[k.replace("_", "-")] = v
    f.metadata[ALLOWED] = True
    return f


@pytest.mark.parametrize(
    ("headers", "streamed"),
    [
        ({"content_length": "10"}, False),
        ({"content_length": "65536"}, False),
        ({"content_length": "65537"}, True),
        ({"transfer_encoding": "chunked"}, True),
        ({"content_length": "junk"}, False),
        ({}, False),
    ],
)
def test_threshold(headers, streamed):
    addon = RequestStreaming()
    with taddons.context(addon, DumpWriter()):
        f = post(**headers)
        addon.requestheaders(f)
        assert bool(f.request.stream) is streamed


def test_unmarked_or_answered_flows_are_not_streamed():
    addon = RequestStreaming()
    with taddons.context(addon, DumpWriter()):
        f = post(content_length="999999")
        del f.metadata[ALLOWED]
        addon.requestheaders(f)
        assert not f.request.stream


def test_dump_required_never_streams(tmp_path):
    addon, dumps = RequestStreaming(), DumpWriter()
    with taddons.context(addon, dumps) as tctx:
        tctx.configure(dumps, codex_dump_dir=str(tmp_path), codex_dump_required=True)
        f = post(content_length="999999")
        addon.requestheaders(f)
        assert not f.request.stream


def test_body_is_kept_for_dumps():
    addon = RequestStreaming()
    with taddons.context(addon, DumpWriter()):
        f = post(content_length="100000")
        addon.requestheaders(f)
        f.request.stream(b"a" * 60000)
        f.request.stream(b"b" * 40000)
        f.request.data.content = None
        addon.request(f)
        assert f.request.raw_content == b"a" * 60000 + b"b" * 40000
