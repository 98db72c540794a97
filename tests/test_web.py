"""mitmweb front (``./run.sh web``) end to end: real Codex CLI, real headless Chromium."""

from __future__ import annotations

import http.client
import json
import os
import re
import shutil
import subprocess
import sys
import threading
import urllib.request
from pathlib import Path

import pytest

from addons.web import free_port
from bench.targets import tree_pids as proc_tree
from tests.conftest import ROOT, TEST_KEY, open_stream, wait_for
from tests.test_clients import printed_codex_config, run_codex
from tests.test_leaks import (
    CLIENT_API_KEY,
    CLIENT_COOKIE,
    SECRET_HEADERS,
    UPSTREAM_COOKIES,
    assert_no_marker,
)

pytestmark = pytest.mark.e2e
ARTIFACTS = ROOT / "test-artifacts"


class WebProxy:
    def __init__(self, tmp_path: Path, upstream_url: str, *args: str) -> None:
        self.info = tmp_path / "web-info.json"
        self.log_path = tmp_path / "web.log"
        self.web_port = free_port()
        self.log = open(self.log_path, "wb")
        self.proc = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "addons.web",
                "--upstream-url",
                upstream_url,
                "--server-info",
                str(self.info),
                "--http-shutdown",
                "--web-port",
                str(self.web_port),
                "--dump-dir",
                str(tmp_path / "dumps"),
                *args,
            ],
            stdin=subprocess.PIPE,
            stdout=self.log,
            stderr=subprocess.STDOUT,
            cwd=ROOT,
        )
        assert self.proc.stdin is not None
        self.proc.stdin.write(TEST_KEY.encode() + b"\n")
        self.proc.stdin.close()
        wait_for(lambda: self.info.exists() or self.proc.poll() is not None, 120, "web front")
        assert self.proc.poll() is None, self.output()
        self.port = json.loads(self.info.read_text())["port"]
        wait_for(lambda: "token=" in self.output(), 30, "mitmweb's token")
        self.token = re.search(r"token=([0-9a-f]+)", self.output()).group(1)

    def output(self) -> str:
        return self.log_path.read_text(errors="replace")

    def api(self, path: str) -> bytes:
        sep = "&" if "?" in path else "?"
        url = f"http://127.0.0.1:{self.web_port}{path}{sep}token={self.token}"
        with urllib.request.urlopen(url, timeout=30) as resp:
            return resp.read()

    def flows(self) -> list[dict]:
        return json.loads(self.api("/flows"))

    def request(self, method: str, target: str, body=None, headers=None):
        conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=60)
        conn.request(method, target, body=body, headers=headers or {})
        resp = conn.getresponse()
        out = resp.status, resp.read()
        conn.close()
        return out

    def stop(self) -> int:
        if self.proc.poll() is None:
            status, _ = self.request("GET", "/shutdown")
            assert status == 200
        code = self.proc.wait(60)
        self.log.close()
        return code


def chrome():
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    if not (shutil.which("chromium") and shutil.which("chromedriver")):
        if os.environ.get("CI"):
            pytest.fail("chromium/chromedriver missing in CI: ./run.sh test installs them")
        pytest.skip("chromium/chromedriver not installed (./run.sh test installs them)")
    os.environ["SE_OFFLINE"] = "true"  # never let Selenium Manager download anything
    options = webdriver.ChromeOptions()
    options.binary_location = shutil.which("chromium")
    for arg in (
        "--headless=new",
        "--no-sandbox",
        "--disable-gpu",
        "--disable-dev-shm-usage",
        "--disable-background-networking",
        "--disable-component-update",
        "--disable-sync",
        "--no-first-run",
        "--disable-quic",
        "--window-size=1400,1000",
    ):
        options.add_argument(arg)
    return webdriver.Chrome(service=Service(shutil.which("chromedriver")), options=options)


