"""``PoolForwarder`` (``addons/gateway_mode/forward.py``) with taddons/tflow: routing member
flows, picking and injecting an upstream key, judging replies, retrying on another key (against
the local Responses stand-in), scrubbing the key from the flow."""

from __future__ import annotations

import asyncio
import json
import time

import pytest
from mitmproxy import http
from mitmproxy.test import taddons, tflow, tutils

from addons.common import ALLOWED, KEY_INJECTED, REFUSED
from addons.gateway_mode.core import ATTEMPTS, MEMBER, ROUTE, UPSTREAM_KEY, GatewayCore
from addons.gateway_mode.forward import PoolForwarder
from addons.gateway_mode.keypool import KeyPool, UpstreamKey
from addons.secret_memory import REDACTED
from addons.standin import ResponsesStandIn

KEYS = {"alpha": "sk-upstream-alpha-0123456789", "beta": "sk-upstream-beta-0123456789"}


def make_core(*names: str) -> GatewayCore:
    core = GatewayCore()
    core.pool = KeyPool()
    core.pool.set_keys([UpstreamKey(n, bytearray(KEYS[n].encode())) for n in names])
    return core


def member_flow(path: str = "/v1/responses", session: str | None = None) -> http.HTTPFlow:
    flow = tflow.tflow()
    flow.request.method = "POST"
    flow.request.path = path
    flow.request.headers["authorization"] = "Bearer sk-codex-gw-member"
    flow.request.headers["connection"] = "keep-alive"
    flow.request.headers["content-type"] = "application/json"
    if session:
        flow.request.headers["session-id"] = session
    flow.request.content = json.dumps({"model": "gpt-5.5", "stream": True}).encode()
    flow.metadata[ALLOWED] = True
    flow.metadata[MEMBER] = {"member": "ana", "member_id": 1, "key_id": "k1"}
    return flow


def in_flight(core: GatewayCore) -> dict[str, int]:
    return {k.name: k.in_flight for k in core.pool.keys}


def test_member_flow_is_routed_and_loses_client_credentials():
    forwarder = PoolForwarder(make_core("alpha"))
    with taddons.context(forwarder) as tctx:
        tctx.configure(forwarder, codex_upstream_url="https://up.example:8443/openai/v1/r?v=2")
        flow = member_flow("/v1/responses/compact")
        forwarder.requestheaders(flow)
        assert flow.response is None
        assert flow.request.url == "https://up.example:8443/openai/v1/r/compact?v=2"
        assert flow.request.host_header == "up.example:8443"
        assert "authorization" not in flow.request.headers
        assert "connection" not in flow.request.headers
        assert flow.metadata[ROUTE] == "/v1/responses/compact"


@pytest.mark.parametrize("marks", [{ALLOWED: True}, {MEMBER: {"member": "ana"}}, {}])
def test_flow_without_both_marks_is_refused_403(marks):
    forwarder = PoolForwarder(make_core("alpha"))
    with taddons.context(forwarder):
        flow = tflow.tflow()
        flow.metadata.update(marks)
        forwarder.requestheaders(flow)
        assert flow.response is not None and flow.response.status_code == 403
        assert ALLOWED not in flow.metadata and flow.metadata[REFUSED] == "not-marked"
        forwarder.request(flow)
        assert KEY_INJECTED not in flow.metadata


def test_request_injects_one_pool_key_and_the_session_keeps_it():
    core = make_core("alpha", "beta")
    forwarder = PoolForwarder(core)
    with taddons.context(forwarder):
        first, second = member_flow(session="s-1"), member_flow(session="s-1")
        for flow in (first, second):
            forwarder.requestheaders(flow)
            forwarder.request(flow)
        assert first.metadata[UPSTREAM_KEY] == second.metadata[UPSTREAM_KEY]
        name = first.metadata[UPSTREAM_KEY]
        assert first.request.headers.get_all("authorization") == [f"Bearer {KEYS[name]}"]
        assert first.metadata[KEY_INJECTED] is True and first.metadata[ATTEMPTS] == 1
        assert in_flight(core)[name] == 2
        forwarder.finished(first)
        forwarder.finished(second)
        assert in_flight(core) == {"alpha": 0, "beta": 0}


def test_no_healthy_key_is_a_503_with_retry_after():
    core = make_core("alpha", "beta")
    core.pool.cool_down(core.pool.keys[0], 120, "test")
    core.pool.disable(core.pool.keys[1], "test")
    forwarder = PoolForwarder(core)
    with taddons.context(forwarder):
        flow = member_flow()
        forwarder.requestheaders(flow)
        forwarder.request(flow)
        assert flow.response is not None and flow.response.status_code == 503
        assert 100 <= int(flow.response.headers["retry-after"]) <= 120  # alpha's cool-down
        assert json.loads(flow.response.content)["error"]["code"] == "no_upstream_key"
        assert flow.metadata[REFUSED] == "no-upstream-key" and KEY_INJECTED not in flow.metadata


