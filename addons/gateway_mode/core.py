"""What the gateway's addons share: the database, the ledger, the member directory, the rate
card and the policies; and :class:`GatewayOptions`, the addon that owns their options.

The manifest (``addons/gateway.py``) makes one :class:`GatewayCore` and hands it to each
gateway addon. Flow markers the gateway adds to ``flow.metadata`` (plain values only: they
are written into flow files) are defined here.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import logging
import os
import threading
import time
import uuid
from typing import Any

from mitmproxy import ctx, exceptions, http

from addons import body_decode
from addons.body_decode import DecodeLimits
from addons.common import ALLOWED, REFUSED, error_response, fail_closed
from addons.credits import RateCard
from addons.exchange import read_request
from addons.gateway_mode import identities, keypool, teams
from addons.gateway_mode.config import (
    DEFAULT_GATEWAY_CONFIG,
    load_gateway_config,
    rate_card_gap_lines,
    rate_card_gaps,
)
from addons.gateway_mode.database import Database
from addons.gateway_mode.ledger import UsageLedger
from addons.gateway_mode.lifetimes import expired, expired_message
from addons.gateway_mode.members import same_hash
from addons.gateway_mode.metrics import GatewayMetrics
from addons.gateway_mode.oidc import OidcVerifier
from addons.gateway_mode.socket_protocol import realtime_query
from addons.gateway_mode.teams import TeamSlots
from addons.gateway_mode.windows import limits_of

logger = logging.getLogger(__name__)

#: Seconds :meth:`GatewayCore.acquire_lease` waits at most for the member's own releases (they
#: wait for the usage ledger's next write, which is at once unless the database is away).
RELEASE_WAIT_S = 5.0

#: ``{"member": name, "member_id": n, "key_id": id}`` once the member key was accepted; a
#: member in a team also has ``"team": name, "team_id": n`` (:mod:`addons.gateway_mode.teams`).
MEMBER = "codex_gateway.member"
#: ``{"model", "service_tier", "session"}`` read from the request (body and headers).
REQUEST_INFO = "codex_gateway.request"
#: The upstream key *name* used (last attempt), and the number of attempts.
UPSTREAM_KEY = "codex_gateway.upstream_key"
ATTEMPTS = "codex_gateway.attempts"
#: The gateway route the member asked for (``/v1/responses`` or ``/v1/responses/compact``),
#: kept before the URL is rewritten to the upstream's.
ROUTE = "codex_gateway.route"
#: The WebSocket route an upgrade was claimed for: the name of its
#: :class:`addons.gateway_mode.socket_protocol.SocketProtocol` (``responses``, ``realtime``).
SOCKET_ROUTE = "codex_gateway.socket_route"
#: Route labels for metrics: the gateway's own routes, everything else ``other`` (a label
#: per path a client invents would grow without bound).
KNOWN_ROUTES = frozenset({"/v1/responses", "/v1/responses/compact", "/health", "/metrics"})


def route_label(path: str) -> str:
    """``path`` when it is one of :data:`KNOWN_ROUTES`, else ``"other"``."""
    return path if path in KNOWN_ROUTES else "other"


#: Codex's session header (CODEX.md); keeps a session on one upstream key.
SESSION_HEADERS = ("session-id", "session_id", "thread-id")


def gateway_error(
    status: int, code: str, message: str, headers: dict[str, str] | None = None, **fields: Any
) -> http.Response:
    """A local JSON reply in the OpenAI error shape (:func:`addons.common.error_response`, type
    ``codex_gateway``), with extra ``fields`` in ``error`` (``limit``, ``used``,
    ``resets_at``...). ``message`` must never hold a secret."""
    return error_response(status, "codex_gateway", code, message, headers, fields)


def refuse(flow: http.HTTPFlow, reason: str, response: http.Response) -> None:
    """Answer ``flow`` locally: it loses the allowlist mark (nothing is forwarded, no key)."""
    flow.metadata.pop(ALLOWED, None)
    flow.metadata[REFUSED] = reason
    flow.response = response


class BodyRefused(ValueError):
    """A member request body the gateway will not read: ``status`` (413, 400), ``code`` and
    ``limit`` (the limit's name) for the error reply; the message names the limit."""

    def __init__(self, status: int, code: str, limit: str, message: str) -> None:
        super().__init__(message)
        self.status, self.code, self.limit = status, code, limit


def parse_request_body(
    raw: bytes, content_encoding: str | None, limits: DecodeLimits | None = None
) -> dict[str, Any]:
    """``{"model", "service_tier"}`` of a member request body (bytes as received; Codex can
    send zstd), read by :func:`addons.exchange.read_request` within ``limits`` (``None``: the
    process's) and the JSON depth limit. A body that is no JSON object gives ``None`` for both.

    Raises:
        BodyRefused: 413 ``request_too_large`` past the decode limit (a decompression bomb),
            400 ``json_too_deep`` past :data:`addons.body_decode.MAX_JSON_DEPTH`.
    """
    limits = limits if limits is not None else body_decode.LIMITS
    facts = read_request(raw, content_encoding, limits)
    if facts.decoded is not None and facts.decoded.over_limit:
        raise BodyRefused(
            413,
            "request_too_large",
            "codex_decode_max_mib"
            if "max_mib" in (facts.decoded.error or "")
            else "codex_decode_max_ratio",
            f"the request body ({len(raw)} bytes, {content_encoding}) decodes past the "
            f"gateway's limit of {limits.describe(len(raw))}; nothing was sent upstream",
        )
    if facts.too_deep is not None:
        raise BodyRefused(
            400,
            "json_too_deep",
            "max_json_depth",
            f"the request body is {facts.too_deep} (the gateway's limit); nothing was sent "
            "upstream",
        )
    return {"model": facts.model, "service_tier": facts.service_tier}


def request_info(flow: http.HTTPFlow) -> dict[str, Any]:
    """``model``, ``service_tier``, ``session`` of a member request, read once and kept in
    ``flow.metadata[REQUEST_INFO]``: by :class:`RequestFacts` (off the event loop, refusing
    bombs and deep JSON) before any other addon asks; read here only for a flow it did not see
    (a body it would refuse reads as no facts)."""
    info = flow.metadata.get(REQUEST_INFO)
    if isinstance(info, dict):
        return info
    try:
        facts = parse_request_body(
            flow.request.raw_content or b"", flow.request.headers.get("content-encoding")
        )
    except BodyRefused:
        facts = {"model": None, "service_tier": None}
    return _keep_info(flow, facts)


def _keep_info(flow: http.HTTPFlow, facts: dict[str, Any]) -> dict[str, Any]:
    if facts["model"] is None and flow.metadata.get(SOCKET_ROUTE) == "realtime":
        # A Realtime upgrade has no body: its model is the URL's (checked by the route).
        target = str(flow.metadata.get(ROUTE) or flow.request.path)  # before the rewrite
        facts = {**facts, "model": (realtime_query(target.encode()) or {}).get("model")}
    session = next(
        (flow.request.headers[h] for h in SESSION_HEADERS if h in flow.request.headers), None
    )
    info = {**facts, "session": session[:200] if session else None}
    flow.metadata[REQUEST_INFO] = info
    return info


class RequestFacts:
    """Reads a member request's facts (:func:`parse_request_body`) in ``request``, before the
    Codex filter and the quota gate ask for them, and refuses what it will not read: 413
    ``request_too_large`` (decodes past ``codex_decode_max_mib`` / ``_ratio``) or 400
    ``json_too_deep``, both naming the limit, before anything goes upstream.

    A compressed or large body is decoded and parsed on this addon's own two threads, never
    on the event loop (a 32 MiB decode takes ~100 ms; other members' streams go on meanwhile),
    and two at a time at most, so concurrent bombs hold at most two decode limits of memory.
    """

    #: Plain bodies up to this size (bytes) are parsed on the loop (~50 us for Codex's 40 KB).
    INLINE_BYTES = 256 * 1024

    def __init__(self, core: GatewayCore) -> None:
        self.core = core
        self._executor: concurrent.futures.ThreadPoolExecutor | None = None

    @fail_closed
    async def request(self, flow: http.HTTPFlow) -> None:
        if flow.response or flow.error or not flow.live or MEMBER not in flow.metadata:
            return
        raw = flow.request.raw_content or b""
        encoding = flow.request.headers.get("content-encoding")
        limits = body_decode.LIMITS
        try:
            if encoding or len(raw) > self.INLINE_BYTES:
                if self._executor is None:
                    self._executor = concurrent.futures.ThreadPoolExecutor(
                        2, thread_name_prefix="gateway-decode"
                    )
                facts = await asyncio.get_running_loop().run_in_executor(
                    self._executor, parse_request_body, raw, encoding, limits
                )
            else:
                facts = parse_request_body(raw, encoding, limits)
        except BodyRefused as e:
            self.core.metrics.refused.labels(e.code).inc()
            refuse(
                flow,
                e.code.replace("_", "-"),
                gateway_error(e.status, e.code, str(e), limit=e.limit),
            )
            return
        _keep_info(flow, facts)

    def done(self) -> None:
        if self._executor is not None:
            self._executor.shutdown(wait=False, cancel_futures=True)
            self._executor = None


class MemberDirectory:
    """Live member keys by hash, refreshed from the database on the ledger thread every
    ``refresh_s`` (a revoked key stops working within that time) and on a miss. Entries carry
    ``expires_ms``; expiry is judged with the clock when asked (:meth:`by_key_id`,
    :meth:`refusal`), so a key stops working at its expiry, not at the next refresh."""

    def __init__(self) -> None:
        self._by_hash: dict[str, dict[str, Any]] = {}
        self._by_id: dict[str, dict[str, Any]] = {}
        self._lock = threading.Lock()

    def load(self, rows: list[dict[str, Any]]) -> None:
        by_hash = {row["key_hash"]: row for row in rows if row.get("key_hash")}
        by_id = {row["key_id"]: row for row in rows}
        with self._lock:
            self._by_hash, self._by_id = by_hash, by_id

    def find(self, digest: str) -> dict[str, Any] | None:
        """The entry of a key hash, expired or not (member auth tells an expired key apart)."""
        entry = self._by_hash.get(digest)
        if entry is not None and same_hash(entry["key_hash"], digest):
            return entry
        return None

    def by_key_id(self, key_id: str) -> dict[str, Any] | None:
        """The live entry of a key id (its member's current settings), ``None`` if revoked
        or expired now."""
        entry = self._by_id.get(key_id)
        if entry is not None and expired(entry.get("expires_ms"), int(time.time() * 1000)):
            return None
        return entry

    def refusal(self, key_id: str) -> tuple[str, str]:
        """``(code, message)`` for a key (or an OIDC identity, ``oi_...``) that is not live:
        ``expired_member_key`` and when it expired, else ``invalid_member_key`` (unknown or
        revoked)."""
        entry = self._by_id.get(key_id)
        expires = entry.get("expires_ms") if entry is not None else None
        if expires is not None and expired(expires, int(time.time() * 1000)):
            identity = key_id if entry is not None and entry.get("issuer") else None
            return "expired_member_key", expired_message(expires, identity)
        return "invalid_member_key", "unknown or revoked member key"


class GatewayCore:
    """Shared state of one gateway process (see the module docstring)."""

    def __init__(self) -> None:
        self.db: Database | None = None
        self.ledger: UsageLedger | None = None
        self.card = RateCard()
        self.pool = keypool.POOL
        self.directory = MemberDirectory()
        #: OIDC identities (issue 31): their rows come with the directory's.
        self.oidc = OidcVerifier()
        self.metrics = GatewayMetrics()
        self.instance = f"{os.uname().nodename[:40]}-{os.getpid()}-{uuid.uuid4().hex[:6]}"
        self.require_codex_client = True
        self.max_attempts = 3
        self.cooldown_s = 30
        self.lease_ms = 60_000
        #: Slots of a member with a quota and ``max_concurrent`` 0 (``quota_max_concurrent``).
        self.quota_concurrency = 4
        self.refresh_s = 1.0
        self.executor = concurrent.futures.ThreadPoolExecutor(4, thread_name_prefix="gateway-db")
        self.leases: dict[str, str] = {}  # flow id -> lease id
        self._lease_member: dict[str, int] = {}  # lease id -> member id
        self._lease_team: dict[str, int] = {}  # lease id -> team id (a team member's lease)
        #: Releases not written yet, by team id (:meth:`acquire_team_lease` waits for them).
        self._releasing_team: dict[int, set[concurrent.futures.Future[Any]]] = {}
        #: ``{team id: name}`` of the teams in the directory (``/metrics`` by team).
        self.team_names: dict[int, str] = {}
        #: Releases not written yet, by member id (:meth:`acquire_lease` waits for them).
        self._releasing: dict[int, set[concurrent.futures.Future[Any]]] = {}
        #: Failed connect attempts for a client connection's current request, by its id
        #: (:class:`addons.gateway_mode.connect.RetryingConnect`; counted in ``attempts``).
        self.connect_retries: dict[str, int] = {}
        self._last_used: dict[str, int] = {}
        self._miss_lock = asyncio.Lock()
        self._last_miss_refresh = 0.0

    @property
    def database_ok(self) -> bool:
        return self.ledger is not None and self.ledger.healthy

    async def run_db(self, fn: Any, *args: Any) -> Any:
        """Run a blocking database call on the gateway's worker threads."""
        return await asyncio.get_running_loop().run_in_executor(self.executor, fn, *args)

    def release_lease(self, key: str, after_rows: bool = True) -> None:
        """Give back the concurrency lease held under ``key`` (a flow id or a socket turn's
        slot), if any, without waiting; :meth:`acquire_lease` of the same member waits for it.

        With ``after_rows`` (the default: a request or socket turn that ended), only once
        every usage row queued so far on this instance is in the database
        (:meth:`UsageLedger.after_written`, which flushes at once): whoever finds the slot
        free, on any instance, then also finds the usage of the request that held it. That
        is what bounds a quota's overshoot to its slots (docs/gateway.md). A socket turn's
        row is queued right after its release, in the same step of the event loop, so the
        barrier is set at the end of that step."""
        lease = self.leases.pop(key, None)
        if not lease or self.db is None:
            return
        member_id = self._lease_member.pop(lease, -1)
        future: concurrent.futures.Future[Any] = concurrent.futures.Future()
        pending = self._releasing.setdefault(member_id, set())
        pending.add(future)
        future.add_done_callback(pending.discard)
        team_id = self._lease_team.pop(lease, None)
        if team_id is not None:
            team_pending = self._releasing_team.setdefault(team_id, set())
            team_pending.add(future)
            future.add_done_callback(team_pending.discard)
        db = self.db

        def release() -> None:
            try:
                db.release_leases([lease])
            except Exception as e:
                logger.warning("concurrency slot not released (%s)", type(e).__name__)
            finally:
                future.set_result(None)

        ledger = self.ledger
        if not after_rows or ledger is None:
            self.executor.submit(release)
            return
        try:
            asyncio.get_running_loop().call_soon(ledger.after_written, release)
        except RuntimeError:  # no event loop (shutdown): at once
            ledger.after_written(release)

    async def give_back_lease(self, key: str) -> None:
        """Release the lease held under ``key`` now and wait until it is written (a request
        refused after it took its slot: it spent nothing)."""
        lease = self.leases.pop(key, None)
        if lease and self.db is not None:
            self._lease_member.pop(lease, None)
            self._lease_team.pop(lease, None)
            await self.run_db(self.db.release_leases, [lease])

    async def acquire_lease(self, member_id: int, max_concurrent: int) -> tuple[str | None, int]:
        """:meth:`Database.acquire_lease` on a worker thread, after every release of the
        member's already given back has been written (at most :data:`RELEASE_WAIT_S`). A
        client's next request can follow the end of its previous one by less than the
        release takes (Codex sends its next turn as soon as a socket turn's last event
        arrives), and the worker threads run in parallel: without the wait, the member's own
        finished turn could still count against its slots."""
        pending = self._releasing.get(member_id)
        if pending:
            await asyncio.wait(
                [asyncio.wrap_future(f) for f in list(pending)], timeout=RELEASE_WAIT_S
            )
        assert self.db is not None
        lease, active = await self.run_db(
            self.db.acquire_lease, member_id, max_concurrent, self.instance, self.lease_ms
        )
        if lease is not None:
            self._lease_member[lease] = member_id
        return lease, active

    async def acquire_team_lease(
        self, member_id: int, max_concurrent: int, team: TeamSlots
    ) -> tuple[str | None, int, int | None]:
        """:meth:`acquire_lease` for a member in a team: one lease holding a slot of the
        member and one of its team (:func:`addons.gateway_mode.teams.acquire_lease`), after
        every release of the member's and of the team's on this instance already given back
        has been written (at most :data:`RELEASE_WAIT_S`). Returns ``(lease, active,
        team_active)``: ``team_active`` is not ``None`` when the team's count was read."""
        waits = [
            *self._releasing.get(member_id, ()),
            *self._releasing_team.get(team.team_id, ()),
        ]
        if waits:
            await asyncio.wait([asyncio.wrap_future(f) for f in waits], timeout=RELEASE_WAIT_S)
        assert self.db is not None
        lease, active, team_active = await self.run_db(
            teams.acquire_lease,
            self.db,
            member_id,
            max_concurrent,
            team.team_id,
            team.slots,
            self.instance,
            self.lease_ms,
        )
        if lease is not None:
            self._lease_member[lease] = member_id
            self._lease_team[lease] = team.team_id
        return lease, active, team_active

    def refuse_expired(self, flow: http.HTTPFlow, key_id: str) -> None:
        """Refuse ``flow`` whose member key or OIDC identity ``key_id`` is past its expiry:
        401 ``expired_member_key`` with :meth:`MemberDirectory.refusal`'s message (when it
        expired; no secret), refused as member auth (400 to Codex: a new token or retry would
        not help; :mod:`addons.gateway_mode.codex_replies`)."""
        code, text = self.directory.refusal(key_id)
        self.metrics.refused.labels(code).inc()
        refuse(
            flow,
            "member-auth",
            gateway_error(
                401,
                code,
                text,
                {"www-authenticate": 'Bearer realm="codex-gateway", error="invalid_token"'},
            ),
        )

    async def acquire_slots(
        self, member_id: int, max_concurrent: int, team: TeamSlots | None
    ) -> tuple[str | None, int, int | None]:
        """The one lease a request or socket turn takes before its usage is read: a slot of
        the member and, for a team member, one of its team (:meth:`acquire_team_lease`); none
        for a member without slots and team. Returns ``(lease, active, team_active)``
        (``lease`` ``None`` and ``active`` at the cap: no slot; ``team_active`` not ``None``
        when the team's count was read)."""
        if team is not None:
            return await self.acquire_team_lease(member_id, max_concurrent, team)
        if not max_concurrent:
            return None, 0, None
        lease, active = await self.acquire_lease(member_id, max_concurrent)
        return lease, active, None

    def refresh_directory(self) -> None:
        """Reload the member directory; a member with a quota and ``max_concurrent`` 0 gets
        :attr:`quota_concurrency` slots (marked ``max_concurrent_default``)."""
        assert self.db is not None
        rows = self.db.directory()
        identity_rows = identities.directory_rows(self.db)
        rows += identity_rows
        if self.quota_concurrency:
            for row in rows:
                if not row["max_concurrent"] and limits_of(row):
                    row["max_concurrent"] = self.quota_concurrency
                    row["max_concurrent_default"] = True
        self.team_names = teams.attach_teams(
            rows, teams.member_teams(self.db), self.quota_concurrency
        )
        self.directory.load(rows)
        self.oidc.load(identity_rows)

    async def find_member(self, digest: str) -> dict[str, Any] | None:
        """The directory entry for a key hash; on a miss, one refresh from the database (at
        most every 0.2 s, so unknown keys cannot flood it) for keys added since."""
        entry = self.directory.find(digest)
        if entry is not None or self.db is None:
            return entry
        await self.refresh_after_miss()
        return self.directory.find(digest)

    async def refresh_after_miss(self) -> None:
        """One directory refresh from the database, at most every 0.2 s for every kind of miss
        together (an unknown key hash in :meth:`find_member`, an identity token that named no
        live identity), so unknown credentials cannot flood the database."""
        if self.db is None:
            return
        async with self._miss_lock:
            if time.monotonic() - self._last_miss_refresh > 0.2:
                self._last_miss_refresh = time.monotonic()
                await self.run_db(self.refresh_directory)

    def touch(self, key_id: str) -> None:
        self._last_used[key_id] = int(time.time() * 1000)

    def _touch_keys(self) -> None:
        used, self._last_used = self._last_used, {}
        assert self.db is not None
        self.db.touch_keys(used)

    def _renew_leases(self) -> None:
        assert self.db is not None
        self.db.renew_leases(list(self.leases.values()), self.lease_ms)

    def _record_key_states(self) -> None:
        if not self.pool.changed.is_set():
            return
        self.pool.changed.clear()
        assert self.db is not None
        self.db.record_key_states(self.pool.states(), self.instance)

    def start(
        self, database_url: str, spool_path: str | None, spool_base: str | None = None
    ) -> None:
        """Open the database (schema must be initialised; a SQLite file is never created
        here), load the directory, start the ledger thread, which first replays every spool
        of ``spool_base`` (the deployment's spool option; default ``spool_path``). Raises
        ``ValueError`` / :class:`DatabaseError` for the operator."""
        self.stop()
        self.db = Database(database_url, create=False)
        self.db.check_schema()
        self.refresh_directory()
        self.ledger = UsageLedger(self.db, spool_path, spool_base)
        self.ledger.tasks = [
            (self.refresh_s, self.refresh_directory),
            (1.0, self._touch_keys),
            (max(1.0, self.lease_ms / 3000), self._renew_leases),
            (0.5, self._record_key_states),
        ]
        self.pool.changed.set()
        self.ledger.start()

    def stop(self) -> None:
        if self.ledger is not None:
            self.ledger.stop()
            self.ledger = None
        self._lease_member.clear()
        if self.db is not None:
            if self.leases:
                try:
                    self.db.release_leases(list(self.leases.values()))
                except Exception as e:
                    logger.warning("could not release leases at exit (%s)", type(e).__name__)
                self.leases.clear()
            self.db.dispose()
            self.db = None


class GatewayOptions:
    """Owns the gateway's options and opens its database (``configure`` fails start-up on a
    bad URL, an uninitialised schema, a bad rate card or no upstream keys)."""

    def __init__(self, core: GatewayCore) -> None:
        self.core = core

    def load(self, loader) -> None:
        loader.add_option(
            "codex_gateway_config",
            str,
            DEFAULT_GATEWAY_CONFIG,
            "The gateway's YAML config (rate card, policies, default database).",
        )
        loader.add_option(
            "codex_gateway_database",
            str,
            "",
            "Database URL (sqlite:///path.db or postgresql://user@host/db; no password in "
            "it). Empty: the config's.",
        )
        loader.add_option(
            "codex_gateway_keys_file",
            str,
            "",
            "Read upstream keys (NAME KEY or KEY per line) from this file ('-': stdin) when the "
            "launcher has not loaded them; for plain `mitmdump -s addons/gateway.py`.",
        )
        loader.add_option(
            "codex_gateway_spool",
            str,
            "",
            "Where usage rows the database could not take are kept at exit (empty: the "
            "config's spool; --workers gives each worker its own).",
        )
        loader.add_option(
            "codex_gateway_refresh_ms",
            int,
            1000,
            "Milliseconds between member directory refreshes (a revoked key stops working "
            "within this time).",
        )

    def configure(self, updated: set[str]) -> None:
        names = {
            "codex_gateway_config",
            "codex_gateway_database",
            "codex_gateway_keys_file",
            "codex_gateway_refresh_ms",
            "codex_gateway_spool",
        }
        if not names & updated:
            return
        opts = ctx.options
        try:
            config = load_gateway_config(opts.codex_gateway_config)
            if opts.codex_gateway_refresh_ms < 100:
                raise ValueError("codex_gateway_refresh_ms must be >= 100")
            if opts.codex_gateway_keys_file and not self.core.pool.is_set:
                self._load_keys(opts.codex_gateway_keys_file)
            core = self.core
            core.card = config.rate_card()
            gaps = rate_card_gap_lines(rate_card_gaps(core.card), config.path, core.card)
            if gaps:
                logger.warning("gateway: %s", "\n".join(gaps))
            core.require_codex_client = config.require_codex_client
            core.max_attempts = config.max_attempts
            core.cooldown_s = config.cooldown_seconds
            core.lease_ms = config.lease_seconds * 1000
            core.quota_concurrency = config.quota_max_concurrent
            core.refresh_s = opts.codex_gateway_refresh_ms / 1000
            core.start(
                opts.codex_gateway_database or config.database_url(),
                opts.codex_gateway_spool or config.spool_path(),
                config.spool_path(),
            )
        except exceptions.OptionsError:
            raise
        except Exception as e:  # ValueError, DatabaseError, SQLAlchemy errors
            raise exceptions.OptionsError(f"gateway: {e}") from None

    def _load_keys(self, path: str) -> None:
        import sys

        try:
            if path == "-":
                keys = keypool.read_upstream_keys(sys.stdin.buffer)
            else:
                with open(path, "rb") as f:
                    keys = keypool.read_upstream_keys(f)
        except OSError as e:
            raise ValueError(f"codex_gateway_keys_file: {e.strerror}") from None
        self.core.pool.set_keys(keys)

    def running(self) -> None:
        if not self.core.pool.is_set:
            logger.error(
                "no upstream keys loaded: start through `codex-proxy gateway serve` (keys on "
                "stdin) or set codex_gateway_keys_file"
            )


class GatewayClose:
    """Last in the manifest: at shutdown, after every addon's ``done`` (accounting queues the
    rows of flows still open), flushes the ledger, releases leases, closes the database."""

    def __init__(self, core: GatewayCore) -> None:
        self.core = core

    def done(self) -> None:
        self.core.stop()
