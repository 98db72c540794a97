"""OpenTelemetry GenAI telemetry (issue 33): settings from the standard variables, the span and
metric points of one turn, and end to end with a loopback OTLP/HTTP receiver of ours
(tests/otlp_receiver.py, decoding with opentelemetry-proto) and the real Codex CLI through the
strict proxy and the gateway (HTTP and WebSocket): span name and attributes, tokens equal to
what the stand-in reported, the member, timing, ``traceparent`` continuation, a leak scan of
every exported byte, and a collector that is down."""

from __future__ import annotations

import http.client
import itertools
import json
import socket
import sys
import time
from pathlib import Path

import pytest
from mitmproxy.test import taddons, tflow
from prometheus_client.parser import text_string_to_metric_families

from addons import telemetry
from addons.exchange import Metering
from addons.standin import DEFAULT_TEXT, usage_block
from addons.telemetry import Settings, TurnRecord, settings_from_env
from tests.conftest import TEST_KEY, wait_for
from tests.gateway_harness import (
    METRICS_TOKEN,
    OPERATOR,
    UPSTREAM_KEYS,
    bearer,
    member_codex_home,
    run_member_codex,
)
from tests.otlp_receiver import OtlpReceiver
from tests.test_clients import CATALOG_MODEL, printed_codex_config, run_codex

USAGE = usage_block()  # what the stand-in reports: 42 in (8 cached), 17 out (5 reasoning)
TRACE_ID = "4bf92f3577b34da6a3ce929d0e0e4736"
PARENT_ID = "00f067aa0ba902b7"
TRACEPARENT = f"00-{TRACE_ID}-{PARENT_ID}-01"


# -- settings ------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("env", "traces", "metrics"),
    [
        ({}, False, False),
        ({"OTEL_EXPORTER_OTLP_ENDPOINT": "http://127.0.0.1:4318"}, True, True),
        ({"OTEL_EXPORTER_OTLP_TRACES_ENDPOINT": "http://c/v1/traces"}, True, False),
        ({"OTEL_EXPORTER_OTLP_METRICS_ENDPOINT": "http://c/v1/metrics"}, False, True),
        ({"OTEL_EXPORTER_OTLP_ENDPOINT": "http://c", "OTEL_SDK_DISABLED": "true"}, False, False),
        ({"OTEL_EXPORTER_OTLP_ENDPOINT": "  "}, False, False),
    ],
)
def test_settings_follow_the_standard_variables(env, traces, metrics):
    got = settings_from_env(env)
    assert (got.traces, got.metrics, got.warning) == (traces, metrics, None)
    assert got.protocol == "http/protobuf"


def test_grpc_without_its_exporter_is_one_clear_warning(monkeypatch):
    monkeypatch.setattr(telemetry, "_grpc_installed", lambda: False)
    env = {"OTEL_EXPORTER_OTLP_ENDPOINT": "http://c:4317", "OTEL_EXPORTER_OTLP_PROTOCOL": "grpc"}
    got = settings_from_env(env)
    assert not got.on
    assert got.warning is not None and "opentelemetry-exporter-otlp-proto-grpc" in got.warning
    got = settings_from_env({**env, "OTEL_EXPORTER_OTLP_PROTOCOL": "http/json"})
    assert not got.on and "http/json" in (got.warning or "")


def test_content_is_captured_only_on_the_opt_in():
    env = {"OTEL_EXPORTER_OTLP_ENDPOINT": "http://c"}
    assert not settings_from_env(env).capture_content
    assert settings_from_env(
        {**env, "OTEL_INSTRUMENTATION_GENAI_CAPTURE_MESSAGE_CONTENT": "true"}
    ).capture_content


def test_off_the_sdk_is_not_imported():
    """Without an endpoint the proxy never loads the SDK (no import cost, no threads)."""
    import subprocess

    code = (
        "import sys\n"
        "from addons import telemetry\n"
        "import addons.proxy, addons.gateway\n"
        "assert telemetry.start('x', {}) is False\n"
        "print(sorted(m for m in sys.modules if m.startswith('opentelemetry.sdk')))\n"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=60, check=True
    ).stdout
    assert out.strip() == "[]"


@pytest.mark.parametrize(
    ("status", "turn_status", "flow_error", "want"),
    [
        (200, "completed", False, None),
        (200, "incomplete", False, None),
        (200, "failed", False, "failed"),
        (200, None, True, "cut"),
        (200, None, False, None),
        (429, None, False, "429"),
        (None, None, True, "_OTHER"),
    ],
)
def test_error_type(status, turn_status, flow_error, want):
    assert telemetry.error_type(status, turn_status, flow_error) == want


# -- the strict proxy's addon, with a sink standing in for the SDK --------------------------


