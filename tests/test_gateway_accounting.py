"""``UsageAccounting`` (``addons/gateway_mode/accounting.py``) with taddons/tflow: the ledger row
of each forwarded member flow (tokens, credits with the shipped rate card, errors, timing), the
metrics, and the flow's upstream key given back, whichever hook ends the exchange."""

from __future__ import annotations

import json
import logging
from typing import Any

import pytest
from mitmproxy import http
from mitmproxy.test import taddons, tflow, tutils

from addons.common import KEY_INJECTED
from addons.gateway_mode.accounting import UsageAccounting, reply_usage
from addons.gateway_mode.config import DEFAULT_GATEWAY_CONFIG, load_gateway_config
from addons.gateway_mode.core import ATTEMPTS, MEMBER, ROUTE, GatewayCore
from addons.gateway_mode.forward import PoolForwarder
from addons.gateway_mode.keypool import KeyPool, UpstreamKey
from addons.standin import encode_event, response_object, responses_sse_events, usage_block

MEMBER_INFO = {"member": "ana", "member_id": 7, "key_id": "key-7"}


class RecordingLedger:
    """The ledger's producer side (``add``, ``healthy``), keeping the rows for the test: the
    finished rows in ``rows``, the in-flight rows queued when a request is forwarded in
    ``in_flight`` (``duration_ms`` is None until the request ends)."""

    def __init__(self) -> None:
        self.rows: list[dict[str, Any]] = []
        self.in_flight: list[dict[str, Any]] = []
        self.healthy = True

    def add(self, row: dict[str, Any]) -> None:
        (self.rows if row["duration_ms"] is not None else self.in_flight).append(row)


@pytest.fixture
def setup():
    core = GatewayCore()
    core.pool = KeyPool()
    core.pool.set_keys([UpstreamKey("alpha", bytearray(b"sk-upstream-alpha-0123"))])
    core.card = load_gateway_config(DEFAULT_GATEWAY_CONFIG).rate_card()
    ledger = RecordingLedger()
    core.ledger = ledger  # type: ignore[assignment]
    forwarder = PoolForwarder(core)
    accounting = UsageAccounting(core, forwarder)
    with taddons.context(forwarder, accounting):
        yield core, forwarder, accounting, ledger
    core.executor.shutdown()


def forwarded_flow(forwarder: PoolForwarder, model: str = "gpt-5.5", tier: str | None = None):
    """A member flow as the earlier addons leave it: routed, keyed, its request hook run."""
    flow = tflow.tflow()
    flow.request.method = "POST"
    flow.request.path = "/v1/responses"
    body: dict[str, Any] = {"model": model, "stream": True}
    if tier:
        body["service_tier"] = tier
    flow.request.content = json.dumps(body).encode()
    flow.metadata[MEMBER] = dict(MEMBER_INFO)
    flow.metadata["codex_proxy.allowed"] = True
    forwarder.requestheaders(flow)
    forwarder.request(flow)
    assert flow.metadata[KEY_INJECTED] is True
    return flow


def sse_reply(model: str = "gpt-5.5", status: int = 200) -> http.Response:
    body = b"".join(encode_event(k, p) for k, p in responses_sse_events("hi there", model=model))
    response = tutils.tresp(status_code=status, content=b"")
    response.headers["content-type"] = "text/event-stream"
    response.raw_content = body
    return response


def sample(core: GatewayCore, name: str, **labels: str) -> float | None:
    return core.metrics.registry.get_sample_value(name, labels)


