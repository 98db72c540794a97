"""Series of ``GET /metrics`` made for the operator's dashboard and alerts (``deploy/``): the
members' quota windows, and refusals by kind.

- :class:`QuotaGauges`: ``codex_gateway_quota_used{member,window,unit}`` and
  ``codex_gateway_quota_limit{member,window,unit}`` (``window`` ``five_hour`` or ``weekly``,
  ``unit`` ``tokens`` or ``credits``, credits as decimal credits), one pair per limit of each
  member that has one, plus ``codex_gateway_quota_sample_age_seconds``. The figures are what
  the quota check decides with (:func:`addons.gateway_mode.quota.limit_usages`: the database's
  rows plus this instance's rows not written yet), read on the gateway's database threads when
  a scrape finds the last reading older than :data:`QUOTA_SAMPLE_S`: a scrape never waits on
  more than one reading, and scrapes closer together than that cost no query at all.
- :class:`RefusalKinds`: ``codex_gateway_refused_by_kind_total{kind}``, the sum of
  ``codex_gateway_refused_total{reason}`` by the kinds ``gateway usage`` counts refusals by
  (:data:`addons.gateway_mode.ledger.KIND_ORDER`), plus ``unmetered`` (served, its usage
  unread), every kind present from the start at 0 (so ``rate()`` has a series to work on).
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable, Iterator
from decimal import Decimal

from prometheus_client import Counter
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from addons.gateway_mode.ledger import KIND_ORDER, REFUSAL_KINDS
from addons.gateway_mode.windows import FIVE_HOURS_MS, MICRO, LimitUsage

logger = logging.getLogger(__name__)

#: Seconds a quota reading serves scrapes before the next scrape reads again.
QUOTA_SAMPLE_S = 10.0

#: The quota gauges' names.
QUOTA_SERIES = (
    "codex_gateway_quota_used",
    "codex_gateway_quota_limit",
    "codex_gateway_quota_sample_age_seconds",
)

#: ``codex_gateway_refused_total``'s ``reason`` labels that are not refusal codes of
#: :data:`REFUSAL_KINDS`, by kind. The socket's bounds (``rate_limited``: frames a second;
#: ``open_turns``) count as ``concurrency`` like its busy answer; a socket message the gateway
#: will not read (``protocol_error``) or a member that stops reading (``not_reading``) as
#: ``body``. Anything else unknown is the gateway's own state (``gateway``), as in the ledger.
REASON_KINDS = {
    "quota": "quota",
    "concurrency": "concurrency",
    "open_turns": "concurrency",
    "rate_limited": "concurrency",
    "protocol_error": "body",
    "not_reading": "body",
    "unmetered": "unmetered",
}
#: Every ``kind`` of ``codex_gateway_refused_by_kind_total``.
KINDS = (*KIND_ORDER, "unmetered")


def refusal_kind_of(reason: str) -> str:
    """The kind (:data:`KINDS`) of a ``codex_gateway_refused_total`` ``reason`` label: from
    :data:`REASON_KINDS`, else the ledger's kind of that error code (``gateway`` if none)."""
    return REASON_KINDS.get(reason) or REFUSAL_KINDS.get(reason, "gateway")


class RefusalKinds(Collector):
    """``codex_gateway_refused_by_kind_total{kind}``, computed from the ``refused`` counter at
    each scrape (a sum of counters, so a counter too)."""

    NAME = "codex_gateway_refused_by_kind"
    HELP = (
        "Requests refused locally, by kind (quota, concurrency, unpriced, auth, body, route, "
        "gateway; unmetered: served, usage unread): codex_gateway_refused_total summed by kind."
    )

    def __init__(self, refused: Counter) -> None:
        self.refused = refused

    def describe(self) -> Iterator[Metric]:
        yield CounterMetricFamily(self.NAME, self.HELP, labels=["kind"])

    def collect(self) -> Iterator[Metric]:
        totals = dict.fromkeys(KINDS, 0.0)
        for metric in self.refused.collect():
            for sample in metric.samples:
                if sample.name.endswith("_total"):
                    totals[refusal_kind_of(sample.labels["reason"])] += sample.value
        family = CounterMetricFamily(self.NAME, self.HELP, labels=["kind"])
        for kind, value in totals.items():
            family.add_metric([kind], value)
        yield family