class Sink:
    def __init__(self, capture: bool = False) -> None:
        self.settings = Settings(True, True, capture_content=capture)
        self.turns: list[TurnRecord] = []

    def emit(self, turn: TurnRecord) -> None:
        self.turns.append(turn)

    def shutdown(self) -> None:
        pass


def _streamed_flow() -> tflow.HTTPFlow:
    from addons.common import KEY_INJECTED
    from tests.fake_upstream import encode_event, responses_sse_events

    flow = tflow.tflow(resp=True)
    flow.request.method, flow.request.path = "POST", "/v1/responses"
    flow.request.host, flow.request.port = "api.example.test", 443
    flow.request.content = json.dumps(
        {"model": "gpt-x", "service_tier": "priority", "input": "secret prompt"}
    ).encode()
    flow.request.headers["authorization"] = f"Bearer {TEST_KEY}"
    flow.request.headers["traceparent"] = TRACEPARENT
    flow.response.headers["content-type"] = "text/event-stream"
    flow.response.content = b"".join(
        encode_event(*e) for e in responses_sse_events("hello there", "gpt-x-2026", "resp_1")
    )
    flow.metadata[KEY_INJECTED] = True
    return flow


@pytest.mark.parametrize("capture", [False, True])
def test_strict_turn_record(capture):
    sink = Sink(capture)
    telemetry.install(sink)
    try:
        addon = telemetry.Telemetry()
        with taddons.context(addon):
            flow = _streamed_flow()
            addon.response(flow)
    finally:
        telemetry.install(None)
    (turn,) = sink.turns
    assert (turn.request_model, turn.response_model, turn.response_id) == (
        "gpt-x",
        "gpt-x-2026",
        "resp_1",
    )
    assert turn.usage is not None and turn.usage["input"] == USAGE["input_tokens"]
    assert turn.usage["output"] == USAGE["output_tokens"]
    assert turn.finish_reasons == ("completed",) and turn.error_type is None
    assert (turn.server_address, turn.server_port) == ("api.example.test", 443)
    assert turn.service_tier == "priority" and turn.api_type == "responses"
    assert turn.carrier == {"traceparent": TRACEPARENT}
    assert [p.name for p in turn.phases] == ["upstream"]
    if capture:
        assert turn.content is not None
        assert "secret prompt" in turn.content[0] and "hello there" in turn.content[1]
        assert TEST_KEY not in repr(turn)
    else:
        assert turn.content is None


def test_strict_addon_ignores_what_was_not_forwarded():
    sink = Sink()
    telemetry.install(sink)
    try:
        addon = telemetry.Telemetry()
        flow = tflow.tflow(resp=True)  # refused or local: no key injected
        addon.response(flow)
        gateway_side = telemetry.Telemetry(strict=False)
        gateway_side.response(_streamed_flow())
    finally:
        telemetry.install(None)
    assert sink.turns == []


class SlowSink(Sink):
    """A sink whose exports wait for ``release``: a collector that does not keep up."""

    def __init__(self) -> None:
        super().__init__()
        import threading

        self.release = threading.Event()

    def emit(self, turn: TurnRecord) -> None:
        self.release.wait(30)
        super().emit(turn)


def test_turns_are_recorded_off_the_loop_and_a_stop_drains_them(monkeypatch):
    """With the telemetry thread running, ``response`` only queues the turn (the reply is
    read and the span built on the thread); a stop records what is still queued."""
    import threading

    sink = SlowSink()
    monkeypatch.setattr(telemetry, "settings_from_env", lambda env: sink.settings)
    monkeypatch.setattr("addons.telemetry_otel.OtelSink", lambda *a: sink)
    assert telemetry.start("t", {"OTEL_EXPORTER_OTLP_ENDPOINT": "http://c"})
    try:
        addon = telemetry.Telemetry()
        addon.response(_streamed_flow())
        addon.response(_streamed_flow())
        assert sink.turns == []  # queued: the hook did not wait for the exporter
        assert telemetry._worker is not None and telemetry._worker is not threading.current_thread()
    finally:
        sink.release.set()
        telemetry.stop()
    assert [t.response_id for t in sink.turns] == ["resp_1", "resp_1"]
    assert not telemetry.active()


def test_a_full_queue_drops_turns_never_waits(monkeypatch, caplog):
    sink = SlowSink()
    monkeypatch.setattr(telemetry, "QUEUE_TURNS", 3)
    monkeypatch.setattr(telemetry, "_jobs", __import__("queue").Queue(3))
    monkeypatch.setattr(telemetry, "_dropped", 0)
    monkeypatch.setattr(telemetry, "settings_from_env", lambda env: sink.settings)
    monkeypatch.setattr("addons.telemetry_otel.OtelSink", lambda *a: sink)
    assert telemetry.start("t", {"OTEL_EXPORTER_OTLP_ENDPOINT": "http://c"})
    try:
        for _ in range(10):  # one on the thread (held), three queued, the rest dropped
            telemetry.record(TurnRecord("gpt-x", 0.0, 1.0))
        assert telemetry._dropped >= 6
        assert "turns dropped" in caplog.text
    finally:
        sink.release.set()
        telemetry.stop()
    assert 1 <= len(sink.turns) <= 4


