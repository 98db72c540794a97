"""Fail closed: an exception inside any of our hooks never lets a flow go upstream with the key.

mitmproxy logs a hook's exception and lets the flow go on; our hooks catch their own errors and
answer a local 500 (before a response exists) or kill the flow (after)."""

from __future__ import annotations

import inspect

import pytest
from mitmproxy.test import taddons, tflow, tutils

from addons import proxy
from addons.common import ALLOWED, KEY_INJECTED


def chain():
    return [type(a)() for a in proxy.addons]


def post_flow():
    f = tflow.tflow()
    f.request.method = "POST"
    f.request.path = "/v1/responses"
    f.request.headers.clear()
    f.request.headers["Host"] = "127.0.0.1:1"
    f.request.headers["content-type"] = "application/json"
    f.request.raw_content = b"{}"
    return f


async def run_request_hooks(addons, f):
    for hook in ("requestheaders", "request"):
        for addon in addons:
            if hasattr(addon, hook):
                result = getattr(addon, hook)(f)
                if inspect.isawaitable(result):
                    await result


def boom(*_args, **_kwargs):
    raise RuntimeError("injected fault")


async def test_healthy_chain_injects_the_key(loaded_key):
    addons = chain()
    with taddons.context(*addons) as tctx:
        tctx.configure(addons[0], listen_host="127.0.0.1")
        f = post_flow()
        await run_request_hooks(addons, f)
        assert f.response is None
        assert f.request.headers["authorization"] == f"Bearer {loaded_key}"


@pytest.mark.parametrize(
    "target",
    [
        "addons.allowlist.refusal_reason",
        "addons.routing.strip_hop_by_hop",
        "addons.keyholder.ApiKey.header_value",
        "addons.websocket_refusal.is_websocket_upgrade",
    ],
)
async def test_fault_in_a_request_hook_answers_locally(loaded_key, monkeypatch, caplog, target):
    monkeypatch.setattr(target, boom)
    addons = chain()
    with taddons.context(*addons) as tctx:
        tctx.configure(addons[0], listen_host="127.0.0.1")
        f = post_flow()
        await run_request_hooks(addons, f)
        assert f.response is not None and f.response.status_code == 500
        assert "authorization" not in f.request.headers
        assert ALLOWED not in f.metadata
        assert not f.metadata.get(KEY_INJECTED)
        assert loaded_key not in caplog.text


async def test_fault_after_the_response_started_kills_the_flow(loaded_key, monkeypatch):
    addons = chain()
    with taddons.context(*addons) as tctx:
        tctx.configure(addons[0], listen_host="127.0.0.1")
        f = post_flow()
        await run_request_hooks(addons, f)
        f.response = tutils.tresp(headers=[(b"content-type", b"text/event-stream")])
        monkeypatch.setattr("addons.sse_stream.Tee.__init__", boom)
        sse = next(a for a in addons if type(a).__name__ == "SseStreaming")
        sse.responseheaders(f)
        assert f.error is not None and "killed" in f.error.msg.lower()


async def test_fault_right_after_injection_removes_the_key(loaded_key, monkeypatch):
    """A fault after the header was set must not leave the key in the flow object."""
    addons = chain()
    with taddons.context(*addons) as tctx:
        tctx.configure(addons[0], listen_host="127.0.0.1")
        f = post_flow()

        class ExplodingMetadata(dict):
            def __setitem__(self, key, value):
                if key == KEY_INJECTED:
                    raise RuntimeError("injected fault")
                super().__setitem__(key, value)

        f.metadata = ExplodingMetadata()
        await run_request_hooks(addons, f)
        assert f.response.status_code == 500
        assert "authorization" not in f.request.headers
        assert loaded_key not in str(f.get_state())
