"""Issue 33: the Grafana dashboard and the Prometheus rules in deploy/, checked as files (the
dashboard's structure, every metric it names present on /metrics, ``promtool check rules``)
and against a real Prometheus (Debian's package) scraping a real gateway under traffic (the
Codex CLI over the socket, the openai SDK over HTTP, refusals of four kinds, an upstream key
disabled and one cooling): every PromQL expression of the dashboard and of the rules returns
data. The same run takes docs/observability.md's screenshot of Prometheus' graph page."""

from __future__ import annotations

import json
import math
import os
import re
import shutil
import subprocess
import tempfile
import urllib.parse
from pathlib import Path
from typing import Any

import openai
import pytest
import yaml

from addons.gateway_mode.keypool import KeyPool
from addons.gateway_mode.metrics import GatewayMetrics
from addons.gateway_mode.quota_metrics import KINDS, refusal_kind_of
from tests.conftest import ROOT, wait_for
from tests.gateway_harness import (
    CODEX_HEADERS,
    OPERATOR,
    UPSTREAM_KEYS,
    member_codex_home,
    run_member_codex,
)
from tests.test_exposure import free_port, prometheus_api

DASHBOARD = ROOT / "deploy" / "grafana" / "codex-gateway-dashboard.json"
RULES = ROOT / "deploy" / "prometheus" / "codex-gateway-rules.yml"
DATASOURCE = {"type": "prometheus", "uid": "${DS_PROMETHEUS}"}
#: Grafana's variables as the test's Prometheus reads them (1 s scrapes).
GRAFANA_VARIABLES = {"$job": ".+", "$__rate_interval": "5m", "$__range": "1h"}
#: Prometheus' own series a query may name beside the gateway's.
PROMETHEUS_SERIES = {"up"}
SCREENSHOT = "observability-prometheus.png"


def dashboard() -> dict[str, Any]:
    return json.loads(DASHBOARD.read_text())


def panels() -> list[dict[str, Any]]:
    return [p for p in dashboard()["panels"] if p["type"] != "row"]


def dashboard_queries() -> list[tuple[str, str]]:
    """``(panel title, PromQL with Grafana's variables replaced)`` of every target."""
    queries = []
    for panel in panels():
        for target in panel["targets"]:
            expr = target["expr"]
            for name, value in GRAFANA_VARIABLES.items():
                expr = expr.replace(name, value)
            queries.append((panel["title"], expr))
    return queries


def rules() -> list[dict[str, Any]]:
    return [
        rule for group in yaml.safe_load(RULES.read_text())["groups"] for rule in group["rules"]
    ]


_CONDITION = re.compile(r"\s*(==|!=|>=|<=|>|<)\s*[0-9.e+-]+\s*$")


def underlying(expr: str) -> list[str]:
    """An alert's expression without its conditions: each side of a top-level ``and`` with its
    trailing comparison to a number removed (``x > 0.2 and y > 0`` → ``x``, ``y``)."""
    return [_CONDITION.sub("", part).strip() for part in re.split(r"\s+and\s+", expr.strip())]


def rule_queries() -> list[tuple[str, str]]:
    queries = []
    for rule in rules():
        if "record" in rule:
            queries += [(rule["record"], rule["expr"]), (rule["record"], rule["record"])]
        else:
            queries += [(rule["alert"], expr) for expr in underlying(rule["expr"])]
    return queries


def metric_names(expr: str) -> set[str]:
    """The series names a PromQL expression reads (ours, ``up``, and recorded ones)."""
    names = set(re.findall(r"\b(codex_gateway[a-z_:]*|up)\b(?=\s*[{\[)\s]|$)", expr))
    return {n for n in names if n not in {"codex_gateway"}}


def exposed_names(text: str) -> set[str]:
    """Every sample name a ``/metrics`` text can carry, from its ``# TYPE`` lines (a counter's
    ``_total``, a histogram's ``_bucket`` / ``_sum`` / ``_count``)."""
    names = set()
    for name, kind in re.findall(r"^# TYPE (\S+) (\S+)$", text, re.M):
        if kind == "counter":
            names |= {name, name.removesuffix("_total") + "_total"}
        elif kind == "histogram":
            names |= {name + suffix for suffix in ("_bucket", "_sum", "_count")}
        else:
            names.add(name)
    return names


# -- the files -------------------------------------------------------------------------------