@pytest.mark.codex
def test_mitmweb_front_shows_codex_flows_without_the_key(upstream, codex, tmp_path):
    upstream.gate = threading.Event()
    web = WebProxy(tmp_path, upstream.url, "--set", "codex_web_max_flows=50")
    driver = None
    try:
        # The process that shows flows never had the key.
        for pid in proc_tree(web.proc.pid):
            for name in ("cmdline", "environ"):
                assert TEST_KEY.encode() not in Path(f"/proc/{pid}/{name}").read_bytes()

        # 1. While a stream is running, the UI already has its first event.
        conn, resp = open_stream(web.port, timeout=60)
        assert resp.readline() == b"event: response.created\n"

        def live_body() -> bytes:
            flows = [f for f in web.flows() if f["request"]["method"] == "POST"]
            if not flows or not flows[0].get("response"):
                return b""
            return web.api(f"/flows/{flows[0]['id']}/response/content.data")

        wait_for(lambda: b"response.created" in live_body(), 20, "the streaming body in the UI")
        assert b"response.completed" not in live_body()
        flows_json = web.api("/flows")
        assert TEST_KEY.encode() not in flows_json
        upstream.gate.set()
        assert b"response.completed" in resp.read()
        conn.close()
        upstream.gate = None

        # 2. A real Codex run through the front.
        home, work = tmp_path / "codex-home", tmp_path / "work"
        home.mkdir()
        work.mkdir()
        toml = printed_codex_config(type("P", (), {"info_path": web.info})(), "--toml-only")
        (home / "config.toml").write_text(toml)
        result = run_codex(codex, home, work)
        assert result.returncode == 0, result.stderr.decode(errors="replace")

        # 3. What Codex (or anything else) tried and was refused is visible and marked.
        assert web.request("GET", "/v1/models")[0] == 403
        assert (
            web.request(
                "GET", "/v1/responses", headers={"Upgrade": "websocket", "Connection": "Upgrade"}
            )[0]
            == 426
        )
        flows = web.flows()
        by_comment = {f["comment"] for f in flows}
        assert any("allowlist" in c for c in by_comment)
        assert any("426" in c for c in by_comment)
        refused = [f for f in flows if f["response"] and f["response"]["status_code"] == 403]
        # A plain letter, not an emoji (which headless Chromium draws as an empty box).
        assert refused and all(f["marked"] == "X" for f in refused)
        posts = [f for f in flows if f["request"]["method"] == "POST"]
        assert len(posts) == 2
        for f in posts:
            headers = dict((k.lower(), v) for k, v in f["request"]["headers"])
            assert headers["authorization"] == "[REDACTED]"
            assert (
                f"forwarded to {upstream.url};" in f["comment"]
                or "stream complete" in (f["comment"])
            )

        # 4. No key anywhere in the UI's API: flow list and every body.
        everything = [web.api("/flows")]
        for f in flows:
            everything.append(web.api(f"/flows/{f['id']}/request/content.data"))
            if f.get("response"):
                everything.append(web.api(f"/flows/{f['id']}/response/content.data"))
        for f in posts:
            # The whole stream stays viewable, even when Codex hung up right after
            # response.completed (the flow then ends in an error, not a response).
            assert b"response.completed" in web.api(f"/flows/{f['id']}/response/content.data")
            if f.get("error"):
                assert f["comment"].startswith("stream complete"), f["comment"]
        for blob in everything:
            assert TEST_KEY.encode() not in blob

        # 5. A real browser: the flow is there, the SSE body is shown, no key in the DOM.
        from selenium.webdriver.common.by import By
        from selenium.webdriver.support.ui import WebDriverWait

        driver = chrome()
        try:
            driver.get(f"http://127.0.0.1:{web.web_port}/?token={web.token}")
            wait = WebDriverWait(driver, 30)
            rows = wait.until(
                lambda d: [
                    r
                    for r in d.find_elements(By.CSS_SELECTOR, "tr")
                    if "/v1/responses" in r.text and "POST" in r.text
                ]
            )
            rows[-1].click()
            tab = wait.until(
                lambda d: next(
                    (
                        t
                        for t in d.find_elements(By.CSS_SELECTOR, "a")
                        if t.text.strip() == "Response"
                    ),
                    None,
                )
            )
            tab.click()
            # The Responses stream view is chosen by itself: the assembled text, not events.
            wait.until(lambda d: "── assistant text ──" in d.page_source)
        except Exception:
            ARTIFACTS.mkdir(exist_ok=True)
            driver.save_screenshot(str(ARTIFACTS / "mitmweb-failure.png"))
            raise
        page = driver.page_source
        assert upstream.text in page and "Responses stream" in page
        # The status bar shows the front's real listen address, not mitmweb's default.
        assert f"127.0.0.1:{web.port}" in page
        assert "status: completed" in page and "tokens: input 42 (cached 8, cache writes 3)" in page
        assert TEST_KEY not in driver.page_source
        ARTIFACTS.mkdir(exist_ok=True)
        driver.save_screenshot(str(ARTIFACTS / "mitmweb-codex-flow.png"))
        assert (ARTIFACTS / "mitmweb-codex-flow.png").stat().st_size > 10_000
    finally:
        if driver is not None:
            driver.quit()
        if upstream.gate is not None:
            upstream.gate.set()
        code = web.stop()
    assert code == 0
    assert TEST_KEY not in web.output()
    dumps = list((tmp_path / "dumps").iterdir())
    assert len(dumps) == 4  # the key-holding proxy wrote the dumps: two pairs


