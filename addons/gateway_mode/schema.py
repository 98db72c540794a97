"""The gateway's tables (SQLAlchemy Core), shared by SQLite and PostgreSQL.

Times are integer milliseconds since the Unix epoch (``*_ms``); credits are integer
micro-credits (``*_micro``: 1 credit = 1 000 000), exact on both dialects. The migrations in
``addons/gateway_mode/migrations`` create exactly these tables; ``tests/test_gateway_db.py``
checks that they agree.
"""

from __future__ import annotations

from sqlalchemy import (
    BigInteger,
    Column,
    ForeignKey,
    Index,
    Integer,
    MetaData,
    String,
    Table,
    Text,
)

#: SQLite only auto-increments an ``INTEGER PRIMARY KEY``; PostgreSQL gets a BIGINT identity.
BigId = BigInteger().with_variant(Integer(), "sqlite")

metadata = MetaData()

#: A team member. Quotas: 0 = unlimited. Token quotas count ``total_tokens``.
members = Table(
    "members",
    metadata,
    Column("id", BigId, primary_key=True, autoincrement=True),
    Column("name", String(64), nullable=False, unique=True),
    Column("five_hour_quota", BigInteger, nullable=False, default=0),
    Column("weekly_quota", BigInteger, nullable=False, default=0),
    Column("five_hour_credits_micro", BigInteger, nullable=False, default=0),
    Column("weekly_credits_micro", BigInteger, nullable=False, default=0),
    Column("max_concurrent", Integer, nullable=False, default=0),
    Column("created_ms", BigInteger, nullable=False),
    #: Model patterns the member may use, comma-separated (``*``: any run of characters);
    #: ``NULL``: every model (:mod:`addons.gateway_mode.model_policy`).
    Column("models", String(2000), nullable=True),
    #: The member's team (:data:`teams`), ``NULL``: none (0007).
    Column("team_id", BigId, ForeignKey("teams.id", name="members_team_id_fkey"), nullable=True),
)

#: A team (0007): its members' requests count against its windows too, and its
#: ``max_concurrent`` slots are shared by its members. Quotas as a member's (0 = unlimited);
#: ``models``: comma-separated model patterns (``*`` any run of characters; empty = every
#: model), stored and shown here, matched by the models-per-member code.
teams = Table(
    "teams",
    metadata,
    Column("id", BigId, primary_key=True, autoincrement=True),
    Column("name", String(64), nullable=False, unique=True),
    Column("five_hour_quota", BigInteger, nullable=False, default=0),
    Column("weekly_quota", BigInteger, nullable=False, default=0),
    Column("five_hour_credits_micro", BigInteger, nullable=False, default=0),
    Column("weekly_credits_micro", BigInteger, nullable=False, default=0),
    Column("max_concurrent", Integer, nullable=False, default=0),
    Column("models", String(2000), nullable=False, default="", server_default=""),
    Column("created_ms", BigInteger, nullable=False),
)

#: A member key: only its SHA-256 (hex) is stored; ``id`` is public (``list-keys``).
member_keys = Table(
    "member_keys",
    metadata,
    Column("id", String(32), primary_key=True),
    Column("member_id", BigId, ForeignKey("members.id"), nullable=False),
    Column("key_hash", String(64), nullable=False, unique=True),
    Column("created_ms", BigInteger, nullable=False),
    Column("last_used_ms", BigInteger, nullable=True),
    Column("revoked_ms", BigInteger, nullable=True),
    #: When the key stops working (``NULL``: never); :mod:`addons.gateway_mode.lifetimes`.
    Column("expires_ms", BigInteger, nullable=True),
)

