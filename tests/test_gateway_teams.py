"""Teams (``addons/gateway_mode/teams.py``, issue 32): the admin commands, the model pattern
syntax, the migration from a 0004 ledger with rows, and the quota gate with taddons/tflow on a
real SQLite database: a member's request counts against its team's windows and slots too, the
first one spent refuses and names itself, Codex's headers show the tighter of the two, and a
member who changes team leaves its usage with the team it was spent under."""

from __future__ import annotations

import io
import json
import math
import time
from typing import Any

import pytest

from addons.common import ALLOWED, REFUSED
from addons.gateway_mode import cli, teams
from addons.gateway_mode.accounting import TurnFacts, ledger_row, record_refusal
from addons.gateway_mode.core import MEMBER, GatewayCore
from addons.gateway_mode.database import Database, DatabaseError
from addons.gateway_mode.ledger import REFUSALS, TABLE
from addons.gateway_mode.quota import CODEX_LIMITS, CONCURRENCY_RETRY_S, usage_limit_error
from addons.gateway_mode.windows import FIVE_HOURS_MS, WEEK_MS, Limit, LimitUsage
from tests.test_gateway_quota import (
    add_member,
    error_of,
    member_flow,
    setup,  # noqa: F401 (a fixture)
    usage_row,
)
from tests.test_gateway_units import ROWS_0003, upgraded_from

# -- pure rules ----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("given", "stored"),
    [
        ("", ""),
        ("  ", ""),
        ("gpt-5.6-luna", "gpt-5.6-luna"),
        (" gpt-5.5 , gpt-5.6-*,gpt-5.5", "gpt-5.5,gpt-5.6-*"),
        ("gpt-5.5,,gpt-5.6,", "gpt-5.5,gpt-5.6"),  # the member rule: blanks ignored
        ("*", "*"),
        ("org/model:v1@x+y_z", "org/model:v1@x+y_z"),
    ],
)
def test_model_patterns_are_stored_trimmed_and_deduplicated(given: str, stored: str) -> None:
    assert teams.parse_models(given) == stored


@pytest.mark.parametrize("given", ["gpt 5.5", "gpt-5.5;rm", "x" * 101, "a<b"])
def test_a_bad_model_pattern_is_refused_naming_the_rule(given: str) -> None:
    with pytest.raises(ValueError, match=r"model pattern .*only letters"):
        teams.parse_models(given)


def test_a_team_name_follows_the_member_rule() -> None:
    with pytest.raises(ValueError, match="invalid team name"):
        teams.check_team_name("-platform")


def test_both_spent_the_refusal_names_the_one_waited_for_longest_and_its_reset() -> None:
    now = 10 * WEEK_MS
    mine = Limit("five_hour_quota", "tokens", FIVE_HOURS_MS, 100)
    team = Limit("weekly_credits_micro", "credits", WEEK_MS, 2_000_000, "platform", 7)
    usages = [
        LimitUsage(mine, 100, now + 60_000),
        LimitUsage(team, 2_000_000, now + 3_600_000),
    ]
    refusal = usage_limit_error("ana", usages, now)
    assert refusal is not None
    retry, message, fields = refusal
    assert message.startswith("team 'platform' of member 'ana' used 2 credits of its weekly")
    assert fields["team"] == "platform" and fields["resets_at"] == math.ceil(
        (now + 3_600_000) / 1000
    )
    assert retry == 3600
    # The member's own limit alone: worded as before, no team field.
    refusal = usage_limit_error("ana", usages[:1], now)
    assert refusal is not None and refusal[1].startswith("member 'ana' used 100 tokens")
    assert "team" not in refusal[2]


# -- the schema ----------------------------------------------------------------------------------


