"""addons/bomb_fence.py: a body past the decode limit is fenced once its flow ends, only where
mitmproxy would decode it whole (a HAR export, mitmweb), large ones off the event loop."""

from __future__ import annotations

import gzip
import inspect

from mitmproxy.addons.savehar import SaveHar
from mitmproxy.test import taddons, tflow, tutils

from addons.body_decode import FENCED
from addons.bomb_fence import BombFence

MIB = 1024 * 1024
BOMB = gzip.compress(bytes(MIB), 9) * 200  # 200 MiB in ~210 KB: past max(1 MiB, 100 x)


def flow_with(body: bytes) -> tflow.HTTPFlow:
    f = tflow.tflow()
    f.request.headers["content-encoding"] = "gzip"
    f.request.raw_content = body
    f.response = tutils.tresp(content=b'{"ok": 1}')
    return f


async def test_a_bomb_is_fenced_off_the_loop_when_a_har_is_written(tmp_path):
    fence = BombFence()
    with taddons.context(fence, SaveHar()) as tctx:
        tctx.configure(fence, hardump=str(tmp_path / "s.har"))
        f = flow_with(BOMB)
        pending = fence.response(f)
        assert inspect.isawaitable(pending)  # large: checked on the addon's thread
        await pending
        assert f.request.headers["content-encoding"].startswith(FENCED)
        small = flow_with(gzip.compress(b'{"model": "m"}'))
        assert fence.response(small) is None
        assert small.request.headers["content-encoding"] == "gzip"
        fence.done()


def test_nothing_is_decoded_without_a_reader_that_would_expand_it():
    fence = BombFence()
    with taddons.context(fence, SaveHar()):
        f = flow_with(BOMB)
        assert fence.response(f) is None
        assert f.request.headers["content-encoding"] == "gzip"
