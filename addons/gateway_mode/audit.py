"""The audit log of admin changes (issue 32, "Audit log"): who changed what, when, from where,
and the values before and after, in the database's ``audit_log`` table.

How to log a change (for every admin command that changes the database)::

    from addons.gateway_mode import audit

    with db.engine.begin() as conn:              # the change's own transaction
        before = {...}                           # the values it replaces (None: nothing)
        conn.execute(...)                        # the change
        audit.record(conn, actor, "set-team", name, before, {...})

- **Same transaction.** :func:`record` only inserts on the connection it is given: call it
  inside the ``begin()`` block of the change, after the change. If the change fails, or
  :func:`record` refuses the row, the transaction rolls back and neither is written; if the
  commit fails, neither is. An admin reading the log never sees a change that did not happen,
  and every change that happened is in the log (several admin hosts on one PostgreSQL: each
  row is an ``INSERT`` with its own identity id, no lock taken).
- **actor**: the ``--actor`` given to the admin command, else the OS user
  (:func:`default_actor`); the CLI resolves it once (:func:`actor_name`) and admin
  :class:`~addons.gateway_mode.database.Database` methods take it as ``actor=``. ``host`` is
  where the command ran (:func:`socket.gethostname`).
- **action**: the admin command's name (``add-member``, ``set-member``, ``add-key``,
  ``revoke-key``, ``init``...); **target**: what it acted on, by public name (a member's name,
  a key's id ``mk_...``, ``schema``).
- **before / after**: JSON objects of the values that changed (``None``: the thing did not
  exist before / does not after). Never a secret: a key is named by its id, never its text or
  hash. :func:`record` refuses (``ValueError``, so the change rolls back) a field named like
  a secret (:data:`SECRET_FIELDS`, ``*_hash``, ``*_secret``, ``*_password``) or a value that
  holds a member key, at any depth.

Read it with ``gateway audit [--since WHEN] [--json]`` (:func:`rows`, :func:`describe`).
"""

from __future__ import annotations

import datetime as dt
import getpass
import json
import os
import socket
import time
from collections.abc import Mapping
from typing import Any

import sqlalchemy as sa

from addons.gateway_mode.members import KEY_PATTERN
from addons.gateway_mode.schema import audit_log

#: Field names that must never reach the log (exact, case-insensitive).
SECRET_FIELDS = frozenset(
    {
        "key",
        "key_hash",
        "hash",
        "secret",
        "password",
        "token",
        "api_key",
        "access_token",
        "refresh_token",
        "client_secret",
    }
)
_SECRET_SUFFIXES = ("_hash", "_secret", "_password")
#: ``actor`` and ``host`` column widths (longer values are cut).
ACTOR_MAX, HOST_MAX, TARGET_MAX = 128, 255, 200


def default_actor() -> str:
    """The OS user running the command (:func:`getpass.getuser`: ``LOGNAME``, ``USER``...,
    then the password database), else ``uid:<n>`` when the user has no name (a container)."""
    try:
        name = getpass.getuser()
    except Exception:  # OSError (3.13) or KeyError: no name for this uid
        name = ""
    return name.strip()[:ACTOR_MAX] or f"uid:{os.getuid()}"


def actor_name(given: str | None) -> str:
    """``--actor NAME`` checked (1-128 printable characters), else :func:`default_actor`.

    Raises:
        ValueError: empty, too long, or with a control character.
    """
    if given is None:
        return default_actor()
    name = given.strip()
    if not name or len(name) > ACTOR_MAX or not name.isprintable():
        raise ValueError(f"--actor: 1-{ACTOR_MAX} printable characters, got {given[:40]!r}")
    return name