def test_a_0004_ledger_upgrades_with_its_rows_kept_and_in_no_team(tmp_path) -> None:
    db = upgraded_from(tmp_path, f"sqlite:///{tmp_path / 'old.db'}", "0003", [])
    db.dispose()
    # From 0004 with rows: the member, its usage and its refusals stay, in no team.
    old = Database(f"sqlite:///{tmp_path / 'old4.db'}")
    from alembic import command

    with old.engine.begin() as conn:
        command.upgrade(old._alembic_config(conn), "0004")
        for statement in ROWS_0003:
            conn.exec_driver_sql(statement)
        conn.exec_driver_sql(
            "INSERT INTO refusals (row_id, ts_ms, member_id, key_id, kind, code, status, route,"
            " count, instance) VALUES ('f1', 6, 1, 'k', 'quota', 'quota_exceeded', 429,"
            " '/v1/responses', 1, 'i')"
        )
    assert old.migrate() == old.head()
    (row,) = old.usage_rows(0)
    assert row["total_tokens"] == 5 and row["team_id"] is None
    assert [(r["member"], r["team_id"]) for r in old.refusal_rows(0)] == [("a", None)]
    (member,) = old.members()
    assert member["team_id"] is None
    teams.add_team(old, "platform", weekly_credits_micro=5)
    teams.set_member_team(old, "a", "platform")
    assert teams.member_teams(old)[1]["name"] == "platform"
    old.dispose()


# -- the admin commands --------------------------------------------------------------------------


def run(db_url: str, *argv: str) -> tuple[int, str]:
    out = io.StringIO()
    code = cli.main(["--database", db_url, *argv], out=out)
    return code, out.getvalue()


@pytest.fixture
def db_url(tmp_path) -> str:
    url = f"sqlite:///{tmp_path / 'g.db'}"
    assert run(url, "init")[0] == 0
    return url


def test_add_set_and_list_teams_and_members_in_them(db_url: str, capsys) -> None:
    assert run(
        db_url, "add-team", "platform", "--weekly-credits", "2000", "--models", "gpt-5.5, gpt-5.6-*"
    ) == (0, "team platform added\n")
    assert "quota holds to its limit plus what 4 requests in flight use" in capsys.readouterr().err
    assert run(db_url, "add-team", "platform")[0] == 2
    assert "already exists" in capsys.readouterr().err
    with pytest.raises(SystemExit) as refused:  # argparse's check, the member rule
        run(db_url, "add-team", "interns", "--models", "gpt 5")
    assert refused.value.code == 2
    assert "model pattern 'gpt 5'" in capsys.readouterr().err
    assert run(db_url, "add-member", "ana", "--team", "nope")[0] == 2
    assert "no team named 'nope'" in capsys.readouterr().err
    assert run(db_url, "list-members")[1].count("\n") == 1  # ana was not added
    assert run(db_url, "add-member", "ana", "--team", "platform")[0] == 0
    assert run(db_url, "add-member", "bo", "--weekly-quota", "10")[0] == 0
    assert run(db_url, "set-member", "bo", "--team", "platform")[0] == 0
    assert run(db_url, "set-team", "platform", "--max-concurrent", "3", "--models", "")[0] == 0
    assert run(db_url, "set-team", "platform")[0] == 2
    assert "at least one setting" in capsys.readouterr().err
    text = run(db_url, "list-teams")[1]
    header, line = text.splitlines()
    assert header.split()[:2] == ["team", "5h"] and line.split() == [
        "platform", "-", "-", "-", "2000", "3", "*", "ana,bo",
    ]  # fmt: skip
    members = run(db_url, "list-members")[1].splitlines()
    assert members[0].split()[-1] == "team" and [m.split()[-1] for m in members[1:]] == [
        "platform",
        "platform",
    ]
    assert run(db_url, "set-member", "bo", "--team", "")[0] == 0
    assert run(db_url, "list-teams")[1].splitlines()[1].split()[-1] == "ana"


def test_list_members_is_unchanged_without_teams(db_url: str) -> None:
    run(db_url, "add-member", "ana", "--max-concurrent", "2")
    assert run(db_url, "list-members")[1].splitlines()[0].split()[-1] == "models"


