"""The audit log of admin changes (issue 32): one row per change, in the change's own
transaction, on SQLite and PostgreSQL; ``gateway audit``; keys that expire at the command
line; an older database upgraded in place."""

from __future__ import annotations

import io
import itertools
import json
import subprocess
import sys
import threading
import time
import uuid
from pathlib import Path
from typing import Any

import pytest
import sqlalchemy as sa

from addons.gateway_mode import audit, cli
from addons.gateway_mode.database import Database
from addons.gateway_mode.members import key_hash
from addons.gateway_mode.schema import audit_log, members
from tests.conftest import ROOT

HEAD = "0009_identities"


@pytest.fixture(params=["sqlite", "postgresql"])
def url(request, tmp_path: Path) -> str:
    """A fresh, empty database of each dialect (PostgreSQL: the session's ``pg_cluster``)."""
    if request.param == "sqlite":
        return f"sqlite:///{tmp_path / 'gateway.db'}"
    cluster = request.getfixturevalue("pg_cluster")
    name = f"gw_{uuid.uuid4().hex[:8]}"
    cluster.create_database(name)
    return cluster.url(name)


def gateway(url: str, *args: str, config: Path | None = None) -> tuple[int, str]:
    """One admin command in this process: ``(exit code, stdout)``."""
    out = io.StringIO()
    extra = ["--config", str(config)] if config else []
    code = cli.main([*extra, "--database", url, *args], out=out)
    return code, out.getvalue()


def audit_lines(url: str, *args: str) -> list[dict[str, Any]]:
    code, out = gateway(url, "audit", "--json", *args)
    assert code == 0
    return [json.loads(line) for line in out.splitlines()]


def test_every_admin_change_is_a_row_saying_who_what_and_the_values(url, monkeypatch) -> None:
    monkeypatch.setenv("LOGNAME", "opsuser")  # the OS user, when no --actor is given
    assert gateway(url, "init")[0] == 0
    assert (
        gateway(url, "--actor", "lead@corp", "add-member", "ann", "--weekly-quota", "500")[0] == 0
    )
    assert (
        gateway(url, "set-member", "ann", "--weekly-credits", "12.5", "--weekly-quota", "900")[0]
        == 0
    )
    code, key = gateway(url, "--actor", "lead@corp", "add-key", "ann", "--expires", "7d")
    assert code == 0
    key = key.strip()
    key_id = gateway(url, "list-keys")[1].splitlines()[-1].split()[0]
    assert gateway(url, "revoke-key", key_id)[0] == 0
    assert gateway(url, "revoke-key", key_id)[0] == 0  # already revoked: no change, no row
    assert gateway(url, "list-members")[0] == 0  # reading is no change

    rows = audit_lines(url)
    assert [(r["action"], r["target"], r["actor"]) for r in rows] == [
        ("init", "schema", "opsuser"),
        ("add-member", "ann", "lead@corp"),
        ("set-member", "ann", "opsuser"),
        ("add-key", key_id, "lead@corp"),
        ("revoke-key", key_id, "opsuser"),
    ]
    init, add, setm, addk, revoke = rows
    assert init["before"] is None and init["after"] == {"revision": HEAD}
    assert add["before"] is None and add["after"]["weekly_quota"] == 500
    assert setm["before"] == {"weekly_quota": 500, "weekly_credits_micro": 0}
    assert setm["after"] == {"weekly_quota": 900, "weekly_credits_micro": 12_500_000}
    assert addk["before"] is None and addk["after"]["member"] == "ann"
    assert addk["after"]["expires_at"].endswith("Z")
    assert revoke["before"] == {"member": "ann", "revoked_at": None}
    assert revoke["after"]["revoked_at"].endswith("Z")
    assert all(r["host"] for r in rows)
    assert [r["ts_ms"] for r in rows] == sorted(r["ts_ms"] for r in rows)
    # Never a secret: neither the key nor its hash is anywhere in the log.
    db = Database(url)
    with db.engine.connect() as conn:
        stored = json.dumps([list(r) for r in conn.execute(sa.select(audit_log)).all()])
    db.dispose()
    assert key not in stored and key_hash(key) not in stored

    code, table = gateway(url, "audit")
    assert code == 0
    assert "weekly_quota: 500 -> 900" in table and "weekly_credits_micro: 0 -> 12500000" in table
    assert "lead@corp" in table and key_id in table
    later = audit_lines(url, "--since", "2099-01-01")
    assert later == []
    assert (
        "no admin changes recorded since 2099" in gateway(url, "audit", "--since", "2099-01-01")[1]
    )