def test_metering_names_the_response():
    from addons.exchange import Reply, meter_reply

    flow = _streamed_flow()
    got = meter_reply(Reply.of(flow.response))
    assert isinstance(got, Metering)
    assert (got.response_id, got.response_model) == ("resp_1", "gpt-x-2026")


# -- the SDK sink, exporting to our receiver ------------------------------------------------


@pytest.fixture
def receiver():
    r = OtlpReceiver()
    yield r
    r.close()


def test_sdk_sink_exports_span_and_points(receiver):
    from addons.telemetry_otel import OtelSink

    # The SDK reads its endpoint from os.environ: set it for this sink's exporters.
    with pytest.MonkeyPatch.context() as mp:
        env = receiver.env(OTEL_SERVICE_NAME="svc-x")
        for k, v in env.items():
            mp.setenv(k, v)
        sink = OtelSink(Settings(True, True), "codex-test", env)
        now = time.time()
        sink.emit(
            TurnRecord(
                "gpt-x",
                now - 1.5,
                now,
                response_model="gpt-x-2026",
                response_id="resp_9",
                finish_reasons=("completed",),
                usage={"input": 42, "cached": 8, "output": 17, "reasoning": 5},
                server_address="up.test",
                server_port=8443,
                first_chunk=now - 1.0,
                carrier={"traceparent": TRACEPARENT},
                member="ada",
                team="core",
                credits=0.25,
                upstream_key="alpha",
                phases=[telemetry.Phase("upstream", now - 1.2, now)],
            )
        )
        sink.shutdown()
    spans = receiver.spans()
    main = next(s for s in spans if s.name == "chat gpt-x")
    child = next(s for s in spans if s.name == "upstream")
    assert main.kind == 3  # SPAN_KIND_CLIENT
    assert (main.trace_id, main.parent_span_id) == (TRACE_ID, PARENT_ID)
    assert (child.trace_id, child.parent_span_id) == (TRACE_ID, main.span_id)
    a = main.attributes
    assert a["gen_ai.operation.name"] == "chat" and a["gen_ai.provider.name"] == "openai"
    assert a["gen_ai.usage.input_tokens"] == 42 and a["gen_ai.usage.output_tokens"] == 17
    assert a["gen_ai.usage.cache_read.input_tokens"] == 8
    assert a["gen_ai.response.finish_reasons"] == ["completed"]
    assert a["user.id"] == "ada" and a["codex.team"] == "core" and a["codex.credits"] == 0.25
    assert a["codex.upstream_key.name"] == "alpha" and a["openai.api.type"] == "responses"
    assert (a["server.address"], a["server.port"]) == ("up.test", 8443)
    assert main.resource["service.name"] == "svc-x" and main.resource["service.instance.id"]
    assert main.end_ns - main.start_ns == pytest.approx(1.5e9, rel=1e-3)
    (tokens_in,) = receiver.latest("gen_ai.client.token.usage", **{"gen_ai.token.type": "input"})
    assert (tokens_in.count, tokens_in.sum, tokens_in.unit) == (1, 42, "{token}")
    assert tokens_in.bounds[:3] == [1, 4, 16]
    (duration,) = receiver.latest("gen_ai.client.operation.duration")
    assert duration.sum == pytest.approx(1.5) and duration.bounds[0] == 0.01
    (ttfc,) = receiver.latest("gen_ai.client.operation.time_to_first_chunk")
    assert ttfc.sum == pytest.approx(0.5)


# -- end to end ----------------------------------------------------------------------------


def _leak_scan(receiver: OtlpReceiver, *secrets: str) -> None:
    blob = b"".join(receiver.raw)
    assert blob, "nothing was exported"
    for secret in secrets:
        assert secret.encode() not in blob, "a secret reached the collector"
    for word in (b"authorization", b"Bearer ", b"cookie"):
        assert word not in blob


def _turn_spans(receiver: OtlpReceiver, model: str, want: int = 1):
    wait_for(
        lambda: len([s for s in receiver.spans() if s.name == f"chat {model}"]) >= want,
        60,
        f"{want} span(s) 'chat {model}'",
    )
    return [s for s in receiver.spans() if s.name == f"chat {model}"]


