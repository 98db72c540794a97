"""The OpenTelemetry GenAI client histograms on the gateway's ``GET /metrics``.

The same figures as the OTLP export (:mod:`addons.telemetry`), under Prometheus names: the
conventions' names with ``.`` as ``_`` and the unit as a suffix (as the OpenTelemetry
Prometheus exporter would name them), their attributes as labels (``gen_ai_token_type``,
``gen_ai_request_model``, ``gen_ai_operation_name``) plus ``member``, and the conventions'
advised bucket boundaries. Observed for every turn that went upstream (HTTP and WebSocket);
refusals are in ``codex_gateway_refused`` (and in the OTLP spans), not here.
"""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Histogram

from addons.telemetry import SECONDS_BUCKETS, TOKEN_BUCKETS

LABELS = ["gen_ai_operation_name", "gen_ai_request_model", "member"]


class GenAiHistograms:
    """``gen_ai_client_token_usage`` (by ``gen_ai_token_type``: ``input`` / ``output``),
    ``gen_ai_client_operation_duration_seconds`` and
    ``gen_ai_client_operation_time_to_first_chunk_seconds``, registered in ``registry``."""

    def __init__(self, registry: CollectorRegistry) -> None:
        self.token_usage = Histogram(
            "gen_ai_client_token_usage",
            "Number of input and output tokens used per turn (gen_ai.client.token.usage).",
            ["gen_ai_token_type", *LABELS],
            buckets=TOKEN_BUCKETS,
            registry=registry,
        )
        self.duration = Histogram(
            "gen_ai_client_operation_duration_seconds",
            "Turn duration, request in to reply end (gen_ai.client.operation.duration).",
            LABELS,
            buckets=SECONDS_BUCKETS,
            registry=registry,
        )
        self.first_chunk = Histogram(
            "gen_ai_client_operation_time_to_first_chunk_seconds",
            "Request in to the first streamed chunk (gen_ai.client.operation.time_to_first_chunk).",
            LABELS,
            buckets=SECONDS_BUCKETS,
            registry=registry,
        )

    def observe(
        self,
        operation: str,
        model: str | None,
        member: str,
        usage: dict[str, int] | None,
        duration_s: float,
        first_chunk_s: float | None,
    ) -> None:
        """One turn's points (``usage`` as :func:`addons.responses_turn.usage_of`; no token
        points without it)."""
        labels = (operation, (model or "")[:64], member)
        self.duration.labels(*labels).observe(max(0.0, duration_s))
        if first_chunk_s is not None:
            self.first_chunk.labels(*labels).observe(max(0.0, first_chunk_s))
        if usage is not None:
            self.token_usage.labels("input", *labels).observe(usage.get("input", 0))
            self.token_usage.labels("output", *labels).observe(usage.get("output", 0))
