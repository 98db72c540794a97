"""Gateway mode, unit level: member keys, windows, the key pool, the database, config."""

from __future__ import annotations

import io
from decimal import Decimal
from fractions import Fraction

import pytest
import sqlalchemy as sa
from hypothesis import given, settings
from hypothesis import strategies as st

from addons.codex_models import catalog as codex_catalog
from addons.codex_models import parse as parse_catalog
from addons.codex_models import trim
from addons.credits import parse_rate_card
from addons.gateway_mode import keypool, members, windows
from addons.gateway_mode.config import (
    load_gateway_config,
    parse_gateway_config,
    rate_card_gap_lines,
    rate_card_gaps,
)
from addons.gateway_mode.database import Database, DatabaseError, parse_database_url
from addons.gateway_mode.schema import metadata
from tests.conftest import ROOT

# -- member keys --------------------------------------------------------------------------------


def test_new_member_keys_have_the_documented_shape_and_differ() -> None:
    keys = {members.new_member_key() for _ in range(50)}
    assert len(keys) == 50
    assert all(members.KEY_PATTERN.fullmatch(k) for k in keys)
    assert all(k.startswith("sk-codex-gw-") and len(k) == 55 for k in keys)


@pytest.mark.parametrize(
    "value",
    [
        None,
        "",
        "Bearer",
        "Basic sk-codex-gw-" + "a" * 43,
        "Bearer sk-codex-gw-" + "a" * 42,
        "Bearer sk-codex-gw-" + "a" * 44,
        "Bearer sk-codex-gw-" + "a" * 42 + "'",
        "Bearer sk-codex-gw-' OR '1'='1'; DROP TABLE members; --",
        "Bearer sk-codex-gw-" + "a" * 43 + " extra",
        "Bearer  sk-codex-gw-" + "a" * 43,
        "Bearer sk-codex-gw-" + "a" * 5000,
        "Bearer sk-test-other-key",
    ],
)
def test_malformed_member_keys_are_not_keys(value: str | None) -> None:
    assert members.bearer_member_key(value) is None


def test_a_well_formed_member_key_is_read_in_any_scheme_case() -> None:
    key = members.new_member_key()
    assert members.bearer_member_key(f"Bearer {key}") == key
    assert members.bearer_member_key(f"bearer {key}") == key


def test_key_hash_is_sha256_hex_and_compared_in_constant_time() -> None:
    digest = members.key_hash("sk-codex-gw-x")
    assert len(digest) == 64 and int(digest, 16) >= 0
    assert members.same_hash(digest, members.key_hash("sk-codex-gw-x"))
    assert not members.same_hash(digest, members.key_hash("sk-codex-gw-y"))


@pytest.mark.parametrize(
    "name", ["", "-x", "a b", "a;b", "x" * 65, "robert'); DROP TABLE members;--", "é", "a\nb"]
)
def test_hostile_member_names_are_refused(name: str) -> None:
    with pytest.raises(ValueError, match="invalid member name"):
        members.check_name(name)


@pytest.mark.parametrize("name", ["alice", "ci-runner.7", "bob@example.com", "A" * 64])
def test_member_names(name: str) -> None:
    assert members.check_name(name) == name


# -- quota windows ------------------------------------------------------------------------------


def test_reset_is_when_the_oldest_rows_have_left_the_window() -> None:
    now = 10 * windows.HOUR_MS
    rows = [(now - 4 * windows.HOUR_MS, 60), (now - 1 * windows.HOUR_MS, 50)]
    # 110 used, limit 100: the first row (60) must leave: at its time + 5 h = now + 1 h.
    assert windows.reset_in_ms(rows, 100, windows.FIVE_HOURS_MS, now) == windows.HOUR_MS
    # limit 40: both must leave; the second leaves at now + 4 h.
    assert windows.reset_in_ms(rows, 40, windows.FIVE_HOURS_MS, now) == 4 * windows.HOUR_MS
    assert windows.retry_after_seconds(1) == 1
    assert windows.retry_after_seconds(3_600_001) == 3601


@given(
    st.lists(
        st.tuples(st.integers(0, windows.FIVE_HOURS_MS - 1), st.integers(1, 10_000)), max_size=30
    ),
    st.integers(1, 50_000),
)
def test_after_the_reset_time_usage_is_below_the_limit(
    rows: list[tuple[int, int]], limit: int
) -> None:
    now = windows.FIVE_HOURS_MS
    wait = windows.reset_in_ms(rows, limit, windows.FIVE_HOURS_MS, now)
    later = now + wait
    left = sum(a for ts, a in rows if ts + windows.FIVE_HOURS_MS > later)
    assert left < limit or wait == windows.FIVE_HOURS_MS
    assert wait >= 1000


def test_since_values() -> None:
    now = 1_000 * windows.WEEK_MS
    assert windows.parse_since("5h", now) == now - windows.FIVE_HOURS_MS
    assert windows.parse_since("7d", now) == now - windows.WEEK_MS
    assert windows.parse_since("2026-12-01T00:00:00Z", now) == 1_796_083_200_000
    assert windows.parse_since("2026-12-01T00:00:00", now) == 1_796_083_200_000
    with pytest.raises(ValueError, match="--since"):
        windows.parse_since("yesterday", now)


