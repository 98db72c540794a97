"""Quotas per member: rolling 5-hour and weekly windows in tokens and in Codex credits, and a
maximum of concurrent requests; refused with 429 before anything goes upstream. The windows
are also read for Codex's rate-limit headers on every reply (``codex_replies``)."""

from __future__ import annotations

import logging
import math
import time
from decimal import Decimal
from typing import Any

from mitmproxy import http
from sqlalchemy.exc import SQLAlchemyError

from addons.codex_models import catalog
from addons.common import WEBSOCKET, error_response, fail_closed
from addons.credits import RateCard
from addons.gateway_mode.core import MEMBER, GatewayCore, gateway_error, refuse, request_info
from addons.gateway_mode.genai import LEASED, mark_phase
from addons.gateway_mode.teams import TeamSlots, busy_text
from addons.gateway_mode.windows import (
    MICRO,
    Limit,
    LimitUsage,
    codex_rate_limit_headers,
    iso,
    limits_of,
    reset_in_ms,
    retry_after_seconds,
)

logger = logging.getLogger(__name__)

#: ``Retry-After`` (s) when the database cannot be asked, or every slot is taken.
UNAVAILABLE_RETRY_S = 5
CONCURRENCY_RETRY_S = 1


def amount_text(kind: str, amount: int) -> str:
    """``1200 tokens`` or ``3.5 credits`` (``amount`` in tokens or micro-credits)."""
    if kind == "credits":
        return f"{(Decimal(amount) / MICRO).normalize():f} credits"
    return f"{amount} tokens"


#: The member's windows in Codex's rate-limit headers (``{name: value}``), read by the quota
#: check and sent on the reply by :class:`addons.gateway_mode.codex_replies.CodexReplies`.
CODEX_LIMITS = "codex_gateway.codex_limits"


def limit_usages(core: GatewayCore, member_id: int, limits: list[Limit]) -> list[LimitUsage]:
    """On a worker thread: the member's usage against each limit, read now (database rows
    plus this instance's rows not written yet), with its reset time (see :class:`LimitUsage`).

    Raises:
        SQLAlchemyError: the database could not be read.
    """
    assert core.db is not None and core.ledger is not None
    now = int(time.time() * 1000)
    windows = core.db.window_usage(member_id, now)
    team_windows: dict[int, dict[str, dict[str, Any]]] = {}
    usages = []
    for limit in limits:
        # A team's limit counts the team's usage (its rows' team_id), a member's its own.
        owner, owner_id, of = "member_id", member_id, windows
        if limit.team_id is not None:
            owner, owner_id = "team_id", limit.team_id
            if owner_id not in team_windows:
                team_windows[owner_id] = core.db.window_usage(owner_id, now, owner)
            of = team_windows[owner_id]
        window = of["five_hour" if limit.window_ms < 6 * 3_600_000 else "weekly"]
        since = now - limit.window_ms
        # This instance's rows not written yet count at once (and in the reset time).
        pending = core.ledger.pending_rows(owner_id, since, limit.kind, owner)
        used = window[limit.kind] + sum(amount for _, amount in pending)
        resets_at: int | None
        if used >= limit.limit:
            rows = core.db.window_rows(owner_id, since, limit.kind, owner) + pending
            resets_at = now + reset_in_ms(rows, limit.limit, limit.window_ms, now)
        else:
            times = [ts for ts, _ in pending]
            if window["oldest"] is not None:
                times.append(window["oldest"])
            resets_at = min(times) + limit.window_ms if times else None
        usages.append(LimitUsage(limit, used, resets_at))
    return usages


def quota_readings(core: GatewayCore) -> list[tuple[str, LimitUsage]]:
    """On a worker thread: ``(member name, usage)`` for every limit of every member that has
    one (:func:`limit_usages`), for ``/metrics``' quota gauges
    (:class:`addons.gateway_mode.quota_metrics.QuotaGauges`).

    Raises:
        SQLAlchemyError: the database could not be read.
    """
    assert core.db is not None
    readings: list[tuple[str, LimitUsage]] = []
    for member in core.db.members():
        limits = limits_of(member)
        if limits:
            usages = limit_usages(core, int(member["id"]), limits)
            readings.extend((str(member["name"]), usage) for usage in usages)
    return readings


def codex_limits(core: GatewayCore, member_id: int, limits: list[Limit]) -> dict[str, str]:
    """On a worker thread: :func:`codex_rate_limit_headers` of the member's usage now."""
    return codex_rate_limit_headers(limit_usages(core, member_id, limits))