def _check_turn_span(span, model: str) -> None:
    a = span.attributes
    assert a["gen_ai.request.model"] == model
    assert a["gen_ai.response.model"] == model
    assert a["gen_ai.response.id"].startswith("resp_")
    assert a["gen_ai.usage.input_tokens"] == USAGE["input_tokens"]
    assert a["gen_ai.usage.output_tokens"] == USAGE["output_tokens"]
    assert a["gen_ai.usage.cache_read.input_tokens"] == 8
    assert a["gen_ai.response.finish_reasons"] == ["completed"]
    assert a["server.address"] == "127.0.0.1" and a["server.port"] > 0
    assert "error.type" not in a
    assert "gen_ai.input.messages" not in a and "gen_ai.output.messages" not in a  # no opt-in
    assert span.end_ns > span.start_ns


@pytest.mark.e2e
@pytest.mark.codex
def test_codex_turn_through_the_strict_proxy(upstream, start_proxy, codex, tmp_path, receiver):
    proxy = start_proxy(upstream.url, env=receiver.env())
    home, work = tmp_path / "codex-home", tmp_path / "work"
    home.mkdir()
    work.mkdir()
    (home / "config.toml").write_text(printed_codex_config(proxy, "--toml-only"))
    result = run_codex(codex, home, work)
    assert result.returncode == 0, result.stdout.decode() + result.stderr.decode()
    (span,) = _turn_spans(receiver, CATALOG_MODEL)
    _check_turn_span(span, CATALOG_MODEL)
    assert span.attributes["openai.api.type"] == "responses"
    assert span.resource["service.name"] == "codex-proxy"
    assert "user.id" not in span.attributes  # the strict proxy has no members
    wait_for(
        lambda: receiver.latest("gen_ai.client.token.usage", **{"gen_ai.token.type": "output"}),
        30,
        "token usage points",
    )
    (out,) = receiver.latest("gen_ai.client.token.usage", **{"gen_ai.token.type": "output"})
    assert out.sum == USAGE["output_tokens"]
    assert out.attributes["gen_ai.request.model"] == CATALOG_MODEL
    (duration,) = receiver.latest("gen_ai.client.operation.duration")
    assert duration.sum > 0
    # A raw request with a traceparent: its span is a child of the caller's.
    conn = http.client.HTTPConnection("127.0.0.1", proxy.port, timeout=60)
    conn.request(
        "POST",
        "/v1/responses",
        json.dumps({"model": "traced-model", "stream": True, "input": "hi"}),
        {"content-type": "application/json", "traceparent": TRACEPARENT},
    )
    assert conn.getresponse().read()
    conn.close()
    (traced,) = _turn_spans(receiver, "traced-model")
    assert (traced.trace_id, traced.parent_span_id) == (TRACE_ID, PARENT_ID)
    assert proxy.shutdown() == 0
    _leak_scan(receiver, TEST_KEY)
    assert "Traceback" not in proxy.output()


