"""Quota windows: rolling 5-hour and 7-day sums and when enough usage leaves them (pure).

A limit admits a request while the member's usage inside the window is below the limit
(``used < limit``). Requests in flight are not counted until they end, so a window can be
overshot by what the member's concurrent requests use: at most its slots' worth, since a
member with a quota always has slots (``max_concurrent``, else the gateway's
``quota_max_concurrent``) and a slot is freed only once its request's usage is written
(docs/gateway.md, "Quotas in tokens and in Codex credits").
"""

from __future__ import annotations

import datetime as dt
import math
import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any

HOUR_MS = 3_600_000
FIVE_HOURS_MS = 5 * HOUR_MS
WEEK_MS = 7 * 24 * HOUR_MS
MICRO = 1_000_000

_SINCE = re.compile(r"(\d+)\s*([smhdw])")
_UNIT_MS = {"s": 1000, "m": 60_000, "h": HOUR_MS, "d": 24 * HOUR_MS, "w": 7 * 24 * HOUR_MS}


@dataclass(frozen=True)
class Limit:
    """One of a member's limits: ``column`` of the member row (``five_hour_quota``...),
    ``kind`` (``tokens`` or ``credits``), ``window_ms``, and ``limit`` in tokens or
    micro-credits (0 = unlimited, never built)."""

    column: str
    kind: str
    window_ms: int
    limit: int
    #: A team's limit (``team``: its name, ``team_id``): counted over the team's usage
    #: (:mod:`addons.gateway_mode.teams`); ``None`` for the member's own.
    team: str | None = None
    team_id: int | None = None

    @property
    def label(self) -> str:
        window = "5-hour" if self.window_ms == FIVE_HOURS_MS else "weekly"
        return f"{window} {'credit' if self.kind == 'credits' else 'token'} quota"


LIMIT_COLUMNS = (
    ("five_hour_quota", "tokens", FIVE_HOURS_MS),
    ("weekly_quota", "tokens", WEEK_MS),
    ("five_hour_credits_micro", "credits", FIVE_HOURS_MS),
    ("weekly_credits_micro", "credits", WEEK_MS),
)


#: Key of a member directory entry holding its team's limits (a list of :class:`Limit`),
#: set by :func:`addons.gateway_mode.teams.attach_teams`.
TEAM_LIMITS = "team_limits"


def limits_of(member: dict[str, Any]) -> list[Limit]:
    """The non-zero limits of a member row (a mapping with the ``LIMIT_COLUMNS`` keys), then
    its team's (a directory entry's :data:`TEAM_LIMITS`, when it has any)."""
    return [
        Limit(column, kind, window, int(member[column]))
        for column, kind, window in LIMIT_COLUMNS
        if member.get(column)
    ] + list(member.get(TEAM_LIMITS) or ())


def overshoot_note(settings: Mapping[str, int | None], default_slots: int) -> str | None:
    """What ``add-member`` says of a member with a quota (``settings``: member columns,
    ``None`` or 0 for unset; ``default_slots``: the config's ``quota_max_concurrent``): how
    far its quotas can be overshot. ``None`` without a quota."""
    if not any(settings.get(column) for column, _, _ in LIMIT_COLUMNS):
        return None
    slots = settings.get("max_concurrent") or default_slots
    if not slots:
        return (
            "note: this member has a quota but no concurrency limit (max_concurrent 0 and "
            "quota_max_concurrent 0): requests in flight are counted only when they end, so "
            "its quota can be overshot without bound (docs/gateway.md)"
        )
    source = (
        "--max-concurrent" if settings.get("max_concurrent") else "quota_max_concurrent default"
    )
    return (
        f"note: a quota holds to its limit plus what {slots} requests in flight use ({source}): "
        "a request is admitted while usage is under the limit and counted when it ends "
        "(docs/gateway.md)"
    )