def _check(value: Any, where: str) -> None:
    """Raise ``ValueError`` if ``value`` (JSON-able) holds a secret-named field or a member key."""
    if isinstance(value, Mapping):
        for name, item in value.items():
            lower = str(name).lower()
            if lower in SECRET_FIELDS or lower.endswith(_SECRET_SUFFIXES):
                raise ValueError(f"audit: field {name!r} in {where} looks like a secret")
            _check(item, where)
    elif isinstance(value, list | tuple):
        for item in value:
            _check(item, where)
    elif isinstance(value, str) and KEY_PATTERN.search(value):
        raise ValueError(f"audit: {where} holds a member key")


def _dump(value: Mapping[str, Any] | None, where: str) -> str | None:
    if value is None:
        return None
    _check(value, where)
    return json.dumps(dict(value), sort_keys=True, separators=(",", ":"), ensure_ascii=False)


def record(
    conn: sa.Connection,
    actor: str,
    action: str,
    target: str,
    before: Mapping[str, Any] | None,
    after: Mapping[str, Any] | None,
    *,
    host: str | None = None,
    ts_ms: int | None = None,
) -> None:
    """Append one row to ``audit_log`` on ``conn``, inside the caller's transaction (see the
    module docstring). ``before`` / ``after``: JSON-able mappings or ``None``; ``host``:
    default this machine's name; ``ts_ms``: default now (epoch ms).

    Raises:
        ValueError: ``before`` / ``after`` hold a secret-named field or a member key, or are
            not JSON-able (the caller's transaction then rolls back: nothing changes).
    """
    try:
        before_text, after_text = _dump(before, "before"), _dump(after, "after")
    except TypeError as e:
        raise ValueError(f"audit: values are not JSON: {e}") from None
    conn.execute(
        audit_log.insert().values(
            ts_ms=int(time.time() * 1000) if ts_ms is None else ts_ms,
            actor=(actor or default_actor())[:ACTOR_MAX],
            host=(host if host is not None else socket.gethostname())[:HOST_MAX] or None,
            action=action[:64],
            target=target[:TARGET_MAX],
            before=before_text,
            after=after_text,
        )
    )


def rows(conn: sa.Connection, since_ms: int = 0) -> list[dict[str, Any]]:
    """Audit rows with ``ts_ms >= since_ms``, oldest first (by time, then id), each
    ``{"id", "ts_ms", "actor", "host", "action", "target", "before", "after"}`` with
    ``before`` / ``after`` parsed back to dicts (or ``None``)."""
    query = (
        sa.select(audit_log)
        .where(audit_log.c.ts_ms >= since_ms)
        .order_by(audit_log.c.ts_ms, audit_log.c.id)
    )
    found = []
    for row in conn.execute(query).all():
        entry = dict(row._mapping)
        for side in ("before", "after"):
            entry[side] = json.loads(entry[side]) if entry[side] is not None else None
        found.append(entry)
    return found


def _text(value: Any) -> str:
    return "-" if value is None else json.dumps(value, ensure_ascii=False)


def describe(before: Mapping[str, Any] | None, after: Mapping[str, Any] | None) -> str:
    """One line for people: ``field: old -> new`` for each field that differs (``-``: none);
    every field of ``after`` for a creation, of ``before`` for a removal."""
    old, new = dict(before or {}), dict(after or {})
    parts = []
    for name in sorted(set(old) | set(new), key=lambda n: (n not in new, n)):
        if before is None:
            parts.append(f"{name}={_text(new.get(name))}")
        elif after is None:
            parts.append(f"{name}={_text(old.get(name))} (removed)")
        elif old.get(name) != new.get(name):
            parts.append(f"{name}: {_text(old.get(name))} -> {_text(new.get(name))}")
    return ", ".join(parts) or "(no change)"


def json_line(row: Mapping[str, Any]) -> str:
    """One audit row as a JSON line (``ts`` ISO-8601 UTC beside ``ts_ms``)."""
    ts = dt.datetime.fromtimestamp(row["ts_ms"] / 1000, dt.UTC)
    doc = {"ts": ts.isoformat(timespec="milliseconds").replace("+00:00", "Z"), **row}
    return json.dumps(doc, ensure_ascii=False)
