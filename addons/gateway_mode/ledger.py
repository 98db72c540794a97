"""The usage ledger's writer: rows leave the event loop at once and reach the database in
batches from one thread; none is lost while the database is away.

Rows wait in memory (a deque) until a batch insert succeeds. While inserts fail the ledger is
*unhealthy* (:attr:`UsageLedger.healthy` false): the gateway then answers new requests 503
(quota checks fail closed) and retries the batch every second. A SQLite file deleted or
replaced under the running gateway counts as a failure too (checked before and after every
batch and on every pass of the thread, :meth:`Database.intact`): rows are kept, and the file is
reopened once a database with the current schema is back at its path. Rows carry a ``row_id``
(a UUID), so one that reached the database just before a failure lands once.

Each request writes two rows with one ``row_id``: an in-flight row when it is forwarded and
its finished row when it ends (which replaces it). So a gateway killed outright (SIGKILL, power)
loses only the rows queued since the last flush (at most :data:`FLUSH_INTERVAL_S` of starts and
ends, plus a batch in its transaction), and a request that was in flight keeps its in-flight
row (``duration_ms`` null, ``error`` ``in flight``).

The same queue carries the ``ws_connections`` rows of member WebSockets (``"table":
"ws_connections"``), with the same two-step life: an open row when a socket opens
(``duration_ms`` null) replaced by its closed row (same ``row_id``).

It carries the ``refusals`` rows too (``"table": "refusals"``, written once): one per
refusal of a member; refusals with no member (an unknown or missing member key, which anyone
can send) are coalesced while they wait, one row per ``code`` and ``route`` with a ``count``,
so a flood of bad keys costs at most one row per code per flush.

At exit, rows still waiting are written to the spool file (JSON lines, fsynced). Every start
looks for every spool of the deployment (``<spool>``, ``<spool>.<i>`` of any worker count, a
legacy ``.loaded``), claims each with an exclusive ``flock`` (so two workers never replay the
same file, and a crashed claimer's lock is gone with it), queues its rows, and deletes the file
only once all of them are committed.

The same thread does the gateway's other housekeeping (each a database round trip that must
not run on the event loop): refreshing the member directory, renewing concurrency leases,
recording upstream key health and keys' last use.
"""

from __future__ import annotations

import fcntl
import json
import logging
import os
import re
import threading
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from sqlalchemy.exc import SQLAlchemyError

from addons.gateway_mode.database import Database

logger = logging.getLogger(__name__)

#: Seconds between flushes when rows wait, and between retries after a failure.
FLUSH_INTERVAL_S = 0.25
RETRY_INTERVAL_S = 1.0
BATCH = 500
#: ``error`` of an in-flight row (its finished row replaces it).
IN_FLIGHT = "in flight"
#: A queued row whose ``"table"`` is this is a ``ws_connections`` row (a socket's, open or
#: closed), not a ``usage`` row; the marker is kept in the spool and dropped on insert.
TABLE = "table"
WS_CONNECTIONS = "ws_connections"
#: A queued row whose ``"table"`` is this is a ``refusals`` row.
REFUSALS = "refusals"

#: The kinds ``usage`` counts refusals by, from the refusal's error ``code``: the member's
#: limits (``quota``, ``concurrency``), a model the rate card cannot price for a member with a
#: credit quota (``unpriced``), a model the member may not use (``model``), member keys
#: (``auth``), request bodies and socket messages past the decode or depth limits (``body``),
#: routes and clients the gateway does not serve (``route``); anything else is the gateway's
#: own state (``gateway``: its database away, no healthy upstream key, an internal error).
REFUSAL_KINDS = {
    "quota_exceeded": "quota",
    "concurrency_limit": "concurrency",
    "rate_limit_exceeded": "concurrency",  # the socket's busy answer
    "unpriced_model": "unpriced",
    "model_not_allowed": "model",
    "missing_member_key": "auth",
    "invalid_member_key": "auth",
    "expired_member_key": "auth",
    "invalid_identity_token": "auth",
    "identity_issuer_unavailable": "auth",
    "request_too_large": "body",
    "json_too_deep": "body",
    "forbidden": "route",
    "not_codex": "route",
    "tls_required": "route",
    "websocket_not_supported": "route",
}
#: Every kind, in the order ``usage`` shows them.
KIND_ORDER = ("quota", "concurrency", "unpriced", "model", "auth", "body", "route", "gateway")


