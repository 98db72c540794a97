"""The usage ledger keeps its promise (issue 20), unit level on SQLite: spools of any worker
count replayed and removed only once their rows are committed, a replay twice lands once,
in-flight rows completed by their finished rows, a database file deleted or replaced under
the ledger detected and reopened."""

from __future__ import annotations

import json
import os
import shutil
import threading
import uuid
from pathlib import Path

import pytest
import sqlalchemy as sa
from sqlalchemy.exc import OperationalError

from addons.gateway_mode.database import Database, collapse_rows
from addons.gateway_mode.ledger import (
    IN_FLIGHT,
    REFUSALS,
    WS_CONNECTIONS,
    UsageLedger,
    refusal_kind,
    spool_files,
)
from addons.gateway_mode.schema import usage, ws_connections
from tests.conftest import wait_for


@pytest.fixture
def url(tmp_path: Path) -> str:
    url = f"sqlite:///{tmp_path / 'g.db'}"
    db = Database(url)
    db.migrate()
    db.add_member("m")
    db.dispose()
    return url


def open_db(url: str) -> Database:
    db = Database(url, create=False)
    db.check_schema()
    return db


def row(row_id: str | None = None, finished: bool = True, total: int = 7) -> dict:
    return {
        "row_id": row_id or str(uuid.uuid4()),
        "ts_ms": 1_000,
        "member_id": 1,
        "key_id": "k",
        "upstream_key": "alpha",
        "model": "m",
        "route": "/v1/responses",
        "status": 200 if finished else None,
        "input_tokens": 0,
        "cached_tokens": 0,
        "output_tokens": 0,
        "reasoning_tokens": 0,
        "total_tokens": total if finished else 0,
        "credits_micro": None,
        "rate": None,
        "service_tier": None,
        "duration_ms": 5 if finished else None,
        "ttfb_ms": None,
        "events": 0,
        "attempts": 1,
        "error": None if finished else IN_FLIGHT,
        "instance": "t",
    }


def write_spool(path: Path, rows: list[dict]) -> None:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))


def stored(db: Database) -> list[dict]:
    with db.engine.connect() as conn:
        return [dict(r._mapping) for r in conn.execute(sa.select(usage)).all()]


class FailingDatabase(Database):
    """Refuses every insert (the database is away)."""

    def insert_usage(self, rows):  # type: ignore[override]
        raise OperationalError("insert", {}, Exception("down"))

    def insert_refusals(self, rows):  # type: ignore[override]
        raise OperationalError("insert", {}, Exception("down"))


def test_spools_of_any_worker_count_are_replayed_and_removed(tmp_path: Path, url: str) -> None:
    base = tmp_path / "gateway-spool.jsonl"
    rows = [row() for _ in range(10)]
    write_spool(Path(f"{base}.0"), rows[:4])  # written by --workers 2
    write_spool(Path(f"{base}.1"), rows[4:8])
    write_spool(Path(f"{base}.loaded"), rows[8:])  # an older version's renamed spool
    (tmp_path / "gateway-spool.jsonl.tmp-1").write_text("not a spool\n")
    assert len(spool_files(str(base))) == 3
    db = open_db(url)
    ledger = UsageLedger(db, str(base))  # now one worker
    ledger.start()
    wait_for(lambda: not spool_files(str(base)), 10, "spools removed")
    ledger.stop()
    assert sorted(r["row_id"] for r in stored(db)) == sorted(r["row_id"] for r in rows)
    assert (tmp_path / "gateway-spool.jsonl.tmp-1").exists()  # not ours to touch
    db.dispose()


def test_a_spool_stays_until_its_rows_are_committed(tmp_path: Path, url: str) -> None:
    base = tmp_path / "spool.jsonl"
    rows = [row() for _ in range(12)]
    write_spool(Path(f"{base}.0"), rows[:6])
    write_spool(Path(f"{base}.1"), rows[6:])
    # The database is away: the spools are claimed, not removed, and at exit every row goes
    # to this process's spool before the others are removed.
    down = FailingDatabase(url, create=False)
    down.check_schema()
    ledger = UsageLedger(down, f"{base}.0", str(base))
    ledger.start()
    assert Path(f"{base}.0").exists() and Path(f"{base}.1").exists()
    ledger.stop(timeout=1)
    down.dispose()
    assert spool_files(str(base)) == [f"{base}.0"]
    lines = Path(f"{base}.0").read_text().splitlines()
    assert sorted(json.loads(x)["row_id"] for x in lines) == sorted(r["row_id"] for r in rows)
    # A crash after reading (simulated: the rows are queued, the thread never flushes) keeps
    # the file; the next start replays it.
    crashed = UsageLedger(open_db(url), f"{base}.0", str(base))
    crashed._claim_spools()
    assert Path(f"{base}.0").exists()
    for claim in crashed._claims:
        os.close(claim.fd)  # the process "died": its flock goes with it
    db = open_db(url)
    ledger = UsageLedger(db, str(base))
    ledger.start()
    wait_for(lambda: not spool_files(str(base)), 10, "spool removed")
    ledger.stop()
    assert len(stored(db)) == 12
    db.dispose()


