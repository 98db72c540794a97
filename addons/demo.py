"""``codex-proxy demo`` (``./run.sh demo``): the whole proxy on real input, with no API key
and no network.

Starts the local Responses stand-in (:mod:`addons.standin`) on 127.0.0.1, starts the real
launcher in front of it with a throwaway key piped on stdin, streams one request through it with
the ``openai`` SDK (printing the text as the SSE events arrive), shows what the upstream saw of
the injected header (redacted), shows a refused request and a refused WebSocket upgrade, shuts
the proxy down over ``GET /shutdown`` and lists the dump files written. Exit 0 on success.
"""

from __future__ import annotations

import argparse
import http.client
import json
import secrets
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path

from addons.invocation import prog
from addons.secret_memory import REDACTED

ROOT = Path(__file__).resolve().parent.parent


def _say(text: str = "") -> None:
    print(text, flush=True)


def _wait_for_file(path: Path, proc: subprocess.Popen[bytes], timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if path.exists():
            return
        if proc.poll() is not None:
            raise SystemExit(f"demo: the proxy exited with {proc.returncode} before listening")
        time.sleep(0.05)
    raise SystemExit("demo: the proxy did not start in time")


def _request(port: int, method: str, target: str, headers: dict[str, str]) -> tuple[int, bytes]:
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
    try:
        conn.request(method, target, headers=headers)
        resp = conn.getresponse()
        return resp.status, resp.read()
    finally:
        conn.close()


def mask(value: str) -> str:
    """``Bearer sk-demo-abcd…`` → ``Bearer sk-d…(52 chars)``: enough to recognise, not to use."""
    scheme, _, secret = value.partition(" ")
    return f"{scheme} {secret[:4]}…({len(secret)} chars, redacted)"


def build_parser() -> argparse.ArgumentParser:
    """The demo takes no arguments; ``--help`` says what it does."""
    return argparse.ArgumentParser(
        prog=prog("demo"),
        description="Run the strict proxy in front of the local Responses stand-in with a "
        "throwaway key on stdin, stream one request through it with the openai SDK, show what "
        "the upstream saw (the key redacted), a refused request, a refused WebSocket upgrade, "
        "the shutdown and the dump files. No API key, no network. Exit 0 when every check "
        "passed. The stand-in alone: " + prog("standin") + ".",
    )


def main(argv: Sequence[str] | None = None) -> int:
    """Run the demo; returns 0 when every check it prints passed, else 1 (2: bad arguments)."""
    build_parser().parse_args(argv)
    import openai

    from addons.standin import ResponsesStandIn

    work = Path(tempfile.mkdtemp(prefix="codex-proxy-demo-"))
    dump_dir = work / "dumps"
    info = work / "server-info.json"
    demo_key = "sk-demo-" + secrets.token_urlsafe(24).replace("=", "")

    upstream = ResponsesStandIn()
    upstream.event_delay = 0.04
    upstream.start()
    _say(f"1. Local Responses stand-in listening at {upstream.url}")

    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "addons.cli",
            "--upstream-url",
            upstream.url,
            "--dump-dir",
            str(dump_dir),
            "--server-info",
            str(info),
            "--http-shutdown",
            "--set",
            "flow_detail=0",
            "--set",
            "termlog_verbosity=warn",
        ],
        stdin=subprocess.PIPE,
        cwd=ROOT,
    )
    assert proc.stdin is not None
    proc.stdin.write(demo_key.encode() + b"\n")
    proc.stdin.close()
    try:
        _wait_for_file(info, proc)
        port = json.loads(info.read_text())["port"]
        info_line = info.read_text().strip()
        _say(f"2. Proxy started with a throwaway key on stdin; server-info: {info_line}")
        _say()
        _say("3. Streaming a request through the proxy with the openai SDK:")
        with openai.OpenAI(
            base_url=f"http://127.0.0.1:{port}/v1",
            api_key="not-the-real-key",
            max_retries=0,
            timeout=60,
        ) as client:
            # Warm the client first (SDK set-up, first connection), so the times below are the
            # request's own, not the SDK's start-up.
            client.responses.create(model="demo-model", input="warm-up")
            sys.stdout.write("   ")
            started = time.monotonic()
            first_at = None
            usage = None
            with client.responses.create(
                model="demo-model", input="Say hello", stream=True
            ) as stream:
                for event in stream:
                    if event.type == "response.output_text.delta":
                        first_at = first_at or time.monotonic() - started
                        sys.stdout.write(event.delta)
                        sys.stdout.flush()
                    elif event.type == "response.completed":
                        usage = event.response.usage
        _say()
        _say(
            f"   first token after {1000 * (first_at or 0):.1f} ms, whole stream "
            f"{1000 * (time.monotonic() - started):.1f} ms, measured from a warm client; the "
            f"stand-in sends an event every {1000 * upstream.event_delay:.0f} ms and the first "
            "token is its 5th event (events arrive one by one)"
        )
        if usage is not None:
            _say(
                f"   usage: {usage.input_tokens} in, {usage.output_tokens} out, "
                f"{usage.total_tokens} total"
            )
        _say()
        seen = upstream.requests[-1]
        auth = seen.header_values("authorization")
        _say("4. What the upstream received:")
        _say(f"   {seen.method} {seen.path_qs}  Host: {seen.header_values('host')[0]}")
        _say(f"   Authorization: {mask(auth[0]) if auth else '(none)'}")
        _say(
            f"   exactly one Authorization header: {len(auth) == 1}; it is the key from stdin: "
            f"{auth == ['Bearer ' + demo_key]}; the client's own key was dropped: "
            f"{'not-the-real-key' not in json.dumps(seen.headers)}"
        )
        _say()
        status, body = _request(port, "GET", "/v1/models", {})
        _say(f"5. GET /v1/models -> {status} {body.decode()}")
        status, body = _request(
            port, "GET", "/v1/responses", {"Upgrade": "websocket", "Connection": "Upgrade"}
        )
        _say(f"   WebSocket upgrade -> {status} {json.loads(body)['error']['code']}")
        _say(f"   requests that reached the upstream in total: {len(upstream.requests)}")
        _say()
        status, _ = _request(port, "GET", "/shutdown", {})
        code = proc.wait(30)
        _say(f"6. GET /shutdown -> {status}; proxy exited with code {code}")
        _say()
        _say(f"7. Dump files in {dump_dir}:")
        for path in sorted(dump_dir.iterdir()):
            st = path.stat()
            _say(f"   {path.name}  ({st.st_size} bytes, mode {oct(st.st_mode & 0o777)})")
        request_file = next(
            p for p in sorted(dump_dir.iterdir()) if p.name.endswith("-request.json")
        )
        doc = json.loads(request_file.read_text())
        redacted = [h["name"] for h in doc["headers"] if h["value"] == REDACTED]
        _say(f"   request headers redacted in the dump: {', '.join(redacted) or '(none)'}")
        leaked = any(demo_key in p.read_text() for p in dump_dir.iterdir())
        _say(f"   key found in any dump file: {leaked}")
        ok = (
            code == 0
            and auth == ["Bearer " + demo_key]
            and not leaked
            and len(list(dump_dir.iterdir())) == 4  # the warm-up and the stream, a pair each
        )
        _say()
        _say("Demo finished: OK" if ok else "Demo finished: something was wrong (see above)")
        return 0 if ok else 1
    finally:
        if proc.poll() is None:
            proc.terminate()
            proc.wait(10)
        upstream.stop()


if __name__ == "__main__":
    sys.exit(main())