def test_dashboard_structure():
    board = dashboard()
    assert board["uid"] == "codex-gateway" and board["title"] and board["id"] is None
    variables = {v["name"]: v for v in board["templating"]["list"]}
    assert variables["DS_PROMETHEUS"]["type"] == "datasource"
    assert variables["DS_PROMETHEUS"]["query"] == "prometheus"
    assert variables["job"]["datasource"] == DATASOURCE
    ids = [p["id"] for p in board["panels"]]
    assert len(ids) == len(set(ids)), "panel ids must be unique"
    for panel in panels():
        assert panel["datasource"] == DATASOURCE, panel["title"]
        assert panel["targets"] and panel["description"], panel["title"]
        refs = [t["refId"] for t in panel["targets"]]
        assert len(refs) == len(set(refs)), panel["title"]
        for target in panel["targets"]:
            assert target["datasource"] == DATASOURCE and target["expr"].strip(), panel["title"]
        pos = panel["gridPos"]
        assert pos["x"] + pos["w"] <= 24 and pos["w"] > 0 and pos["h"] > 0, panel["title"]
    # No datasource pinned to one Grafana's uid anywhere in the file.
    uids = re.findall(r'"uid":\s*"([^"]*)"', DASHBOARD.read_text())
    assert set(uids) == {"${DS_PROMETHEUS}", "codex-gateway"}
    titles = " ".join(p["title"].lower() for p in panels())
    for wanted in (
        "refusals by kind",
        "tokens",
        "credits",
        "quota",
        "time to first byte",
        "duration",
        "upstream key",
        "ledger backlog",
        "open sockets",
    ):
        assert wanted in titles, wanted


def test_panels_do_not_overlap():
    cells: dict[tuple[int, int], str] = {}
    for panel in dashboard()["panels"]:
        pos = panel["gridPos"]
        for x in range(pos["x"], pos["x"] + pos["w"]):
            for y in range(pos["y"], pos["y"] + pos["h"]):
                assert (x, y) not in cells, f"{panel['title']} overlaps {cells[(x, y)]}"
                cells[(x, y)] = panel["title"]


def test_every_metric_named_is_on_metrics():
    metrics = GatewayMetrics()
    metrics.quotas.update([])
    exposed = exposed_names(metrics.render(KeyPool(), 0).decode()) | PROMETHEUS_SERIES
    recorded = {rule["record"] for rule in rules() if "record" in rule}
    named: set[str] = set()
    for _, expr in dashboard_queries() + rule_queries():
        named |= metric_names(expr)
    assert named - exposed - recorded == set()
    # The quota and refusal series the issue asks for are among them.
    assert {"codex_gateway_quota_used", "codex_gateway_quota_limit"} <= named
    assert "codex_gateway_refused_by_kind_total" in named


def test_the_rules_pass_promtool():
    if shutil.which("promtool") is None:
        if os.environ.get("CI"):
            pytest.fail("promtool missing in CI: ./run.sh test installs Debian's prometheus")
        pytest.skip("promtool not installed (Debian's prometheus package)")
    result = subprocess.run(
        ["promtool", "check", "rules", str(RULES)], capture_output=True, text=True, timeout=60
    )
    assert result.returncode == 0, result.stdout + result.stderr
    assert f"SUCCESS: {len(rules())} rules found" in result.stdout


def test_the_example_config_loads_the_rules():
    config = yaml.safe_load((ROOT / "examples" / "prometheus.yml").read_text())
    assert any(Path(p).name == RULES.name for p in config["rule_files"])


@pytest.mark.parametrize(
    ("expr", "parts"),
    [
        ("up == 0", ["up"]),
        ("a / b > 0.2", ["a / b"]),
        ("max by (x) (a) > 100\nand deriv(a[10m]) > 0", ["max by (x) (a)", "deriv(a[10m])"]),
        (
            "histogram_quantile(0.95, sum by (le) (rate(h[5m]))) > 10",
            ["histogram_quantile(0.95, sum by (le) (rate(h[5m])))"],
        ),
    ],
)
def test_underlying(expr, parts):
    assert underlying(expr) == parts


@pytest.mark.parametrize(
    ("reason", "kind"),
    [
        ("quota", "quota"),
        ("concurrency", "concurrency"),
        ("rate_limited", "concurrency"),
        ("unpriced_model", "unpriced"),
        ("missing_member_key", "auth"),
        ("invalid_member_key", "auth"),
        ("request_too_large", "body"),
        ("not_reading", "body"),
        ("not_codex", "route"),
        ("database_unavailable", "gateway"),
        ("no_upstream_key", "gateway"),
        ("something_new", "gateway"),
        ("unmetered", "unmetered"),
    ],
)
def test_refusal_kind_of(reason, kind):
    assert refusal_kind_of(reason) == kind and kind in KINDS


# -- a real Prometheus --------------------------------------------------------------------------


def values(result: list[dict[str, Any]]) -> list[float]:
    return [float(r["value"][1]) for r in result]


