"""Credential lifetimes: when a member key (and, later, an identity) stops working.

One rule for every credential the gateway hands out (issue 32, "Keys that expire"; the
keyless-members issue's identities follow it too):

- ``--expires`` / ``default_key_lifetime`` take a *duration* (``90s``, ``30m``, ``12h``,
  ``7d``, ``2w``: from now), a *date* (``2027-01-31``: the end of that day, UTC, i.e. the key
  works through 23:59:59 of that day), an *ISO-8601 time* (``2027-01-31T12:00``, naive means
  UTC; ``Z`` or an offset accepted), or ``never``.
- An expiry is stored as epoch milliseconds (``expires_ms``; ``NULL``: never). A credential is
  expired from that instant on: :func:`expired` is ``now_ms >= expires_ms``, judged with the
  time of the request being checked, never the time the member directory was read.
- An expiry in the past (or now) is refused when it is set: a key born expired is a mistake.

Pure functions, no clock of their own: callers pass ``now_ms``.
"""

from __future__ import annotations

import datetime as dt
import re

_DURATION = re.compile(r"([0-9]{1,9})([smhdw])")
_UNIT_MS = {"s": 1000, "m": 60_000, "h": 3_600_000, "d": 86_400_000, "w": 7 * 86_400_000}
_DATE = re.compile(r"[0-9]{4}-[0-9]{2}-[0-9]{2}")
#: Words that mean "no expiry".
NEVER = frozenset({"never", "none", "null"})
#: The latest expiry accepted (year 9999), so every expiry prints as a date.
MAX_EXPIRY_MS = int(dt.datetime(9999, 12, 31, 23, 59, 59, tzinfo=dt.UTC).timestamp() * 1000)


def parse_lifetime(value: str) -> int | None:
    """A lifetime as milliseconds: ``90s``, ``30m``, ``12h``, ``7d``, ``2w`` (whole numbers);
    ``never`` (or ``none``, ``null``) gives ``None``. What ``default_key_lifetime`` takes.

    Raises:
        ValueError: anything else, or a zero lifetime (the message names the forms).
    """
    text = value.strip().lower()
    if text in NEVER:
        return None
    match = _DURATION.fullmatch(text)
    if match is None:
        raise ValueError(
            f"expected a lifetime such as 12h, 7d, 30d, 2w or never, got {value[:40]!r}"
        )
    ms = int(match.group(1)) * _UNIT_MS[match.group(2)]
    if ms <= 0:
        raise ValueError(f"a lifetime must be longer than 0, got {value[:40]!r}")
    return ms


def parse_expiry(value: str, now_ms: int) -> int | None:
    """``--expires``: a lifetime from ``now_ms`` (:func:`parse_lifetime`), a date (the end of
    that day, UTC: the last millisecond of it), or an ISO-8601 time (naive: UTC); ``never``
    gives ``None``. Returns epoch milliseconds.

    Raises:
        ValueError: unparseable, or not after ``now_ms`` (the message shows the time).
    """
    text = value.strip()
    try:
        lifetime = parse_lifetime(text)
    except ValueError:
        pass
    else:
        return None if lifetime is None else _bounded(now_ms + lifetime, value)
    if _DATE.fullmatch(text):
        try:
            day = dt.date.fromisoformat(text)
        except ValueError:
            raise ValueError(f"--expires: not a date: {value[:40]!r}") from None
        next_day = dt.datetime.combine(day, dt.time(), dt.UTC) + dt.timedelta(days=1)
        when = int(next_day.timestamp() * 1000) - 1
    else:
        try:
            moment = dt.datetime.fromisoformat(text.replace("Z", "+00:00"))
        except ValueError:
            raise ValueError(
                "--expires: expected a lifetime (12h, 7d, 30d), a date (2027-01-31: the end of "
                f"that day, UTC), an ISO-8601 time or never, got {value[:40]!r}"
            ) from None
        if moment.tzinfo is None:
            moment = moment.replace(tzinfo=dt.UTC)
        when = int(moment.timestamp() * 1000)
    if when <= now_ms:
        raise ValueError(f"--expires: {format_expiry(when)} is in the past")
    return _bounded(when, value)


def _bounded(when: int, value: str) -> int:
    if when > MAX_EXPIRY_MS:
        raise ValueError(f"--expires: {value[:40]!r} is past the year 9999")
    return when


def expired(expires_ms: int | None, now_ms: int) -> bool:
    """Whether a credential with this expiry is expired at ``now_ms`` (``None``: never)."""
    return expires_ms is not None and now_ms >= expires_ms


def format_expiry(expires_ms: int) -> str:
    """``2027-01-31 23:59 UTC``: an expiry for people (minutes, rounded down: the key is
    good through the minute shown)."""
    moment = dt.datetime.fromtimestamp(expires_ms / 1000, dt.UTC)
    return moment.strftime("%Y-%m-%d %H:%M UTC")


def expired_message(expires_ms: int, identity: str | None = None) -> str:
    """What a member is told when its key (or its OIDC ``identity``, by id) has expired (no
    secret in it)."""
    if identity is not None:
        return (
            f"identity {identity} expired on {format_expiry(expires_ms)}; ask the gateway's "
            "admin to renew it (a new token does not help)"
        )
    return (
        f"member key expired on {format_expiry(expires_ms)}; ask the gateway's admin for a new key"
    )


def key_expiry(given: str | None, default_lifetime: str | None, now: int) -> int | None:
    """The expiry (epoch ms, ``None``: never) of a new key or identity: ``--expires`` when given
    (:func:`parse_expiry`), else now plus the YAML
    ``default_key_lifetime``, else never. Raises ``ValueError`` for a bad or past value."""
    if given is not None:
        return parse_expiry(given, now)
    lifetime = parse_lifetime(default_lifetime) if default_lifetime else None
    return None if lifetime is None else now + lifetime
