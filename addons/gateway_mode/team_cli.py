"""The gateway's team commands (issue 32): ``add-team``, ``set-team``, ``list-teams``, the
``--team`` flag of ``add-member`` / ``set-member``, and what ``usage --by team`` regroups.
Registered by :func:`addons.gateway_mode.cli.build_parser`; the queries are
:mod:`addons.gateway_mode.teams`."""

from __future__ import annotations

import argparse
import functools
import sys
from collections.abc import Callable
from decimal import Decimal
from typing import Any

from addons.codex_models import full_catalog
from addons.gateway_mode import teams
from addons.gateway_mode.database import Database
from addons.gateway_mode.model_policy import allowed_entries, parse_patterns
from addons.gateway_mode.windows import MICRO, overshoot_note

#: ``usage --by team``: the group of usage rows spent by members in no team.
NO_TEAM = "(no team)"


Settings = Callable[[argparse.Namespace], dict[str, "int | None"]]
Table = Callable[[list[list[str]], Any], None]


def add_parsers(
    sub: Any,
    member_options: Callable[[argparse.ArgumentParser], None],
    settings: Settings,
    table: Table,
) -> None:
    """Add ``add-team``, ``set-team`` and ``list-teams`` to the subparsers ``sub``: the quota
    flags are the members' own (``member_options``, read by ``settings``), and ``list-teams``
    prints with the other commands' ``table``. Each subparser names its admin command."""
    add = sub.add_parser("add-team", help="add a team (its members share its limits)")
    add.set_defaults(admin=functools.partial(add_team, settings=settings))
    add.add_argument("name")
    member_options(add)
    sett = sub.add_parser("set-team", help="change a team's limits or models (0 = unlimited)")
    sett.set_defaults(admin=functools.partial(set_team, settings=settings))
    sett.add_argument("name")
    member_options(sett)
    lt = sub.add_parser("list-teams", help="teams, their limits, models and members")
    lt.set_defaults(admin=functools.partial(list_teams, table=table))


def team_option(parser: argparse.ArgumentParser) -> None:
    """``--team NAME`` of ``add-member`` / ``set-member``."""
    parser.add_argument(
        "--team",
        metavar="NAME",
        help="the member's team (its requests count against the team's limits too); "
        "'' = in no team",
    )


def add_team(
    db: Database, ns: argparse.Namespace, config: Any, out: Any, settings: Settings
) -> None:
    """``add-team NAME [limits] [--models P,…]``; notes on stderr how far the team's quotas
    can be overshot (its slots)."""
    given = {k: v for k, v in settings(ns).items() if v is not None}
    teams.add_team(db, ns.name, ns.models or "", actor=getattr(ns, "actor", None), **given)
    out.write(f"team {ns.name} added\n")
    note = overshoot_note(settings(ns), config.quota_max_concurrent)
    if note:
        sys.stderr.write(note.replace("this member", "this team") + "\n")


def set_team(
    db: Database, ns: argparse.Namespace, config: Any, out: Any, settings: Settings
) -> None:
    """``set-team NAME [limits] [--models P,…]``: at least one setting, else ``ValueError``."""
    given = {k: v for k, v in settings(ns).items() if v is not None}
    teams.set_team(db, ns.name, ns.models, actor=getattr(ns, "actor", None), **given)
    out.write(f"team {ns.name} updated\n")
    if ns.models is not None:
        warn_disjoint_models(db, team=ns.name)


def _credits(micro: int) -> str:
    return f"{(Decimal(micro) / MICRO).normalize():f}" if micro else "-"


def list_teams(db: Database, ns: argparse.Namespace, config: Any, out: Any, table: Table) -> None:
    """``list-teams``: a table of the teams, their limits (``-``: unlimited), models (``*``:
    every model) and members."""
    rows = [
        [
            "team",
            "5h tokens",
            "weekly tokens",
            "5h credits",
            "weekly credits",
            "max concurrent",
            "models",
            "members",
        ]
    ]
    for t in teams.list_teams(db):
        rows.append(
            [
                t["name"],
                str(t["five_hour_quota"] or "-"),
                str(t["weekly_quota"] or "-"),
                _credits(t["five_hour_credits_micro"]),
                _credits(t["weekly_credits_micro"]),
                str(t["max_concurrent"] or "-"),
                t["models"] or "*",
                ",".join(t["members"]) or "-",
            ]
        )
    table(rows, out)


def member_team(db: Database, ns: argparse.Namespace) -> None:
    """Apply ``--team`` of ``add-member`` / ``set-member`` (nothing when absent), then
    :func:`warn_disjoint_models` for the member."""
    if ns.team is not None:
        teams.set_member_team(db, ns.name, ns.team, actor=getattr(ns, "actor", None))
    warn_disjoint_models(db, member=ns.name)


def warn_disjoint_models(
    db: Database, *, member: str | None = None, team: str | None = None
) -> None:
    """One line on stderr for each member (``member``, or every member of ``team``) whose own
    ``--models`` and its team's let no model of Codex's catalog through (every request of that
    member would be refused ``model_not_allowed``). A warning only: patterns may name models
    the catalog does not list."""
    by_member = teams.member_teams(db)
    _, entries = full_catalog()
    for row in db.members():
        team_row = by_member.get(int(row["id"]))
        if team_row is None or (member is not None and row["name"] != member):
            continue
        if team is not None and team_row["name"] != team:
            continue
        mine, theirs = parse_patterns(row.get("models")), parse_patterns(team_row["models"])
        if mine and theirs and next(allowed_entries(entries, mine, theirs), None) is None:
            sys.stderr.write(
                f"warning: member {row['name']!r} may use {','.join(mine)} and its team "
                f"{team_row['name']!r} allows {','.join(theirs)}: no model of Codex's catalog "
                "passes both, so every request of this member will be refused\n"
            )


def by_team(
    db: Database,
    rows: list[dict[str, Any]],
    connections: list[dict[str, Any]],
    refusals: list[dict[str, Any]],
) -> tuple[list[dict[str, Any]], list[dict[str, Any]], list[dict[str, Any]]]:
    """``usage --by team``: the rows regrouped, each ``member`` key now its team's name (the
    team the request was spent under: the row's ``team_id``; :data:`NO_TEAM` for none). A
    socket's row has no team: it is grouped under its member's team now. Refusals with no
    member stay ``None``."""
    names = teams.team_names(db)
    now_team = {
        m["name"]: names.get(m["team_id"], NO_TEAM) if m.get("team_id") else NO_TEAM
        for m in db.members()
    }

    def team_of(row: dict[str, Any]) -> str:
        team_id = row.get("team_id")
        return names.get(team_id, NO_TEAM) if team_id is not None else NO_TEAM

    return (
        [{**r, "member": team_of(r)} for r in rows],
        [{**c, "member": now_team.get(c["member"], NO_TEAM)} for c in connections],
        [{**f, "member": team_of(f) if f["member"] is not None else None} for f in refusals],
    )
