"""``quota_metrics``: the quota gauges read at most once per ``max_age_s`` off the event loop
(a failed reading keeps the last figures, its age growing), and refusals summed by kind."""

from __future__ import annotations

import asyncio
import logging

from prometheus_client import CollectorRegistry, Counter, generate_latest
from sqlalchemy.exc import OperationalError

from addons.gateway_mode.quota_metrics import QuotaGauges, RefusalKinds
from addons.gateway_mode.windows import FIVE_HOURS_MS, WEEK_MS, Limit, LimitUsage

TOKENS = LimitUsage(Limit("five_hour_quota", "tokens", FIVE_HOURS_MS, 1000), 900, None)
CREDITS = LimitUsage(
    Limit("weekly_credits_micro", "credits", WEEK_MS, 50_000_000), 12_500_000, None
)


def render(collector) -> str:
    registry = CollectorRegistry()
    registry.register(collector)
    return generate_latest(registry).decode()


def test_gauges_render_each_limit_in_its_unit():
    gauges = QuotaGauges()
    empty = render(gauges)  # before the first reading: no member, no age
    assert "codex_gateway_quota_used{" not in empty
    assert "\ncodex_gateway_quota_sample_age_seconds " not in empty
    gauges.update([("alice", TOKENS), ("alice", CREDITS)])
    text = render(gauges)
    assert 'codex_gateway_quota_used{member="alice",unit="tokens",window="five_hour"} 900.0' in text
    assert (
        'codex_gateway_quota_limit{member="alice",unit="tokens",window="five_hour"} 1000.0' in text
    )
    assert 'codex_gateway_quota_used{member="alice",unit="credits",window="weekly"} 12.5' in text
    assert 'codex_gateway_quota_limit{member="alice",unit="credits",window="weekly"} 50.0' in text
    assert "\ncodex_gateway_quota_sample_age_seconds " in text


class Reader:
    """A database read that counts its calls; ``fail`` makes it raise."""

    def __init__(self) -> None:
        self.calls = 0
        self.fail = False
        self.threads: set[str] = set()

    def __call__(self) -> list[tuple[str, LimitUsage]]:
        import threading

        self.calls += 1
        self.threads.add(threading.current_thread().name)
        if self.fail:
            raise OperationalError("SELECT", {}, Exception("database is away"))
        return [("bob", TOKENS)]


async def run_db(fn):
    return await asyncio.get_running_loop().run_in_executor(None, fn)


async def test_refresh_reads_once_per_max_age_off_the_loop():
    gauges, read = QuotaGauges(max_age_s=3600), Reader()
    await asyncio.gather(*(gauges.refresh(run_db, read) for _ in range(5)))
    assert read.calls == 1  # concurrent scrapes share one reading
    await gauges.refresh(run_db, read)
    assert read.calls == 1 and 'member="bob"' in render(gauges)
    assert "MainThread" not in read.threads


async def test_a_stale_reading_is_read_again_and_a_failure_keeps_the_last(caplog):
    gauges, read = QuotaGauges(max_age_s=0), Reader()
    await gauges.refresh(run_db, read)
    read.fail = True
    with caplog.at_level(logging.WARNING):
        await gauges.refresh(run_db, read)  # never raises: the scrape goes on
    assert read.calls == 2
    assert 'codex_gateway_quota_used{member="bob"' in render(gauges)
    assert "quota gauges not read (OperationalError)" in caplog.text
    assert "database is away" not in caplog.text


def test_refusals_summed_by_kind():
    registry = CollectorRegistry()
    refused = Counter("codex_gateway_refused", "", ["reason"], registry=registry)
    kinds = RefusalKinds(refused)
    registry.register(kinds)
    refused.labels("quota").inc(2)
    refused.labels("rate_limited").inc()
    refused.labels("concurrency").inc()
    refused.labels("missing_member_key").inc()
    refused.labels("no_upstream_key").inc(3)
    text = generate_latest(registry).decode()
    assert 'codex_gateway_refused_by_kind_total{kind="quota"} 2.0' in text
    assert 'codex_gateway_refused_by_kind_total{kind="concurrency"} 2.0' in text
    assert 'codex_gateway_refused_by_kind_total{kind="auth"} 1.0' in text
    assert 'codex_gateway_refused_by_kind_total{kind="gateway"} 3.0' in text
    assert 'codex_gateway_refused_by_kind_total{kind="body"} 0.0' in text
    assert "# TYPE codex_gateway_refused_by_kind_total counter" in text