def refusal_kind(code: str) -> str:
    """The :data:`KIND_ORDER` kind of a refusal's error ``code`` (``gateway`` when unknown)."""
    return REFUSAL_KINDS.get(code, "gateway")


@dataclass
class _Claim:
    """A spool file this process replays: its path, the descriptor holding the ``flock``, the
    file's identity, and the ``row_id`` s not committed yet."""

    path: str
    fd: int
    identity: tuple[int, int]
    remaining: set[str] = field(default_factory=set)


def spool_files(base: str) -> list[str]:
    """Every spool of a deployment whose spool option is ``base``: ``base`` itself,
    ``base.<i>`` (a worker's, any worker count) and either with ``.loaded`` (left by older
    versions, which renamed a spool before its rows were committed). Sorted; existing only."""
    directory, name = os.path.split(os.path.abspath(base))
    pattern = re.compile(re.escape(name) + r"(\.\d+)?(\.loaded)?")
    try:
        names = os.listdir(directory or ".")
    except OSError:
        return []
    return sorted(os.path.join(directory, n) for n in names if pattern.fullmatch(n))


def _identity(st: os.stat_result) -> tuple[int, int]:
    return st.st_dev, st.st_ino


class UsageLedger:
    """Batches usage rows into ``db`` from a daemon thread (see the module docstring).

    ``spool_path``: this process's spool (written at exit); ``spool_base``: the deployment's
    spool option, whose every spool file is replayed at start (default ``spool_path``).
    ``tasks`` are ``(interval_s, fn)`` housekeeping calls run on the same thread; an exception
    in one is logged by type and marks nothing (the row flush decides health).
    """

    def __init__(
        self, db: Database, spool_path: str | None = None, spool_base: str | None = None
    ) -> None:
        self.db = db
        self.spool_path = spool_path
        self.spool_base = spool_base or spool_path
        self._rows: deque[dict[str, Any]] = deque()
        #: In-flight rows still waiting in ``_rows``, by ``row_id`` (see :meth:`add`); those of
        #: the batch being written; the ids whose finished row was queued meanwhile.
        self._in_flight: dict[str, dict[str, Any]] = {}
        self._in_batch: dict[str, dict[str, Any]] = {}
        self._finished_meanwhile: set[str] = set()
        #: Waiting refusal rows with no member, by ``(code, route)``: the next one adds to it.
        self._anonymous: dict[tuple[str, str], dict[str, Any]] = {}
        self._lock = threading.Lock()
        self._wake = threading.Event()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._claims: list[_Claim] = []
        self.tasks: list[tuple[float, Callable[[], None]]] = []
        self._last_run: dict[int, float] = {}
        #: Rows ever put in / taken off the queue (written, or dropped as replaced), and the
        #: callbacks waiting for a count of taken rows (:meth:`after_written`).
        self._added = 0
        self._done = 0
        self._barriers: list[tuple[int, Callable[[], None]]] = []
        self.healthy = True
        self.file_missing = False

    # -- producers (the event loop) -----------------------------------------------------------

    def add(self, row: dict[str, Any]) -> None:
        """Queue one row (``usage`` columns). A finished row whose in-flight row still waits
        (a request shorter than a flush interval, or the database away) takes its place: one
        row written, not two. Never blocks, never raises."""
        with self._lock:
            row_id = row["row_id"]
            if row.get(TABLE) == REFUSALS:
                self._add_refusal(row)
                return
            if row.get("duration_ms") is None:
                self._rows.append(row)
                self._added += 1
                self._in_flight[row_id] = row
                return
            waiting = self._in_flight.pop(row_id, None)
            if waiting is not None:
                waiting.clear()
                waiting.update(row)
                return
            if row_id in self._in_batch:  # its in-flight row is being written right now
                self._finished_meanwhile.add(row_id)
            self._rows.append(row)
            self._added += 1

    def after_written(self, callback: Callable[[], None]) -> None:
        """Call ``callback`` on the ledger's thread once every row queued so far is in the
        database (or, at :meth:`stop`, spooled), and flush now rather than at the next
        interval. ``callback`` must not raise (it is logged by type if it does)."""
        with self._lock:
            self._barriers.append((self._added, callback))
        self._wake.set()

    def _fire_barriers(self, every: bool = False) -> None:
        due: list[tuple[int, Callable[[], None]]] = []
        keep: list[tuple[int, Callable[[], None]]] = []
        with self._lock:
            for barrier in self._barriers:
                (due if every or barrier[0] <= self._done else keep).append(barrier)
            self._barriers = keep
        for _, callback in due:
            try:
                callback()
            except Exception as e:
                logger.warning("usage ledger: callback failed (%s)", type(e).__name__)

    def _add_refusal(self, row: dict[str, Any]) -> None:
        """Queue a refusal row (the lock held): one with no member adds its ``count`` to the
        waiting row of its code and route, if any."""
        if row.get("member_id") is not None:
            self._rows.append(row)
            return
        key = (str(row.get("code")), str(row.get("route")))
        waiting = self._anonymous.get(key)
        if waiting is not None:
            waiting["count"] += row.get("count", 1)
            return
        self._anonymous[key] = row
        self._rows.append(row)

    def pending(self) -> int:
        with self._lock:
            return len(self._rows)

    def pending_rows(
        self, member_id: int, since_ms: int, kind: str, owner: str = "member_id"
    ) -> list[tuple[int, int]]:
        """``(ts_ms, amount)`` of a member's rows not yet written, newer than ``since_ms``;
        amount in tokens (``kind="tokens"``) or micro-credits (``"credits"``).
        ``owner="team_id"``: of one team's rows instead."""
        column = "total_tokens" if kind == "tokens" else "credits_micro"
        with self._lock:
            return [
                (r["ts_ms"], r.get(column) or 0)
                for r in self._rows
                if TABLE not in r
                and r.get(owner) == member_id
                and r["ts_ms"] > since_ms
                and r.get(column)
            ]

    # -- the thread ---------------------------------------------------------------------------

    def start(self) -> None:
        self._claim_spools()
        self._thread = threading.Thread(target=self._run, name="gateway-ledger", daemon=True)
        self._thread.start()

    def stop(self, timeout: float = 10.0) -> None:
        """Flush what can be flushed within ``timeout`` s, spool the rest, stop the thread."""
        self._stop.set()
        self._wake.set()
        if self._thread is not None:
            self._thread.join(timeout)
        deadline = time.monotonic() + timeout
        while self.pending() and time.monotonic() < deadline:
            if not self.flush():
                break
        self._write_spool()
        self._fire_barriers(every=True)  # the rows left are spooled: nothing more to wait for

    def flush(self) -> bool:
        """Write up to :data:`BATCH` waiting rows. Returns whether the database took them (or
        nothing was waiting)."""
        with self._lock:
            batch = [self._rows[i] for i in range(min(BATCH, len(self._rows)))]
            for row in batch:  # while written, a finished row is queued apart, not merged in
                if row.get(TABLE) == REFUSALS:
                    key = (str(row.get("code")), str(row.get("route")))
                    if self._anonymous.get(key) is row:
                        del self._anonymous[key]
                if self._in_flight.get(row["row_id"]) is row:
                    self._in_batch[row["row_id"]] = self._in_flight.pop(row["row_id"])
        if not batch:
            return True
        if not self._file_ok() or not self._insert(batch):
            self._batch_failed()
            return False
        if not self._file_ok():
            # The file went away during the batch: it may have landed in the unlinked file.
            # Keep the rows; they land once (row_id) in the database that comes back.
            self._batch_failed()
            return False
        with self._lock:
            for _ in batch:
                self._rows.popleft()
            self._done += len(batch)
            self._in_batch.clear()
            self._finished_meanwhile.clear()
        self._committed(batch)
        if not self.healthy:
            logger.warning("usage ledger: database back; %d rows written", len(batch))
        self.healthy = True
        return True

    def _insert(self, batch: list[dict[str, Any]]) -> bool:
        usage = [row for row in batch if TABLE not in row]
        sockets = [
            {k: v for k, v in row.items() if k != TABLE}
            for row in batch
            if row.get(TABLE) == WS_CONNECTIONS
        ]
        refused = [
            {k: v for k, v in row.items() if k != TABLE}
            for row in batch
            if row.get(TABLE) == REFUSALS
        ]
        try:
            # Statements, not one transaction: a batch that fails between them is sent
            # again whole, and its rows land once (row_id).
            if usage:
                self.db.insert_usage(usage)
            if sockets:
                self.db.insert_ws_connections(sockets)
            if refused:
                self.db.insert_refusals(refused)
            return True
        except SQLAlchemyError as e:
            if self.healthy:
                logger.error(
                    "usage ledger: database write failed (%s); rows kept", type(e).__name__
                )
            self.healthy = False
            return False

    def _batch_failed(self) -> None:
        """The batch stays queued: its in-flight rows can be merged into again, or, when their
        finished row was queued meanwhile, are dropped (the finished row replaces them)."""
        with self._lock:
            for row_id, row in self._in_batch.items():
                if row_id in self._finished_meanwhile:
                    for index, queued in enumerate(self._rows):
                        if queued is row:
                            del self._rows[index]
                            self._done += 1
                            break
                else:
                    self._in_flight[row_id] = row
            self._in_batch.clear()
            self._finished_meanwhile.clear()

    def _file_ok(self) -> bool:
        """Whether the SQLite file is still the one opened (always for PostgreSQL); when it is
        not, tries to reopen a database at its path. Marks the ledger unhealthy meanwhile."""
        if self.db.intact():
            return True
        if not self.file_missing:
            logger.error(
                "usage ledger: the database file %s was deleted or replaced; rows kept, new "
                "requests refused until a database is back at that path",
                self.db.path,
            )
        self.file_missing = True
        self.healthy = False
        if not self.db.reopen():
            return False
        logger.warning("usage ledger: database file %s reopened", self.db.path)
        self.file_missing = False
        return True

    def _run(self) -> None:
        while not self._stop.is_set():
            self._wake.wait(FLUSH_INTERVAL_S if self.healthy else RETRY_INTERVAL_S)
            self._wake.clear()
            if not self._file_ok():
                continue
            while self.pending() and self.flush() and not self._stop.is_set():
                pass
            if self._barriers:
                self._fire_barriers()
            if not self.healthy and not self.pending():
                # Marked unhealthy by a failed quota check with no row waiting: no flush
                # would ever say the database is back, so ask it.
                self.healthy = self.db.ping()
            now = time.monotonic()
            for index, (interval, task) in enumerate(self.tasks):
                if now - self._last_run.get(index, 0.0) < interval:
                    continue
                self._last_run[index] = now
                try:
                    task()
                except Exception as e:
                    logger.warning(
                        "gateway housekeeping %s failed: %s",
                        getattr(task, "__name__", "task"),
                        type(e).__name__,
                    )

    # -- spool --------------------------------------------------------------------------------

    def _candidates(self) -> list[str]:
        paths = spool_files(self.spool_base) if self.spool_base else []
        if self.spool_path and os.path.exists(self.spool_path):
            paths.append(os.path.abspath(self.spool_path))
        return sorted(set(paths))

    def _claim_spools(self) -> None:
        """Claim and queue every unclaimed spool of the deployment (see the module docstring)."""
        for path in self._candidates():
            try:
                claim = self._claim(path)
            except OSError as e:
                logger.error("usage ledger: cannot read spool %s: %s", path, e.strerror)
                continue
            if claim is not None:
                self._claims.append(claim)

    def _claim(self, path: str) -> _Claim | None:
        fd = os.open(path, os.O_RDWR | os.O_CLOEXEC)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            identity = _identity(os.fstat(fd))
            if _identity(os.stat(path)) != identity:
                raise FileNotFoundError  # replaced or removed by its owner meanwhile
        except (BlockingIOError, FileNotFoundError):
            os.close(fd)  # another process replays it, or it is gone
            return None
        except BaseException:
            os.close(fd)
            raise
        rows, broken = [], 0
        with os.fdopen(os.dup(fd), "r", encoding="utf-8", errors="replace") as f:
            for line in f:
                line = line.strip()
                if not line:
                    continue
                try:
                    row = json.loads(line)
                except ValueError:
                    broken += 1  # a line cut by a crash mid-write
                    continue
                if isinstance(row, dict) and isinstance(row.get("row_id"), str):
                    rows.append(row)
                else:
                    broken += 1
        claim = _Claim(path, fd, identity, {row["row_id"] for row in rows})
        with self._lock:
            self._rows.extend(rows)
            self._added += len(rows)
        logger.info(
            "usage ledger: %d spooled rows from %s queued%s",
            len(rows),
            path,
            f" ({broken} unreadable lines skipped)" if broken else "",
        )
        if not claim.remaining:
            self._release(claim, remove=True)
            return None
        return claim

    def _committed(self, batch: list[dict[str, Any]]) -> None:
        """Rows of ``batch`` are in the database: a spool whose rows all are is deleted."""
        if not self._claims:
            return
        ids = {row["row_id"] for row in batch}
        for claim in list(self._claims):
            claim.remaining -= ids
            if not claim.remaining:
                self._claims.remove(claim)
                self._release(claim, remove=True)
                logger.info("usage ledger: spool %s written and removed", claim.path)

    @staticmethod
    def _release(claim: _Claim, remove: bool) -> None:
        try:
            if remove:
                try:
                    if _identity(os.stat(claim.path)) == claim.identity:
                        os.unlink(claim.path)
                except FileNotFoundError:
                    pass
        finally:
            os.close(claim.fd)

    def _write_spool(self) -> None:
        """At exit: every row still waiting (rows of claimed spools included) goes to this
        process's spool, fsynced, before the claimed spools are removed (a crash in between
        leaves a row twice, which lands once)."""
        with self._lock:
            rows = list(self._rows)
        claims, self._claims = self._claims, []
        saved = not rows
        if rows and not self.spool_path:
            logger.error(
                "usage ledger: %d rows could not be written and no spool is set", len(rows)
            )
        if rows and self.spool_path:
            data = "".join(json.dumps(row, separators=(",", ":")) + "\n" for row in rows)
            try:
                _spool_out(self.spool_path, data.encode("utf-8"), {c.identity for c in claims})
                saved = True
                logger.error(
                    "usage ledger: database unreachable; %d rows spooled to %s",
                    len(rows),
                    self.spool_path,
                )
            except OSError as e:
                logger.error(
                    "usage ledger: %d rows could not be spooled to %s: %s",
                    len(rows),
                    self.spool_path,
                    e.strerror,
                )
        for claim in claims:
            # Saved: the claimed spools' rows are in this process's spool now (a claimed file
            # at that very path was replaced, so its identity no longer matches: kept).
            self._release(claim, remove=saved)


def _spool_out(path: str, data: bytes, claimed: set[tuple[int, int]]) -> None:
    """Write spool lines to ``path``: a new file (fsynced, then renamed over it) when there is
    none or it is one this process claimed (its rows are in ``data``); else appended under the
    file's ``flock`` (another process's spool at the same path keeps its rows)."""
    try:
        existing: tuple[int, int] | None = _identity(os.stat(path))
    except FileNotFoundError:
        existing = None
    if existing is None or existing in claimed:
        tmp = f"{path}.tmp-{os.getpid()}"
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o600)
        try:
            _write_all(fd, data)
        finally:
            os.close(fd)
        os.replace(tmp, path)
        return
    fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CLOEXEC, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        _write_all(fd, data)
    finally:
        os.close(fd)


def _write_all(fd: int, data: bytes) -> None:
    view = memoryview(data)
    while view:
        view = view[os.write(fd, view) :]
    os.fsync(fd)
