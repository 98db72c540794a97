"""The usage ledger's writer: rows leave the event loop at once and reach the database in
batches from one thread; none is lost while the database is away.

Rows wait in memory (a deque) until a batch insert succeeds. While inserts fail the ledger is
*unhealthy* (:attr:`UsageLedger.healthy` false): the gateway then answers new requests 503
(quota checks fail closed) and retries the batch every second. At exit, rows still waiting
are appended to the spool file (JSON lines), which the next start loads first. Rows carry a
``row_id``, so one that reached the database just before a failure is not counted twice.

The same thread does the gateway's other housekeeping (each a database round trip that must
not run on the event loop): refreshing the member directory, renewing concurrency leases,
recording upstream key health and keys' last use.
"""

from __future__ import annotations

import json
import logging
import os
import threading
import time
from collections import deque
from collections.abc import Callable
from typing import Any

from sqlalchemy.exc import SQLAlchemyError

from addons.gateway_mode.database import Database

logger = logging.getLogger(__name__)

#: Seconds between flushes when rows wait, and between retries after a failure.
FLUSH_INTERVAL_S = 0.25
RETRY_INTERVAL_S = 1.0
BATCH = 500


class UsageLedger:
    """Batches usage rows into ``db`` from a daemon thread (see the module docstring).

    ``tasks`` are ``(interval_s, fn)`` housekeeping calls run on the same thread; an exception
    in one is logged by type and marks nothing (the row flush decides health).
    """

    def __init__(self, db: Database, spool_path: str | None = None) -> None:
        self.db = db
        self.spool_path = spool_path
        self._rows: deque[dict[str, Any]] = deque()
        self._lock = threading.Lock()
        self._wake = threading.Event()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self.tasks: list[tuple[float, Callable[[], None]]] = []
        self._last_run: dict[int, float] = {}
        self.healthy = True

    # -- producers (the event loop) -----------------------------------------------------------

    def add(self, row: dict[str, Any]) -> None:
        """Queue one row (``usage`` columns). Never blocks, never raises."""
        with self._lock:
            self._rows.append(row)
        # No wake-up per row: the thread looks every FLUSH_INTERVAL_S, so rows are written in
        # batches (one transaction for many rows) instead of one transaction per request.

    def pending(self) -> int:
        with self._lock:
            return len(self._rows)

    def pending_rows(self, member_id: int, since_ms: int, kind: str) -> list[tuple[int, int]]:
        """``(ts_ms, amount)`` of a member's rows not yet written, newer than ``since_ms``;
        amount in tokens (``kind="tokens"``) or micro-credits (``"credits"``)."""
        column = "total_tokens" if kind == "tokens" else "credits_micro"
        with self._lock:
            return [
                (r["ts_ms"], r.get(column) or 0)
                for r in self._rows
                if r["member_id"] == member_id and r["ts_ms"] > since_ms and r.get(column)
            ]

    # -- the thread ---------------------------------------------------------------------------

    def start(self) -> None:
        self._load_spool()
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

    def flush(self) -> bool:
        """Write up to :data:`BATCH` waiting rows. Returns whether the database took them (or
        nothing was waiting)."""
        with self._lock:
            batch = [self._rows[i] for i in range(min(BATCH, len(self._rows)))]
        if not batch:
            return True
        try:
            self.db.insert_usage(batch)
        except SQLAlchemyError as e:
            if self.healthy:
                logger.error(
                    "usage ledger: database write failed (%s); rows kept", type(e).__name__
                )
            self.healthy = False
            return False
        with self._lock:
            for _ in batch:
                self._rows.popleft()
        if not self.healthy:
            logger.warning("usage ledger: database back; %d rows written", len(batch))
        self.healthy = True
        return True

    def _run(self) -> None:
        while not self._stop.is_set():
            self._wake.wait(FLUSH_INTERVAL_S if self.healthy else RETRY_INTERVAL_S)
            self._wake.clear()
            while self.pending() and self.flush() and not self._stop.is_set():
                pass
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

    def _load_spool(self) -> None:
        if not self.spool_path or not os.path.exists(self.spool_path):
            return
        loaded = 0
        with open(self.spool_path, encoding="utf-8") as f:
            for line in f:
                line = line.strip()
                if line:
                    self._rows.append(json.loads(line))
                    loaded += 1
        os.replace(self.spool_path, self.spool_path + ".loaded")
        logger.info("usage ledger: %d spooled rows from %s queued", loaded, self.spool_path)

    def _write_spool(self) -> None:
        with self._lock:
            rows = list(self._rows)
        if not rows or not self.spool_path:
            if rows:
                logger.error(
                    "usage ledger: %d rows could not be written and no spool is set", len(rows)
                )
            return
        fd = os.open(self.spool_path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            for row in rows:
                f.write(json.dumps(row, separators=(",", ":")) + "\n")
        logger.error(
            "usage ledger: database unreachable; %d rows spooled to %s", len(rows), self.spool_path
        )