def test_a_spool_replayed_twice_lands_once(tmp_path: Path, url: str) -> None:
    rows = [row() for _ in range(5)]
    first = tmp_path / "s.jsonl"
    write_spool(first, rows)
    shutil.copy(first, tmp_path / "s.jsonl.3")
    with open(first, "a") as f:
        f.write('{"row_id": "cut-by-a-cra')  # a line cut by a crash mid-write
    db = open_db(url)
    for _ in range(2):
        ledger = UsageLedger(db, str(first))
        ledger.start()
        wait_for(lambda: not spool_files(str(first)), 10, "spools removed")
        ledger.stop()
        write_spool(first, rows)  # and once more
    assert len(stored(db)) == 5
    db.dispose()


def test_a_claimed_spool_is_not_replayed_by_another_worker(tmp_path: Path, url: str) -> None:
    base = tmp_path / "s.jsonl"
    write_spool(Path(f"{base}.0"), [row()])
    down = FailingDatabase(url, create=False)
    down.check_schema()
    first = UsageLedger(down, f"{base}.0", str(base))
    first._claim_spools()
    second = UsageLedger(open_db(url), f"{base}.1", str(base))
    second._claim_spools()
    assert len(first._claims) == 1 and second._claims == [] and second.pending() == 0
    for claim in first._claims:
        os.close(claim.fd)


def test_in_flight_rows_are_completed_by_their_finished_rows(url: str) -> None:
    db = open_db(url)
    a, b = str(uuid.uuid4()), str(uuid.uuid4())
    db.insert_usage([row(a, finished=False)])
    db.insert_usage([row(a, finished=True, total=59)])
    db.insert_usage([row(a, finished=False)])  # re-sent in-flight row: the finished one stays
    db.insert_usage([row(b, finished=False), row(b, finished=True, total=3)])  # one batch
    by_id = {r["row_id"]: r for r in stored(db)}
    assert by_id[a]["total_tokens"] == 59 and by_id[a]["error"] is None
    assert by_id[b]["total_tokens"] == 3 and by_id[b]["duration_ms"] == 5
    assert len(by_id) == 2
    db.dispose()
    assert [r["total_tokens"] for r in collapse_rows([row(a, False), row(a, True, 9)])] == [9]


@pytest.mark.parametrize("fault", ["deleted", "replaced"])
def test_a_database_file_deleted_or_replaced_is_noticed_and_reopened(
    tmp_path: Path, url: str, fault: str
) -> None:
    path = tmp_path / "g.db"
    db = open_db(url)
    ledger = UsageLedger(db, str(tmp_path / "spool.jsonl"))
    ledger.start()
    ledger.add(row())
    wait_for(lambda: len(stored(db)) == 1 and ledger.pending() == 0, 10, "first row")
    backup = tmp_path / "backup.db"
    shutil.copy(path, backup)
    for suffix in ("-wal", "-shm"):
        if Path(f"{path}{suffix}").exists():
            os.unlink(f"{path}{suffix}")
    if fault == "deleted":
        os.unlink(path)
    else:
        other = tmp_path / "other.db"
        replacement = Database(f"sqlite:///{other}")
        replacement.migrate()
        replacement.add_member("m")
        replacement.dispose()
        os.replace(other, path)  # a database, but not the one opened: adopted, rows go there
    rows = [row() for _ in range(3)]
    for r in rows:
        ledger.add(r)
    if fault == "deleted":
        wait_for(lambda: not ledger.healthy, 10, "the ledger notices")
        assert ledger.pending() == 3 and not path.exists()  # nothing created at the path
        os.replace(backup, path)  # the operator restores the file
    wait_for(lambda: ledger.healthy and ledger.pending() == 0, 10, "rows written")
    ledger.stop()
    fresh = Database(url, create=False)
    fresh.check_schema()
    ids = {r["row_id"] for r in stored(fresh)}
    assert {r["row_id"] for r in rows} <= ids
    fresh.dispose()
    db.dispose()