def test_usage_by_team_counts_each_row_for_the_team_it_was_spent_under(db_url: str) -> None:
    run(db_url, "add-team", "platform")
    run(db_url, "add-team", "web")
    run(db_url, "add-member", "ana", "--team", "platform")
    run(db_url, "add-member", "bo")
    db = Database(db_url)
    ids = {m["name"]: m["id"] for m in db.members()}
    names = {v: k for k, v in teams.team_names(db).items()}
    now = int(time.time() * 1000)

    def row(member: str, team: str | None, tokens: int, ago: int) -> dict[str, Any]:
        r = usage_row({"member_id": ids[member], "key_id": "k"}, now - ago, tokens=tokens)
        return {**r, "team_id": names.get(team), "warmup": 0}

    db.insert_usage(
        [row("ana", "platform", 10, 3000), row("ana", "web", 7, 2000), row("bo", None, 5, 1000)]
    )
    db.dispose()
    code, text = run(db_url, "usage", "--by", "team", "--json")
    doc = json.loads(text)
    assert code == 0 and "members" not in doc
    assert {t["team"]: t["total_tokens"] for t in doc["teams"]} == {
        "platform": 10,
        "web": 7,
        "(no team)": 5,
    }
    table = run(db_url, "usage", "--by", "team")[1].splitlines()
    assert table[1].split()[0] == "team"
    assert [line.split()[:2] for line in table[2:6]] == [
        ["(no", "team)"], ["platform", "1"], ["web", "1"], ["TOTAL", "3"],
    ]  # fmt: skip
    by_member = json.loads(run(db_url, "usage", "--json")[1])
    assert {m["member"]: m["total_tokens"] for m in by_member["members"]} == {"ana": 17, "bo": 5}


# -- the quota gate ------------------------------------------------------------------------------


def in_team(core: GatewayCore, team: str, *members: dict[str, Any]) -> None:
    """Put ``members`` in ``team`` and mark their flows as MemberAuth would now."""
    assert core.db is not None
    for member in members:
        teams.set_member_team(core.db, member["member"], team)
    core.refresh_directory()
    for member in members:
        entry = core.directory.by_key_id(member["key_id"])
        assert entry is not None
        member.update(teams.team_marker(entry))


def team_usage(core: GatewayCore, member: dict[str, Any], ago_ms: int, tokens: int = 0, **kw):
    assert core.db is not None
    now = int(time.time() * 1000)
    row = usage_row(member, now - ago_ms, tokens, kw.get("credits_micro", 0))
    core.db.insert_usage([{**row, "team_id": member.get("team_id")}])


async def test_a_team_spent_refuses_a_member_whose_own_quota_is_not(setup) -> None:  # noqa: F811
    core, gate = setup
    assert core.db is not None
    teams.add_team(core.db, "platform", weekly_quota=100, max_concurrent=5)
    ana = add_member(core, "ana")
    bo = add_member(core, "bo", weekly_quota=1000)
    in_team(core, "platform", ana, bo)
    now = int(time.time() * 1000)
    team_usage(core, ana, 3_600_000, tokens=100)
    flow = member_flow(bo)
    await gate.request(flow)
    assert flow.response is not None and flow.response.status_code == 429
    error = error_of(flow)
    assert error["type"] == "usage_limit_reached" and error["team"] == "platform"
    assert error["message"].startswith(
        "team 'platform' of member 'bo' used 100 tokens of its weekly token quota of 100 tokens"
    )
    assert (
        error["resets_at"] == math.ceil((now - 3_600_000 + WEEK_MS) / 1000)
        or error["resets_at"] == math.ceil((now - 3_600_000 + WEEK_MS) / 1000) + 1
    )
    # The tighter of the two: the team's 100 % beats bo's own 0 %.
    assert flow.metadata[CODEX_LIMITS]["x-codex-secondary-used-percent"] == "100"
    assert flow.metadata[REFUSED] == "quota" and core.leases == {}
    # bo's own usage is untouched: out of the team, bo passes.
    in_team(core, "", bo)
    bo.pop("team", None), bo.pop("team_id", None)
    flow = member_flow(bo)
    await gate.request(flow)
    assert flow.response is None and flow.metadata[ALLOWED] is True


