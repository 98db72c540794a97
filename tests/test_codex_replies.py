"""Codex's language on gateway replies: rate-limit header values (pure) and the addon."""

from __future__ import annotations

import json

import pytest
from mitmproxy.test import taddons, tflow, tutils

from addons.common import REFUSED, error_response
from addons.gateway_mode.codex_replies import CodexReplies
from addons.gateway_mode.core import MEMBER, GatewayCore
from addons.gateway_mode.quota import CODEX_LIMITS
from addons.gateway_mode.windows import (
    FIVE_HOURS_MS,
    MICRO,
    WEEK_MS,
    Limit,
    LimitUsage,
    codex_rate_limit_headers,
    codex_rate_limits_event,
)

T0 = 1_800_000_000_000  # ms


def tokens_5h(limit: int) -> Limit:
    return Limit("five_hour_quota", "tokens", FIVE_HOURS_MS, limit)


def credits_5h(limit_credits: float) -> Limit:
    return Limit("five_hour_credits_micro", "credits", FIVE_HOURS_MS, int(limit_credits * MICRO))


def weekly_tokens(limit: int) -> Limit:
    return Limit("weekly_quota", "tokens", WEEK_MS, limit)


def weekly_credits(limit_credits: float) -> Limit:
    return Limit("weekly_credits_micro", "credits", WEEK_MS, int(limit_credits * MICRO))


def test_no_limit_sends_no_header() -> None:
    assert codex_rate_limit_headers([]) == {}


