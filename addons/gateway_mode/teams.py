"""Teams (issue 32): a member may be in one team, whose windows its requests count against
too, and whose ``max_concurrent`` slots its members share.

A team has the member quota columns (tokens and credits, five-hour and weekly; 0 =
unlimited), ``max_concurrent`` and ``models`` (comma-separated model patterns, stored and
validated here, matched by the models-per-member code). A request is admitted while the
member and its team are both under every limit; the first one spent refuses, naming itself
(:func:`addons.gateway_mode.quota.usage_limit_error`). A request's usage and refusal rows
carry the team it was spent under (``team_id``), so a member who changes team leaves its
past usage with the old one.

The team's bound is the member's mechanism, one level up: a request of a team member takes
one lease that holds a member slot and a team slot, both counted in one serialised step
(:func:`acquire_lease`: the member's row, then the team's, locked on PostgreSQL; ``BEGIN
IMMEDIATE`` on SQLite), reads the team's usage after that, and gives the lease back only
once its usage row is written. So a team's window holds to its limit plus what its
``max_concurrent`` requests in flight use, across workers and instances. A team with a quota
and ``max_concurrent`` 0 gets the gateway's ``quota_max_concurrent`` slots, as a member does.

This module: the team queries (SQLAlchemy Core, on :class:`Database`'s engine), the pure
rules (names, model patterns) and what a member directory entry learns of its team.
"""

from __future__ import annotations

import uuid
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import sqlalchemy as sa

from addons.gateway_mode import audit
from addons.gateway_mode import members as member_rules
from addons.gateway_mode.database import (
    MEMBER_SETTINGS,
    Database,
    DatabaseError,
    _member_id,
    _settings,
    now_ms,
)
from addons.gateway_mode.model_policy import parse_patterns
from addons.gateway_mode.schema import leases, members, teams
from addons.gateway_mode.windows import LIMIT_COLUMNS, TEAM_LIMITS, Limit

#: Directory entry keys a team member gets (:func:`attach_teams`).
TEAM_ID = "team_id"
TEAM = "team"
TEAM_SLOTS = "team_max_concurrent"
TEAM_SLOTS_DEFAULT = "team_max_concurrent_default"
#: The team's ``models`` text as stored (``""``: every model), for the models-per-member check.
TEAM_MODELS = "team_models"


def check_team_name(name: str) -> str:
    """Validate a team name (the member name rule: 1-64 of ``A-Z a-z 0-9 . _ @ -``, starting
    alphanumeric; safe in logs, metrics labels and shells).

    Raises:
        ValueError: naming the rule.
    """
    try:
        return member_rules.check_name(name)
    except ValueError as e:
        raise ValueError(str(e).replace("invalid member name", "invalid team name")) from None


def parse_models(text: str) -> str:
    """``--models PATTERN[,PATTERN…]`` as stored for a team: the member rule
    (:func:`addons.gateway_mode.model_policy.parse_patterns`: trimmed, deduplicated, blanks
    between commas ignored) comma-joined; ``""`` (every model) for an empty text.

    Raises:
        ValueError: as :func:`~addons.gateway_mode.model_policy.parse_patterns`.
    """
    return ",".join(parse_patterns(text))


# -- admin queries ---------------------------------------------------------------------------


def add_team(
    db: Database, name: str, models: str = "", *, actor: str | None = None, **settings: int
) -> int:
    """Insert a team; ``settings`` are :data:`MEMBER_SETTINGS` (absent: 0), ``models`` as
    :func:`parse_models` gives it. Returns its id. Audited (``add-team``, by ``actor``;
    default the OS user) in the same transaction.

    Raises:
        ValueError: bad name, models or negative setting.
        DatabaseError: the name exists.
    """
    check_team_name(name)
    values = {column: 0 for column in MEMBER_SETTINGS}
    values.update(_settings(settings))
    models = parse_models(models)
    with db.engine.begin() as conn:
        if conn.execute(sa.select(teams.c.id).where(teams.c.name == name)).first():
            raise DatabaseError(f"team {name!r} already exists (use set-team)")
        result = conn.execute(
            teams.insert().values(name=name, models=models, created_ms=now_ms(), **values)
        )
        key = result.inserted_primary_key
        assert key is not None
        after = {"models": models, **values}
        audit.record(conn, actor or audit.default_actor(), "add-team", name, None, after)
        return int(key[0])


