"""Benchmark upstream: nginx (Debian's package, with its echo module), so that the upstream is
never the bottleneck of a ratio.

A Python upstream on the same two cores would spend a core of its own on 1 000 streams and pull
every ratio toward 1; nginx answers a request in microseconds. :class:`NginxUpstream` writes a
config into a temporary directory and runs ``nginx -g 'daemon off;'`` there on 127.0.0.1 (as any
user; nothing outside the directory is touched). ``POST /v1/responses``:

- ``Accept: text/event-stream`` -> an SSE stream of :data:`EVENTS` events, one every
  :data:`INTERVAL_MS` ms (the last ``response.completed``), each carrying ``"t"``: nginx's clock
  (s, ms resolution) when it left, so a client computes per-event lag as arrival - ``t``; the
  text delta is ``"[t]"`` too, so the lag survives translation into Chat Completions chunks;
- anything else -> a small JSON reply, after the whole request body was read (with its length,
  for the 8 MB run).

Raises :class:`RuntimeError` from :meth:`NginxUpstream.start` when nginx or its echo module is
missing (``./run.sh bench`` and ``./run.sh test`` install both).
"""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

#: Events per stream and the gap between them (ms).
EVENTS = 50
INTERVAL_MS = 20
#: The small JSON reply (nginx fills in ``$content_length``).
JSON_REPLY = (
    '{"id":"resp_bench","object":"response","status":"completed","received_bytes":$content_length}'
)
ECHO_MODULE = Path("/usr/lib/nginx/modules/ngx_http_echo_module.so")


def nginx_binary() -> str | None:
    """The nginx executable (``/usr/sbin`` is often not on a user's PATH), or ``None``."""
    found = shutil.which("nginx")
    if found:
        return found
    return "/usr/sbin/nginx" if Path("/usr/sbin/nginx").exists() else None


def sse_directives(events: int = EVENTS, interval_ms: int = INTERVAL_MS) -> str:
    """The echo-module directives of one stream: each event, flushed, then a pause."""
    lines = []
    for i in range(events):
        kind = "response.completed" if i == events - 1 else "response.output_text.delta"
        payload = f'{{"type":"{kind}","i":{i},"t":${{msec}},"delta":"[${{msec}}]"}}'
        lines += [f"echo 'event: {kind}';", f"echo 'data: {payload}';", "echo;", "echo_flush;"]
        if i < events - 1:
            lines.append(f"echo_sleep {interval_ms / 1000:.3f};")
    return "\n            ".join(lines)


def nginx_config(
    root: Path, port: int, events: int = EVENTS, interval_ms: int = INTERVAL_MS
) -> str:
    """nginx.conf for the benchmark upstream on 127.0.0.1:``port``, every path under ``root``."""
    temp = "\n    ".join(
        f"{name}_temp_path {root / name};"
        for name in ("client_body", "proxy", "fastcgi", "uwsgi", "scgi")
    )
    return f"""
load_module {ECHO_MODULE};
worker_processes 1;
error_log {root / "error.log"} warn;
pid {root / "nginx.pid"};
events {{ worker_connections 16384; }}
http {{
    access_log off;
    {temp}
    keepalive_requests 100000000;
    keepalive_timeout 600s;
    client_max_body_size 64m;
    client_body_buffer_size 16m;
    postpone_output 0;
    map $http_accept $bench_route {{
        "~*text/event-stream" /bench-sse;
        default /bench-json;
    }}
    server {{
        listen 127.0.0.1:{port} backlog=4096;
        location = /v1/responses {{
            rewrite ^ $bench_route last;
        }}
        location = /bench-json {{
            internal;
            default_type application/json;
            echo_read_request_body;
            echo '{JSON_REPLY}';
        }}
        location = /bench-sse {{
            internal;
            default_type text/event-stream;
            echo_read_request_body;
            {sse_directives(events, interval_ms)}
        }}
    }}
}}
"""


class NginxUpstream:
    """The running benchmark upstream: ``start()`` -> port; ``stop()`` ends nginx."""

    def __init__(self, root: Path, port: int) -> None:
        self.root = root
        self.port = port
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self) -> int:
        """Write the config, start nginx; returns the port. Raises RuntimeError."""
        binary = nginx_binary()
        if binary is None or not ECHO_MODULE.exists():
            raise RuntimeError(
                "the benchmark upstream needs nginx and its echo module (Debian: nginx "
                "libnginx-mod-http-echo; ./run.sh bench installs them)"
            )
        self.root.mkdir(parents=True, exist_ok=True)
        conf = self.root / "nginx.conf"
        conf.write_text(nginx_config(self.root, self.port))
        self.proc = subprocess.Popen(
            [binary, "-p", str(self.root), "-c", str(conf), "-g", "daemon off;"],
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
        )
        return self.port

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