# -- upstream key pool --------------------------------------------------------------------------


def test_upstream_keys_from_stdin_named_or_bare() -> None:
    keys = keypool.read_upstream_keys(
        io.BytesIO(b"main sk-a_1\n\n# comment\nsk-b-2\r\nspare sk-c\n")
    )
    assert [k.name for k in keys] == ["main", "key-2", "spare"]
    assert keys[0].header_value() == "Bearer sk-a_1"
    assert "sk-a_1" not in repr(keys[0]) and "sk-a_1" not in str(keys)


@pytest.mark.parametrize(
    ("data", "message"),
    [
        (b"", "must be provided"),
        (b"\n\n", "must be provided"),
        (b"a b c\n", "line 1: expected NAME KEY"),
        (b"ok sk-1\nbad! sk-SECRETVALUE\n", "line 2: a key name"),
        (b"n sk-SECRET$VALUE\n", "line 1: API key may only contain"),
        (b"n " + b"k" * 1017 + b"\n", "longer than 1016"),
        (b"n sk-1\nn sk-2\n", "duplicate key name 'n'"),
    ],
)
def test_bad_key_lists_are_refused_without_echoing_them(data: bytes, message: str) -> None:
    with pytest.raises(keypool.UpstreamKeyError, match=message) as info:
        keypool.read_upstream_keys(io.BytesIO(data))
    assert "SECRET" not in str(info.value)


def _pool(*names: str) -> keypool.KeyPool:
    pool = keypool.KeyPool()
    pool.set_keys([keypool.UpstreamKey(n, bytearray(b"sk-" + n.encode())) for n in names])
    return pool


def test_pick_prefers_the_least_busy_key_and_keeps_a_session_on_its_key() -> None:
    pool = _pool("a", "b")
    first = pool.pick("s1")
    assert first is not None
    other = pool.pick("s2")
    assert other is not None and other.name != first.name  # least in flight
    again = pool.pick("s1")
    assert again is not None and again.name == first.name  # sticky while healthy
    pool.cool_down(first, 30, "429")
    moved = pool.pick("s1")
    assert moved is not None and moved.name == other.name
    assert pool.status().cooling == [first.name]


def test_disabled_and_cooling_keys_are_not_picked_and_cooling_ends() -> None:
    pool = _pool("a", "b")
    pool.disable(pool.keys[0], "401")
    pool.cool_down(pool.keys[1], 0.05, "429")
    assert pool.pick(None) is None
    status = pool.status()
    assert status.disabled == ["a"] and status.cooling == ["b"] and status.next_ready_s
    import time

    time.sleep(0.06)
    picked = pool.pick(None)
    assert picked is not None and picked.name == "b"
    assert pool.pick(None, exclude={"b"}) is None


# -- database -----------------------------------------------------------------------------------


@pytest.fixture
def db(tmp_path) -> Database:
    database = Database(f"sqlite:///{tmp_path / 'g.db'}")
    database.migrate()
    yield database
    database.dispose()


def test_migrations_build_exactly_the_declared_schema(db: Database) -> None:
    from alembic.autogenerate import compare_metadata
    from alembic.migration import MigrationContext

    with db.engine.connect() as conn:
        diff = compare_metadata(MigrationContext.configure(conn), metadata)
    assert diff == []
    assert db.migrate() == db.head()  # idempotent


def test_a_0001_ledger_upgrades_with_its_rows_kept(tmp_path) -> None:
    from alembic import command

    old = Database(f"sqlite:///{tmp_path / 'old.db'}")
    with old.engine.begin() as conn:
        command.upgrade(old._alembic_config(conn), "0001")
        conn.exec_driver_sql(
            "INSERT INTO members (name, five_hour_quota, weekly_quota, five_hour_credits_micro,"
            " weekly_credits_micro, max_concurrent, created_ms) VALUES ('a', 0, 0, 0, 0, 0, 1)"
        )
        conn.exec_driver_sql(
            "INSERT INTO usage (row_id, ts_ms, member_id, key_id, route, input_tokens,"
            " cached_tokens, output_tokens, reasoning_tokens, total_tokens, events, attempts,"
            " instance) VALUES ('r1', 5, 1, 'k', '/v1/responses', 3, 1, 2, 0, 5, 0, 1, 'i')"
        )
    assert old.revision() == "0001"
    assert old.migrate() == old.head()
    (row,) = old.usage_rows(0)
    assert row["total_tokens"] == 5 and row["cache_write_tokens"] == 0
    old.dispose()


def upgraded_from(tmp_path, url: str, revision: str, statements: list[str]) -> Database:
    """A database at ``revision`` holding the rows ``statements`` insert, migrated to head."""
    from alembic import command

    old = Database(url)
    with old.engine.begin() as conn:
        command.upgrade(old._alembic_config(conn), revision)
        for statement in statements:
            conn.exec_driver_sql(statement)
    assert old.revision() == revision
    assert old.migrate() == old.head() == "0009_identities"
    return old


