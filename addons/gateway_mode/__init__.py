"""Gateway mode: one team, many Codex users, a pool of upstream keys.

The entry script is ``addons/gateway.py`` (the manifest of addons, as ``addons/proxy.py`` is
for the strict proxy); the launcher is ``./run.sh gateway`` (:mod:`addons.gateway_mode.cli`).
This package holds only what the gateway adds; what it shares with the strict proxy
(allowlist, upstream routing, SSE streaming, redaction, dumps, recording, WebSocket 426,
error replies, launching) is imported from ``addons/``.

- ``schema``, ``migrations/``, ``database``: the SQLAlchemy Core tables, their Alembic
  migrations and every query (SQLite or PostgreSQL).
- ``members``: member keys (``sk-codex-gw-...``), their hashes, name rules.
- ``lifetimes``: when a credential expires (``--expires``, ``default_key_lifetime``; pure).
- ``audit``: the audit log of admin changes (``record`` in the change's transaction; reading).
- ``identities``, ``oidc``, ``identity_auth``: members without static keys (OIDC identities:
  their rules, queries and admin commands; the JWT check against the issuer's discovered
  keys; the member auth path for a JWT bearer, whose refusals stay 401 for Codex).
- ``keypool``: the upstream key pool (keys from stdin, in memory only; health, cooldown).
- ``windows``: quota window arithmetic (pure).
- ``ledger``: the usage ledger's writer thread and its spool (no row lost); its rows are
  usage rows, ``ws_connections`` rows and ``refusals`` rows (and the refusal kinds).
- ``core``: the state the gateway's addons share, the addon that owns its options, and
  ``RequestFacts`` (a request's model and service tier, read off the loop; 413/400 for bombs
  and deep JSON).
- ``auth``, ``codex_filter``, ``quota``, ``cookies``, ``forward``, ``codex_replies``,
  ``accounting``, ``local_routes``, ``metrics``, ``tls``: one mitmproxy addon (or its helpers)
  each. ``codex_replies`` speaks Codex's language to members: its rate-limit headers and the
  refusal statuses it acts on.
- ``model_policy``: which models a member may use (patterns with ``*``, every non-empty list
  must allow; pure); ``member_models``: its addons (the refusal ``model_not_allowed`` before
  anything goes upstream, and a member's ``GET /v1/models``, Codex's catalog format).
- ``quota_metrics``: ``/metrics``' quota window gauges (read when a scrape finds them stale)
  and refusals by kind, for the dashboard and alert rules in ``deploy/``.
- ``websocket``: the WebSocket routes (on unless ``serve --no-websockets``): Codex's
  ``/v1/responses`` and the Realtime API's ``/v1/realtime``: the upgrade claimed, then each
  socket's turns checked against quotas and metered, and the socket a ``ws_connections`` row;
  ``socket_protocol``: what differs between the two routes (one small object each);
  ``socket_bounds``: what one member socket may make the gateway hold (message size while
  gathered and inflated, frames a second, unread input and output), inside mitmproxy's
  WebSocket layer.
- ``config``, ``cli``: ``config/gateway.yaml`` and the command line.
- ``teams``, ``team_cli``: teams (their queries and rules, what a member's directory entry
  learns of its team, the lease that holds a member's and its team's slot) and their commands.
- ``genai``, ``genai_metrics``: the turns as OpenTelemetry GenAI telemetry (the OTLP span
  through :mod:`addons.telemetry`, the ``gen_ai_client_*`` histograms of ``/metrics``), fed
  by the accounting.
"""