def set_team(
    db: Database,
    name: str,
    models: str | None = None,
    *,
    actor: str | None = None,
    **settings: int | None,
) -> None:
    """Change some of a team's settings (0 = unlimited; ``models`` ``None``: unchanged, ``""``:
    every model). Audited (``set-team``: the given settings before and after) in the same
    transaction.

    Raises:
        ValueError: bad models or setting.
        DatabaseError: unknown team.
    """
    values: dict[str, Any] = dict(_settings(settings))
    if models is not None:
        values["models"] = parse_models(models)
    if not values:
        raise ValueError("set-team: give at least one setting to change")
    with db.engine.begin() as conn:
        query = sa.select(teams).where(teams.c.name == name)
        row = conn.execute(query.with_for_update() if db.dialect != "sqlite" else query).first()
        if row is None:
            raise DatabaseError(f"no team named {name!r}")
        conn.execute(teams.update().where(teams.c.name == name).values(values))
        before = {column: row._mapping[column] for column in values}
        audit.record(conn, actor or audit.default_actor(), "set-team", name, before, values)


def list_teams(db: Database) -> list[dict[str, Any]]:
    """Every team row, by name, each with ``members``: its members' names, sorted."""
    with db.engine.connect() as conn:
        rows = [dict(r._mapping) for r in conn.execute(sa.select(teams).order_by(teams.c.name))]
        names = conn.execute(
            sa.select(members.c.team_id, members.c.name)
            .where(members.c.team_id.is_not(None))
            .order_by(members.c.name)
        ).all()
    by_team: dict[int, list[str]] = {}
    for team_id, member in names:
        by_team.setdefault(int(team_id), []).append(member)
    for row in rows:
        row["members"] = by_team.get(int(row["id"]), [])
    return rows


def team_names(db: Database) -> dict[int, str]:
    """``{team id: name}`` of every team."""
    with db.engine.connect() as conn:
        return {int(i): n for i, n in conn.execute(sa.select(teams.c.id, teams.c.name)).all()}


def set_member_team(db: Database, member: str, team: str, *, actor: str | None = None) -> None:
    """Put member ``member`` in team ``team`` (``""``: in no team). Its past usage stays with
    the team it was spent under. Audited (``set-member``, ``team`` before and after, by
    team name) in the same transaction.

    Raises:
        DatabaseError: unknown member or team.
    """
    with db.engine.begin() as conn:
        member_id = _member_id(conn, member)
        team_id = None
        if team:
            team_id = conn.execute(sa.select(teams.c.id).where(teams.c.name == team)).scalar()
            if team_id is None:
                raise DatabaseError(f"no team named {team!r} (add it with add-team)")
        query = (
            sa.select(teams.c.name)
            .select_from(members.join(teams, teams.c.id == members.c.team_id))
            .where(members.c.id == member_id)
        )
        before = conn.execute(query).scalar() or ""
        conn.execute(members.update().where(members.c.id == member_id).values(team_id=team_id))
        audit.record(
            conn,
            actor or audit.default_actor(),
            "set-member",
            member,
            {"team": before},
            {"team": team},
        )


def require_team(db: Database, team: str) -> None:
    """Raises :class:`DatabaseError` unless team ``team`` exists (``""`` always passes)."""
    if team and team not in team_names(db).values():
        raise DatabaseError(f"no team named {team!r} (add it with add-team)")


# -- what the gateway reads ------------------------------------------------------------------


def member_teams(db: Database) -> dict[int, dict[str, Any]]:
    """``{member id: its team's row}`` for every member in a team (one query)."""
    query = sa.select(members.c.id.label("member_id"), teams).join(
        teams, teams.c.id == members.c.team_id
    )
    with db.engine.connect() as conn:
        return {int(r.member_id): dict(r._mapping) for r in conn.execute(query).all()}


def team_limits(team: Mapping[str, Any]) -> list[Limit]:
    """The non-zero limits of a team row, as :class:`Limit` marked with the team."""
    return [
        Limit(column, kind, window, int(team[column]), team["name"], int(team["id"]))
        for column, kind, window in LIMIT_COLUMNS
        if team.get(column)
    ]


def attach_teams(
    rows: list[dict[str, Any]], by_member: Mapping[int, Mapping[str, Any]], default_slots: int
) -> dict[int, str]:
    """Tell each directory entry (``rows``, from :meth:`Database.directory`) of its member's
    team: :data:`TEAM_ID`, :data:`TEAM`, :data:`TEAM_MODELS`, its limits
    (:data:`TEAM_LIMITS`, read by :func:`addons.gateway_mode.windows.limits_of`) and its
    slots (:data:`TEAM_SLOTS`; a team
    with a quota and ``max_concurrent`` 0 gets ``default_slots``, marked
    :data:`TEAM_SLOTS_DEFAULT`). Entries of members in no team are left as they are.
    Returns ``{team id: name}`` of the teams seen."""
    names: dict[int, str] = {}
    for row in rows:
        team = by_member.get(int(row["member_id"]))
        if team is None:
            continue
        limits = team_limits(team)
        slots = int(team["max_concurrent"])
        row[TEAM_ID], row[TEAM], row[TEAM_LIMITS] = int(team["id"]), team["name"], limits
        row[TEAM_MODELS] = team["models"] or ""
        if not slots and limits and default_slots:
            slots = default_slots
            row[TEAM_SLOTS_DEFAULT] = True
        row[TEAM_SLOTS] = slots
        names[int(team["id"])] = team["name"]
    return names