def window_name(window_ms: int) -> str:
    """``five_hour`` or ``weekly``: the ``window`` label of a limit's window."""
    return "five_hour" if window_ms == FIVE_HOURS_MS else "weekly"


def _amount(kind: str, amount: int) -> float:
    """Tokens as they are; micro-credits as credits."""
    return float(Decimal(amount) / MICRO) if kind == "credits" else float(amount)


class QuotaGauges(Collector):
    """The members' quota windows, as last read (see the module docstring).

    :meth:`refresh` reads anew when the reading is older than ``max_age_s`` (one reading at a
    time; a failed one keeps the last figures, whose age then grows); :meth:`collect` renders
    the reading without touching the database.
    """

    def __init__(self, max_age_s: float = QUOTA_SAMPLE_S) -> None:
        self.max_age_s = max_age_s
        self._rows: list[tuple[str, LimitUsage]] = []
        self._at: float | None = None  # time.monotonic() of the last reading
        self._lock = asyncio.Lock()

    def update(self, rows: list[tuple[str, LimitUsage]], at: float | None = None) -> None:
        """Keep ``rows`` (``(member name, usage against one limit)``) as the reading of
        ``at`` (``time.monotonic()``; default now)."""
        self._rows = list(rows)
        self._at = time.monotonic() if at is None else at

    def stale(self) -> bool:
        return self._at is None or time.monotonic() - self._at >= self.max_age_s

    async def refresh(
        self,
        run: Callable[[Callable[[], list[tuple[str, LimitUsage]]]], Awaitable[object]],
        read: Callable[[], list[tuple[str, LimitUsage]]],
    ) -> None:
        """When stale, ``await run(read)`` (``run``: the gateway's ``run_db``, so the reading
        happens on a database thread) and keep its rows. Never raises: a failed reading is
        logged by its exception's type only."""
        if not self.stale():
            return
        async with self._lock:
            if not self.stale():  # another scrape read while this one waited
                return
            try:
                rows = await run(read)
            except Exception as e:
                logger.warning("quota gauges not read (%s)", type(e).__name__)
                return
            self.update(rows)  # type: ignore[arg-type]

    def describe(self) -> Iterator[Metric]:
        for name in QUOTA_SERIES:
            yield GaugeMetricFamily(name, name)

    def collect(self) -> Iterator[Metric]:
        return iter(self._families())

    def _families(self) -> list[Metric]:
        labels = ["member", "window", "unit"]
        used = GaugeMetricFamily(
            "codex_gateway_quota_used",
            "A member's usage inside a quota window (tokens, or credits), as the quota check "
            "reads it; only members with a limit on that window and unit.",
            labels=labels,
        )
        limit = GaugeMetricFamily(
            "codex_gateway_quota_limit",
            "A member's limit on a quota window (tokens, or credits).",
            labels=labels,
        )
        for member, usage in self._rows:
            kind = usage.limit.kind
            key = [member, window_name(usage.limit.window_ms), kind]
            used.add_metric(key, _amount(kind, usage.used))
            limit.add_metric(key, _amount(kind, usage.limit.limit))
        age = GaugeMetricFamily(
            "codex_gateway_quota_sample_age_seconds",
            "Seconds since the quota gauges were read from the database (grows while it "
            "cannot be read); absent before the first reading.",
        )
        families: list[Metric] = [used, limit]
        if self._at is not None:
            age.add_metric([], time.monotonic() - self._at)
            families.append(age)
        return families
