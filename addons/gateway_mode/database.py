"""Every query of the gateway, through SQLAlchemy Core, for SQLite and PostgreSQL alike.

The schema is :mod:`addons.gateway_mode.schema`, created and migrated by Alembic
(:meth:`Database.migrate`). Methods are synchronous and thread-safe (one pooled connection per
call); the serving addons call them from worker threads, never on the event loop.

Dialect differences handled here, and nowhere else:
- SQLite: WAL journal, ``busy_timeout``, foreign keys on, and every transaction ``BEGIN
  IMMEDIATE`` (so a lease count and its insert are one serialised step).
- PostgreSQL: the member's row is locked (``SELECT ... FOR UPDATE``) around a lease count and
  insert, so several gateway instances never hand out more slots than ``max_concurrent``.
  Admin changes read the row they change ``FOR UPDATE`` too, so the values before that their
  audit row records (:mod:`addons.gateway_mode.audit`) are the ones the change replaced, with
  several admin hosts at once.
- Usage rows are written with ``INSERT ... ON CONFLICT (row_id) DO UPDATE ... WHERE`` the new
  row is a finished one, on both: a re-sent row lands once, and a request's finished row
  replaces its in-flight row (see :meth:`Database.insert_usage`).
- SQLite only: the file is opened read-write, never created, except by ``init``
  (``create=True``); its identity (device, inode) is remembered when the schema is checked, so
  a file deleted or replaced under a running gateway is noticed (:meth:`Database.intact`) and
  reopened when a database is back at the path (:meth:`Database.reopen`).
"""

from __future__ import annotations

import logging
import os
import time
import urllib.parse
import uuid
from collections.abc import Iterable, Mapping, Sequence
from types import EllipsisType
from typing import Any

import sqlalchemy as sa
from sqlalchemy import event
from sqlalchemy.engine import URL, Engine, make_url

from addons.gateway_mode import audit
from addons.gateway_mode import members as member_rules
from addons.gateway_mode.model_policy import parse_patterns, patterns_text
from addons.gateway_mode.schema import (
    leases,
    member_keys,
    members,
    refusals,
    upstream_keys,
    usage,
    ws_connections,
)
from addons.gateway_mode.windows import FIVE_HOURS_MS, LIMIT_COLUMNS, WEEK_MS, iso
from addons.invocation import prog

logger = logging.getLogger(__name__)
# Alembic logs "Context impl SQLiteImpl." / "Will assume non-transactional DDL." at INFO on every
# schema check, in the gateway's log among the flows (issue 29: a clean log); its warnings stay.
logging.getLogger("alembic").setLevel(logging.WARNING)

MIGRATIONS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "migrations")
MEMBER_SETTINGS = (*tuple(column for column, _, _ in LIMIT_COLUMNS), "max_concurrent")


class DatabaseError(RuntimeError):
    """A usage error the operator must fix (unknown member, schema not initialised...); the
    message is for the command line. Connection failures stay SQLAlchemy's
    ``OperationalError``."""


def now_ms() -> int:
    """The current time in epoch milliseconds."""
    return int(time.time() * 1000)


def parse_database_url(value: str) -> URL:
    """A ``sqlite:///path.db`` or ``postgresql://...`` URL, ready for SQLAlchemy
    (``postgresql://`` means psycopg 3).

    Raises:
        ValueError: for another scheme, or a password in the URL (put it in ``~/.pgpass`` or
            ``PGPASSWORD``: the URL is an option mitmproxy shows and logs).
    """
    try:
        url = make_url(value)
    except Exception:  # SQLAlchemy raises ArgumentError
        raise ValueError(
            "database: not a database URL (sqlite:///path.db or postgresql://...)"
        ) from None
    if url.password:
        raise ValueError("database: the URL must not carry a password; use ~/.pgpass or PGPASSWORD")
    backend = url.get_backend_name()
    if backend == "sqlite":
        if url.drivername not in ("sqlite", "sqlite+pysqlite"):
            raise ValueError(f"database: unsupported SQLite driver {url.drivername!r}")
        return url
    if backend == "postgresql":
        if url.drivername in ("postgresql", "postgresql+psycopg"):
            return url.set(drivername="postgresql+psycopg")
        raise ValueError("database: PostgreSQL URLs use psycopg 3 (postgresql://...)")
    raise ValueError(f"database: unsupported database {backend!r} (sqlite or postgresql)")