def team_marker(entry: Mapping[str, Any]) -> dict[str, Any]:
    """What the flow's member marker says of the team (``team``, ``team_id``; plain values,
    written into flow files and recordings): ``{}`` for a member in no team."""
    if entry.get(TEAM_ID) is None:
        return {}
    return {TEAM: entry[TEAM], TEAM_ID: entry[TEAM_ID]}


def refresh_marker(marker: dict[str, Any], entry: Mapping[str, Any]) -> None:
    """Bring a long-lived flow's member marker (a WebSocket's) to the member's team now, so
    each turn's row names the team it is spent under."""
    marker.pop(TEAM, None)
    marker.pop(TEAM_ID, None)
    marker.update(team_marker(entry))


@dataclass(frozen=True)
class TeamSlots:
    """A team's concurrency: ``team_id``, ``name``, ``slots`` (``max_concurrent``, 0 =
    unlimited) and whether they are the gateway's default."""

    team_id: int
    name: str
    slots: int
    default: bool = False

    @classmethod
    def of(cls, entry: Mapping[str, Any]) -> TeamSlots | None:
        """The team slots of a directory entry, ``None`` for a member in no team or in a team
        without a slot limit (its own slots, if any, are then all there is to take)."""
        if entry.get(TEAM_ID) is None or not entry.get(TEAM_SLOTS):
            return None
        return cls(
            int(entry[TEAM_ID]),
            str(entry[TEAM]),
            int(entry.get(TEAM_SLOTS) or 0),
            bool(entry.get(TEAM_SLOTS_DEFAULT)),
        )


def busy_text(member: str, team: TeamSlots, active: int) -> str:
    """The concurrency refusal's message when the team's slots are all taken."""
    source = (
        "quota_max_concurrent, the gateway's default for a team with a quota"
        if team.default
        else "max_concurrent"
    )
    return (
        f"team {team.name!r} of member {member!r} already has {active} requests in flight "
        f"({source} {team.slots})"
    )


def acquire_lease(
    db: Database,
    member_id: int,
    limit: int,
    team_id: int,
    team_limit: int,
    instance: str,
    ttl_ms: int,
) -> tuple[str | None, int, int | None]:
    """Take one concurrency slot of a member (``limit``, 0 = unlimited) and of its team
    (``team_limit``, 0 = unlimited) for ``ttl_ms``: one lease row carrying both.

    Returns ``(lease_id, active, team_active)``: ``lease_id`` ``None`` when the member's
    unexpired leases (``active``) reached ``limit`` (``team_active`` then ``None``) or the
    team's (``team_active``) reached ``team_limit``. Expired leases are deleted first.
    Serialised per member and per team: :meth:`Database.acquire_lease`'s step with the team's
    row locked after the member's (PostgreSQL), or ``BEGIN IMMEDIATE`` (SQLite).
    """
    now = now_ms()
    with db.engine.begin() as conn:
        if db.dialect != "sqlite":
            conn.execute(sa.select(members.c.id).where(members.c.id == member_id).with_for_update())
            conn.execute(sa.select(teams.c.id).where(teams.c.id == team_id).with_for_update())
        conn.execute(
            leases.delete().where(
                sa.or_(leases.c.member_id == member_id, leases.c.team_id == team_id),
                leases.c.expires_ms <= now,
            )
        )

        def count(where: Any) -> int:
            return int(
                conn.execute(
                    sa.select(sa.func.count()).select_from(leases).where(where)
                ).scalar_one()
            )

        active = count(leases.c.member_id == member_id)
        if limit and active >= limit:
            return None, active, None
        team_active = count(leases.c.team_id == team_id)
        if team_limit and team_active >= team_limit:
            return None, active, team_active
        lease_id = str(uuid.uuid4())
        conn.execute(
            leases.insert().values(
                id=lease_id,
                member_id=member_id,
                team_id=team_id,
                instance=instance,
                expires_ms=now + ttl_ms,
            )
        )
        return lease_id, active + 1, team_active + 1