@pytest.mark.e2e
@pytest.mark.codex
@pytest.mark.parametrize("websockets", [False, True], ids=["http", "websocket"])
def test_codex_turn_through_the_gateway(upstream, gateway, codex, tmp_path, receiver, websockets):
    gateway.admin("add-team", "core")
    gateway.admin("add-member", "ada", "--team", "core")
    key = gateway.add_key("ada")
    server = gateway.serve(upstream.url, env=receiver.env())
    home, work, _ = member_codex_home(tmp_path, server, CATALOG_MODEL, websockets=websockets)
    code, out, _ = run_member_codex(codex, home, work, key)
    assert code == 0, out
    spans = _turn_spans(receiver, CATALOG_MODEL)
    span = spans[-1]
    _check_turn_span(span, CATALOG_MODEL)
    a = span.attributes
    assert a["user.id"] == "ada" and a["codex.team"] == "core"
    assert a["codex.upstream_key.name"] in UPSTREAM_KEYS
    assert a["codex.credits"] > 0
    assert a["codex.route"] == ("ws:/v1/responses" if websockets else "/v1/responses")
    assert span.resource["service.name"] == "codex-gateway"
    if not websockets:
        children = {s.name: s for s in receiver.spans() if s.parent_span_id == span.span_id}
        assert {"member auth", "quota check", "upstream"} <= set(children)
        assert all(c.trace_id == span.trace_id for c in children.values())
    wait_for(
        lambda: receiver.latest(
            "gen_ai.client.token.usage", **{"gen_ai.token.type": "input", "user.id": "ada"}
        ),
        30,
        "token usage points",
    )
    (tokens,) = receiver.latest(
        "gen_ai.client.token.usage", **{"gen_ai.token.type": "input", "user.id": "ada"}
    )
    assert tokens.sum == USAGE["input_tokens"] * tokens.count
    # The same figures on /metrics, under the Prometheus names.
    conn = http.client.HTTPConnection("127.0.0.1", server.port, timeout=30)
    conn.request("GET", "/metrics", headers=OPERATOR)
    text = conn.getresponse().read().decode()
    conn.close()
    samples = {
        (sample.name, tuple(sorted(sample.labels.items()))): sample.value
        for family in text_string_to_metric_families(text)
        for sample in family.samples
    }
    labels = (
        ("gen_ai_operation_name", "chat"),
        ("gen_ai_request_model", CATALOG_MODEL),
        ("member", "ada"),
    )
    token_labels = tuple(sorted((*labels, ("gen_ai_token_type", "input"))))
    count = samples[("gen_ai_client_token_usage_count", token_labels)]
    assert count >= 1
    assert samples[("gen_ai_client_token_usage_sum", token_labels)] == 42 * count
    assert samples[("gen_ai_client_operation_duration_seconds_sum", labels)] > 0
    assert samples[("gen_ai_client_operation_time_to_first_chunk_seconds_count", labels)] >= 1
    assert "codex_gateway_tokens_total" in text  # today's series are still there
    # A refusal (an unknown member key) is a span with error.type and the refusal kind.
    conn = http.client.HTTPConnection("127.0.0.1", server.port, timeout=30)
    conn.request(
        "POST",
        "/v1/responses",
        json.dumps({"model": "refused-model", "stream": True}),
        {
            **bearer("sk-codex-gw-not-a-key"),
            "content-type": "application/json",
            "traceparent": TRACEPARENT,
        },
    )
    refusal = conn.getresponse()
    body = refusal.read()
    conn.close()
    assert refusal.status in (400, 401), body  # Codex's language: see codex_replies
    # Refused at member auth, before the body was read: the model is unknown, the span is
    # named after the operation alone.
    wait_for(
        lambda: any("codex.refusal.kind" in s.attributes for s in receiver.spans()),
        60,
        "the refusal's span",
    )
    (refused,) = [s for s in receiver.spans() if "codex.refusal.kind" in s.attributes]
    assert refused.name == "chat"
    assert refused.attributes["error.type"] == str(refusal.status)
    assert refused.attributes["codex.refusal.kind"]
    assert refused.status_code == 2  # STATUS_CODE_ERROR
    assert (refused.trace_id, refused.parent_span_id) == (TRACE_ID, PARENT_ID)
    server.shutdown()
    _leak_scan(receiver, key, METRICS_TOKEN, *UPSTREAM_KEYS.values())


def _closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.e2e
def test_a_collector_that_is_down_costs_no_request(upstream, start_proxy, tmp_path):
    """Turns still succeed quickly, the log has no traceback, and the stop is prompt."""
    env = {
        "OTEL_EXPORTER_OTLP_ENDPOINT": f"http://127.0.0.1:{_closed_port()}",
        "OTEL_BSP_SCHEDULE_DELAY": "50",
        "OTEL_METRIC_EXPORT_INTERVAL": "100",
    }
    proxy = start_proxy(upstream.url, env=env)
    for _ in range(5):
        conn = http.client.HTTPConnection("127.0.0.1", proxy.port, timeout=30)
        conn.request(
            "POST", "/v1/responses", json.dumps({"model": "m", "stream": True, "input": "x"}),
            {"content-type": "application/json"},
        )  # fmt: skip
        reply = conn.getresponse()
        body = reply.read()
        conn.close()
        assert reply.status == 200 and b"response.completed" in body
    wait_for(lambda: "OpenTelemetry export" in proxy.output(), 60, "the export warning")
    started = time.monotonic()
    assert proxy.shutdown() == 0
    stop_s = time.monotonic() - started
    print(f"stopped in {stop_s:.2f} s with the collector down")
    out = proxy.output()
    assert "Traceback" not in out
    assert out.count("OpenTelemetry export") <= 2, out  # rate-limited, not one per batch


def test_telemetry_module_is_light():
    """The proxy's manifest imports addons.telemetry, which imports no SDK module itself."""
    source = Path(telemetry.__file__).read_text()
    assert "\nimport opentelemetry" not in source and "\nfrom opentelemetry" not in source


@pytest.mark.e2e
def test_each_worker_exports_its_turns(upstream, start_proxy, receiver):
    """``--workers 2``: every turn is exported, by the worker that served it, each worker
    process with its own ``service.instance.id`` (the kernel picks the worker of each
    connection, so only "every span has one, and the supervisor exports none" is asserted)."""
    proxy = start_proxy(upstream.url, "--workers", "2", env=receiver.env())
    for i in range(6):
        conn = http.client.HTTPConnection("127.0.0.1", proxy.port, timeout=30)
        conn.request(
            "POST", "/v1/responses", json.dumps({"model": f"w{i}", "stream": True, "input": "x"}),
            {"content-type": "application/json"},
        )  # fmt: skip
        reply = conn.getresponse()
        reply.read()
        conn.close()
        assert reply.status == 200
    wait_for(
        lambda: {s.name for s in receiver.spans()} >= {f"chat w{i}" for i in range(6)},
        60,
        "a span per turn",
    )
    instances = {
        s.resource["service.instance.id"] for s in receiver.spans() if s.name.startswith("chat ")
    }
    assert 1 <= len(instances) <= 2
    assert proxy.shutdown() == 0