def _sqlite_setup(engine: Engine) -> None:
    @event.listens_for(engine, "connect")
    def _connect(dbapi_connection: Any, _record: Any) -> None:
        dbapi_connection.isolation_level = None  # we issue BEGIN ourselves
        cursor = dbapi_connection.cursor()
        cursor.execute("PRAGMA journal_mode=WAL")
        cursor.execute("PRAGMA synchronous=NORMAL")
        cursor.execute("PRAGMA foreign_keys=ON")
        cursor.execute("PRAGMA busy_timeout=30000")
        cursor.close()

    @event.listens_for(engine, "begin")
    def _begin(conn: Any) -> None:
        conn.exec_driver_sql("BEGIN IMMEDIATE")


class Database:
    """The gateway's database. ``url``: see :func:`parse_database_url`.

    Raises ``ValueError`` for a bad URL, :class:`DatabaseError` when a SQLite file's directory
    cannot be created; methods raise :class:`DatabaseError` for operator errors and
    SQLAlchemy's ``OperationalError`` when the server cannot be reached. Every message names
    :attr:`location`.
    """

    def __init__(self, url: str, create: bool = True) -> None:
        self.url = parse_database_url(url)
        self.dialect = self.url.get_backend_name()
        #: SQLite: the database file's path, and its (device, inode) when the schema was checked.
        self.path: str | None = None
        self._identity: tuple[int, int] | None = None
        if self.dialect == "sqlite":
            path = self.url.database
            engine_url = self.url
            if path and path != ":memory:" and not path.startswith("file:"):
                self.path = os.path.abspath(path)
                if create:
                    try:
                        os.makedirs(os.path.dirname(self.path) or ".", exist_ok=True)
                    except OSError as e:
                        raise DatabaseError(
                            f"cannot create the directory of {self.location}: "
                            f"{e.strerror or type(e).__name__}"
                        ) from None
                else:  # read-write, never create: a deleted file must not come back empty
                    engine_url = self.url.set(
                        database=f"file:{urllib.parse.quote(self.path)}",
                        query={**self.url.query, "mode": "rw", "uri": "true"},
                    )
            self.engine = sa.create_engine(
                engine_url, connect_args={"timeout": 30, "check_same_thread": False}
            )
            _sqlite_setup(self.engine)
        else:
            self.engine = sa.create_engine(
                self.url,
                pool_pre_ping=True,
                pool_size=8,
                max_overflow=8,
                connect_args={"connect_timeout": 5},
            )

    @property
    def location(self) -> str:
        """Where the database is, for messages: a SQLite file's absolute path (a relative
        ``sqlite:///x.db`` is relative to the current directory, SQLAlchemy's rule: the note
        says so), else the URL (never with a password: :func:`parse_database_url`)."""
        if self.path is None:  # postgresql (psycopg is implied), or SQLite in memory
            plain = self.url.set(drivername=self.dialect)
            return plain.render_as_string(hide_password=True)
        given = self.url.database or ""
        if not os.path.isabs(given):
            return (
                f"{self.path} (sqlite:///{given} is relative to the current directory; "
                f"for /{given} write sqlite:////{given})"
            )
        return self.path

    def __repr__(self) -> str:
        return f"<Database {self.location}>"

    def dispose(self) -> None:
        """Close every pooled connection."""
        self.engine.dispose()

    # -- schema ------------------------------------------------------------------------------

    def _alembic_config(self, connection: sa.Connection) -> Any:
        from alembic.config import Config

        config = Config()
        config.set_main_option("script_location", MIGRATIONS)
        config.attributes["connection"] = connection
        return config

    def migrate(self, actor: str | None = None) -> str:
        """Create or migrate the schema to the newest revision (idempotent). Returns it. A
        change of revision is an ``init`` row of the audit log (same transaction)."""
        from alembic import command
        from alembic.runtime.migration import MigrationContext

        with self.engine.begin() as connection:
            before = MigrationContext.configure(connection).get_current_revision()
            command.upgrade(self._alembic_config(connection), "head")
            after = MigrationContext.configure(connection).get_current_revision()
            if after != before:
                audit.record(
                    connection, actor or audit.default_actor(), "init", "schema",
                    {"revision": before} if before else None, {"revision": after},
                )  # fmt: skip
        return self.revision() or ""

    def revision(self) -> str | None:
        """The schema's current Alembic revision, ``None`` before ``init``."""
        from alembic.runtime.migration import MigrationContext

        with self.engine.connect() as connection:
            return MigrationContext.configure(connection).get_current_revision()

    def head(self) -> str:
        """The newest revision this code knows."""
        from alembic.script import ScriptDirectory

        with self.engine.connect() as connection:
            script = ScriptDirectory.from_config(self._alembic_config(connection))
        head = script.get_current_head()
        assert head is not None
        return head

    def check_schema(self) -> None:
        """Raises :class:`DatabaseError` (naming :attr:`location`) unless the schema is at the
        newest revision (a missing SQLite file too). Remembers the SQLite file's identity (see
        :meth:`intact`)."""
        if self.path is not None and not os.path.exists(self.path):
            # Checked first: connecting would create an empty file (or fail, read-only).
            raise DatabaseError(
                f"no database at {self.location}: run `{prog('gateway')} init` first"
            )
        identity = self._file_identity()
        current = self.revision()
        if current != self.head():
            raise DatabaseError(
                f"database schema is at {current or 'nothing'}, not {self.head()}, in "
                f"{self.location}: run `{prog('gateway')} init` first"
            )
        self._identity = identity

    def _file_identity(self) -> tuple[int, int] | None:
        if self.path is None:
            return None
        try:
            st = os.stat(self.path)
        except OSError:
            return None
        return st.st_dev, st.st_ino

    def intact(self) -> bool:
        """SQLite: whether the file checked by :meth:`check_schema` is still the one at its
        path (not deleted, not replaced: connections to a deleted file would write into an
        unlinked inode). One ``stat``. Always true for PostgreSQL."""
        if self.path is None or self._identity is None:
            return True
        return self._file_identity() == self._identity

    def reopen(self) -> bool:
        """After :meth:`intact` turned false: close every pooled connection and, when a
        database with the current schema is at the path again, adopt it. Returns whether it
        did; never raises."""
        self.engine.dispose()
        try:
            self.check_schema()
        except (DatabaseError, sa.exc.SQLAlchemyError):
            return False
        return True

    @property
    def _locks(self) -> bool:
        """Whether reads that precede a write take row locks (``FOR UPDATE``): PostgreSQL;
        SQLite's ``BEGIN IMMEDIATE`` already serialises every transaction."""
        return self.dialect != "sqlite"

    def audit_rows(self, since_ms: int = 0) -> list[dict[str, Any]]:
        """The audit log from ``since_ms`` on, oldest first (:func:`audit.rows`)."""
        with self.engine.connect() as conn:
            return audit.rows(conn, since_ms)

    def ping(self) -> bool:
        """Whether a trivial query succeeds now."""
        try:
            with self.engine.connect() as connection:
                connection.execute(sa.text("SELECT 1"))
            return True
        except sa.exc.SQLAlchemyError:
            return False

    # -- members and keys --------------------------------------------------------------------

    def add_member(
        self, name: str, models: str | None = None, *, actor: str | None = None, **settings: int
    ) -> int:
        """Insert a member; ``settings`` are :data:`MEMBER_SETTINGS` (absent: 0), ``models``
        its model patterns (:mod:`addons.gateway_mode.model_policy`; ``None``: every model).
        Returns id. Audited (``add-member``, by ``actor``; default the OS user) in the same
        transaction.

        Raises:
            ValueError: bad name, negative setting or bad model pattern.
            DatabaseError: the name exists.
        """
        member_rules.check_name(name)
        values: dict[str, Any] = {column: 0 for column in MEMBER_SETTINGS}
        values.update(_settings(settings))
        values["models"] = _models(models)
        with self.engine.begin() as conn:
            exists = conn.execute(sa.select(members.c.id).where(members.c.name == name)).first()
            if exists:
                raise DatabaseError(f"member {name!r} already exists (use set-member)")
            result = conn.execute(members.insert().values(name=name, created_ms=now_ms(), **values))
            key = result.inserted_primary_key
            assert key is not None
            audit.record(conn, actor or audit.default_actor(), "add-member", name, None, values)
            return int(key[0])

    def set_member(
        self,
        name: str,
        models: str | EllipsisType | None = ...,
        *,
        actor: str | None = None,
        **settings: int,
    ) -> None:
        """Change some of a member's settings (0 = unlimited); ``models``, when given, its
        model patterns (``None`` or ``""``: every model again). Audited (``set-member``: the
        given settings before and after) in the same transaction.

        Raises:
            ValueError: bad setting or model pattern.
            DatabaseError: unknown member.
        """
        values: dict[str, Any] = dict(_settings(settings))
        if models is not ...:
            values["models"] = _models(models)
        with self.engine.begin() as conn:
            query = sa.select(members).where(members.c.name == name)
            row = conn.execute(query.with_for_update() if self._locks else query).first()
            if row is None:
                raise DatabaseError(f"no member named {name!r}")
            if values:
                conn.execute(members.update().where(members.c.name == name).values(values))
            before = {column: row._mapping[column] for column in values}
            audit.record(conn, actor or audit.default_actor(), "set-member", name, before, values)

    def members(self) -> list[dict[str, Any]]:
        """Every member row, by name."""
        with self.engine.connect() as conn:
            rows = conn.execute(sa.select(members).order_by(members.c.name)).all()
        return [dict(r._mapping) for r in rows]

    def add_key(
        self, name: str, expires_ms: int | None = None, *, actor: str | None = None
    ) -> tuple[str, str]:
        """A new member key for member ``name``: ``(key_id, key)``. Only the hash is stored.
        ``expires_ms``: when it stops working (epoch ms; ``None``: never). Audited
        (``add-key``, the key by id) in the same transaction.

        Raises:
            DatabaseError: unknown member.
        """
        key = member_rules.new_member_key()
        key_id = member_rules.new_key_id()
        with self.engine.begin() as conn:
            member_id = conn.execute(sa.select(members.c.id).where(members.c.name == name)).scalar()
            if member_id is None:
                raise DatabaseError(f"no member named {name!r}")
            conn.execute(
                member_keys.insert().values(
                    id=key_id,
                    member_id=member_id,
                    key_hash=member_rules.key_hash(key),
                    created_ms=now_ms(),
                    expires_ms=expires_ms,
                )
            )
            after = {"member": name, "expires_at": iso(expires_ms)}
            audit.record(conn, actor or audit.default_actor(), "add-key", key_id, None, after)
        return key_id, key

    def list_keys(self, name: str | None = None) -> list[dict[str, Any]]:
        """Key rows (``id, member, created_ms, last_used_ms, revoked_ms, expires_ms``), never
        the hash.

        Raises:
            DatabaseError: ``name`` given and unknown.
        """
        query = (
            sa.select(
                member_keys.c.id,
                members.c.name.label("member"),
                member_keys.c.created_ms,
                member_keys.c.last_used_ms,
                member_keys.c.revoked_ms,
                member_keys.c.expires_ms,
            )
            .join(members, members.c.id == member_keys.c.member_id)
            .order_by(members.c.name, member_keys.c.created_ms)
        )
        with self.engine.connect() as conn:
            if name is not None:
                _member_id(conn, name)
                query = query.where(members.c.name == name)
            return [dict(r._mapping) for r in conn.execute(query).all()]

    def revoke_key(self, key_id: str, *, actor: str | None = None) -> None:
        """Revoke a key by id (idempotent for a revoked key). Audited (``revoke-key``) in
        the same transaction when it revokes.

        Raises:
            DatabaseError: unknown id.
        """
        with self.engine.begin() as conn:
            query = (
                sa.select(member_keys.c.revoked_ms, members.c.name)
                .join(members, members.c.id == member_keys.c.member_id)
                .where(member_keys.c.id == key_id)
            )
            row = conn.execute(
                query.with_for_update(of=member_keys) if self._locks else query
            ).first()
            if row is None:
                raise DatabaseError(f"no key with id {key_id!r}")
            if row.revoked_ms is None:
                revoked = now_ms()
                conn.execute(
                    member_keys.update()
                    .where(member_keys.c.id == key_id)
                    .values(revoked_ms=revoked)
                )
                audit.record(
                    conn, actor or audit.default_actor(), "revoke-key", key_id,
                    {"member": row.name, "revoked_at": None},
                    {"member": row.name, "revoked_at": iso(revoked)},
                )  # fmt: skip

    def directory(self) -> list[dict[str, Any]]:
        """Every live (not revoked) key with its member's settings: ``key_id, key_hash,
        member_id, member``, ``expires_ms`` (expired keys included: whoever reads the
        directory judges expiry at the time of each request), :data:`MEMBER_SETTINGS` and
        ``models`` (patterns text or ``None``).
        What the gateway authenticates with."""
        query = (
            sa.select(
                member_keys.c.id.label("key_id"),
                member_keys.c.key_hash,
                member_keys.c.expires_ms,
                members.c.id.label("member_id"),
                members.c.name.label("member"),
                *(members.c[column] for column in MEMBER_SETTINGS),
                members.c.models,
            )
            .join(members, members.c.id == member_keys.c.member_id)
            .where(member_keys.c.revoked_ms.is_(None))
        )
        with self.engine.connect() as conn:
            return [dict(r._mapping) for r in conn.execute(query).all()]

    def touch_keys(self, last_used: dict[str, int]) -> None:
        """Record when keys were last used (``{key_id: ms}``; only ever moves forward)."""
        if not last_used:
            return
        with self.engine.begin() as conn:
            for key_id, ms in last_used.items():
                conn.execute(
                    member_keys.update()
                    .where(member_keys.c.id == key_id)
                    .where(
                        sa.or_(
                            member_keys.c.last_used_ms.is_(None), member_keys.c.last_used_ms < ms
                        )
                    )
                    .values(last_used_ms=ms)
                )

    # -- usage ledger ------------------------------------------------------------------------

    def insert_usage(self, rows: Sequence[dict[str, Any]]) -> None:
        """Write ledger rows (``usage`` columns, ``row_id`` set, every row the same keys).

        A row whose ``row_id`` is present already replaces it only when it is a finished row
        (``duration_ms`` set) — a request's in-flight row (``duration_ms`` null, written when it
        starts) is completed by its finished row, whatever order they land in — and is
        otherwise skipped: a batch re-sent after an outage, or a spool replayed twice, lands
        once. One ``INSERT ... ON CONFLICT (row_id) DO UPDATE ... WHERE`` on both dialects.
        """
        if not rows:
            return
        # A row spooled by an older release lacks the columns added since (one INSERT takes
        # its keys from the first row): those get the column's default.
        defaults = {"cache_write_tokens": 0, "warmup": 0, "team_id": None, "subject": None}
        self._upsert(usage, [{**defaults, **row} for row in collapse_rows(rows)])

    def _upsert(self, table: sa.Table, rows: list[dict[str, Any]]) -> None:
        """``INSERT ... ON CONFLICT (row_id) DO UPDATE ... WHERE`` the new row is finished."""
        if self.dialect == "sqlite":
            from sqlalchemy.dialects.sqlite import insert
        else:
            from sqlalchemy.dialects.postgresql import insert  # type: ignore[assignment]
        statement = insert(table)
        columns = [name for name in rows[0] if name not in ("id", "row_id")]
        statement = statement.on_conflict_do_update(
            index_elements=["row_id"],
            set_={name: statement.excluded[name] for name in columns},
            where=statement.excluded.duration_ms.is_not(None),
        )
        with self.engine.begin() as conn:
            conn.execute(statement, rows)

    def insert_ws_connections(self, rows: Sequence[dict[str, Any]]) -> None:
        """Write ``ws_connections`` rows (its columns, ``row_id`` set, every row the same
        keys), with :meth:`insert_usage`'s rule: a socket's closed row (``duration_ms`` set)
        replaces its open row, whatever order they land in; a row re-sent lands once."""
        if rows:
            self._upsert(ws_connections, collapse_rows(rows))

    def insert_refusals(self, rows: Sequence[dict[str, Any]]) -> None:
        """Write ``refusals`` rows (its columns, ``row_id`` set, every row the same keys); a
        row whose ``row_id`` is present already is skipped (a re-sent batch lands once)."""
        if not rows:
            return
        if self.dialect == "sqlite":
            from sqlalchemy.dialects.sqlite import insert
        else:
            from sqlalchemy.dialects.postgresql import insert  # type: ignore[assignment]
        unique = list({row["row_id"]: {"team_id": None, **row} for row in rows}.values())
        with self.engine.begin() as conn:
            conn.execute(insert(refusals).on_conflict_do_nothing(index_elements=["row_id"]), unique)

    def refusal_rows(self, since: int, name: str | None = None) -> list[dict[str, Any]]:
        """``refusals`` rows after ``since`` (ms), oldest first, each with its member's name as
        ``member`` (``None`` for a refusal with no member: an unknown or missing member key);
        only ``name``'s rows when given.

        Raises:
            DatabaseError: ``name`` given and unknown.
        """
        return self._member_rows(refusals, refusals.c.ts_ms, since, name, memberless=True)

    def ws_connection_rows(self, since: int, name: str | None = None) -> list[dict[str, Any]]:
        """``ws_connections`` rows opened after ``since`` (ms), oldest first, with the
        member's name.

        Raises:
            DatabaseError: ``name`` given and unknown.
        """
        return self._member_rows(ws_connections, ws_connections.c.opened_ms, since, name)

    def window_usage(
        self, member_id: int, now: int, owner: str = "member_id"
    ) -> dict[str, dict[str, Any]]:
        """Usage of one member in the rolling windows ending ``now`` (ms): ``{"five_hour":
        {"tokens": n, "credits": micro, "oldest": ts_ms | None}, "weekly": {...}}``, where
        ``oldest`` is the time of the window's oldest row that used tokens or credits.
        ``owner="team_id"``: of one team instead (``member_id`` is then the team's id)."""
        five = now - FIVE_HOURS_MS
        week = now - WEEK_MS
        used = sa.or_(usage.c.total_tokens > 0, usage.c.credits_micro > 0)

        def in_window(column: Any, since: int) -> Any:
            return sa.func.coalesce(
                sa.func.sum(sa.case((usage.c.ts_ms > since, column), else_=0)), 0
            )

        def oldest(since: int) -> Any:
            return sa.func.min(sa.case((sa.and_(usage.c.ts_ms > since, used), usage.c.ts_ms)))

        query = sa.select(
            in_window(usage.c.total_tokens, five),
            in_window(sa.func.coalesce(usage.c.credits_micro, 0), five),
            oldest(five),
            in_window(usage.c.total_tokens, week),
            in_window(sa.func.coalesce(usage.c.credits_micro, 0), week),
            oldest(week),
        ).where(usage.c[owner] == member_id, usage.c.ts_ms > week)
        with self.engine.connect() as conn:
            t5, c5, o5, tw, cw, ow = conn.execute(query).one()
        return {
            "five_hour": {
                "tokens": int(t5),
                "credits": int(c5),
                "oldest": None if o5 is None else int(o5),
            },
            "weekly": {
                "tokens": int(tw),
                "credits": int(cw),
                "oldest": None if ow is None else int(ow),
            },
        }

    def window_rows(
        self, member_id: int, since: int, kind: str, owner: str = "member_id"
    ) -> list[tuple[int, int]]:
        """``(ts_ms, amount)`` of a member's rows after ``since``; amount is ``total_tokens``
        (``kind="tokens"``) or micro-credits (``kind="credits"``). ``owner="team_id"``: of
        one team's rows instead."""
        column = usage.c.total_tokens if kind == "tokens" else usage.c.credits_micro
        query = (
            sa.select(usage.c.ts_ms, column)
            .where(usage.c[owner] == member_id, usage.c.ts_ms > since)
            .where(column.is_not(None), column > 0)
        )
        with self.engine.connect() as conn:
            return [(int(ts), int(amount)) for ts, amount in conn.execute(query).all()]

    def usage_rows(self, since: int, name: str | None = None) -> list[dict[str, Any]]:
        """Ledger rows after ``since`` (ms), oldest first, with the member's name.

        Raises:
            DatabaseError: ``name`` given and unknown.
        """
        return self._member_rows(usage, usage.c.ts_ms, since, name)

    def _member_rows(
        self,
        table: sa.Table,
        time: sa.Column[Any],
        since: int,
        name: str | None,
        memberless: bool = False,
    ) -> list[dict[str, Any]]:
        """Rows of ``table`` (which has ``id`` and ``member_id``) whose ``time`` is after
        ``since`` (ms), oldest first, each with the member's name as ``member`` (with
        ``memberless``, rows whose ``member_id`` is NULL too, ``member`` ``None``); only
        ``name``'s rows when given. Raises DatabaseError: ``name`` unknown."""
        query = (
            sa.select(table, members.c.name.label("member"))
            .join(members, members.c.id == table.c.member_id, isouter=memberless)
            .where(time > since)
            .order_by(time, table.c.id)
        )
        with self.engine.connect() as conn:
            if name is not None:
                _member_id(conn, name)
                query = query.where(members.c.name == name)
            return [dict(r._mapping) for r in conn.execute(query).all()]

    # -- concurrency leases ------------------------------------------------------------------

    def acquire_lease(
        self, member_id: int, limit: int, instance: str, ttl_ms: int
    ) -> tuple[str | None, int]:
        """Take one of a member's ``limit`` concurrency slots for ``ttl_ms``.

        Returns ``(lease_id, active)``: ``lease_id`` is ``None`` when ``active`` (unexpired
        leases of the member, across every instance) already reached ``limit``. Expired
        leases (a crashed instance's) are deleted first. Serialised per member (see module).
        """
        now = now_ms()
        with self.engine.begin() as conn:
            if self.dialect != "sqlite":
                conn.execute(
                    sa.select(members.c.id).where(members.c.id == member_id).with_for_update()
                )
            conn.execute(
                leases.delete().where(leases.c.member_id == member_id, leases.c.expires_ms <= now)
            )
            active = conn.execute(
                sa.select(sa.func.count())
                .select_from(leases)
                .where(leases.c.member_id == member_id)
            ).scalar_one()
            if active >= limit:
                return None, int(active)
            lease_id = str(uuid.uuid4())
            conn.execute(
                leases.insert().values(
                    id=lease_id, member_id=member_id, instance=instance, expires_ms=now + ttl_ms
                )
            )
            return lease_id, int(active) + 1

    def renew_leases(self, lease_ids: Iterable[str], ttl_ms: int) -> None:
        """Push the expiry of live leases ``ttl_ms`` into the future."""
        ids = list(lease_ids)
        if not ids:
            return
        with self.engine.begin() as conn:
            conn.execute(
                leases.update().where(leases.c.id.in_(ids)).values(expires_ms=now_ms() + ttl_ms)
            )

    def release_leases(self, lease_ids: Iterable[str]) -> None:
        """Give slots back (unknown ids are ignored)."""
        ids = list(lease_ids)
        if not ids:
            return
        with self.engine.begin() as conn:
            conn.execute(leases.delete().where(leases.c.id.in_(ids)))

    # -- upstream key health -----------------------------------------------------------------

    def record_key_states(self, states: Sequence[dict[str, Any]], instance: str) -> None:
        """Store upstream key health by name (``name, state, cooling_until_ms, reason``)."""
        if not states:
            return
        with self.engine.begin() as conn:
            for state in states:
                values = {
                    "state": state["state"],
                    "cooling_until_ms": state.get("cooling_until_ms"),
                    "reason": (state.get("reason") or None),
                    "instance": instance,
                    "updated_ms": now_ms(),
                }
                updated = conn.execute(
                    upstream_keys.update()
                    .where(upstream_keys.c.name == state["name"])
                    .values(values)
                )
                if updated.rowcount == 0:
                    conn.execute(upstream_keys.insert().values(name=state["name"], **values))