#: Rows of a 0003 ledger: a member, a usage row, a socket's row.
ROWS_0003 = [
    "INSERT INTO members (name, five_hour_quota, weekly_quota, five_hour_credits_micro,"
    " weekly_credits_micro, max_concurrent, created_ms) VALUES ('a', 0, 0, 0, 0, 0, 1)",
    "INSERT INTO usage (row_id, ts_ms, member_id, key_id, route, input_tokens, cached_tokens,"
    " cache_write_tokens, output_tokens, reasoning_tokens, total_tokens, credits_micro, events,"
    " attempts, instance) VALUES ('r1', 5, 1, 'k', 'ws:/v1/responses', 3, 1, 0, 2, 0, 5, 170,"
    " 0, 1, 'i')",
    "INSERT INTO ws_connections (row_id, member_id, key_id, route, opened_ms, client_messages,"
    " upstream_messages, turns, instance) VALUES ('c1', 1, 'k', 'ws:/v1/responses', 4, 2, 3,"
    " 2, 'i')",
]


def check_upgraded_0003(db: Database) -> None:
    """The 0003 rows survive 0004: the usage row is no warm-up, refusals start empty and take
    rows, with and without a member."""
    (row,) = db.usage_rows(0)
    assert row["total_tokens"] == 5 and row["credits_micro"] == 170 and row["warmup"] == 0
    assert [c["client_messages"] for c in db.ws_connection_rows(0)] == [2]
    assert db.refusal_rows(0) == []
    base = {"ts_ms": 9, "kind": "quota", "code": "quota_exceeded", "status": 429}
    base |= {"route": "/v1/responses", "model": None, "count": 1, "instance": "i"}
    db.insert_refusals(
        [
            {**base, "row_id": "f1", "member_id": 1, "key_id": "k"},
            {**base, "row_id": "f2", "member_id": None, "key_id": None, "count": 4},
        ]
    )
    assert [(r["member"], r["count"]) for r in db.refusal_rows(0)] == [("a", 1), (None, 4)]
    columns = {k: v for k, v in row.items() if k not in ("id", "member")}
    db.insert_usage([{**columns, "row_id": "r2", "duration_ms": 5, "warmup": 1}])
    assert [r["warmup"] for r in db.usage_rows(0)] == [0, 1]


def test_a_0003_ledger_upgrades_to_0004_in_place_with_its_rows_kept(tmp_path) -> None:
    old = upgraded_from(tmp_path, f"sqlite:///{tmp_path / 'old.db'}", "0003", ROWS_0003)
    check_upgraded_0003(old)
    old.dispose()


def test_an_uninitialised_database_is_refused_with_the_fix(tmp_path) -> None:
    fresh = Database(f"sqlite:///{tmp_path / 'new.db'}")
    with pytest.raises(DatabaseError, match="gateway init"):
        fresh.check_schema()


@pytest.mark.parametrize(
    ("url", "message"),
    [
        ("postgresql://u:secret@h/db", "must not carry a password"),
        ("mysql://u@h/db", "unsupported database"),
        ("nonsense", "not a database URL"),
    ],
)
def test_database_urls(url: str, message: str) -> None:
    with pytest.raises(ValueError, match=message) as info:
        parse_database_url(url)
    assert "secret" not in str(info.value)
    assert parse_database_url("postgresql://u@h/db").drivername == "postgresql+psycopg"


def test_members_keys_and_revocation(db: Database) -> None:
    db.add_member("alice", five_hour_quota=10)
    with pytest.raises(DatabaseError, match="already exists"):
        db.add_member("alice")
    key_id, key = db.add_key("alice")
    (entry,) = db.directory()
    assert entry["key_hash"] == members.key_hash(key) and entry["five_hour_quota"] == 10
    with db.engine.connect() as conn:
        stored = conn.execute(sa.text("select * from member_keys")).all()
    assert key not in repr(stored)
    db.revoke_key(key_id)
    assert db.directory() == []
    assert db.list_keys("alice")[0]["revoked_ms"] is not None
    with pytest.raises(DatabaseError, match="no key"):
        db.revoke_key("mk_nope")
    with pytest.raises(DatabaseError, match="no member"):
        db.add_key("bob")


def test_leases_cap_concurrency_and_expire(db: Database) -> None:
    member_id = db.add_member("carol", max_concurrent=2)
    a, _ = db.acquire_lease(member_id, 2, "i1", 60_000)
    b, _ = db.acquire_lease(member_id, 2, "i2", 60_000)
    assert a and b
    assert db.acquire_lease(member_id, 2, "i1", 60_000) == (None, 2)
    db.release_leases([a])
    c, active = db.acquire_lease(member_id, 2, "i1", 1)  # expires at once
    assert c and active == 2
    import time

    time.sleep(0.01)
    d, active = db.acquire_lease(member_id, 2, "i1", 60_000)
    assert d and active == 2  # c expired (a crashed instance's slot) and was reclaimed