#: The usage ledger: one row per forwarded request. ``row_id`` (a UUID made by the gateway)
#: makes a re-sent row (after a database outage) land once. A request's in-flight row
#: (``duration_ms`` null, ``error`` "in flight"), written when it is forwarded, is replaced by its
#: finished row (same ``row_id``); one left in-flight means the gateway was killed meanwhile.
usage = Table(
    "usage",
    metadata,
    Column("id", BigId, primary_key=True, autoincrement=True),
    Column("row_id", String(36), nullable=False, unique=True),
    Column("ts_ms", BigInteger, nullable=False),
    Column("member_id", BigId, ForeignKey("members.id"), nullable=False),
    Column("key_id", String(32), nullable=False),
    Column("upstream_key", String(64), nullable=True),
    Column("model", String(200), nullable=True),
    Column("route", String(64), nullable=False),
    Column("status", Integer, nullable=True),
    Column("input_tokens", BigInteger, nullable=False, default=0),
    Column("cached_tokens", BigInteger, nullable=False, default=0),
    #: Prompt-cache writes (``input_tokens_details.cache_write_tokens``; part of input).
    Column("cache_write_tokens", BigInteger, nullable=False, default=0, server_default="0"),
    Column("output_tokens", BigInteger, nullable=False, default=0),
    Column("reasoning_tokens", BigInteger, nullable=False, default=0),
    Column("total_tokens", BigInteger, nullable=False, default=0),
    #: ``NULL``: unpriced (the rate card has no entry for the model).
    Column("credits_micro", BigInteger, nullable=True),
    Column("rate", String(200), nullable=True),
    Column("service_tier", String(32), nullable=True),
    Column("duration_ms", Integer, nullable=True),
    Column("ttfb_ms", Integer, nullable=True),
    Column("events", Integer, nullable=False, default=0),
    Column("attempts", Integer, nullable=False, default=1),
    Column("error", String(500), nullable=True),
    Column("instance", String(64), nullable=False),
    #: 1 for a warm-up (Codex's WebSocket ``response.create`` with ``"generate": false``):
    #: not a request or a turn in ``usage``; 0 for every other row and every row before 0004.
    Column("warmup", Integer, nullable=False, default=0, server_default="0"),
    #: The token's ``sub`` when an OIDC identity named the member (``key_id`` is then the
    #: identity's id, ``oi_...``); ``NULL`` for a member key and every row before 0009.
    Column("subject", String(255), nullable=True),
    Index("usage_member_ts", "member_id", "ts_ms"),
    #: The team the request was spent under (its member's then), ``NULL``: none (0007).
    Column("team_id", BigId, nullable=True),
    Index("usage_team_ts", "team_id", "ts_ms"),
)

#: Concurrency slots: one row per request in flight; a crashed instance's rows expire.
leases = Table(
    "leases",
    metadata,
    Column("id", String(36), primary_key=True),
    Column("member_id", BigId, ForeignKey("members.id"), nullable=False),
    Column("instance", String(64), nullable=False),
    Column("expires_ms", BigInteger, nullable=False),
    Index("leases_member", "member_id"),
    #: The team whose slot this lease also holds, ``NULL``: none (0007).
    Column("team_id", BigId, nullable=True),
    Index("leases_team", "team_id"),
)

#: Upstream key health by name (the keys themselves never reach the database).
upstream_keys = Table(
    "upstream_keys",
    metadata,
    Column("name", String(64), primary_key=True),
    Column("state", String(16), nullable=False),
    Column("cooling_until_ms", BigInteger, nullable=True),
    Column("reason", String(200), nullable=True),
    Column("instance", String(64), nullable=False),
    Column("updated_ms", BigInteger, nullable=False),
)