def collapse_rows(rows: Sequence[dict[str, Any]]) -> list[dict[str, Any]]:
    """One row per ``row_id``, in first-seen order: a finished row (``duration_ms`` set) wins
    over the in-flight row of the same request, else the first. (One statement must not touch
    a row twice: PostgreSQL refuses ``ON CONFLICT DO UPDATE`` hitting a row twice.)"""
    chosen: dict[str, dict[str, Any]] = {}
    for row in rows:
        current = chosen.get(row["row_id"])
        if current is None or (
            current.get("duration_ms") is None and row.get("duration_ms") is not None
        ):
            chosen[row["row_id"]] = row
    return list(chosen.values())


def _member_id(conn: sa.Connection, name: str) -> int:
    """The id of member ``name``. Raises :class:`DatabaseError` when there is none."""
    member_id = conn.execute(sa.select(members.c.id).where(members.c.name == name)).scalar()
    if member_id is None:
        raise DatabaseError(f"no member named {name!r}")
    return int(member_id)


def _settings(settings: Mapping[str, int | None]) -> dict[str, int]:
    values: dict[str, int] = {}
    for column, value in settings.items():
        if column not in MEMBER_SETTINGS:
            raise ValueError(f"unknown member setting {column!r}")
        if value is None:
            continue
        if isinstance(value, bool) or not isinstance(value, int) or value < 0:
            raise ValueError(f"{column} must be a whole number >= 0")
        values[column] = value
    return values


def _models(text: str | None) -> str | None:
    """A ``models`` value as stored: its patterns checked and normalised, ``None`` for every
    model. Raises ``ValueError`` for a bad pattern."""
    return patterns_text(parse_patterns(text))