def _row(member_id: int, row_id: str, ts: int, total: int, credits: int | None) -> dict:
    return {
        "row_id": row_id,
        "ts_ms": ts,
        "member_id": member_id,
        "key_id": "k",
        "route": "/v1/responses",
        "input_tokens": 0,
        "cached_tokens": 0,
        "output_tokens": 0,
        "reasoning_tokens": 0,
        "total_tokens": total,
        "credits_micro": credits,
        "events": 0,
        "attempts": 1,
        "instance": "t",
    }


def test_usage_rows_land_once_and_sum_per_window(db: Database) -> None:
    member_id = db.add_member("dave")
    now = 100 * windows.WEEK_MS
    rows = [
        _row(member_id, "r1", now - 1000, 10, 5),
        _row(member_id, "r2", now - 6 * windows.HOUR_MS, 20, None),  # weekly only, unpriced
        _row(member_id, "r3", now - 8 * 24 * windows.HOUR_MS, 40, 7),  # outside both
        # A row of this release (cache writes) after rows spooled by an older one (none).
        {**_row(member_id, "r4", now - 9 * 24 * windows.HOUR_MS, 1, 1), "cache_write_tokens": 4},
    ]
    db.insert_usage(rows)
    db.insert_usage(rows)  # re-sent after an outage: no duplicates
    assert [r["cache_write_tokens"] for r in db.usage_rows(0)] == [4, 0, 0, 0]
    assert db.window_usage(member_id, now) == {
        "five_hour": {"tokens": 10, "credits": 5, "oldest": now - 1000},
        "weekly": {"tokens": 30, "credits": 5, "oldest": now - 6 * windows.HOUR_MS},
    }


@settings(max_examples=40, deadline=None)
@given(
    st.lists(
        st.tuples(st.integers(0, 10**7), st.integers(0, 10**6), st.integers(0, 10**6)),
        min_size=1,
        max_size=60,
    )
)
def test_credits_stored_as_micro_credits_sum_without_drift(
    usages: list[tuple[int, int, int]],
) -> None:
    from addons.credits import parse_rate_card

    card = parse_rate_card(
        {"rates": {"m": {"input": 43.75, "cached_input": 4.375, "output": 350.0}}}
    )
    micro = []
    exact = Fraction(0)
    for inp, cached, out in usages:
        cached = min(cached, inp)
        charge = card.charge("m", {"input": inp, "cached": cached, "output": out}, None)
        assert charge is not None
        micro.append(int(charge.credits * windows.MICRO))
        exact += Fraction(charge.credits)
    # integer micro-credits add up to exactly the sum of the per-row Decimal charges
    assert Fraction(sum(micro), windows.MICRO) == exact
    assert Decimal(sum(micro)) / windows.MICRO == sum(
        (Fraction(m, windows.MICRO) for m in micro), Fraction(0)
    )


# -- config -------------------------------------------------------------------------------------


def test_shipped_gateway_config_carries_todays_rate_card() -> None:
    import yaml

    config = load_gateway_config(str(ROOT / "config" / "gateway.yaml"))
    shipped = yaml.safe_load((ROOT / "config" / "codex-rate-card.yaml").read_text())
    published = {k: v for k, v in config.credits["rates"].items() if k in shipped["rates"]}
    assert published == shipped["rates"]
    # Beyond the published card: only the operator's estimates, each a same_as marked so.
    estimates = {k: v for k, v in config.credits["rates"].items() if k not in shipped["rates"]}
    assert estimates and all(v == {"same_as": "gpt-5.5"} for v in estimates.values())
    text = (ROOT / "config" / "gateway.yaml").read_text()
    for model in estimates:
        (line,) = [ln for ln in text.splitlines() if ln.strip().startswith(f"{model}:")]
        assert "# ESTIMATE" in line, line
    assert "ESTIMATES, owned by the operator: NOT published rates" in text
    # So Codex's default model is priced out of the box (the quick start's member is served),
    # and only the catalog's hidden models are left unpriced.
    card = config.rate_card()
    snapshot = codex_catalog()
    assert card.prices(snapshot.default_model)
    assert {g["model"] for g in rate_card_gaps(card)} == set(snapshot.slugs()) - set(
        snapshot.slugs(listed_only=True)
    )
    assert config.credits["fast_mode_multiplier"] == shipped["fast_mode_multiplier"]
    assert config.credits["usd_per_credit"] == shipped["usd_per_credit"]