def reset_in_ms(rows: Iterable[tuple[int, int]], limit: int, window_ms: int, now_ms: int) -> int:
    """Milliseconds until usage in the window drops below ``limit``.

    ``rows`` are ``(ts_ms, amount)`` inside the window, in any order. Oldest rows leave first,
    each at ``ts_ms + window_ms``. Returns at least 1000 (a Retry-After of 1 s); when even an
    empty window would not suffice (cannot happen for ``limit > 0``), the whole window.
    """
    ordered = sorted(rows)
    remaining = sum(amount for _, amount in ordered)
    for ts, amount in ordered:
        if remaining < limit:
            break
        remaining -= amount
        if remaining < limit:
            return max(1000, ts + window_ms - now_ms)
    if remaining < limit:
        return 1000
    return window_ms


def retry_after_seconds(ms: int) -> int:
    """A ``Retry-After`` value: whole seconds, rounded up, at least 1."""
    return max(1, math.ceil(ms / 1000))


def parse_since(value: str, now_ms: int) -> int:
    """``--since``: ``5h``, ``7d``, ``30m``, ``2w``, ``90s`` before ``now_ms``, or an ISO-8601
    time (naive means UTC). Returns epoch milliseconds.

    Raises:
        ValueError: for anything else.
    """
    text = value.strip()
    match = _SINCE.fullmatch(text)
    if match:
        digits = match.group(1)
        # More than 15 digits of any unit reaches past 1970 (checked below) anyway.
        since = -1 if len(digits) > 15 else now_ms - int(digits) * _UNIT_MS[match.group(2)]
    else:
        try:
            when = dt.datetime.fromisoformat(text.replace("Z", "+00:00"))
        except ValueError:
            raise ValueError(
                f"--since: expected e.g. 5h, 7d or an ISO-8601 time, got {value[:60]!r}"
            ) from None
        if when.tzinfo is None:
            when = when.replace(tzinfo=dt.UTC)
        since = int(when.timestamp() * 1000)
    if since < 0:
        raise ValueError("--since: reaches before 1970-01-01")
    return since


def iso(ms: int | None) -> str | None:
    """Epoch milliseconds as ISO-8601 UTC (seconds precision), ``None`` passes through."""
    if ms is None:
        return None
    return (
        dt.datetime.fromtimestamp(ms / 1000, dt.UTC).replace(microsecond=0).isoformat()
    ).replace("+00:00", "Z")


@dataclass(frozen=True)
class LimitUsage:
    """A member's usage against one :class:`Limit`, read for one request.

    ``used`` is in the limit's unit (tokens or micro-credits), this instance's unwritten rows
    included. ``resets_at_ms`` (epoch ms) is when the member is back under the limit when it
    is reached (:func:`reset_in_ms`), or else when the oldest usage counted in the window
    leaves it; ``None`` when nothing is counted.
    """

    limit: Limit
    used: int
    resets_at_ms: int | None

    @property
    def over(self) -> bool:
        return self.used >= self.limit.limit

    @property
    def percent(self) -> float:
        return self.used * 100 / self.limit.limit


#: Codex's names of our two windows (the ``x-codex-primary-*`` / ``-secondary-*`` headers
#: that OpenAI's backend sends and Codex records as its session's ``rate_limits``).
CODEX_WINDOWS = (("primary", FIVE_HOURS_MS), ("secondary", WEEK_MS))


def _decimal_text(value: float) -> str:
    return f"{value:.2f}".rstrip("0").rstrip(".")


@dataclass(frozen=True)
class CodexWindow:
    """One of Codex's rate-limit windows as the gateway reports it: ``name`` (``primary`` =
    5-hour, ``secondary`` = weekly), ``used_percent`` (the highest of the window's token and
    credit usage over its limit, times 100; may exceed 100), ``window_minutes`` (300 / 10080)
    and ``reset_at`` (Unix seconds, rounded up, or ``None``)."""

    name: str
    used_percent: float
    window_minutes: int
    reset_at: int | None


@dataclass(frozen=True)
class CodexCredits:
    """The weekly credits left, in micro-credits (never below 0)."""

    left_micro: int

    @property
    def balance(self) -> str:
        return _decimal_text(self.left_micro / MICRO)