def test_team_changes_and_a_members_team_are_rows_too(url) -> None:
    assert gateway(url, "init")[0] == 0
    assert gateway(url, "add-member", "ann")[0] == 0
    args = ("--actor", "lead@corp")
    assert gateway(url, *args, "add-team", "platform", "--weekly-credits", "2000")[0] == 0
    assert gateway(url, *args, "set-team", "platform", "--models", "gpt-5.6-*")[0] == 0
    assert gateway(url, *args, "set-member", "ann", "--team", "platform")[0] == 0
    assert gateway(url, *args, "set-member", "ann", "--team", "")[0] == 0
    assert gateway(url, *args, "set-team", "nosuch", "--weekly-quota", "5")[0] != 0
    rows = [r for r in audit_lines(url) if r["actor"] == "lead@corp"]
    assert [(r["action"], r["target"]) for r in rows] == [
        ("add-team", "platform"),
        ("set-team", "platform"),
        ("set-member", "ann"),
        ("set-member", "ann"),
    ]
    add, models, join, leave = rows
    assert add["before"] is None and add["after"]["weekly_credits_micro"] == 2_000_000_000
    assert (models["before"], models["after"]) == ({"models": ""}, {"models": "gpt-5.6-*"})
    assert (join["before"], join["after"]) == ({"team": ""}, {"team": "platform"})
    assert (leave["before"], leave["after"]) == ({"team": "platform"}, {"team": ""})


def test_a_failed_change_leaves_no_audit_row(url) -> None:
    assert gateway(url, "init")[0] == 0
    assert gateway(url, "add-member", "ann")[0] == 0
    before = audit_lines(url)
    assert gateway(url, "add-member", "ann")[0] == 2  # exists
    assert gateway(url, "set-member", "nobody", "--weekly-quota", "1")[0] == 2
    assert gateway(url, "add-key", "nobody")[0] == 2
    assert gateway(url, "revoke-key", "mk_000000000000")[0] == 2
    assert gateway(url, "add-key", "ann", "--expires", "2001-01-01")[0] == 2  # in the past
    assert gateway(url, "--actor", "", "add-member", "bo")[0] == 2  # no actor: no change
    assert audit_lines(url) == before
    assert gateway(url, "list-keys", "ann")[1].count("\n") == 1  # the header alone


def test_the_audit_row_and_the_change_commit_together(url, monkeypatch) -> None:
    db = Database(url)
    db.migrate()
    try:
        # The row is written after the change, on its connection: when it fails, so does the
        # change (here: a refused secret, then a failure of the insert itself).
        with pytest.raises(ValueError, match="looks like a secret"):
            with db.engine.begin() as conn:
                conn.execute(members.insert().values(name="zed", created_ms=1))
                audit.record(conn, "me", "add-member", "zed", None, {"key_hash": "ab" * 32})
        assert db.members() == []

        def broken(conn: Any, *args: Any, **kwargs: Any) -> None:
            raise sa.exc.OperationalError("INSERT INTO audit_log", {}, Exception("disk full"))

        monkeypatch.setattr(audit, "record", broken)
        with pytest.raises(sa.exc.OperationalError):
            db.add_member("ann", weekly_quota=5)
        assert db.members() == []
        monkeypatch.undo()
        db.add_member("ann", weekly_quota=5, actor="me")
        monkeypatch.setattr(audit, "record", broken)
        with pytest.raises(sa.exc.OperationalError):
            db.set_member("ann", weekly_quota=9)
        with pytest.raises(sa.exc.OperationalError):
            db.add_key("ann")
        assert db.members()[0]["weekly_quota"] == 5 and db.list_keys() == []
        monkeypatch.undo()
        assert [r["action"] for r in db.audit_rows()] == ["init", "add-member"]
    finally:
        db.dispose()


@pytest.mark.parametrize(
    "values",
    [
        {"key": "anything"},
        {"Key_Hash": "x"},
        {"upstream": {"client_secret": "x"}},
        {"note": "sk-codex-gw-" + "A" * 43},
        {"keys": ["ok", "Bearer sk-codex-gw-" + "b" * 43]},
    ],
)
def test_a_secret_never_reaches_the_log(values, tmp_path) -> None:
    db = Database(f"sqlite:///{tmp_path / 'g.db'}")
    db.migrate()
    with pytest.raises(ValueError, match="audit: "), db.engine.begin() as conn:
        audit.record(conn, "me", "x", "y", None, values)
    with pytest.raises(ValueError, match="audit: "), db.engine.begin() as conn:
        audit.record(conn, "me", "x", "y", values, None)
    assert len(db.audit_rows()) == 1  # init's
    db.dispose()