def test_every_key_disabled_is_a_refusal_marked_permanent():
    """Nothing comes back before a restart: no Retry-After, and a reason CodexReplies turns
    into a refusal Codex stops on (tests/test_gateway_ws_codex.py runs the real Codex)."""
    from addons.gateway_mode.forward import NO_KEY_UNTIL_RESTART

    core = make_core("alpha", "beta")
    for key in core.pool.keys:
        core.pool.disable(key, "test")
    forwarder = PoolForwarder(core)
    with taddons.context(forwarder):
        flow = member_flow()
        forwarder.requestheaders(flow)
        forwarder.request(flow)
        assert flow.response is not None and flow.response.status_code == 503
        assert "retry-after" not in flow.response.headers
        error = json.loads(flow.response.content)["error"]
        assert error["code"] == "no_upstream_key"
        assert "disabled until the gateway restarts" in error["message"]
        assert flow.metadata[REFUSED] == NO_KEY_UNTIL_RESTART


@pytest.mark.parametrize(
    ("status", "headers", "state", "hold"),
    [
        (200, {}, "healthy", False),
        (429, {"retry-after": "120"}, "cooling", True),
        (401, {}, "disabled", True),
        (500, {}, "healthy", True),
        (400, {}, "healthy", False),
    ],
)
def test_reply_judges_the_key_and_holds_a_retryable_reply(status, headers, state, hold):
    core = make_core("alpha", "beta")
    forwarder = PoolForwarder(core)
    with taddons.context(forwarder):
        flow = member_flow()
        forwarder.requestheaders(flow)
        forwarder.request(flow)
        used = next(k for k in core.pool.keys if k.name == flow.metadata[UPSTREAM_KEY])
        flow.response = tutils.tresp(status_code=status, headers=http.Headers(**headers))
        before = time.time()
        forwarder.responseheaders(flow)
        assert flow.request.headers["authorization"] == REDACTED
        assert used.state == state
        assert forwarder.attempts[flow.id].hold is hold
        if hold:
            assert flow.response.stream is False
        if status == 429:
            assert before + 120 <= used.cooling_until <= time.time() + 120  # its Retry-After


def test_last_key_is_not_held_for_a_retry():
    forwarder = PoolForwarder(make_core("alpha"))
    with taddons.context(forwarder):
        flow = member_flow()
        forwarder.requestheaders(flow)
        forwarder.request(flow)
        flow.response = tutils.tresp(status_code=503)
        forwarder.responseheaders(flow)
        assert forwarder.attempts[flow.id].hold is False


async def test_held_reply_is_retried_on_another_key():
    core = make_core("alpha", "beta")
    forwarder = PoolForwarder(core)
    with ResponsesStandIn() as up, taddons.context(forwarder) as tctx:
        tctx.configure(forwarder, codex_upstream_url=up.url)
        flow = member_flow(session="s-2")
        forwarder.requestheaders(flow)
        forwarder.request(flow)
        first = flow.metadata[UPSTREAM_KEY]
        other = "beta" if first == "alpha" else "alpha"
        flow.response = tutils.tresp(status_code=429, headers=http.Headers(retry_after="60"))
        forwarder.responseheaders(flow)
        try:
            await forwarder.response(flow)
        finally:
            session = forwarder._session
            forwarder.done()
            for _ in range(1000):
                if session is None or session.closed:
                    break
                await asyncio.sleep(0)
        assert flow.response.status_code == 200
        assert b"response.completed" in flow.response.raw_content
        assert flow.metadata[UPSTREAM_KEY] == other and flow.metadata[ATTEMPTS] == 2
        (seen,) = up.requests
        assert seen.header_values("authorization") == [f"Bearer {KEYS[other]}"]
        assert seen.path_qs == "/v1/responses"
        assert core.metrics.retries.labels("429")._value.get() == 1
        assert in_flight(core) == {"alpha": 0, "beta": 0}  # done() gave the keys back


def test_done_scrubs_the_key_from_open_flows():
    core = make_core("alpha")
    forwarder = PoolForwarder(core)
    with taddons.context(forwarder):
        flow = member_flow()
        forwarder.requestheaders(flow)
        forwarder.request(flow)
        forwarder.done()
        assert flow.request.headers["authorization"] == REDACTED
        assert forwarder.attempts == {} and in_flight(core) == {"alpha": 0}
