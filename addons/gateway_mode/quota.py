"""Quotas per member: rolling 5-hour and weekly windows in tokens and in Codex credits, and a
maximum of concurrent requests; refused with 429 before anything goes upstream."""

from __future__ import annotations

import logging
import time
from decimal import Decimal
from typing import Any

from mitmproxy import http
from sqlalchemy.exc import SQLAlchemyError

from addons.common import fail_closed
from addons.gateway_mode.core import MEMBER, GatewayCore, gateway_error, refuse, request_info
from addons.gateway_mode.windows import (
    MICRO,
    Limit,
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


class QuotaGate:
    """Admits a member request or answers it locally, in ``request`` (the body is complete,
    nothing has gone upstream).

    In order: the usage ledger cannot write (database away) → 503 (fail closed); the member
    has a credit quota and the rate card cannot price the model → 403 naming the model and the
    setting (never silently free); all of the member's ``max_concurrent`` slots are taken
    (counted across instances by leases in the database) → 429; usage inside a window has
    reached a limit → 429 with ``Retry-After`` (seconds until enough usage leaves the window)
    and ``error.limit`` / ``used`` / ``resets_at``. The member's settings are read from the
    directory (refreshed every second), usage from the database plus this instance's rows
    not yet written. Members without limits cost no database round trip.
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
        if entry is None:  # revoked since requestheaders
            refuse(
                flow,
                "member-auth",
                gateway_error(401, "invalid_member_key", "unknown or revoked member key"),
            )
            return
        limits = limits_of(entry)
        info = request_info(flow)
        if (
            any(limit.kind == "credits" for limit in limits)
            and core.card.charge(
                info["model"], {"input": 0, "cached": 0, "output": 0, "total": 0}, None
            )
            is None
        ):
            core.metrics.refused.labels("unpriced_model").inc()
            core.metrics.unpriced.labels(str(info["model"] or "")[:64]).inc()
            refuse(
                flow,
                "unpriced-model",
                gateway_error(
                    403,
                    "unpriced_model",
                    f"model {info['model']!r} has no entry in the gateway's rate card, and "
                    f"member {member['member']!r} has a credit quota: add the model (or a "
                    "'default' entry) under credits.rates in the gateway config",
                    model=info["model"],
                ),
            )
            return
        try:
            if entry["max_concurrent"]:
                lease, active = await core.run_db(
                    core.db.acquire_lease,
                    member["member_id"],
                    entry["max_concurrent"],
                    core.instance,
                    core.lease_ms,
                )
                if lease is None:
                    core.metrics.refused.labels("concurrency").inc()
                    refuse(
                        flow,
                        "concurrency",
                        gateway_error(
                            429,
                            "concurrency_limit",
                            f"member {member['member']!r} already has {active} requests in "
                            f"flight (max_concurrent {entry['max_concurrent']})",
                            {"retry-after": str(CONCURRENCY_RETRY_S)},
                            limit="max_concurrent",
                            used=active,
                            allowed=entry["max_concurrent"],
                        ),
                    )
                    return
                core.leases[flow.id] = lease
            if limits:
                over = await core.run_db(self._over_limit, member["member_id"], limits)
                if over is not None:
                    self._release(flow)
                    limit, used, reset_ms = over
                    core.metrics.refused.labels("quota").inc()
                    retry = retry_after_seconds(reset_ms)
                    resets_at = iso(int(time.time() * 1000) + reset_ms)
                    refuse(
                        flow,
                        "quota",
                        gateway_error(
                            429,
                            "quota_exceeded",
                            f"member {member['member']!r} used {amount_text(limit.kind, used)} "
                            f"of its {limit.label} of {amount_text(limit.kind, limit.limit)}; "
                            f"enough leaves the window at {resets_at} (in {retry} s)",
                            {"retry-after": str(retry)},
                            limit=limit.column.replace("_micro", ""),
                            kind=limit.kind,
                            used=_shown(limit.kind, used),
                            allowed=_shown(limit.kind, limit.limit),
                            resets_at=resets_at,
                        ),
                    )
        except SQLAlchemyError as e:
            logger.error("quota check failed: database error (%s)", type(e).__name__)
            self._release(flow)
            if core.ledger is not None:
                core.ledger.healthy = False
            self._unavailable(flow)

    def _over_limit(self, member_id: int, limits: list[Limit]) -> tuple[Limit, int, int] | None:
        """On a worker thread: the first limit reached, with usage and ms until it resets."""
        core = self.core
        assert core.db is not None and core.ledger is not None
        now = int(time.time() * 1000)
        windows = core.db.window_usage(member_id, now)
        for limit in limits:
            window = windows["five_hour" if limit.window_ms < 6 * 3_600_000 else "weekly"]
            since = now - limit.window_ms
            # This instance's rows not written yet count at once (and in the reset time).
            pending = core.ledger.pending_rows(member_id, since, limit.kind)
            used = window[limit.kind] + sum(amount for _, amount in pending)
            if used >= limit.limit:
                rows = core.db.window_rows(member_id, since, limit.kind) + pending
                return limit, used, reset_in_ms(rows, limit.limit, limit.window_ms, now)
        return None

    def _release(self, flow: http.HTTPFlow) -> None:
        lease = self.core.leases.pop(flow.id, None)
        if lease and self.core.db is not None:
            self.core.executor.submit(self.core.db.release_leases, [lease])

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


def _shown(kind: str, amount: int) -> Any:
    if kind == "credits":
        return float(Decimal(amount) / MICRO)
    return amount