def test_flow_cap_keeps_memory_bounded(upstream, tmp_path):
    web = WebProxy(tmp_path, upstream.url, "--set", "codex_web_max_flows=3")
    try:
        for _ in range(8):
            assert web.request("GET", "/v1/models")[0] == 403
        wait_for(lambda: len(web.flows()) == 3, 20, "the cap to apply")
        assert len(web.flows()) == 3
    finally:
        assert web.stop() == 0


def web_command(web: WebProxy, name: str, *args: str) -> dict:
    """Run a mitmproxy command through mitmweb's API, as its UI does (tornado's XSRF check: a
    ``_mitmproxy_xsrf`` cookie and the same token in ``X-XSRFToken``)."""
    xsrf = os.urandom(16).hex()
    conn = http.client.HTTPConnection("127.0.0.1", web.web_port, timeout=30)
    conn.request(
        "POST",
        f"/commands/{name}?token={web.token}",
        json.dumps({"arguments": list(args)}),
        {
            "Content-Type": "application/json",
            "Cookie": f"_mitmproxy_xsrf={xsrf}",
            "X-XSRFToken": xsrf,
        },
    )
    resp = conn.getresponse()
    body = resp.read()
    conn.close()
    assert resp.status == 200, body
    return json.loads(body)


def test_mitmweb_front_redacts_cookies_and_api_keys(upstream, tmp_path):
    upstream.set_cookies = UPSTREAM_COOKIES
    web = WebProxy(tmp_path, upstream.url)
    driver = None
    try:
        for payload in ({"model": "m"}, {"model": "m", "stream": True}):
            conn = http.client.HTTPConnection("127.0.0.1", web.port, timeout=60)
            conn.request("POST", "/v1/responses", json.dumps(payload), SECRET_HEADERS)
            resp = conn.getresponse()
            cookies = [v for k, v in resp.getheaders() if k.lower() == "set-cookie"]
            assert resp.status == 200 and b"resp_standin" in resp.read()
            conn.close()
            assert cookies == UPSTREAM_COOKIES  # the client got them unchanged
        assert web.request("GET", "/v1/models", headers=SECRET_HEADERS)[0] == 403
        for r in upstream.requests:
            assert r.header_values("cookie") == [CLIENT_COOKIE]
            assert r.header_values("x-api-key") == [CLIENT_API_KEY]
        wait_for(lambda: len(web.flows()) == 3, 20, "three flows in the UI")
        flows = web.flows()
        places = {"/flows": web.api("/flows"), "/flows/dump": web.api("/flows/dump")}
        for f in flows:
            for part in ("request", "response"):
                body = web.api(f"/flows/{f['id']}/{part}/content.data")
                if body:
                    places[f"{f['id']} {part}"] = body
        har = tmp_path / "export.har"
        assert "error" not in web_command(web, "save.har", "@all", str(har))
        places["save.har"] = har.read_bytes()
        for f in flows:
            headers = {k.lower(): v for k, v in f["request"]["headers"]}
            assert headers["cookie"] == "[REDACTED]" and headers["x-api-key"] == "[REDACTED]"
        assert b"set-cookie" in places["/flows"].lower()

        from selenium.webdriver.common.by import By
        from selenium.webdriver.support.ui import WebDriverWait

        driver = chrome()
        driver.get(f"http://127.0.0.1:{web.web_port}/?token={web.token}")
        wait = WebDriverWait(driver, 30)
        for label in ("Request", "Response"):
            rows = wait.until(
                lambda d: [r for r in d.find_elements(By.CSS_SELECTOR, "tr") if "POST" in r.text]
            )
            rows[-1].click()
            tab = wait.until(
                lambda d, label=label: next(
                    (t for t in d.find_elements(By.CSS_SELECTOR, "a") if t.text.strip() == label),
                    None,
                )
            )
            tab.click()
            wait.until(lambda d: "[REDACTED]" in d.page_source)
            places[f"page, {label} tab"] = driver.page_source.encode()
    finally:
        if driver is not None:
            driver.quit()
        code = web.stop()
    assert code == 0
    places["mitmweb log"] = web.output().encode()
    assert_no_marker(places)