@pytest.mark.e2e
def test_plain_mitmdump_exports_the_turn(upstream, tmp_path, receiver):
    """``mitmdump -s addons/proxy.py`` as docs/proxy.md shows it (no launcher): the same span,
    and a stop that records it before the exit."""
    import subprocess

    from tests.conftest import ROOT, ProxyProcess, plain_mitmdump_command

    info, out, err = tmp_path / "md-info.json", tmp_path / "md-out.log", tmp_path / "md-err.log"
    cmd = plain_mitmdump_command("proxy.py", upstream.url, info, ["codex_key_file=-"])
    with open(out, "wb") as fo, open(err, "wb") as fe:
        proc = subprocess.Popen(
            cmd, stdin=subprocess.PIPE, stdout=fo, stderr=fe, cwd=ROOT,
            env={**__import__("os").environ, **receiver.env()},
        )  # fmt: skip
    assert proc.stdin is not None
    proc.stdin.write(TEST_KEY.encode() + b"\n")
    proc.stdin.close()
    proxy = ProxyProcess(proc, 0, info, out, err, None, True)
    try:
        wait_for(lambda: info.exists() or proc.poll() is not None, 60, "mitmdump's server-info")
        assert proc.poll() is None, proxy.output()
        proxy.port = json.loads(info.read_text())["port"]
        conn = http.client.HTTPConnection("127.0.0.1", proxy.port, timeout=30)
        conn.request(
            "POST", "/v1/responses",
            json.dumps({"model": "plain-model", "stream": True, "input": "x"}),
            {"content-type": "application/json", "traceparent": TRACEPARENT},
        )  # fmt: skip
        reply = conn.getresponse()
        assert reply.status == 200 and b"response.completed" in reply.read()
        conn.close()
        assert proxy.shutdown() == 0
    finally:
        proxy.stop()
    (span,) = [s for s in receiver.spans() if s.name == "chat plain-model"]
    a = span.attributes
    assert a["gen_ai.usage.input_tokens"] == USAGE["input_tokens"]
    assert a["gen_ai.usage.output_tokens"] == USAGE["output_tokens"]
    assert a["openai.api.type"] == "responses" and "error.type" not in a
    assert (span.trace_id, span.parent_span_id) == (TRACE_ID, PARENT_ID)
    assert span.resource["service.name"] == "codex-proxy"
    _leak_scan(receiver, TEST_KEY)
    assert "Traceback" not in proxy.output()


@pytest.mark.e2e
def test_chat_bridge_and_realtime_turns_through_the_gateway(gateway, upstream, receiver):
    """The openai SDK's ``chat.completions`` through ``serve --chat-bridge`` and its Realtime
    client through ``/v1/realtime``: one span each, with the member, the tokens the stand-in
    reported, the API type (``chat_completions``; none on the Realtime route) and the route."""
    import asyncio

    import openai

    from tests.test_gateway_realtime import MODEL as REALTIME_MODEL
    from tests.test_gateway_realtime import realtime_turn

    gateway.admin("add-member", "bea")
    key = gateway.add_key("bea")
    server = gateway.serve(upstream.url, "--chat-bridge", "--websockets", env=receiver.env())
    with openai.OpenAI(
        base_url=f"http://127.0.0.1:{server.port}/v1", api_key=key, max_retries=0, timeout=30
    ) as sdk:
        chunks = list(
            sdk.chat.completions.create(
                model="gpt-5.5", messages=[{"role": "user", "content": "hi"}], stream=True
            )
        )
    assert any(c.choices and c.choices[0].finish_reason == "stop" for c in chunks)
    events = asyncio.run(realtime_turn(server.port, key))
    assert events[-1].type == "response.done"
    (bridged,) = _turn_spans(receiver, "gpt-5.5")
    b = bridged.attributes
    assert b["openai.api.type"] == "chat_completions" and b["codex.route"] == "/v1/chat/completions"
    assert b["user.id"] == "bea" and b["codex.upstream_key.name"] in UPSTREAM_KEYS
    assert b["gen_ai.usage.input_tokens"] == USAGE["input_tokens"]
    assert b["gen_ai.usage.output_tokens"] == USAGE["output_tokens"]
    assert b["gen_ai.response.finish_reasons"] == ["completed"] and "error.type" not in b
    (realtime,) = _turn_spans(receiver, REALTIME_MODEL)
    r = realtime.attributes
    assert "openai.api.type" not in r and r["codex.route"] == "ws:/v1/realtime"
    assert r["user.id"] == "bea" and r["codex.upstream_key.name"] in UPSTREAM_KEYS
    assert (r["gen_ai.usage.input_tokens"], r["gen_ai.usage.output_tokens"]) == (42, 17)
    assert r["gen_ai.usage.cache_read.input_tokens"] == 8
    assert r["gen_ai.response.id"] == events[-1].response.id
    wait_for(
        lambda: receiver.latest(
            "gen_ai.client.token.usage",
            **{"gen_ai.token.type": "output", "gen_ai.request.model": REALTIME_MODEL},
        ),
        30,
        "the Realtime turn's token points",
    )
    assert server.shutdown() == 0
    _leak_scan(receiver, key, METRICS_TOKEN, *UPSTREAM_KEYS.values())