def test_the_actor_is_the_flag_else_the_os_user(monkeypatch) -> None:
    assert audit.actor_name("  ci-bot ") == "ci-bot"
    for bad in ("", "   ", "a\nb", "x" * 129):
        with pytest.raises(ValueError, match="--actor"):
            audit.actor_name(bad)
    monkeypatch.setenv("LOGNAME", "dana")
    assert audit.actor_name(None) == "dana"

    def nameless() -> str:
        raise OSError("No username set in the environment")

    monkeypatch.setattr(audit.getpass, "getuser", nameless)
    assert audit.default_actor().startswith("uid:")


def test_describe_says_what_changed() -> None:
    assert audit.describe(None, {"b": 1, "a": "x"}) == 'a="x", b=1'
    assert audit.describe({"q": 1, "r": 2}, {"q": 3, "r": 2}) == "q: 1 -> 3"
    assert audit.describe({"q": 1}, {"q": 1}) == "(no change)"
    assert audit.describe({"q": 1}, None) == "q=1 (removed)"


# -- keys that expire at the command line ----------------------------------------------------


def test_list_keys_shows_each_keys_expiry(url) -> None:
    assert gateway(url, "init")[0] == 0
    assert gateway(url, "add-member", "ci")[0] == 0
    for expires in ("2027-01-31", "never", "12h"):
        assert gateway(url, "add-key", "ci", "--expires", expires)[0] == 0
    db = Database(url)
    keys = db.list_keys("ci")
    with db.engine.begin() as conn:  # the 12h key, moved into the past
        conn.execute(sa.text("UPDATE member_keys SET expires_ms = 5 WHERE id = :id"),
                     {"id": keys[2]["id"]})  # fmt: skip
    db.dispose()
    lines = gateway(url, "list-keys", "ci")[1].splitlines()
    assert lines[0].split() == ["id", "member", "created", "last", "used", "expires", "revoked"]
    assert "2027-01-31T23:59:59Z" in lines[1]
    assert lines[2].split()[4] == "never"
    assert "1970-01-01T00:00:00Z (expired)" in lines[3]


def test_add_key_says_when_the_key_expires(tmp_path, capfd) -> None:
    url = f"sqlite:///{tmp_path / 'g.db'}"
    gateway(url, "init")
    gateway(url, "add-member", "ci")
    capfd.readouterr()
    code, out = gateway(url, "add-key", "ci", "--expires", "2027-01-31")
    assert code == 0
    err = capfd.readouterr().err
    assert "(expires 2027-01-31 23:59 UTC)" in err and out.startswith("sk-codex-gw-")
    assert gateway(url, "add-key", "ci")[0] == 0
    assert "(never expires)" in capfd.readouterr().err
    code, _ = gateway(url, "add-key", "ci", "--expires", "yesterday")
    assert code == 2 and "--expires: expected a lifetime" in capfd.readouterr().err


def test_the_yaml_default_key_lifetime_applies_unless_expires_is_given(tmp_path) -> None:
    config = tmp_path / "gateway.yaml"
    config.write_text(
        (ROOT / "config" / "gateway.yaml").read_text() + "\ndefault_key_lifetime: 30d\n"
    )
    url = f"sqlite:///{tmp_path / 'g.db'}"
    assert gateway(url, "init", config=config)[0] == 0
    assert gateway(url, "add-member", "ci", config=config)[0] == 0
    started = int(time.time() * 1000)
    assert gateway(url, "add-key", "ci", config=config)[0] == 0
    ended = int(time.time() * 1000)
    assert gateway(url, "add-key", "ci", "--expires", "never", config=config)[0] == 0
    assert gateway(url, "add-key", "ci", "--expires", "7d", config=config)[0] == 0
    db = Database(url)
    default, never, week = (k["expires_ms"] for k in db.list_keys("ci"))
    db.dispose()
    day = 86_400_000
    assert started + 30 * day <= default <= ended + 30 * day
    assert never is None
    assert week < default - 20 * day
    config.write_text("default_key_lifetime: 30 days\n")
    code, _ = gateway(url, "list-keys", config=config)
    assert code == 2


# -- an older database upgrades in place -----------------------------------------------------