def test_percent_is_the_highest_of_tokens_and_credits_in_the_window() -> None:
    headers = codex_rate_limit_headers(
        [
            LimitUsage(tokens_5h(1000), 250, T0 + 60_000),
            LimitUsage(credits_5h(2), int(1.5 * MICRO), T0 + 30_000),
        ]
    )
    assert headers == {
        "x-codex-primary-used-percent": "75",  # credits 1.5/2 beat tokens 250/1000
        "x-codex-primary-window-minutes": "300",
        # Under every limit: when the oldest counted usage leaves the window.
        "x-codex-primary-reset-at": str((T0 + 30_000) // 1000),
    }


def test_over_a_limit_resets_when_the_member_is_under_every_limit_again() -> None:
    headers = codex_rate_limit_headers(
        [
            LimitUsage(weekly_tokens(100), 150, T0 + 7_000_500),  # over
            LimitUsage(weekly_credits(1), 1_100_000, T0 + 9_000_250),  # over, later
        ]
    )
    assert headers["x-codex-secondary-used-percent"] == "150"  # may exceed 100
    assert headers["x-codex-secondary-window-minutes"] == "10080"
    assert headers["x-codex-secondary-reset-at"] == str(T0 // 1000 + 9001)  # rounded up
    assert "x-codex-primary-used-percent" not in headers
    # A weekly credit limit: the credits left as Codex's balance.
    assert headers["x-codex-credits-has-credits"] == "false"
    assert headers["x-codex-credits-unlimited"] == "false"
    assert headers["x-codex-credits-balance"] == "0"


def test_both_windows_and_the_weekly_credit_balance() -> None:
    headers = codex_rate_limit_headers(
        [
            LimitUsage(tokens_5h(300), 100, None),  # nothing counted yet: no reset time
            LimitUsage(weekly_credits(12.5), int(2.25 * MICRO), T0),
        ]
    )
    assert headers["x-codex-primary-used-percent"] == "33.33"
    assert "x-codex-primary-reset-at" not in headers
    assert headers["x-codex-secondary-used-percent"] == "18"
    assert headers["x-codex-credits-has-credits"] == "true"
    assert headers["x-codex-credits-balance"] == "10.25"


def test_the_socket_event_carries_the_same_windows_as_the_headers() -> None:
    usages = [
        LimitUsage(tokens_5h(300), 100, None),
        LimitUsage(weekly_tokens(1000), 1500, T0 + 7_000_500),  # over
        LimitUsage(weekly_credits(12.5), int(2.25 * MICRO), T0),
    ]
    event = codex_rate_limits_event(usages)
    # The shape codex-rs parse_rate_limit_event reads (credits need all three fields).
    assert event == {
        "type": "codex.rate_limits",
        "metered_limit_name": "codex",
        "rate_limits": {
            "primary": {"used_percent": 33.33, "window_minutes": 300},
            "secondary": {
                "used_percent": 150.0,
                "window_minutes": 10080,
                "reset_at": T0 // 1000 + 7001,
            },
        },
        "credits": {"has_credits": True, "unlimited": False, "balance": "10.25"},
    }
    headers = codex_rate_limit_headers(usages)
    assert headers["x-codex-secondary-reset-at"] == str(T0 // 1000 + 7001)
    assert headers["x-codex-credits-balance"] == "10.25"


def test_no_limit_sends_no_socket_event() -> None:
    assert codex_rate_limits_event([]) is None


# -- the addon ------------------------------------------------------------------------------

CODEX = {"user-agent": "codex_exec/0.171.0 (test)", "session-id": "s"}
MEMBER_INFO = {"member": "alice", "member_id": 1, "key_id": "k1"}


def refused_flow(status: int, headers: dict[str, str]) -> tflow.HTTPFlow:
    flow = tflow.tflow()
    flow.request.headers.update(headers)
    flow.metadata[REFUSED] = "test"
    flow.response = error_response(status, "codex_gateway", "x", "no")
    return flow


@pytest.mark.parametrize(
    ("status", "headers", "expected"),
    [
        (401, CODEX, 400),  # Codex would retry a 401 five times, then give up anyway
        (403, CODEX, 400),
        (404, CODEX, 400),
        (413, CODEX, 400),  # request_too_large: the same body would be refused again
        (401, {"user-agent": "curl/8"}, 401),  # other clients keep the HTTP status
        (403, {"user-agent": "openai-python/3"}, 403),
        (429, CODEX, 429),  # transient and quota refusals keep theirs
        (503, CODEX, 503),
    ],
)
def test_permanent_refusals_end_a_codex_turn(status, headers, expected) -> None:
    addon = CodexReplies(GatewayCore())
    with taddons.context(addon):
        flow = refused_flow(status, headers)
        addon.requestheaders(flow)
        assert flow.response.status_code == expected
        assert json.loads(flow.response.content)["error"]["code"] == "x"


CODEX_WS = {**CODEX, "openai-beta": "responses_websockets=2026-02-06"}


@pytest.mark.parametrize(
    ("status", "reason", "headers", "websocket", "expected"),
    [
        # Codex's WebSocket client: 426, so it posts the turn and sees the refusal's 400.
        (401, "test", CODEX_WS, True, 426),
        (403, "test", CODEX_WS, True, 426),
        (401, "test", CODEX, True, 400),  # an upgrade that announced no HTTP fallback
        (401, "test", {"user-agent": "curl/8"}, True, 401),
        (429, "test", CODEX_WS, True, 429),  # transient ones keep their status
        (503, "test", CODEX_WS, True, 503),
        # Every upstream key disabled until restart: permanent for the member.
        (503, "no-upstream-key-until-restart", CODEX, False, 400),
        (503, "no-upstream-key-until-restart", CODEX_WS, True, 426),
        (503, "no-upstream-key-until-restart", {"user-agent": "curl/8"}, False, 503),
        # An identity token refused: 401 everywhere, so Codex renews its token and retries
        # (docs/gateway.md, "Members without static keys").
        (401, "identity-auth", CODEX, False, 401),
        (401, "identity-auth", CODEX_WS, True, 401),
        (503, "identity-auth", CODEX, False, 503),
    ],
)
def test_permanent_refusals_of_an_upgrade_and_of_a_disabled_pool(
    status, reason, headers, websocket, expected
) -> None:
    from addons.common import WEBSOCKET

    addon = CodexReplies(GatewayCore())
    with taddons.context(addon):
        for hook in ("requestheaders", "response"):  # the forwarder refuses in both
            flow = refused_flow(status, headers)
            flow.metadata[REFUSED] = reason
            if websocket:
                flow.metadata[WEBSOCKET] = True
            getattr(addon, hook)(flow)
            assert flow.response.status_code == expected, hook


def test_upstream_codex_headers_never_reach_a_member_and_the_windows_do() -> None:
    addon = CodexReplies(GatewayCore())
    with taddons.context(addon):
        flow = tflow.tflow(
            resp=tutils.tresp(
                headers=[
                    (b"content-type", b"text/event-stream"),
                    (b"x-codex-primary-used-percent", b"99"),  # the operator's account
                    (b"X-Codex-Credits-Balance", b"1234"),
                ]
            )
        )
        flow.metadata[MEMBER] = MEMBER_INFO
        flow.metadata[CODEX_LIMITS] = {"x-codex-primary-used-percent": "12"}
        addon.responseheaders(flow)
        assert flow.response.headers.get_all("x-codex-primary-used-percent") == ["12"]
        assert "x-codex-credits-balance" not in flow.response.headers
        assert flow.response.headers["content-type"] == "text/event-stream"
        # A member without limits: upstream's headers removed, none added.
        bare = tflow.tflow(resp=tutils.tresp(headers=[(b"x-codex-secondary-reset-at", b"1")]))
        bare.metadata[MEMBER] = MEMBER_INFO
        addon.response(bare)
        assert not [k for k in bare.response.headers if k.lower().startswith("x-codex-")]