async def test_a_member_over_its_own_quota_in_a_team_under_it_names_the_member(setup) -> None:  # noqa: F811
    core, gate = setup
    assert core.db is not None
    teams.add_team(core.db, "platform", five_hour_quota=1000)
    ana = add_member(core, "ana", five_hour_quota=50)
    in_team(core, "platform", ana)
    team_usage(core, ana, 60_000, tokens=60)
    flow = member_flow(ana)
    await gate.request(flow)
    error = error_of(flow)
    assert error["message"].startswith("member 'ana' used 60 tokens") and "team" not in error
    assert flow.metadata[CODEX_LIMITS]["x-codex-primary-used-percent"] == "120"


async def test_pending_rows_of_a_team_count_at_once_and_credits_show_the_fewer_left(setup) -> None:  # noqa: F811
    core, gate = setup
    assert core.db is not None
    teams.add_team(core.db, "platform", weekly_credits_micro=10_000_000)
    ana = add_member(core, "ana", weekly_credits_micro=5_000_000)
    bo = add_member(core, "bo")
    in_team(core, "platform", ana, bo)
    now = int(time.time() * 1000)
    row = usage_row(bo, now - 1000, 0, 8_000_000)  # bo's, not yet written
    core.ledger.add({**row, "team_id": bo["team_id"]})  # type: ignore[union-attr]
    flow = member_flow(ana)
    await gate.request(flow)
    assert flow.response is None
    # ana has 5 of its own left, the team 2: Codex is shown 2.
    assert flow.metadata[CODEX_LIMITS]["x-codex-credits-balance"] == "2"
    assert flow.metadata[CODEX_LIMITS]["x-codex-secondary-used-percent"] == "80"


async def test_the_team_slots_are_shared_and_the_refusal_names_the_team(setup) -> None:  # noqa: F811
    core, gate = setup
    assert core.db is not None
    teams.add_team(core.db, "platform", max_concurrent=2)
    ana = add_member(core, "ana")
    bo = add_member(core, "bo", max_concurrent=5)
    in_team(core, "platform", ana, bo)
    flows = [member_flow(ana), member_flow(bo), member_flow(bo)]
    for flow in flows:
        await gate.request(flow)
    assert [f.response is None for f in flows] == [True, True, False]
    last = flows[2]
    assert last.response is not None and last.response.status_code == 429
    assert last.response.headers["retry-after"] == str(CONCURRENCY_RETRY_S)
    error = error_of(last)
    assert error["code"] == "concurrency_limit" and error["team"] == "platform"
    assert error["message"] == (
        "team 'platform' of member 'bo' already has 2 requests in flight (max_concurrent 2)"
    )
    # A slot given back is the team's again.
    await core.give_back_lease(flows[0].id)
    again = member_flow(bo)
    await gate.request(again)
    assert again.response is None


async def test_a_team_with_a_quota_and_no_max_concurrent_gets_the_default_slots(setup) -> None:  # noqa: F811
    core, gate = setup
    assert core.db is not None
    core.quota_concurrency = 1
    teams.add_team(core.db, "platform", weekly_quota=1000)
    ana, bo = add_member(core, "ana"), add_member(core, "bo")
    in_team(core, "platform", ana, bo)
    first, second = member_flow(ana), member_flow(bo)
    await gate.request(first)
    await gate.request(second)
    assert first.response is None
    assert "quota_max_concurrent, the gateway's default for a team" in error_of(second)["message"]
    entry = core.directory.by_key_id(ana["key_id"])
    assert entry is not None and entry[teams.TEAM_MODELS] == ""  # for the models check


async def test_rows_and_refusals_carry_the_team_they_were_spent_under(setup) -> None:  # noqa: F811
    core, _gate = setup
    assert core.db is not None
    teams.add_team(core.db, "platform")
    ana = add_member(core, "ana")
    in_team(core, "platform", ana)
    facts = TurnFacts("gpt-5.5", None, "/v1/responses", 200, None, 0, None, None, 1.0, 2.0, 1, "a")
    assert ledger_row(core, ana, facts)["team_id"] == ana["team_id"]
    record_refusal(core, ana, "quota_exceeded", 429, "/v1/responses")
    core.ledger.flush()  # type: ignore[union-attr]
    (refusal,) = core.db.refusal_rows(0)
    assert refusal["team_id"] == ana["team_id"]
    sample = core.metrics.registry.get_sample_value(
        "codex_gateway_team_refused_total", {"team": "platform", "kind": "quota"}
    )
    assert sample == 1
    # A member in no team: its rows name none (and the row has the column, empty).
    bo = add_member(core, "bo")
    assert ledger_row(core, bo, facts)["team_id"] is None
    assert TABLE not in ledger_row(core, bo, facts) and REFUSALS