#: Rows of a 0004 database: a member, its live and its revoked key, a usage row, refusals.
ROWS_0004 = [
    "INSERT INTO members (name, five_hour_quota, weekly_quota, five_hour_credits_micro,"
    " weekly_credits_micro, max_concurrent, created_ms) VALUES ('a', 0, 700, 0, 0, 2, 1)",
    "INSERT INTO member_keys (id, member_id, key_hash, created_ms, last_used_ms) VALUES"
    " ('mk_live', 1, '1111111111111111111111111111111111111111111111111111111111111111', 2, 3)",
    "INSERT INTO member_keys (id, member_id, key_hash, created_ms, revoked_ms) VALUES"
    " ('mk_gone', 1, '2222222222222222222222222222222222222222222222222222222222222222', 2, 4)",
    "INSERT INTO usage (row_id, ts_ms, member_id, key_id, route, input_tokens, cached_tokens,"
    " cache_write_tokens, output_tokens, reasoning_tokens, total_tokens, credits_micro, events,"
    " attempts, instance, warmup) VALUES ('r1', 5, 1, 'mk_live', '/v1/responses', 3, 1, 0, 2,"
    " 0, 5, 170, 0, 1, 'i', 0)",
    "INSERT INTO refusals (row_id, ts_ms, member_id, key_id, kind, code, status, route, count,"
    " instance) VALUES ('f1', 6, 1, 'mk_live', 'quota', 'quota_exceeded', 429,"
    " '/v1/responses', 1, 'i')",
    "INSERT INTO refusals (row_id, ts_ms, kind, code, status, route, count, instance) VALUES"
    " ('f2', 7, 'auth', 'invalid_member_key', 401, '/v1/responses', 3, 'i')",
]


def test_a_0004_database_upgrades_in_place_with_its_rows_kept(url) -> None:
    from alembic import command

    old = Database(url)
    with old.engine.begin() as conn:
        command.upgrade(old._alembic_config(conn), "0004")
        for statement in ROWS_0004:
            conn.exec_driver_sql(statement)
    assert old.revision() == "0004"
    assert gateway(url, "--actor", "upgrader", "init")[0] == 0
    try:
        assert old.revision() == old.head() == HEAD
        assert [(m["name"], m["weekly_quota"], m["max_concurrent"]) for m in old.members()] == [
            ("a", 700, 2)
        ]
        keys = {k["id"]: k for k in old.list_keys()}
        assert keys["mk_live"]["last_used_ms"] == 3 and keys["mk_live"]["expires_ms"] is None
        assert keys["mk_gone"]["revoked_ms"] == 4
        # The live key still authenticates (it never expires); the revoked one stays out.
        assert [(d["key_id"], d["expires_ms"]) for d in old.directory()] == [("mk_live", None)]
        (row,) = old.usage_rows(0)
        assert row["total_tokens"] == 5 and row["credits_micro"] == 170
        assert [(r["member"], r["count"]) for r in old.refusal_rows(0)] == [("a", 1), (None, 3)]
        (init,) = old.audit_rows()
        assert init["actor"] == "upgrader" and init["action"] == "init"
        assert (init["before"], init["after"]) == ({"revision": "0004"}, {"revision": HEAD})
        # The new columns and table take rows.
        old.add_key("a", int(time.time() * 1000) + 60_000, actor="upgrader")
        old.revoke_key("mk_live", actor="upgrader")
        assert [r["action"] for r in old.audit_rows()] == ["init", "add-key", "revoke-key"]
        assert gateway(url, "init")[0] == 0  # idempotent: nothing changed, no row
        assert len(old.audit_rows()) == 3
    finally:
        old.dispose()


# -- several admin hosts at once -------------------------------------------------------------


def test_admin_processes_append_concurrently_and_each_row_follows_the_last(url) -> None:
    """Several admin processes (as from several hosts) change one member at once: every
    change is a row, and in commit order each row's ``before`` is the previous row's
    ``after`` (the read of the old values is in the change's transaction and locks the row
    on PostgreSQL; SQLite's ``BEGIN IMMEDIATE`` serialises)."""
    assert gateway(url, "init")[0] == 0
    assert gateway(url, "add-member", "shared")[0] == 0
    errors: list[str] = []

    def admin(i: int) -> None:
        for round_ in range(3):
            value = str(i * 100 + round_ + 1)
            proc = subprocess.run(
                [sys.executable, "-m", "addons.gateway_mode.cli", "--database", url,
                 "--actor", f"admin{i}", "set-member", "shared", "--weekly-quota", value],
                capture_output=True, text=True, timeout=120, cwd=ROOT, stdin=subprocess.DEVNULL,
            )  # fmt: skip
            if proc.returncode != 0:
                errors.append(proc.stderr)

    threads = [threading.Thread(target=admin, args=(i,)) for i in range(1, 5)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert errors == []
    db = Database(url)
    rows = sorted(
        (r for r in db.audit_rows() if r["action"] == "set-member"), key=lambda r: r["id"]
    )
    final = db.members()[0]["weekly_quota"]
    db.dispose()
    assert len(rows) == 12
    assert sorted(r["actor"] for r in rows) == sorted(
        f"admin{i}" for i in range(1, 5) for _ in range(3)
    )
    assert rows[0]["before"] == {"weekly_quota": 0}
    for previous, row in itertools.pairwise(rows):
        assert row["before"] == previous["after"]
    assert rows[-1]["after"] == {"weekly_quota": final}