def codex_snapshot(
    usages: Iterable[LimitUsage],
) -> tuple[list[CodexWindow], CodexCredits | None]:
    """The member's windows as Codex reads them, from :func:`limit_usages` rows.

    A window without a limit is left out. A member's and its team's limits of a window are
    one window, the tighter shown (the highest percentage, the fewest credits). ``reset_at``:
    over a limit, when the member is back under every limit of the window; under, when the
    oldest counted usage leaves the window; ``None`` when nothing is counted. Credits only
    with a weekly credit limit.
    """
    usages = list(usages)
    windows: list[CodexWindow] = []
    for name, window_ms in CODEX_WINDOWS:
        mine = [u for u in usages if u.limit.window_ms == window_ms]
        if not mine:
            continue
        over = [u.resets_at_ms for u in mine if u.over and u.resets_at_ms is not None]
        under = [u.resets_at_ms for u in mine if not u.over and u.resets_at_ms is not None]
        reset = max(over) if over else min(under) if under else None
        windows.append(
            CodexWindow(
                name,
                max(u.percent for u in mine),
                window_ms // 60_000,
                None if reset is None else math.ceil(reset / 1000),
            )
        )
    # A member's and its team's weekly credits: the fewer left (the tighter of the two).
    weekly_credits = [
        max(0, u.limit.limit - u.used)
        for u in usages
        if u.limit.kind == "credits" and u.limit.window_ms == WEEK_MS
    ]
    credits = CodexCredits(min(weekly_credits)) if weekly_credits else None
    return windows, credits


def codex_rate_limit_headers(usages: Iterable[LimitUsage]) -> dict[str, str]:
    """The member's windows in Codex's rate-limit headers (checked on Codex 0.171: it parses
    them from any provider's reply and records them in its session, CODEX.md).

    ``x-codex-{primary,secondary}-used-percent`` / ``-window-minutes`` / ``-reset-at`` per
    window of :func:`codex_snapshot` (``reset-at`` absent when ``None``); with a weekly credit
    limit, ``x-codex-credits-*`` give the weekly credits left as the balance (a decimal).
    """
    windows, credits = codex_snapshot(usages)
    headers: dict[str, str] = {}
    for window in windows:
        prefix = f"x-codex-{window.name}"
        headers[f"{prefix}-used-percent"] = _decimal_text(window.used_percent)
        headers[f"{prefix}-window-minutes"] = str(window.window_minutes)
        if window.reset_at is not None:
            headers[f"{prefix}-reset-at"] = str(window.reset_at)
    if credits is not None:
        headers["x-codex-credits-has-credits"] = "true" if credits.left_micro > 0 else "false"
        headers["x-codex-credits-unlimited"] = "false"
        headers["x-codex-credits-balance"] = credits.balance
    return headers


def codex_rate_limits_event(usages: Iterable[LimitUsage]) -> dict[str, object] | None:
    """The member's windows as the ``codex.rate_limits`` event OpenAI's backend sends on a
    Responses WebSocket (Codex reads it there instead of the headers: codex-rs
    ``codex-api/src/rate_limits.rs`` ``parse_rate_limit_event``, and
    ``endpoint/responses_websocket.rs``, which turns it into the session's rate limits).

    Shape: ``{"type": "codex.rate_limits", "metered_limit_name": "codex", "rate_limits":
    {"primary": {"used_percent", "window_minutes", "reset_at"}, "secondary": …},
    "credits": {"has_credits", "unlimited", "balance"}}``; windows and credits as
    :func:`codex_snapshot` (``reset_at`` omitted when ``None``). ``None`` when the member
    has no limit (nothing to report).
    """
    windows, credits = codex_snapshot(usages)
    if not windows and credits is None:
        return None
    rate_limits: dict[str, object] = {}
    for window in windows:
        entry: dict[str, object] = {
            "used_percent": round(window.used_percent, 2),
            "window_minutes": window.window_minutes,
        }
        if window.reset_at is not None:
            entry["reset_at"] = window.reset_at
        rate_limits[window.name] = entry
    event: dict[str, object] = {
        "type": "codex.rate_limits",
        "metered_limit_name": "codex",
        "rate_limits": rate_limits,
    }
    if credits is not None:
        event["credits"] = {
            "has_credits": credits.left_micro > 0,
            "unlimited": False,
            "balance": credits.balance,
        }
    return event