class QuotaGate:
    """Admits a member request or answers it locally, in ``request`` (the body is complete,
    nothing has gone upstream), and reads the member's windows for Codex's rate-limit headers
    (:data:`CODEX_LIMITS`).

    In order: the usage ledger cannot write (database away) → 503 (fail closed); the member
    has a credit quota and the rate card cannot price the model → 403 naming the model and the
    setting (never silently free); usage inside a window has reached a limit → 429 in Codex's
    own shape (``type: usage_limit_reached``, ``resets_at`` in Unix seconds: Codex 0.171 ends
    the turn at once with "You've hit your usage limit. Try again at …", where any other 429
    makes it wait out ``Retry-After``), with our ``code`` / ``limit`` / ``kind`` / ``used`` /
    ``allowed`` beside them; all of the member's ``max_concurrent`` slots are taken (counted
    across instances by leases in the database) → 429 ``concurrency_limit`` with a 1 s
    ``Retry-After`` (Codex retries it). The member's settings are read from the directory
    (refreshed every second), usage from the database plus this instance's rows not yet
    written. Members without limits cost no database round trip.
    """

    def __init__(self, core: GatewayCore) -> None:
        self.core = core

    @fail_closed
    async def request(self, flow: http.HTTPFlow) -> None:
        if flow.response or flow.error or not flow.live or MEMBER not in flow.metadata:
            return
        core = self.core
        if not core.database_ok or core.db is None:
            self._unavailable(flow)
            return
        member = flow.metadata[MEMBER]
        entry = core.directory.by_key_id(member["key_id"])
        if entry is None:  # revoked or expired since requestheaders
            refuse(
                flow,
                "member-auth",
                gateway_error(401, *core.directory.refusal(member["key_id"])),
            )
            return
        limits = limits_of(entry)
        slots = entry["max_concurrent"]
        team = TeamSlots.of(entry)
        team_active: int | None = None
        try:
            if WEBSOCKET in flow.metadata:
                if limits:  # the socket's addon checks each response.create, with its slots
                    usages = await core.run_db(limit_usages, core, member["member_id"], limits)
                    flow.metadata[CODEX_LIMITS] = codex_rate_limit_headers(usages)
                return
            # The slot first, then the usage: every request that gave its slot back before
            # this one took it has its row in the database by now (UsageAccounting releases
            # a slot only then), so the usage read below counts it (docs/gateway.md).
            # One lease: a slot of the member and, in a team, one of its team's.
            lease, active, team_active = await core.acquire_slots(member["member_id"], slots, team)
            if lease is not None:
                core.leases[flow.id] = lease
                mark_phase(flow, LEASED)  # OpenTelemetry: the concurrency-slot child span
            usages = []
            if limits:
                usages = await core.run_db(limit_usages, core, member["member_id"], limits)
                flow.metadata[CODEX_LIMITS] = codex_rate_limit_headers(usages)
            if self._unpriced(flow, limits) or self._over_quota(flow, usages):
                await core.give_back_lease(flow.id)  # nothing was spent: at once
                return
            if team is not None and lease is None and team_active is not None:
                self._team_busy(flow, team, team_active)
            elif (slots or team is not None) and lease is None:
                self._no_slot(flow, entry, active)
        except SQLAlchemyError as e:
            logger.error("quota check failed: database error (%s)", type(e).__name__)
            self._release(flow)
            if core.ledger is not None:
                core.ledger.healthy = False
            self._unavailable(flow)

    def _unpriced(self, flow: http.HTTPFlow, limits: list[Limit]) -> bool:
        """403 when the member has a credit quota and the rate card cannot price the model."""
        info = request_info(flow)
        if not any(limit.kind == "credits" for limit in limits) or (
            self.core.card.charge(
                info["model"], {"input": 0, "cached": 0, "output": 0, "total": 0}, None
            )
            is not None
        ):
            return False
        self.core.metrics.refused.labels("unpriced_model").inc()
        self.core.metrics.unpriced.labels(str(info["model"] or "")[:64]).inc()
        refuse(
            flow,
            "unpriced-model",
            gateway_error(
                403,
                "unpriced_model",
                unpriced_message(info["model"], flow.metadata[MEMBER]["member"], self.core.card),
                model=info["model"],
            ),
        )
        return True

    def _over_quota(self, flow: http.HTTPFlow, usages: list[LimitUsage]) -> bool:
        """429 ``usage_limit_reached`` when a limit is reached (:func:`usage_limit_error`)."""
        refusal = usage_limit_error(flow.metadata[MEMBER]["member"], usages)
        if refusal is None:
            return False
        retry, message, fields = refusal
        self.core.metrics.refused.labels("quota").inc()
        refuse(
            flow,
            "quota",
            error_response(
                429,
                "usage_limit_reached",
                "quota_exceeded",
                message,
                {"retry-after": str(retry)},
                fields,
            ),
        )
        return True

    def _no_slot(self, flow: http.HTTPFlow, entry: dict[str, Any], active: int) -> None:
        """429 ``concurrency_limit`` (Retry-After 1 s): every slot of the member is taken."""
        member = flow.metadata[MEMBER]
        max_concurrent = entry["max_concurrent"]
        source = (
            "quota_max_concurrent, the gateway's default for a member with a quota"
            if entry.get("max_concurrent_default")
            else "max_concurrent"
        )
        self.core.metrics.refused.labels("concurrency").inc()
        refuse(
            flow,
            "concurrency",
            gateway_error(
                429,
                "concurrency_limit",
                f"member {member['member']!r} already has {active} requests in "
                f"flight ({source} {max_concurrent})",
                {"retry-after": str(CONCURRENCY_RETRY_S)},
                limit="max_concurrent",
                used=active,
                allowed=max_concurrent,
            ),
        )

    def _team_busy(self, flow: http.HTTPFlow, team: TeamSlots, active: int) -> None:
        """429 ``concurrency_limit`` (Retry-After 1 s): every slot of the member's team is
        taken (by its members, on any instance)."""
        self.core.metrics.refused.labels("concurrency").inc()
        refuse(
            flow,
            "concurrency",
            gateway_error(
                429,
                "concurrency_limit",
                busy_text(flow.metadata[MEMBER]["member"], team, active),
                {"retry-after": str(CONCURRENCY_RETRY_S)},
                limit="max_concurrent",
                used=active,
                allowed=team.slots,
                team=team.name,
            ),
        )

    def _release(self, flow: http.HTTPFlow) -> None:
        self.core.release_lease(flow.id, after_rows=False)  # no row: nothing went upstream

    def _unavailable(self, flow: http.HTTPFlow) -> None:
        self.core.metrics.refused.labels("database_unavailable").inc()
        refuse(
            flow,
            "database-unavailable",
            gateway_error(
                503,
                "usage_ledger_unavailable",
                "the gateway cannot reach its database to check quotas and record usage; "
                "try again shortly",
                {"retry-after": str(UNAVAILABLE_RETRY_S)},
            ),
        )