def test_a_moved_member_leaves_its_usage_with_its_old_team(tmp_path) -> None:
    db = Database(f"sqlite:///{tmp_path / 'g.db'}")
    db.migrate()
    old = teams.add_team(db, "old")
    new = teams.add_team(db, "new")
    member_id = db.add_member("ana")
    now = int(time.time() * 1000)
    row = usage_row({"member_id": member_id, "key_id": "k"}, now - 1000, tokens=40)
    db.insert_usage([{**row, "team_id": old}])
    teams.set_member_team(db, "ana", "new")
    assert db.window_usage(old, now, "team_id")["weekly"]["tokens"] == 40
    assert db.window_usage(new, now, "team_id")["weekly"]["tokens"] == 0
    assert db.window_usage(member_id, now)["weekly"]["tokens"] == 40
    with pytest.raises(DatabaseError, match="no team named"):
        teams.set_member_team(db, "ana", "ghost")
    db.dispose()


def test_the_team_lease_counts_the_member_and_the_team_in_one_step(tmp_path) -> None:
    db = Database(f"sqlite:///{tmp_path / 'g.db'}")
    db.migrate()
    team = teams.add_team(db, "platform")
    a, b = db.add_member("a"), db.add_member("b")
    first = teams.acquire_lease(db, a, 1, team, 2, "i", 60_000)
    assert first[0] is not None and first[1:] == (1, 1)
    assert teams.acquire_lease(db, a, 1, team, 2, "i", 60_000)[1:] == (1, None)  # a is full
    second = teams.acquire_lease(db, b, 0, team, 2, "i", 60_000)
    assert second[0] is not None and second[1:] == (1, 2)
    assert teams.acquire_lease(db, b, 0, team, 2, "i", 60_000) == (None, 1, 2)  # team full
    db.release_leases([second[0]])
    assert teams.acquire_lease(db, b, 0, team, 2, "i", 60_000)[0] is not None
    # An expired lease (a crashed instance's) frees its team slot.
    assert teams.acquire_lease(db, b, 0, team, 3, "i", -1)[0] is not None
    assert teams.acquire_lease(db, b, 0, team, 3, "i", 60_000)[0] is not None
    db.dispose()


def test_member_marker_is_unchanged_without_a_team() -> None:
    assert teams.team_marker({"member": "a", "member_id": 1}) == {}
    marker = {"member": "a", "team": "x", "team_id": 3}
    teams.refresh_marker(marker, {"team_id": 4, "team": "y"})
    assert marker == {"member": "a", "team": "y", "team_id": 4}
    teams.refresh_marker(marker, {})
    assert marker == {"member": "a"} and MEMBER


def test_a_member_whose_models_and_its_teams_share_none_is_warned_of(db_url: str, capsys) -> None:
    assert run(db_url, "add-team", "interns", "--models", "gpt-5.6-luna")[0] == 0
    capsys.readouterr()
    assert run(db_url, "add-member", "ivy", "--team", "interns", "--models", "gpt-6-*")[0] == 0
    err = capsys.readouterr().err
    assert "warning: member 'ivy' may use gpt-6-* and its team 'interns' allows gpt-5.6-luna" in err
    assert run(db_url, "set-member", "ivy", "--models", "gpt-5.6-*")[0] == 0
    assert "warning" not in capsys.readouterr().err
    assert run(db_url, "add-member", "jo", "--team", "interns")[0] == 0  # no list of his own
    assert "warning" not in capsys.readouterr().err
    assert run(db_url, "set-team", "interns", "--models", "gpt-6-sol")[0] == 0
    err = capsys.readouterr().err
    assert "member 'ivy' may use gpt-5.6-*" in err and "'jo'" not in err