def test_mitmweb_front_with_the_chat_bridge(upstream, tmp_path):
    """``./run.sh web --chat-bridge``: a chat-only client works through the front, which shows
    the call in the Chat Completions views: the upstream request it became, the assembled reply;
    the key-holding proxy's dumps hold both shapes."""
    import openai

    web = WebProxy(tmp_path, upstream.url, "--chat-bridge")
    try:
        with openai.OpenAI(
            base_url=f"http://127.0.0.1:{web.port}/v1", api_key="unused", max_retries=0
        ) as client:
            # Read the stream to its end: the SDK's own iterator closes the connection at
            # ``[DONE]``, which can reach the front before the reply's end does; the flow then
            # ends as "client disconnected" (seen once in CI) instead of finished.
            with client.chat.completions.with_streaming_response.create(
                model="gpt-6.2-sol-low",
                messages=[{"role": "user", "content": "hi"}],
                stream=True,
            ) as reply:
                lines = list(reply.iter_lines())
        chunks = [json.loads(line[len("data: ") :]) for line in lines if line.startswith("data: {")]
        assert "data: [DONE]" in lines
        assert (
            "".join(
                c["choices"][0]["delta"].get("content") or "" for c in chunks if c.get("choices")
            )
            == upstream.text
        )
        # The UI learns of the flow's end a moment after the client has read the last chunk.
        wait_for(
            lambda: any((f.get("response") or {}).get("timestamp_end") for f in web.flows()),
            20,
            "the finished flow in the UI",
        )
        flow = next(f for f in web.flows() if f["request"]["path"] == "/v1/chat/completions")

        def view(part: str, name: str) -> str:
            raw = web.api(f"/flows/{flow['id']}/{part}/content/{name}.json")
            doc = json.loads(raw)
            return doc["text"] if "text" in doc else json.dumps(doc)

        request_view = view("request", "chat%20completions%20request")
        assert "model: gpt-6.2-sol\n" in request_view and "reasoning effort: low" in request_view
        reply_view = view("response", "chat%20completions%20stream")
        assert f"── assistant text ──\n{upstream.text}" in reply_view
    finally:
        code = web.stop()
    assert code == 0
    dumps = sorted((tmp_path / "dumps").iterdir())
    response = json.loads(next(p for p in dumps if p.name.endswith("-response.json")).read_text())
    assert "response.completed" in response["body"] and "[DONE]" in response["client_body"]