def test_the_shipped_config_keeps_its_data_outside_the_package(monkeypatch, tmp_path) -> None:
    """The shipped config (a checkout's config/, an installed package's default_config/):
    gateway.db and the spool go to $XDG_DATA_HOME/codex-proxy, else ~/.local/share/codex-proxy;
    the operator's own config keeps them beside it; a relative YAML sqlite path is read there."""
    from addons.gateway_mode.config import DEFAULT_GATEWAY_CONFIG

    monkeypatch.setenv("XDG_DATA_HOME", str(tmp_path / "xdg"))
    shipped = load_gateway_config(DEFAULT_GATEWAY_CONFIG)
    assert shipped.database_url() == f"sqlite:///{tmp_path}/xdg/codex-proxy/gateway.db"
    assert shipped.spool_path() == f"{tmp_path}/xdg/codex-proxy/gateway-spool.jsonl"
    via_checkout = load_gateway_config(str(ROOT / "config" / "gateway.yaml"))
    assert via_checkout.database_url() == shipped.database_url()
    monkeypatch.setenv("XDG_DATA_HOME", "relative/ignored")  # the XDG spec ignores it
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    assert shipped.database_url() == (
        f"sqlite:///{tmp_path}/home/.local/share/codex-proxy/gateway.db"
    )
    own = tmp_path / "team" / "gateway.yaml"
    own.parent.mkdir()
    own.write_text("spool: s.jsonl\n")
    assert load_gateway_config(str(own)).database_url() == f"sqlite:///{own.parent}/gateway.db"
    assert load_gateway_config(str(own)).spool_path() == f"{own.parent}/s.jsonl"
    own.write_text("database: sqlite:///data/gw.db\n")
    assert load_gateway_config(str(own)).database_url() == f"sqlite:///{own.parent}/data/gw.db"
    for url in ("sqlite:////abs/gw.db", "sqlite:///:memory:", "postgresql://u@h/db"):
        own.write_text(f"database: '{url}'\n")
        assert load_gateway_config(str(own)).database_url() == url


def test_database_messages_name_the_resolved_path(monkeypatch, tmp_path) -> None:
    monkeypatch.chdir(tmp_path)
    missing = Database("sqlite:///sub/x.db", create=False)
    with pytest.raises(DatabaseError) as info:
        missing.check_schema()
    message = str(info.value)
    assert message.startswith(f"no database at {tmp_path}/sub/x.db (sqlite:///sub/x.db is "
                              "relative to the current directory; for /sub/x.db write "
                              "sqlite:////sub/x.db): run `")  # fmt: skip
    assert message.endswith(" gateway init` first")
    assert not (tmp_path / "sub" / "x.db").exists()  # the check created nothing
    empty = tmp_path / "empty.db"
    empty.touch()
    with pytest.raises(DatabaseError, match=f"schema is at nothing, not .*, in {empty}: run"):
        Database(f"sqlite:///{empty}").check_schema()
    assert Database("postgresql://u@h/db").location == "postgresql://u@h/db"