@pytest.mark.e2e
def test_each_gateway_worker_exports_its_members_turns(gateway, upstream, receiver):
    """``serve --workers 2``: every member turn is a span with its member, exported by the
    worker that served it (each with its own ``service.instance.id``)."""
    gateway.admin("add-member", "cy")
    key = gateway.add_key("cy")
    server = gateway.serve(upstream.url, "--workers", "2", env=receiver.env())
    for i in range(4):
        conn = http.client.HTTPConnection("127.0.0.1", server.port, timeout=30)
        conn.request(
            "POST", "/v1/responses",
            json.dumps({"model": f"gw{i}", "stream": True, "input": "x"}),
            {**bearer(key), "content-type": "application/json"},
        )  # fmt: skip
        reply = conn.getresponse()
        assert reply.status == 200 and b"response.completed" in reply.read()
        conn.close()
    wait_for(
        lambda: {s.name for s in receiver.spans()} >= {f"chat gw{i}" for i in range(4)},
        60,
        "a span per turn",
    )
    spans = [s for s in receiver.spans() if s.name.startswith("chat gw")]
    assert {s.attributes["user.id"] for s in spans} == {"cy"}
    assert all(s.attributes["gen_ai.usage.output_tokens"] == USAGE["output_tokens"] for s in spans)
    assert 1 <= len({s.resource["service.instance.id"] for s in spans}) <= 2
    assert {s.resource["service.name"] for s in spans} == {"codex-gateway"}
    assert server.shutdown() == 0
    _leak_scan(receiver, key, *UPSTREAM_KEYS.values())


@pytest.mark.e2e
def test_a_sockets_traceparent_parents_each_of_its_turns(gateway, upstream, receiver):
    """A ``/v1/responses`` socket opened with a ``traceparent``: each turn on it is a span of
    the caller's trace, a child of the caller's span."""
    import asyncio

    import aiohttp

    gateway.admin("add-member", "dee")
    key = gateway.add_key("dee")
    server = gateway.serve(upstream.url, "--websockets", env=receiver.env())
    headers = {
        "authorization": f"Bearer {key}",
        "user-agent": "codex_exec/0.171.0 (test)",
        "traceparent": TRACEPARENT,
    }

    async def session() -> int:
        done = 0
        async with aiohttp.ClientSession() as client:
            url = f"ws://127.0.0.1:{server.port}/v1/responses"
            async with client.ws_connect(url, headers=headers) as ws:
                for model in ("ws-a", "ws-b"):
                    await ws.send_str(json.dumps({"type": "response.create", "model": model}))
                    while True:
                        msg = await asyncio.wait_for(ws.receive(), 30)
                        assert msg.type == aiohttp.WSMsgType.TEXT, msg
                        if json.loads(msg.data)["type"] == "response.completed":
                            done += 1
                            break
        return done

    assert asyncio.run(session()) == 2
    spans = [*_turn_spans(receiver, "ws-a"), *_turn_spans(receiver, "ws-b")]
    assert [(s.trace_id, s.parent_span_id) for s in spans] == [(TRACE_ID, PARENT_ID)] * 2
    assert len({s.span_id for s in spans}) == 2
    for span in spans:
        assert span.attributes["codex.route"] == "ws:/v1/responses"
        assert span.attributes["user.id"] == "dee"
        assert span.attributes["gen_ai.usage.input_tokens"] == USAGE["input_tokens"]
    assert server.shutdown() == 0
    _leak_scan(receiver, key, *UPSTREAM_KEYS.values())