def unpriced_message(model: str | None, member: str, card: RateCard) -> str:
    """The refusal message of a model the rate card cannot price, for a member with a credit
    quota (HTTP 403 / 400 to Codex, and the socket's ``error`` event): what the member asks
    the gateway's operator for (the YAML key to set, or no credit quota), and a model of
    Codex's catalog that is priced, to use meanwhile."""
    key = f"credits.{card.table_key}.{model or 'default'}"
    priced = [slug for slug in catalog().slugs() if card.prices(slug)]
    meanwhile = f"; meanwhile a priced model works, e.g. -c model={priced[0]}" if priced else ""
    return (
        f"model {model!r} has no entry in the gateway's rate card, and member {member!r} has a "
        f"credit quota: ask the gateway's operator to price it ({key} in the gateway config: "
        "its own rates, {same_as: <priced model>}, or a 'default' entry) or to lift your "
        f"credit quota{meanwhile}"
    )


def usage_limit_error(
    member: str, usages: list[LimitUsage], now_ms: int | None = None
) -> tuple[int, str, dict[str, Any]] | None:
    """``(Retry-After seconds, message, error fields)`` when a limit in ``usages`` is reached,
    else ``None``. It names the limit the member waits longest for, the member's or its
    team's (a team's names the team, and ``team`` is among the fields); ``resets_at`` (Unix
    seconds) is when every limit is under again. The fields go beside ``type:
    usage_limit_reached`` / ``code: quota_exceeded`` in the error object, on HTTP (429 body)
    and on the WebSocket (``error`` event), the shape Codex 0.171 ends a turn on."""
    over = [u for u in usages if u.over]
    if not over:
        return None
    now = int(time.time() * 1000) if now_ms is None else now_ms
    binding = max(over, key=lambda u: u.resets_at_ms or 0)
    limit, used = binding.limit, binding.used
    resets_at_ms = binding.resets_at_ms or now + limit.window_ms
    retry = retry_after_seconds(resets_at_ms - now)
    who = (
        f"member {member!r}" if limit.team is None else f"team {limit.team!r} of member {member!r}"
    )
    message = (
        f"{who} used {amount_text(limit.kind, used)} of its {limit.label} of "
        f"{amount_text(limit.kind, limit.limit)}; enough leaves the window at "
        f"{iso(resets_at_ms)} (in {retry} s), or ask the gateway's operator to raise it"
    )
    fields = {
        "resets_at": math.ceil(resets_at_ms / 1000),
        "limit": limit.column.replace("_micro", ""),
        "kind": limit.kind,
        "used": _shown(limit.kind, used),
        "allowed": _shown(limit.kind, limit.limit),
    }
    if limit.team is not None:
        fields["team"] = limit.team
    return retry, message, fields


def _shown(kind: str, amount: int) -> Any:
    if kind == "credits":
        return float(Decimal(amount) / MICRO)
    return amount