def test_the_gateway_command_names_the_database_it_could_not_open(
    tmp_path, capsys, monkeypatch
) -> None:
    from addons.gateway_mode import cli as gateway_cli

    monkeypatch.delenv("CODEX_PROXY_PROG", raising=False)  # as the console script

    blocker = tmp_path / "a-file"
    blocker.touch()
    argv = ["--database", f"sqlite:///{blocker}/sub/gw.db", "init"]
    assert gateway_cli.main(argv) == 2
    err = capsys.readouterr().err
    assert err == (
        f"codex-proxy gateway: error: cannot create the directory of {blocker}/sub/gw.db: "
        "Not a directory\n"
    )
    closed = "postgresql://gw@127.0.0.1:9/gw"
    assert gateway_cli.main(["--database", closed, "list-members"]) == 1
    err = capsys.readouterr().err
    assert err.startswith(f"codex-proxy gateway: database error in {closed}: OperationalError: "), (
        err
    )


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("upstream_key: sk-x\n", "only read from stdin"),
        ("max_attempts: 0\n", "max_attempts must be >= 1"),
        ("max_attempts: true\n", "wrong type"),
        ("credits: {rates: {m: {input: 1}}}\n", "needs exactly"),
        ("quota_max_concurrent: -1\n", "between 0 and 10000"),
    ],
)
def test_bad_gateway_configs(text: str, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        parse_gateway_config(text, "/x/gateway.yaml")


def test_add_member_states_how_far_its_quota_can_be_overshot() -> None:
    from addons.gateway_mode.windows import overshoot_note

    assert parse_gateway_config("", "/x/gateway.yaml").quota_max_concurrent == 4
    assert overshoot_note({"max_concurrent": 0}, 4) is None  # no quota: nothing to bound
    note = overshoot_note({"five_hour_quota": 500, "max_concurrent": None}, 4)
    assert note is not None and "plus what 4 requests in flight use" in note
    assert "quota_max_concurrent default" in note
    note = overshoot_note({"weekly_credits_micro": 5, "max_concurrent": 2}, 4)
    assert note is not None and "plus what 2 requests" in note and "--max-concurrent" in note
    note = overshoot_note({"weekly_quota": 5, "max_concurrent": 0}, 0)
    assert note is not None and "without bound" in note


# -- addons, with mitmproxy's test helpers ------------------------------------------------------


def test_listen_policy_requires_tls_or_an_explicit_opt_in() -> None:
    from addons.gateway_mode.tls import listen_policy

    assert listen_policy("127.0.0.1", [], False) == "loopback"
    assert listen_policy("::1", [], False) == "loopback"
    assert listen_policy("0.0.0.0", ["*=/c.pem"], False) == "tls"
    assert listen_policy("10.0.0.5", [], True) == "insecure"
    with pytest.raises(ValueError, match="--insecure-listen"):
        listen_policy("", [], False)


def test_plain_http_is_refused_when_the_gateway_listens_with_tls() -> None:
    from mitmproxy.test import taddons, tflow

    from addons.gateway_mode.tls import ListenTls

    addon = ListenTls()
    with taddons.context(addon) as tctx:
        tctx.configure(addon, listen_host="0.0.0.0", certs=["*=/nonexistent.pem"])
        assert addon.policy == "tls"
        flow = tflow.tflow()
        flow.request.headers["authorization"] = "Bearer sk-codex-gw-" + "a" * 43
        flow.client_conn.timestamp_tls_setup = None
        addon.requestheaders(flow)
        assert flow.response is not None and flow.response.status_code == 403
        assert "authorization" not in flow.request.headers
        ok = tflow.tflow()
        ok.client_conn.timestamp_tls_setup = 1.0
        addon.requestheaders(ok)
        assert ok.response is None


@pytest.mark.parametrize(
    ("ua", "headers", "model", "codex"),
    [
        ("codex_exec/0.171.0", {}, "gpt-4o", True),
        ("curl/8", {"session-id": "s"}, "gpt-4o", True),
        ("curl/8", {"thread-id": "t"}, None, True),
        ("curl/8", {}, "GPT-5-Codex", True),
        ("curl/8", {}, "gpt-4o", False),
        (None, {}, None, False),
    ],
)
def test_the_codex_client_rule(ua, headers, model, codex) -> None:
    from mitmproxy.test import tflow

    from addons.gateway_mode.codex_filter import looks_like_codex

    request = tflow.tflow().request
    if ua:
        request.headers["user-agent"] = ua
    for k, v in headers.items():
        request.headers[k] = v
    assert looks_like_codex(request, model) is codex


@pytest.mark.parametrize(
    ("upstream", "path", "url"),
    [
        (
            "https://api.openai.com/v1/responses",
            "/v1/responses",
            "https://api.openai.com/v1/responses",
        ),
        (
            "https://api.openai.com/v1/responses",
            "/v1/responses/compact",
            "https://api.openai.com/v1/responses/compact",
        ),
        (
            "https://x.openai.azure.com/openai/responses?api-version=2025-04-01",
            "/v1/responses/compact",
            "https://x.openai.azure.com/openai/responses/compact?api-version=2025-04-01",
        ),
    ],
)
def test_route_urls(upstream: str, path: str, url: str) -> None:
    from addons.gateway_mode.forward import route_url

    assert route_url(upstream, path) == url


def test_retry_after_is_read_in_seconds_and_bounded() -> None:
    from mitmproxy.test import tutils

    from addons.gateway_mode.forward import retry_after_s

    response = tutils.tresp()
    assert retry_after_s(response, 30) == 30
    response.headers["retry-after"] = "12"
    assert retry_after_s(response, 30) == 12
    response.headers["retry-after"] = "99999"
    assert retry_after_s(response, 30) == 3600
    response.headers["retry-after"] = "Wed, 21 Oct 2015 07:28:00 GMT"
    assert retry_after_s(response, 30) == 30
    response.headers["retry-after"] = "nan"
    assert retry_after_s(response, 30) == 30


def test_reply_usage_from_sse_json_and_garbage() -> None:
    import json as _json

    from mitmproxy.test import tutils

    from addons.gateway_mode.accounting import reply_usage
    from tests.fake_upstream import encode_event, response_object, responses_sse_events

    sse = tutils.tresp(headers=[(b"content-type", b"text/event-stream")])
    sse.content = b"".join(encode_event(k, p) for k, p in responses_sse_events("hi", "m", "r1"))
    metered = reply_usage(sse)
    usage, events, status = metered.usage, metered.events, metered.turn_status
    assert usage is not None and usage["total"] == 59 and events > 3 and status == "completed"
    assert metered.unmetered is None
    js = tutils.tresp(headers=[(b"content-type", b"application/json")])
    js.content = _json.dumps(response_object("r2", "m", "hi")).encode()
    assert reply_usage(js).usage == usage
    bad = tutils.tresp(headers=[(b"content-type", b"application/json")])
    bad.content = b"{not json"
    # A 200 whose usage cannot be read says so (the row's error), never a silent 0.
    unread = reply_usage(bad)
    assert unread[:4] == (None, 0, None, "unmetered: the reply carries no usage")
    assert unread.response_id is None and unread.response_model is None
    assert reply_usage(None) == (None, 0, None, None, None, None)
    assert metered.response_id == "r1" and metered.response_model == "m"


def test_member_auth_removes_the_key_and_answers_401(tmp_path) -> None:
    import asyncio

    from mitmproxy.test import taddons, tflow

    from addons.common import ALLOWED
    from addons.gateway_mode.auth import MemberAuth
    from addons.gateway_mode.core import MEMBER, GatewayCore

    core = GatewayCore()
    key = members.new_member_key()
    core.directory.load(
        [{"key_id": "mk_1", "key_hash": members.key_hash(key), "member_id": 1, "member": "a"}]
    )
    addon = MemberAuth(core)
    with taddons.context(addon):
        for value, status in [(f"Bearer {key}", None), ("Bearer nope", 401), (None, 401)]:
            flow = tflow.tflow()
            flow.metadata[ALLOWED] = True
            if value:
                flow.request.headers["authorization"] = value
            asyncio.run(addon.requestheaders(flow))
            assert "authorization" not in flow.request.headers
            assert (flow.response.status_code if flow.response else None) == status
            assert (MEMBER in flow.metadata) is (status is None)
            assert (ALLOWED in flow.metadata) is (status is None)


# -- the admin CLI validates every number (issue 20) ------------------------------------------


@pytest.mark.parametrize(
    "args",
    [
        ["add-member", "z", "--five-hour-quota", "99999999999999999999999"],
        ["add-member", "z", "--weekly-quota", "1e3"],
        ["add-member", "z", "--weekly-quota", "1.5"],
        ["add-member", "z", "--weekly-quota", "-1"],
        ["add-member", "z", "--weekly-quota", "٣"],
        ["add-member", "z", "--weekly-credits", "1e400"],
        ["add-member", "z", "--weekly-credits", "nan"],
        ["add-member", "z", "--weekly-credits", "Infinity"],
        ["add-member", "z", "--five-hour-credits", "9223372036854.775808"],
        ["add-member", "z", "--five-hour-credits", "0.0000001"],
        ["add-member", "z", "--five-hour-credits", "1" * 5000],
        ["add-member", "z", "--max-concurrent", "99999999999"],
        ["set-member", "z", "--max-concurrent", "inf"],
        ["usage", "--since", "99999999999999999999999d"],
        ["usage", "--since", "0001-01-01"],
        ["serve", "--workers", "1e3"],
        ["serve", "--port", "99999999999999999999"],
    ],
)
def test_admin_numbers_out_of_range_exit_2_with_a_message(tmp_path, capsys, args):
    from addons.gateway_mode import cli

    database = f"sqlite:///{tmp_path / 'g.db'}"
    assert cli.main(["--database", database, "init"], out=io.StringIO()) == 0
    assert cli.main(["--database", database, "add-member", "z"], out=io.StringIO()) == 0
    capsys.readouterr()
    try:
        code = cli.main(["--database", database, *args], out=io.StringIO(), stdin=io.BytesIO())
    except SystemExit as e:  # argparse's own exit for a bad argument
        code = e.code
    err = capsys.readouterr().err
    assert code == 2, err
    assert "error:" in err and "Traceback" not in err


def test_admin_numbers_at_the_edges_are_stored_exactly(tmp_path):
    from addons.gateway_mode import cli
    from addons.gateway_mode.database import Database

    database = f"sqlite:///{tmp_path / 'g.db'}"
    assert cli.main(["--database", database, "init"], out=io.StringIO()) == 0
    args = ["--five-hour-quota", str(2**63 - 1), "--weekly-credits", "9223372036854.775807"]
    assert cli.main(["--database", database, "add-member", "z", *args], out=io.StringIO()) == 0
    assert cli.main(["--database", database, "usage", "--since", "5h"], out=io.StringIO()) == 0
    db = Database(database)
    (member,) = db.members()
    db.dispose()
    assert member["five_hour_quota"] == 2**63 - 1
    assert member["weekly_credits_micro"] == 2**63 - 1


# -- request facts: bombs and deep JSON (issue 20) --------------------------------------------


def test_request_facts_refuse_bombs_and_deep_json_naming_the_limit() -> None:
    import gzip

    from addons.body_decode import DecodeLimits
    from addons.gateway_mode.core import BodyRefused, parse_request_body

    body = b'{"model": "gpt-5.3-codex", "service_tier": "flex", "input": "hi"}'
    assert parse_request_body(gzip.compress(body), "gzip") == {
        "model": "gpt-5.3-codex",
        "service_tier": "flex",
    }
    assert parse_request_body(b"not json", None) == {"model": None, "service_tier": None}
    bomb = gzip.compress(bytes(64 * 1024 * 1024))
    with pytest.raises(BodyRefused) as refused:
        parse_request_body(bomb, "gzip", DecodeLimits(max_bytes=8 * 1024 * 1024))
    assert refused.value.status == 413 and refused.value.code == "request_too_large"
    assert refused.value.limit == "codex_decode_max_ratio"  # ~65 KB x 100 < 8 MiB
    assert "codex_decode_max_ratio" in str(refused.value)
    with pytest.raises(BodyRefused) as refused:
        parse_request_body(bomb, "gzip", DecodeLimits(max_bytes=2 * 1024 * 1024))
    assert refused.value.limit == "codex_decode_max_mib" and "2 MiB" in str(refused.value)
    with pytest.raises(BodyRefused) as refused:
        parse_request_body(b"[" * 50_000 + b"]" * 50_000, None)
    assert refused.value.status == 400 and refused.value.code == "json_too_deep"
    assert "1024 levels" in str(refused.value)


CATALOG = parse_catalog(
    trim(
        {
            "models": [
                {"slug": "m-hidden", "visibility": "hide", "priority": 0},
                {"slug": "m-default", "visibility": "list", "priority": 1},
                {"slug": "m-priced", "visibility": "list", "priority": 2},
            ]
        },
        "9.9.9",
    )
)


def test_rate_card_gaps_name_each_unpriced_catalog_model_with_its_key() -> None:
    card = parse_rate_card({"rates": {"m-priced": {"input": 1, "cached_input": 1, "output": 1}}})
    gaps = rate_card_gaps(card, CATALOG)
    assert gaps == [
        {"model": "m-hidden", "yaml_key": "credits.rates.m-hidden", "codex_default": False},
        {"model": "m-default", "yaml_key": "credits.rates.m-default", "codex_default": True},
    ]
    (line,) = rate_card_gap_lines(gaps, "/etc/gw.yaml", card)  # start-up and usage: one line
    assert "cannot price 2 model(s)" in line and "gateway usage --unpriced" in line
    assert "default m-default among them" in line
    lines = rate_card_gap_lines(gaps, "/etc/gw.yaml", card, full=True)  # usage --unpriced
    assert "cannot price 2 model(s)" in lines[0] and "/etc/gw.yaml" in lines[0]
    assert "  credits.rates.m-default  (Codex's default model)" in lines
    assert lines[-1].startswith("  e.g. credits.rates.m-default: {same_as: m-priced}")
    mapped = parse_rate_card(
        {
            "rates": {
                "m-priced": {"input": 1, "cached_input": 1, "output": 1},
                "default": {"same_as": "m-priced"},
            }
        }
    )
    assert rate_card_gaps(mapped, CATALOG) == [] and rate_card_gap_lines([], "x", mapped) == []
    averages = parse_rate_card(
        {"accounting": "message_average", "message_average": {"m-hidden": 1}}
    )
    assert [g["yaml_key"] for g in rate_card_gaps(averages, CATALOG)] == [
        "credits.message_average.m-default",
        "credits.message_average.m-priced",
    ]


# -- usage --------------------------------------------------------------------------------------


def _usage_row(member: str, **fields) -> dict:
    row = {
        "member": member,
        "status": 200,
        "error": None,
        "duration_ms": 5,
        "warmup": 0,
        "credits_micro": 17_100,
        **{
            f"{kind}_tokens": 0
            for kind in ("input", "cached", "cache_write", "output", "reasoning")
        },
        "total_tokens": 59,
    }
    row.update(fields)
    return row


def test_usage_counts_warmups_errors_refusals_and_never_shows_unpriced_as_zero() -> None:
    from addons.gateway_mode.cli import _usage_table, summarize_usage
    from addons.gateway_mode.ledger import IN_FLIGHT

    card = parse_rate_card({"rates": {"m": {"input": 1, "cached_input": 1, "output": 1}}})
    rows = [
        _usage_row("ann", warmup=1, total_tokens=0, credits_micro=None),  # Codex's warm-up
        _usage_row("ann"),
        # A reply whose usage could not be read: status 200, the error column says so.
        _usage_row("ann", error="usage unreadable", total_tokens=0, credits_micro=None),
        _usage_row("ann", status=502, error="upstream", total_tokens=0, credits_micro=None),
        _usage_row("ann", duration_ms=None, error=IN_FLIGHT, status=None),
        _usage_row("bo", credits_micro=None),  # unpriced, nothing priced
        _usage_row("cy", credits_micro=None),  # unpriced beside a priced row
        _usage_row("cy"),
    ]
    refusals = [
        {"member": "ann", "kind": "quota", "count": 1},
        {"member": "ann", "kind": "concurrency", "count": 2},
        {"member": "dee", "kind": "unpriced", "count": 1},
        {"member": None, "kind": "auth", "count": 40},
        {"member": "ann", "kind": "something new", "count": 1},
    ]
    summary = summarize_usage(rows, card, [], refusals)
    per = {m["member"]: m for m in summary["members"]}
    ann = per["ann"]
    assert (ann["requests"], ann["warmups"], ann["errors"], ann["in_flight"]) == (3, 1, 2, 1)
    assert ann["refused"] == 4 and ann["refusals"]["quota"] == 1
    assert ann["refusals"]["concurrency"] == 2 and ann["refusals"]["gateway"] == 1
    assert ann["unpriced"] == 0 and ann["credits"] == 0.0171 and ann["credits_complete"]
    assert per["bo"]["credits"] is None and per["bo"]["usd"] is None and per["bo"]["unpriced"] == 1
    assert per["cy"]["credits"] == 0.0171 and not per["cy"]["credits_complete"]
    assert per["dee"]["requests"] == 0 and per["dee"]["credits"] == 0.0  # nothing used: 0 is true
    assert summary["without_member"]["refusals"]["auth"] == 40
    total = summary["total"]
    assert total["refused"] == 45 and total["requests"] == 6 and total["warmups"] == 1
    assert total["credits"] == pytest.approx(0.0342) and not total["credits_complete"]
    out = io.StringIO()
    _usage_table(summary, out)
    lines = {line.split()[0]: line.split() for line in out.getvalue().splitlines()}
    assert lines["bo"][11:13] == ["unpriced", "unpriced"]
    assert lines["cy"][11] == ">=0.0171" and lines["ann"][11] == "0.0171"
    assert lines["member"][1:5] == ["requests", "warmups", "errors", "refused"]