@pytest.mark.e2e
def test_message_content_only_with_the_opt_in_and_never_a_key_and_the_slot_span(
    gateway, upstream, receiver
):
    """``OTEL_INSTRUMENTATION_GENAI_CAPTURE_MESSAGE_CONTENT=true``: the gateway's span carries
    the prompt and the reply's text (read on the telemetry thread), and still no key."""
    gateway.admin("add-member", "eve", "--max-concurrent", "2")
    key = gateway.add_key("eve")
    env = receiver.env(OTEL_INSTRUMENTATION_GENAI_CAPTURE_MESSAGE_CONTENT="true")
    server = gateway.serve(upstream.url, env=env)
    conn = http.client.HTTPConnection("127.0.0.1", server.port, timeout=30)
    body = {"model": "content-model", "stream": True, "input": "tell me about otters"}
    conn.request(
        "POST", "/v1/responses", json.dumps(body),
        {**bearer(key), "content-type": "application/json"},
    )  # fmt: skip
    reply = conn.getresponse()
    text = reply.read()
    conn.close()
    assert reply.status == 200 and b"response.completed" in text
    (span,) = _turn_spans(receiver, "content-model")
    inputs = json.loads(span.attributes["gen_ai.input.messages"])
    outputs = json.loads(span.attributes["gen_ai.output.messages"])
    assert inputs[0]["parts"][0]["content"] == "tell me about otters"
    assert outputs == [{"role": "assistant", "parts": [{"type": "text", "content": DEFAULT_TEXT}]}]
    # A member with max_concurrent: the concurrency slot is a child span of its own.
    children = {s.name: s for s in receiver.spans() if s.parent_span_id == span.span_id}
    assert set(children) == {"member auth", "concurrency slot", "quota check", "upstream"}
    assert all(c.trace_id == span.trace_id and c.end_ns >= c.start_ns for c in children.values())
    order = ["member auth", "concurrency slot", "quota check", "upstream"]
    for before, after in itertools.pairwise(order):
        assert children[before].end_ns <= children[after].end_ns, (before, after)
    assert children["concurrency slot"].end_ns <= children["quota check"].start_ns
    assert server.shutdown() == 0
    _leak_scan(receiver, key, METRICS_TOKEN, *UPSTREAM_KEYS.values())


@pytest.mark.e2e
@pytest.mark.codex
def test_codex_own_trace_continues_through_the_strict_proxy(
    upstream, start_proxy, codex, tmp_path, receiver
):
    """The real Codex CLI with its own ``[otel]`` on, exporting to the same receiver: the
    ``traceparent`` it sends makes the proxy's span a child of one of Codex's spans, in its
    trace (what a team sees in its trace backend)."""
    proxy = start_proxy(upstream.url, env=receiver.env())
    home, work = tmp_path / "codex-home", tmp_path / "work"
    home.mkdir()
    work.mkdir()
    otel = (
        "\n[otel]\n"
        f'exporter = {{ otlp-http = {{ endpoint = "{receiver.endpoint}/v1/logs", '
        'protocol = "binary" } }\n'
        f'trace_exporter = {{ otlp-http = {{ endpoint = "{receiver.endpoint}/v1/traces", '
        'protocol = "binary" } }\n'
    )
    (home / "config.toml").write_text(printed_codex_config(proxy, "--toml-only") + otel)
    result = run_codex(codex, home, work)
    out = result.stdout.decode(errors="replace")
    assert result.returncode == 0, out + result.stderr.decode(errors="replace")
    assert upstream.text in out
    (ours,) = _turn_spans(receiver, CATALOG_MODEL)
    _check_turn_span(ours, CATALOG_MODEL)
    assert ours.parent_span_id, "no traceparent continued"

    def codex_parent():
        return [
            s
            for s in receiver.spans()
            if s.resource.get("service.name") != "codex-proxy" and s.span_id == ours.parent_span_id
        ]

    wait_for(codex_parent, 60, "Codex's own span, the parent of the proxy's")
    (parent,) = codex_parent()
    assert parent.trace_id == ours.trace_id
    print("Codex's span:", parent.resource.get("service.name"), parent.name)
    assert proxy.shutdown() == 0
    _leak_scan(receiver, TEST_KEY)  # Codex's own exports included: the key is in neither


@pytest.mark.e2e
def test_a_collector_that_never_answers_costs_no_request(upstream, start_proxy):
    """A collector that accepts connections and never replies (a listening socket nobody
    reads): every turn completes, and the stop is not held by the hung export."""
    with socket.socket() as hung:
        hung.bind(("127.0.0.1", 0))
        hung.listen(64)
        env = {
            "OTEL_EXPORTER_OTLP_ENDPOINT": f"http://127.0.0.1:{hung.getsockname()[1]}",
            "OTEL_BSP_SCHEDULE_DELAY": "50",
            "OTEL_METRIC_EXPORT_INTERVAL": "100",
        }
        proxy = start_proxy(upstream.url, env=env)
        for i in range(20):
            conn = http.client.HTTPConnection("127.0.0.1", proxy.port, timeout=30)
            conn.request(
                "POST", "/v1/responses",
                json.dumps({"model": f"h{i}", "stream": True, "input": "x"}),
                {"content-type": "application/json"},
            )  # fmt: skip
            reply = conn.getresponse()
            assert reply.status == 200 and b"response.completed" in reply.read()
            conn.close()
        assert proxy.shutdown() == 0
    assert "Traceback" not in proxy.output()