def test_a_completed_stream_is_one_priced_row(setup):
    core, forwarder, accounting, ledger = setup
    flow = forwarded_flow(forwarder, tier="priority")
    accounting.request(flow)
    assert sample(core, "codex_gateway_in_flight") == 1
    flow.response = sse_reply()
    accounting.response(flow)
    (row,) = ledger.rows
    # The in-flight row queued when it was forwarded: same id, so the finished row replaces it.
    (started,) = ledger.in_flight
    assert started["row_id"] == row["row_id"] and started["status"] is None
    assert started["error"] == "in flight" and started["total_tokens"] == 0
    usage = usage_block()
    assert (row["member_id"], row["key_id"], row["upstream_key"]) == (7, "key-7", "alpha")
    assert (row["model"], row["service_tier"], row["status"]) == ("gpt-5.5", "priority", 200)
    assert row["route"] == "/v1/responses" and row["attempts"] == 1 and row["error"] is None
    assert row["input_tokens"] == usage["input_tokens"] == 42
    assert row["cached_tokens"] == usage["input_tokens_details"]["cached_tokens"]
    assert row["cache_write_tokens"] == usage["input_tokens_details"]["cache_write_tokens"]
    assert row["output_tokens"] == 17 and row["reasoning_tokens"] == 5
    assert row["total_tokens"] == 59
    assert row["events"] == len(responses_sse_events("hi there"))
    charge = core.card.charge("gpt-5.5", reply_usage(flow.response).usage, "priority")
    assert charge is not None and charge.credits > 0
    assert row["credits_micro"] == int(charge.credits * 1_000_000) and row["rate"] == charge.rate
    fast = core.card.charge("gpt-5.5", reply_usage(flow.response).usage, None)
    assert fast is not None and charge.credits == 2 * fast.credits  # fast_mode_multiplier: 2
    assert sample(core, "codex_gateway_in_flight") == 0
    assert sample(core, "codex_gateway_tokens_total", member="ana", kind="output") == 17
    assert sample(core, "codex_gateway_requests_total", route="/v1/responses", status="200") == 1
    assert {k.name: k.in_flight for k in core.pool.keys} == {"alpha": 0}  # key given back


def test_a_json_reply_and_a_retried_route(setup):
    _core, forwarder, accounting, ledger = setup
    flow = forwarded_flow(forwarder)
    flow.metadata[ROUTE] = "/v1/responses/compact"
    flow.metadata[ATTEMPTS] = 2
    accounting.request(flow)
    flow.response = tutils.tresp(
        content=json.dumps(response_object("resp_1", "gpt-5.5", "ok")).encode()
    )
    flow.response.headers["content-type"] = "application/json"
    accounting.response(flow)
    (row,) = ledger.rows
    assert row["route"] == "/v1/responses/compact" and row["attempts"] == 2
    assert row["total_tokens"] == 59 and row["events"] == 0


def test_an_error_after_completed_keeps_the_usage(setup):
    _core, forwarder, accounting, ledger = setup
    flow = forwarded_flow(forwarder)
    accounting.request(flow)
    flow.response = sse_reply()
    flow.error = tflow.terr("client disconnected")
    accounting.error(flow)
    accounting.response(flow)  # the row is written once, by whichever hook ends the flow
    (row,) = ledger.rows
    assert row["error"] == "after response.completed: client disconnected"
    assert row["total_tokens"] == 59


def test_an_unpriced_model_is_counted(setup):
    core, forwarder, accounting, ledger = setup
    flow = forwarded_flow(forwarder, model="no-such-model")
    accounting.request(flow)
    flow.response = sse_reply(model="no-such-model")
    accounting.response(flow)
    (row,) = ledger.rows
    assert row["credits_micro"] is None and row["total_tokens"] == 59
    assert sample(core, "codex_gateway_unpriced_requests_total", model="no-such-model") == 1


def test_a_refused_flow_writes_no_row_but_is_counted(setup):
    core, _forwarder, accounting, ledger = setup
    flow = tflow.tflow(resp=tutils.tresp(status_code=403))
    accounting.request(flow)
    accounting.response(flow)
    assert ledger.rows == []
    assert sample(core, "codex_gateway_requests_total", route="other", status="403") == 1


def test_open_flows_get_their_row_at_shutdown(setup):
    _core, forwarder, accounting, ledger = setup
    flow = forwarded_flow(forwarder)
    accounting.request(flow)
    accounting.done()
    (row,) = ledger.rows
    assert row["status"] is None and row["total_tokens"] == 0
    assert row["error"] == "gateway stopped before the exchange ended"


def test_a_closed_database_loses_the_row_loudly(setup, caplog):
    core, forwarder, accounting, ledger = setup
    core.ledger = None
    flow = forwarded_flow(forwarder)
    accounting.request(flow)
    flow.response = sse_reply()
    with caplog.at_level(logging.ERROR):
        accounting.response(flow)
    assert ledger.rows == []
    assert "usage row lost" in caplog.text
    assert {k.name: k.in_flight for k in core.pool.keys} == {"alpha": 0}