@pytest.mark.e2e
@pytest.mark.codex
@pytest.mark.skipif(shutil.which("prometheus") is None, reason="prometheus not installed")
def test_every_query_returns_data_from_a_real_prometheus(gateway, upstream, codex, tmp_path):
    gateway.admin("add-team", "platform")  # the team panel's figures: alice's turns
    gateway.admin("add-member", "alice", "--weekly-credits", "1000", "--team", "platform")
    gateway.admin("add-member", "bob", "--five-hour-quota", "100")
    alice, bob = gateway.add_key("alice"), gateway.add_key("bob")
    server = gateway.serve(upstream.url, "--websockets")

    config = yaml.safe_load((ROOT / "examples" / "prometheus.yml").read_text())
    (job,) = config["scrape_configs"]
    job["authorization"]["credentials_file"] = str(gateway.tmp / "metrics.token")
    job["static_configs"] = [{"targets": [f"127.0.0.1:{server.port}"]}]
    config["global"] = {"scrape_interval": "1s", "evaluation_interval": "1s"}
    config["rule_files"] = [str(RULES)]
    (tmp_path / "prometheus.yml").write_text(yaml.safe_dump(config))
    port = free_port()
    log = (tmp_path / "prometheus.log").open("wb")
    proc = subprocess.Popen(
        [
            "prometheus",
            f"--config.file={tmp_path / 'prometheus.yml'}",
            f"--storage.tsdb.path={tmp_path / 'tsdb'}",
            f"--web.listen-address=127.0.0.1:{port}",
        ],
        stdout=log,
        stderr=subprocess.STDOUT,
    )
    try:

        def query(expr: str) -> list[dict[str, Any]]:
            try:
                body = prometheus_api(port, "query", query=expr)
            except OSError:
                return []
            assert body["status"] == "success", (expr, body)
            return body["data"]["result"]

        def has_data(expr: str) -> bool:
            return any(math.isfinite(v) for v in values(query(expr)))

        wait_for(lambda: query('up{job="codex-gateway"}') != [], 60, "the gateway scraped")
        assert values(query('up{job="codex-gateway"}')) == [1.0]
        home, work, _ = member_codex_home(tmp_path, server)

        def sdk(key: str, headers: dict[str, str] | None = None) -> openai.OpenAI:
            client = openai.OpenAI(
                base_url=f"http://127.0.0.1:{server.port}/v1",
                api_key=key,
                max_retries=0,
                timeout=30,
                default_headers=CODEX_HEADERS if headers is None else headers,
            )
            clients.append(client)
            return client

        def traffic(first: bool) -> None:
            """A Codex turn over the socket, then HTTP turns with the openai SDK (bob over his
            quota from his third), and a refusal of each kind but quota's."""
            code, out, _ = run_member_codex(codex, home, work, alice)
            assert code == 0 and upstream.text in out, out
            as_alice, as_bob = sdk(alice), sdk(bob)
            for _ in range(3):
                reply = as_alice.responses.create(model="gpt-5.5", input="Say hello")
                assert reply.output_text == upstream.text
            for n in range(3):
                if first and n < 2:
                    as_bob.responses.create(model="gpt-5.5", input="Say hello")
                    continue
                with pytest.raises(openai.RateLimitError, match="5-hour token quota"):
                    as_bob.responses.create(model="gpt-5.5", input="Say hello")
            # Codex is told 400 for a model the card cannot price (it ends the turn at once),
            # and for a member key the gateway does not know (a 401 it would retry).
            with pytest.raises(openai.BadRequestError, match="rate card"):
                as_alice.responses.create(model="no-such-model", input="hi")
            with pytest.raises(openai.BadRequestError, match="member key"):
                sdk("sk-codex-gw-unknown").responses.create(model="gpt-5.5", input="hi")
            with pytest.raises(openai.PermissionDeniedError):  # not a Codex client
                sdk(alice, {}).responses.create(model="gpt-5.5", input="hi")

        clients: list[openai.OpenAI] = []
        try:
            traffic(first=True)
            # Every series scraped once, so that the second round's rise is a rate: a series
            # first seen at its final value has none.
            wait_for(
                lambda: (
                    values(query('codex_gateway_refused_by_kind_total{kind="route"}')) == [1]
                    and values(query('sum(codex_gateway_quota_used{member="bob"})')) == [118]
                ),
                60,
                "the first round scraped",
            )
            # An upstream key refused (disabled) and one rate limited (cooling) on the way.
            upstream.key_status = {UPSTREAM_KEYS["beta"]: 401, UPSTREAM_KEYS["gamma"]: 429}
            upstream.key_retry_after = "600"
            traffic(first=False)
        finally:
            for client in clients:
                client.close()

        queries = dashboard_queries() + rule_queries()
        # Every series named is on the real gateway's /metrics, read with the operator's token.
        status, _, text = server.request("GET", "/metrics", b"", OPERATOR)
        assert status == 200
        recorded = {rule["record"] for rule in rules() if "record" in rule}
        named = set().union(*(metric_names(expr) for _, expr in queries))
        assert named - exposed_names(text.decode()) - recorded == PROMETHEUS_SERIES

        def missing() -> list[tuple[str, str]]:
            return [(title, expr) for title, expr in queries if not has_data(expr)]

        try:
            wait_for(lambda: not missing(), 120, "every query's data")
        except AssertionError:
            assert [(title, expr, query(expr)) for title, expr in missing()] == []
        # The figures behind them are the traffic's.
        ratio = {
            (r["metric"]["member"], r["metric"]["window"], r["metric"]["unit"]): float(
                r["value"][1]
            )
            for r in query("codex_gateway:quota_used:ratio")
        }
        assert ratio[("bob", "five_hour", "tokens")] >= 1.0
        assert 0 < ratio[("alice", "weekly", "credits")] < 1
        kinds = {
            r["metric"]["kind"]: float(r["value"][1])
            for r in query("codex_gateway_refused_by_kind_total")
        }
        assert kinds["quota"] >= 1 and kinds["unpriced"] >= 1 and kinds["auth"] >= 1
        assert kinds["route"] >= 1 and set(kinds) == set(KINDS)
        states = {
            r["metric"]["name"]: r["metric"]["state"]
            for r in query("codex_gateway_upstream_key_state == 1")
        }
        assert states["beta"] == "disabled" and states["gamma"] == "cooling"
        # Every rule evaluates without error, and the variable's values are there.
        groups = prometheus_api(port, "rules")["data"]["groups"]
        assert {r["health"] for g in groups for r in g["rules"]} == {"ok"}
        jobs = prometheus_api(
            port, "label/job/values", **{"match[]": "codex_gateway_requests_total"}
        )
        assert jobs["data"] == ["codex-gateway"]
        graph_screenshot(port)
    finally:
        proc.terminate()
        proc.wait(30)
        log.close()