#: Member WebSocket connections (``/v1/responses``, ``/v1/realtime``): one row per socket,
#: written when it opens (``closed_ms`` and ``duration_ms`` null: still open, or the gateway
#: was killed meanwhile) and replaced by its closed row (same ``row_id``). Messages are
#: counted each way as they passed the gateway (the gateway's own error events not counted).
ws_connections = Table(
    "ws_connections",
    metadata,
    Column("id", BigId, primary_key=True, autoincrement=True),
    Column("row_id", String(36), nullable=False, unique=True),
    Column("member_id", BigId, ForeignKey("members.id"), nullable=False),
    Column("key_id", String(32), nullable=False),
    Column("upstream_key", String(64), nullable=True),
    Column("route", String(64), nullable=False),
    Column("model", String(200), nullable=True),
    Column("opened_ms", BigInteger, nullable=False),
    Column("closed_ms", BigInteger, nullable=True),
    Column("duration_ms", BigInteger, nullable=True),
    Column("client_messages", BigInteger, nullable=False, default=0),
    Column("upstream_messages", BigInteger, nullable=False, default=0),
    Column("turns", Integer, nullable=False, default=0),
    Column("close_reason", String(200), nullable=True),
    Column("instance", String(64), nullable=False),
    Index("ws_connections_member_opened", "member_id", "opened_ms"),
)

#: Requests and socket messages the gateway answered itself instead of forwarding (quota,
#: concurrency, unpriced model, member auth, body limits, route, the gateway's own state), one
#: row per refusal, ``count`` 1; refusals with no member (an unknown or missing member key)
#: are coalesced per ``code`` between ledger flushes into one row with their ``count``.
#: ``kind`` groups ``code`` (the error code of the answer) for ``usage``
#: (:data:`addons.gateway_mode.accounting.REFUSAL_KINDS`).
refusals = Table(
    "refusals",
    metadata,
    Column("id", BigId, primary_key=True, autoincrement=True),
    Column("row_id", String(36), nullable=False, unique=True),
    Column("ts_ms", BigInteger, nullable=False),
    Column("member_id", BigId, ForeignKey("members.id"), nullable=True),
    Column("key_id", String(32), nullable=True),
    Column("kind", String(32), nullable=False),
    Column("code", String(64), nullable=False),
    Column("status", Integer, nullable=True),
    Column("route", String(64), nullable=False),
    Column("model", String(200), nullable=True),
    Column("count", Integer, nullable=False, default=1),
    Column("instance", String(64), nullable=False),
    Index("refusals_ts", "ts_ms"),
    #: The member's team when refused, ``NULL``: none (0007).
    Column("team_id", BigId, nullable=True),
)

#: Admin changes (members, keys, the schema...), one row per change, written in the same
#: transaction as the change (:mod:`addons.gateway_mode.audit`): when (``ts_ms``), who
#: (``actor``: ``--actor`` or the OS user; ``host``: where the command ran), what
#: (``action``, e.g. ``add-key``, on ``target``, e.g. a member name or a key id), and the
#: values before and after as JSON objects (``NULL``: none). Never a secret or a key's hash.
audit_log = Table(
    "audit_log",
    metadata,
    Column("id", BigId, primary_key=True, autoincrement=True),
    Column("ts_ms", BigInteger, nullable=False),
    Column("actor", String(128), nullable=False),
    Column("host", String(255), nullable=True),
    Column("action", String(64), nullable=False),
    Column("target", String(200), nullable=False),
    Column("before", Text, nullable=True),
    Column("after", Text, nullable=True),
    Index("audit_log_ts", "ts_ms"),
)

#: An OIDC identity that names a member (issue 31): a bearer that is a JWT signed by
#: ``issuer``'s keys, whose ``aud`` contains ``audience`` and whose claims match every entry
#: of ``claims`` (a JSON object ``{name: pattern}``, ``*`` any run of characters) is that
#: member. ``id`` is public (``oi_`` and 12 hex digits); ``removed_ms`` set: refused.
member_identities = Table(
    "member_identities",
    metadata,
    Column("id", String(32), primary_key=True),
    Column("member_id", BigId, ForeignKey("members.id"), nullable=False),
    Column("issuer", String(500), nullable=False),
    Column("audience", String(500), nullable=False),
    Column("claims", String(4000), nullable=False),
    Column("created_ms", BigInteger, nullable=False),
    Column("removed_ms", BigInteger, nullable=True),
    #: When the identity stops naming its member (epoch ms; ``NULL``: never), as a key's.
    Column("expires_ms", BigInteger, nullable=True),
    Index("member_identities_issuer", "issuer"),
)
