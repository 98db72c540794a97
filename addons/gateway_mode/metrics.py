"""``GET /metrics``: the gateway's Prometheus metrics, from ``prometheus_client``.

One :class:`GatewayMetrics` per gateway (its own registry, so a hot reload or a test never
registers a metric twice). Labels are member names, model names, routes, statuses and
upstream key *names*; no key value ever reaches a label.
"""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest

from addons.gateway_mode.genai_metrics import GenAiHistograms
from addons.gateway_mode.keypool import COOLING, DISABLED, HEALTHY, KeyPool
from addons.gateway_mode.quota_metrics import QuotaGauges, RefusalKinds

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"
_LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300)


class GatewayMetrics:
    """The metric families (names prefixed ``codex_gateway_``)."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        r = self.registry
        self.requests = Counter(
            "codex_gateway_requests",
            "Requests answered, by route and status.",
            ["route", "status"],
            registry=r,
        )
        self.refused = Counter(
            "codex_gateway_refused",
            "Requests refused locally, by reason; reason 'unmetered': served, but the reply's "
            "usage could not be read (the usage row's error says why).",
            ["reason"],
            registry=r,
        )
        self.tokens = Counter(
            "codex_gateway_tokens",
            "Tokens used, by member and kind (input includes cached; output includes reasoning).",
            ["member", "kind"],
            registry=r,
        )
        self.credits = Counter(
            "codex_gateway_credits",
            "Codex credits charged, by member and model.",
            ["member", "model"],
            registry=r,
        )
        self.team_tokens = Counter(
            "codex_gateway_team_tokens",
            "Tokens used by the members of a team while in it, by team and kind (as "
            "codex_gateway_tokens).",
            ["team", "kind"],
            registry=r,
        )
        self.team_credits = Counter(
            "codex_gateway_team_credits",
            "Codex credits charged to the members of a team while in it, by team.",
            ["team"],
            registry=r,
        )
        self.team_refused = Counter(
            "codex_gateway_team_refused",
            "Requests of a team's members refused locally, by team and refusal kind (quota, "
            "concurrency, ...: the usage command's kinds).",
            ["team", "kind"],
            registry=r,
        )
        self.unpriced = Counter(
            "codex_gateway_unpriced_requests",
            "Requests whose model the rate card cannot price (forwarded unpriced, or refused "
            "to a member with a credit quota), by model: add the model, a same_as or a "
            "default entry under credits.rates.",
            ["model"],
            registry=r,
        )
        self.identity_accepted = Counter(
            "codex_gateway_identity_accepted",
            "Requests whose OIDC identity token named a member, by member, identity id and "
            "issuer (issue 31; the token's subject is in the usage ledger, not a label).",
            ["member", "identity", "issuer"],
            registry=r,
        )
        self.identity_refused = Counter(
            "codex_gateway_identity_refused",
            "OIDC identity tokens refused, by the check that failed (expired, audience, "
            "signature, unknown_key, no_identity...).",
            ["check"],
            registry=r,
        )
        self.ws_connections = Counter(
            "codex_gateway_websocket_connections",
            "WebSocket connections opened, by member.",
            ["member"],
            registry=r,
        )
        self.ws_messages = Counter(
            "codex_gateway_websocket_messages",
            "WebSocket messages, by member and sender (client or server).",
            ["member", "sender"],
            registry=r,
        )
        self.ws_open = Gauge(
            "codex_gateway_websocket_open", "Member WebSocket connections open.", registry=r
        )
        self.in_flight = Gauge(
            "codex_gateway_in_flight", "Forwarded requests (streams) in flight.", registry=r
        )
        self.key_state = Gauge(
            "codex_gateway_upstream_key_state",
            "1 for each upstream key's current state.",
            ["name", "state"],
            registry=r,
        )
        self.retries = Counter(
            "codex_gateway_upstream_retries",
            "Requests sent again on another key, by cause.",
            ["cause"],
            registry=r,
        )
        self.pending_rows = Gauge(
            "codex_gateway_ledger_pending_rows", "Usage rows not yet in the database.", registry=r
        )
        self.duration = Histogram(
            "codex_gateway_request_duration_seconds",
            "Forwarded request duration.",
            ["route"],
            buckets=_LATENCY_BUCKETS,
            registry=r,
        )
        self.ttfb = Histogram(
            "codex_gateway_time_to_first_byte_seconds",
            "From the request's end to the upstream's response headers.",
            ["route"],
            buckets=_LATENCY_BUCKETS,
            registry=r,
        )
        # The OpenTelemetry GenAI histograms (gen_ai_client_*), same figures as the OTLP export.
        self.genai = GenAiHistograms(r)
        #: Refusals by kind and the members' quota windows (``quota_metrics``).
        self.refused_kinds = RefusalKinds(self.refused)
        r.register(self.refused_kinds)
        self.quotas = QuotaGauges()
        r.register(self.quotas)

    def render(self, pool: KeyPool, pending_rows: int) -> bytes:
        """The text exposition of every metric, key states and pending rows sampled now."""
        for state in pool.states():
            for candidate in (HEALTHY, COOLING, DISABLED):
                self.key_state.labels(str(state["name"]), candidate).set(
                    1 if state["state"] == candidate else 0
                )
        self.pending_rows.set(pending_rows)
        return generate_latest(self.registry)
