"""A loopback OTLP/HTTP receiver for the telemetry tests: ``POST /v1/traces`` and
``POST /v1/metrics`` bodies kept as received (for the leak scan) and decoded with
``opentelemetry-proto``'s ``ExportTraceServiceRequest`` / ``ExportMetricsServiceRequest``."""

from __future__ import annotations

import gzip
import threading
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

from opentelemetry.proto.collector.metrics.v1.metrics_service_pb2 import (
    ExportMetricsServiceRequest,
    ExportMetricsServiceResponse,
)
from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import (
    ExportTraceServiceRequest,
    ExportTraceServiceResponse,
)
from opentelemetry.proto.common.v1.common_pb2 import AnyValue


def value_of(v: AnyValue) -> Any:
    """A protobuf ``AnyValue`` as Python."""
    kind = v.WhichOneof("value")
    if kind == "array_value":
        return [value_of(x) for x in v.array_value.values]
    return getattr(v, kind) if kind else None


def attributes(kvs: Any) -> dict[str, Any]:
    """A repeated ``KeyValue`` as a dict."""
    return {kv.key: value_of(kv.value) for kv in kvs}


@dataclass
class Span:
    """A received span: its resource's attributes and its own fields, decoded."""

    resource: dict[str, Any]
    name: str
    kind: int
    trace_id: str
    span_id: str
    parent_span_id: str
    start_ns: int
    end_ns: int
    attributes: dict[str, Any]
    status_code: int


@dataclass
class Point:
    """A received histogram data point."""

    resource: dict[str, Any]
    metric: str
    unit: str
    attributes: dict[str, Any]
    count: int
    sum: float
    bounds: list[float]


class OtlpReceiver:
    """The receiver on 127.0.0.1 (an ephemeral port): ``endpoint`` for
    ``OTEL_EXPORTER_OTLP_ENDPOINT``; ``raw`` holds every body as received."""

    def __init__(self) -> None:
        self.raw: list[bytes] = []
        self._traces: list[ExportTraceServiceRequest] = []
        self._metrics: list[ExportMetricsServiceRequest] = []
        self._lock = threading.Lock()
        receiver = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                body = self.rfile.read(int(self.headers.get("content-length") or 0))
                if self.headers.get("content-encoding") == "gzip":
                    body = gzip.decompress(body)
                with receiver._lock:
                    receiver.raw.append(body)
                if self.path == "/v1/traces":
                    request = ExportTraceServiceRequest()
                    request.ParseFromString(body)
                    with receiver._lock:
                        receiver._traces.append(request)
                    reply = ExportTraceServiceResponse().SerializeToString()
                elif self.path == "/v1/metrics":
                    metrics = ExportMetricsServiceRequest()
                    metrics.ParseFromString(body)
                    with receiver._lock:
                        receiver._metrics.append(metrics)
                    reply = ExportMetricsServiceResponse().SerializeToString()
                else:
                    self.send_response(404)
                    self.end_headers()
                    return
                self.send_response(200)
                self.send_header("content-type", "application/x-protobuf")
                self.send_header("content-length", str(len(reply)))
                self.end_headers()
                self.wfile.write(reply)

            def log_message(self, *args: Any) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()

    @property
    def endpoint(self) -> str:
        return f"http://127.0.0.1:{self.server.server_address[1]}"

    def env(self, **extra: str) -> dict[str, str]:
        """The environment that points a server here (a short export interval)."""
        return {
            "OTEL_EXPORTER_OTLP_ENDPOINT": self.endpoint,
            "OTEL_EXPORTER_OTLP_PROTOCOL": "http/protobuf",
            "OTEL_BSP_SCHEDULE_DELAY": "100",
            "OTEL_METRIC_EXPORT_INTERVAL": "300",
            **extra,
        }

    def spans(self) -> list[Span]:
        out = []
        with self._lock:
            requests = list(self._traces)
        for request in requests:
            for rs in request.resource_spans:
                resource = attributes(rs.resource.attributes)
                for ss in rs.scope_spans:
                    for s in ss.spans:
                        out.append(
                            Span(
                                resource,
                                s.name,
                                s.kind,
                                s.trace_id.hex(),
                                s.span_id.hex(),
                                s.parent_span_id.hex(),
                                s.start_time_unix_nano,
                                s.end_time_unix_nano,
                                attributes(s.attributes),
                                s.status.code,
                            )
                        )
        return out

    def points(self) -> list[Point]:
        """Every histogram point received (cumulative: the last export of a series has the
        totals)."""
        out = []
        with self._lock:
            requests = list(self._metrics)
        for request in requests:
            for rm in request.resource_metrics:
                resource = attributes(rm.resource.attributes)
                for sm in rm.scope_metrics:
                    for m in sm.metrics:
                        if m.WhichOneof("data") != "histogram":
                            continue
                        for p in m.histogram.data_points:
                            out.append(
                                Point(
                                    resource,
                                    m.name,
                                    m.unit,
                                    attributes(p.attributes),
                                    p.count,
                                    p.sum,
                                    list(p.explicit_bounds),
                                )
                            )
        return out

    def latest(self, metric: str, **match: Any) -> list[Point]:
        """The last received point of each series of ``metric`` whose attributes include
        ``match``."""
        series: dict[tuple[str, str], Point] = {}
        for p in self.points():
            if p.metric == metric and all(p.attributes.get(k) == v for k, v in match.items()):
                key = (repr(sorted(p.resource.items())), repr(sorted(p.attributes.items())))
                series[key] = p
        return list(series.values())

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()