def test_rows_added_while_the_thread_flushes_are_all_written(url: str) -> None:
    db = open_db(url)
    ledger = UsageLedger(db)
    ledger.start()
    rows = [row() for _ in range(2000)]

    def produce(part: list[dict]) -> None:
        for r in part:
            ledger.add(r)

    threads = [threading.Thread(target=produce, args=(rows[i::4],)) for i in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    wait_for(lambda: ledger.pending() == 0, 20, "all rows")
    ledger.stop()
    assert len(stored(db)) == 2000
    db.dispose()


def test_a_finished_row_takes_the_place_of_its_waiting_in_flight_row(url: str) -> None:
    db = open_db(url)
    ledger = UsageLedger(db)
    a, b = str(uuid.uuid4()), str(uuid.uuid4())
    ledger.add(row(a, finished=False))
    ledger.add(row(a, finished=True, total=11))  # a short request: one row waits, not two
    assert ledger.pending() == 1
    ledger.add(row(b, finished=False))
    assert ledger.flush() and ledger.pending() == 0  # b's in-flight row is written
    ledger.add(row(b, finished=True, total=13))  # queued apart, then completes it
    assert ledger.pending() == 1 and ledger.flush()
    by_id = {r["row_id"]: r for r in stored(db)}
    assert by_id[a]["total_tokens"] == 11 and by_id[b]["total_tokens"] == 13
    assert by_id[b]["error"] is None and len(by_id) == 2
    db.dispose()


def test_while_the_database_is_away_a_request_still_waits_as_one_row(url: str) -> None:
    a = str(uuid.uuid4())
    ledger: UsageLedger

    class Away(Database):
        def insert_usage(self, rows):  # type: ignore[override]
            ledger.add(row(a, finished=True, total=5))  # the request ends during the attempt
            raise OperationalError("insert", {}, Exception("down"))

    away = Away(url, create=False)
    away.check_schema()
    ledger = UsageLedger(away)
    ledger.add(row(a, finished=False))
    assert not ledger.flush() and not ledger.healthy
    assert ledger.pending() == 1  # the finished row replaced its in-flight row
    b = str(uuid.uuid4())
    ledger.db = FailingDatabase(url, create=False)
    ledger.add(row(b, finished=False))
    assert not ledger.flush()
    ledger.add(row(b, finished=True, total=6))  # merged after the failed attempt
    assert ledger.pending() == 2
    db = open_db(url)
    ledger.db = db
    assert ledger.flush() and ledger.pending() == 0
    assert {r["row_id"]: r["total_tokens"] for r in stored(db)} == {a: 5, b: 6}
    away.dispose()
    db.dispose()


def socket_row(row_id: str, closed: bool, messages: int = 0) -> dict:
    """A ``ws_connections`` row as :class:`WebSocketTurns` queues it (``table`` marker)."""
    return {
        "table": WS_CONNECTIONS,
        "row_id": row_id,
        "member_id": 1,
        "key_id": "k",
        "upstream_key": "alpha",
        "route": "ws:/v1/realtime",
        "model": "gpt-realtime",
        "opened_ms": 1_000,
        "closed_ms": 9_000 if closed else None,
        "duration_ms": 8_000 if closed else None,
        "client_messages": messages,
        "upstream_messages": 2 * messages,
        "turns": 1 if closed else 0,
        "close_reason": "closed by the client (1000)" if closed else None,
        "instance": "t",
    }


def stored_sockets(db: Database) -> list[dict]:
    with db.engine.connect() as conn:
        return [dict(r._mapping) for r in conn.execute(sa.select(ws_connections)).all()]


def test_socket_rows_share_the_queue_replace_their_open_row_and_survive_the_spool(
    tmp_path: Path, url: str
) -> None:
    spool = tmp_path / "spool.jsonl"
    a, b, c = (str(uuid.uuid4()) for _ in range(3))
    ledger = UsageLedger(FailingDatabase(url, create=False), str(spool))
    ledger.add(socket_row(a, closed=False))
    ledger.add(row(b, finished=True, total=4))
    ledger.add(socket_row(c, closed=False))
    ledger.add(socket_row(a, closed=True, messages=3))  # replaces a's waiting open row
    assert ledger.pending() == 3
    assert ledger.pending_rows(1, 0, "tokens") == [(1_000, 4)]  # sockets hold no tokens
    assert not ledger.flush()
    ledger.stop(timeout=1)  # the database is away: the rows go to the spool, marker kept
    lines = [json.loads(line) for line in spool.read_text().splitlines()]
    assert sorted(r.get("table", "usage") for r in lines) == [
        "usage",
        WS_CONNECTIONS,
        WS_CONNECTIONS,
    ]
    db = open_db(url)
    replay = UsageLedger(db, str(spool))
    replay._claim_spools()
    assert replay.flush() and not spool.exists()
    replay.add(socket_row(c, closed=True, messages=1))  # c closes after the restart
    assert replay.flush()
    replay.add(socket_row(c, closed=False))  # an open row re-sent late changes nothing
    assert replay.flush()
    sockets = {r["row_id"]: r for r in stored_sockets(db)}
    assert set(sockets) == {a, c}
    assert sockets[a]["client_messages"] == 3 and sockets[a]["closed_ms"] == 9_000
    assert sockets[c]["client_messages"] == 1 and sockets[c]["duration_ms"] == 8_000
    assert [r["total_tokens"] for r in stored(db)] == [4]
    summary = db.ws_connection_rows(0)
    assert [s["member"] for s in summary] == ["m", "m"]
    db.dispose()


def test_after_written_waits_for_every_row_queued_before_it(url: str) -> None:
    """A concurrency slot is given back through :meth:`UsageLedger.after_written`: only once
    the rows queued before it are in the database (none while it is away; at stop, spooled)."""
    ledger = UsageLedger(FailingDatabase(url, create=False))
    fired: list[str] = []
    ledger.add(row(str(uuid.uuid4())))
    ledger.after_written(lambda: fired.append("first"))
    assert not ledger.flush()
    ledger._fire_barriers()
    assert fired == []  # the row is not written: the slot stays taken
    db = open_db(url)
    ledger.db = db
    ledger.add(row(str(uuid.uuid4())))
    ledger.after_written(lambda: fired.append("second"))
    ledger.add(row(str(uuid.uuid4()), finished=False))
    ledger.after_written(lambda: fired.append("third"))
    ledger.start()  # its thread flushes at once and fires each callback in turn
    try:
        wait_for(lambda: fired == ["first", "second", "third"], 10, "every callback")
        assert len(stored(db)) == 3
    finally:
        ledger.stop()
    away = UsageLedger(FailingDatabase(url, create=False))
    away.add(row(str(uuid.uuid4())))
    away.after_written(lambda: fired.append("at stop"))
    away.stop(timeout=0.5)
    assert fired[-1] == "at stop"
    db.dispose()


def refusal(code: str, member_id: int | None = 1, route: str = "/v1/responses") -> dict:
    return {
        "table": REFUSALS,
        "row_id": str(uuid.uuid4()),
        "ts_ms": 2_000,
        "member_id": member_id,
        "key_id": "k" if member_id else None,
        "kind": refusal_kind(code),
        "code": code,
        "status": 429,
        "route": route,
        "model": None,
        "count": 1,
        "instance": "t",
    }


def test_refusal_rows_share_the_queue_and_a_flood_of_bad_keys_is_one_row_per_code(
    tmp_path: Path, url: str
) -> None:
    """A member's refusals are a row each; refusals with no member (bad keys, which anyone
    can send) coalesce while they wait, per code and route, and keep their count through a
    failed batch, the spool and a replay, landing once."""
    spool = tmp_path / "spool.jsonl"
    ledger = UsageLedger(FailingDatabase(url, create=False), str(spool))
    for _ in range(3):
        ledger.add(refusal("quota_exceeded"))
    for _ in range(1000):
        ledger.add(refusal("invalid_member_key", member_id=None))
    ledger.add(refusal("missing_member_key", member_id=None))
    ledger.add(refusal("invalid_member_key", member_id=None, route="ws:/v1/responses"))
    assert ledger.pending() == 6
    assert ledger.pending_rows(1, 0, "credits") == []  # refusals hold no usage
    assert not ledger.flush()
    # Taken into the failed batch: a new bad key starts a row of its own (the count of the
    # one being written cannot change under it).
    ledger.add(refusal("invalid_member_key", member_id=None))
    assert ledger.pending() == 7
    ledger.stop(timeout=1)
    lines = [json.loads(line) for line in spool.read_text().splitlines()]
    assert {r["table"] for r in lines} == {REFUSALS}
    db = open_db(url)
    replay = UsageLedger(db, str(spool))
    replay._claim_spools()
    assert replay.flush() and not spool.exists()
    rows = db.refusal_rows(0)
    counts: dict[tuple, int] = {}
    for r in rows:
        key = (r["member"], r["code"], r["route"])
        counts[key] = counts.get(key, 0) + r["count"]
    assert counts == {
        ("m", "quota_exceeded", "/v1/responses"): 3,
        (None, "invalid_member_key", "/v1/responses"): 1001,
        (None, "missing_member_key", "/v1/responses"): 1,
        (None, "invalid_member_key", "ws:/v1/responses"): 1,
    }
    assert {r["kind"] for r in rows} == {"quota", "auth"}
    assert [r["member"] for r in db.refusal_rows(0, "m")] == ["m"] * 3
    db.insert_refusals([{k: v for k, v in lines[0].items() if k != "table"}])  # re-sent: once
    assert len(db.refusal_rows(0)) == len(rows)
    db.dispose()
