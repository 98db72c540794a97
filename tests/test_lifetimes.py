"""Credential lifetimes (addons/gateway_mode/lifetimes.py): the ``--expires`` and
``default_key_lifetime`` rule."""

from __future__ import annotations

import datetime as dt

import pytest

from addons.gateway_mode.lifetimes import (
    expired,
    expired_message,
    format_expiry,
    parse_expiry,
    parse_lifetime,
)

#: 2026-12-07 06:00:00 UTC.
NOW = int(dt.datetime(2026, 12, 7, 6, tzinfo=dt.UTC).timestamp() * 1000)
HOUR, DAY = 3_600_000, 86_400_000


def utc_ms(*args: int) -> int:
    return int(dt.datetime(*args, tzinfo=dt.UTC).timestamp() * 1000)  # type: ignore[misc]


@pytest.mark.parametrize(
    ("text", "ms"),
    [
        ("90s", 90_000),
        ("30m", 30 * 60_000),
        ("12h", 12 * HOUR),
        ("7d", 7 * DAY),
        (" 30D ", 30 * DAY),
        ("2w", 14 * DAY),
        ("never", None),
        ("None", None),
    ],
)
def test_lifetimes_parse(text: str, ms: int | None) -> None:
    assert parse_lifetime(text) == ms


@pytest.mark.parametrize("text", ["", "0d", "7", "d", "1.5d", "-1d", "7 days", "1y", "1e3d"])
def test_bad_lifetimes_are_refused_with_the_forms(text: str) -> None:
    with pytest.raises(ValueError, match=r"7d|longer than 0"):
        parse_lifetime(text)


@pytest.mark.parametrize(
    ("text", "expires"),
    [
        ("7d", NOW + 7 * DAY),
        ("12h", NOW + 12 * HOUR),
        # A date: its end, UTC (the key works through 23:59:59.999 of that day).
        ("2027-01-31", utc_ms(2027, 2, 1) - 1),
        ("2026-12-07", utc_ms(2026, 12, 8) - 1),  # today: until midnight
        ("2027-01-31T12:30", utc_ms(2027, 1, 31, 12, 30)),
        ("2027-01-31T12:30:00Z", utc_ms(2027, 1, 31, 12, 30)),
        ("2027-01-31T12:30:00+02:00", utc_ms(2027, 1, 31, 10, 30)),
        ("never", None),
    ],
)
def test_expiries_parse_from_now(text: str, expires: int | None) -> None:
    assert parse_expiry(text, NOW) == expires


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("2026-12-06", "2026-12-06 23:59 UTC is in the past"),
        ("2026-12-07T05:59", "is in the past"),
        ("2026-12-07T06:00", "is in the past"),  # now is not the future
        ("2027-02-30", "not a date"),
        ("next week", "expected a lifetime"),
        ("99999999w", "past the year 9999"),
    ],
)
def test_past_and_bad_expiries_are_refused(text: str, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        parse_expiry(text, NOW)


def test_a_key_is_expired_from_its_expiry_on() -> None:
    assert not expired(None, NOW)
    assert not expired(NOW + 1, NOW)
    assert expired(NOW, NOW)
    assert expired(NOW - 1, NOW)


def test_the_member_is_told_when_its_key_expired() -> None:
    end = parse_expiry("2027-01-31", NOW)
    assert end is not None
    assert format_expiry(end) == "2027-01-31 23:59 UTC"
    assert expired_message(end).startswith("member key expired on 2027-01-31 23:59 UTC")