#: The graphs of docs/observability.md's screenshot (expressions of the dashboard).
SCREENSHOT_GRAPHS = [
    "sum by (kind) (codex_gateway_refused_by_kind_total)",
    "codex_gateway_quota_used / codex_gateway_quota_limit",
    'sum by (member) (codex_gateway_tokens_total{kind="total"})',
]


def graph_screenshot(port: int) -> None:
    """Prometheus' graph page with :data:`SCREENSHOT_GRAPHS`, in headless Chromium, saved as
    test-artifacts/observability-prometheus.png, and as docs/ ``SCREENSHOT`` with
    ``UPDATE_DOC_PICTURES=1``. Skipped without Chromium (the queries were checked above)."""
    if not (shutil.which("chromium") and shutil.which("chromedriver")):
        return
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service
    from selenium.webdriver.common.by import By

    os.environ["SE_OFFLINE"] = "true"  # never let Selenium Manager download anything
    profile = tempfile.mkdtemp(prefix="dashboard-chromium-")
    options = webdriver.ChromeOptions()
    options.binary_location = shutil.which("chromium")
    for arg in (
        "--headless=new",
        "--no-sandbox",
        "--disable-gpu",
        "--disable-dev-shm-usage",
        "--no-first-run",
        "--disable-background-networking",
        f"--user-data-dir={profile}",
        "--window-size=1400,1200",
    ):
        options.add_argument(arg)
    chrome = webdriver.Chrome(service=Service(shutil.which("chromedriver")), options=options)
    try:
        params = {}
        for i, expr in enumerate(SCREENSHOT_GRAPHS):
            params |= {f"g{i}.expr": expr, f"g{i}.tab": "0", f"g{i}.range_input": "1m"}
        chrome.get(f"http://127.0.0.1:{port}/classic/graph?{urllib.parse.urlencode(params)}")
        wait_for(
            lambda: len(chrome.find_elements(By.CSS_SELECTOR, ".legend li")) >= len(KINDS) + 4,
            60,
            "Prometheus' graphs drawn with their legends",
        )
        legend = " ".join(e.text for e in chrome.find_elements(By.CSS_SELECTOR, ".legend li"))
        assert 'kind="quota"' in legend and 'member="bob"' in legend and 'unit="credits"' in legend
        artifacts = ROOT / "test-artifacts"
        artifacts.mkdir(exist_ok=True)
        path = artifacts / SCREENSHOT
        height = chrome.execute_script("return document.documentElement.scrollHeight")
        chrome.execute_cdp_cmd(
            "Emulation.setDeviceMetricsOverride",
            {"width": 1400, "height": height, "deviceScaleFactor": 1, "mobile": False},
        )
        chrome.save_screenshot(str(path))
        assert path.stat().st_size > 20_000
        if os.environ.get("UPDATE_DOC_PICTURES") == "1":
            shutil.copyfile(path, ROOT / "docs" / SCREENSHOT)
    finally:
        chrome.quit()
        shutil.rmtree(profile, ignore_errors=True)
