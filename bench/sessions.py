"""``./run.sh bench --sessions``: a Codex tool-call session of N turns (30 by default) over HTTP
and over WebSocket, direct and through the gateway, side by side in one run (issue 23,
"Performance").

The client plays Codex 0.171 as captured on this machine (custom provider, a 3-tool-call
session against a loopback fake, HTTP and ``supports_websockets = true``):

- **HTTP**: every turn is a ``POST /v1/responses`` carrying the whole conversation: the request
  fields (``tools``: 10 tools, ~9 KB; ``client_metadata`` ~1.2 KB; ``model``, ``reasoning``,
  ``include``...) and ``input``: four messages (~28 KB: the ~21 KB developer instructions, a
  ~5 KB developer message, the environment, the prompt), then per earlier turn the
  ``function_call`` item the model sent and its ``function_call_output``. Turn 1 is ~40 KB,
  and each turn adds ~:data:`OUTPUT_BYTES` of tool output.
- **WebSocket**: one socket per session (``GET /v1/responses`` + ``Upgrade: websocket``,
  ``permessage-deflate`` offered as Codex offers it), a warm-up ``response.create`` with
  ``"generate": false`` and the developer instructions, then per turn a ``response.create``
  with ``previous_response_id`` and only the new items: turn 1 the other three messages, each
  later turn the previous call's ``function_call_output`` (the request fields ride along every
  time, as Codex sends them: tools and ``client_metadata`` included, no ``instructions``).

The upstream (:mod:`bench.session_upstream`) answers each turn with a streamed tool call and
its usage. Between turns the client "runs the tool" for :data:`THINK_S` (Codex's tool calls take
tens of ms at least), which also lets the gateway finish a turn's background work (the ledger
row) inside that turn's window.

Per turn and target: the gateway's **CPU** (ms; the run time of every thread of the gateway's
process tree, ``/proc/<pid>/task/<tid>/schedstat``: the kernel's nanosecond sum of user and
system time, which ``/proc/<pid>/stat``'s 10 ms ticks are too coarse for), counted in
contiguous windows from one turn's start to the next's, so nothing the gateway does is lost;
the **bytes** the gateway read from the client (``TCP_INFO``'s ``tcpi_bytes_acked`` of the
client's socket: request head and body, or WebSocket frames after compression) and the JSON
payload before compression; the **first event** latency (ms from sending the request or
message to the first SSE event or socket message). The upstream is a Python process of its
own: its CPU is never counted as the gateway's, and it is on every target's path alike.

Targets, interleaved round by round (the order rotates each round), each over HTTP and over
WebSocket: ``direct`` (client to upstream), bare ``mitmdump`` in reverse mode (mitmproxy's own
relaying, no addons: the engine's share of the gateway's cost) and ``gateway`` (one process,
``serve --websockets`` on SQLite with one member key and no limits, so every turn is checked
and metered). Per-turn figures are medians across rounds; ``p50`` is over every turn of every
round.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import socket
import statistics
import struct
import subprocess
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

#: The client's "tool run" between turns (s).
THINK_S = 0.05
#: Bytes of each tool call's output (an ``exec_command`` reading ~80 lines of a file).
OUTPUT_BYTES = 6000
#: Milliseconds between a turn's events at the upstream (a model streams them spaced out).
GAP_MS = 5
#: The targets, in their first round's order.
TARGETS = (
    "direct-http",
    "direct-ws",
    "mitmdump-http",
    "mitmdump-ws",
    "gateway-http",
    "gateway-ws",
)
#: Where ``tcp_info.tcpi_bytes_acked`` sits (``linux/tcp.h``, since Linux 4.1): bytes the peer
#: acknowledged, each once (``tcpi_bytes_sent`` counts retransmissions again), plus 1 for the SYN.
TCPI_BYTES_ACKED = 120
#: Codex 0.171's user agent and protocol headers (CODEX.md), the same on every request.
CODEX_UA = "codex_exec/0.171.0 (Debian 12; x86_64) bench"
SESSION_ID = "01a23a17-6e97-7923-82ab-45754ecb298d"


# -- the conversation Codex sends -----------------------------------------------------------


def _vocabulary(size: int = 600, seed: int = 7) -> list[str]:
    """Made-up words (2-9 letters): text of them, drawn with a skew, deflates ~2.7x, as
    Codex's real request does (2.7x measured on the captured 38 KB body); English-like filler
    from a small word list deflates 20x+ and would flatter the WebSocket's compression."""
    rng = random.Random(seed)
    letters = "etaoinshrdlucmfwyp"
    return ["".join(rng.choice(letters) for _ in range(rng.randint(2, 9))) for _ in range(size)]


_VOCABULARY = _vocabulary()


def prose(size: int, seed: int) -> str:
    """Deterministic text of ``size`` characters (instructions, tool descriptions, tool output)."""
    rng = random.Random(seed)
    words: list[str] = []
    length = 0
    while length < size:
        word = _VOCABULARY[int(rng.random() ** 2 * len(_VOCABULARY))]
        if rng.random() < 0.05:
            word += ".\n"
        words.append(word)
        length += len(word) + 1
    return " ".join(words)[:size]


def _message(role: str, text: str, n: int) -> dict[str, Any]:
    return {
        "type": "message",
        "id": f"msg_bench_{n}",
        "role": role,
        "content": [{"type": "input_text", "text": text}],
    }


def _tool(name: str, size: int, n: int) -> dict[str, Any]:
    properties = {
        f"arg_{i}": {"type": "string", "description": prose(110, n * 13 + i)}
        for i in range(max(1, size // 185))
    }
    return {
        "type": "function",
        "name": name,
        "description": prose(90, n),
        "strict": False,
        "parameters": {"type": "object", "properties": properties, "required": []},
    }


def request_fields() -> dict[str, Any]:
    """Every field of Codex's request except ``input`` (the same each turn): 10 tools of
    Codex's names and sizes (~9 KB), ``client_metadata`` (~1.2 KB) and the small fields."""
    sizes = {
        "exec_command": 1600,
        "write_stdin": 820,
        "request_user_input": 1420,
        "apply_patch": 860,
        "view_image": 390,
        "get_goal": 300,
        "create_goal": 780,
        "update_goal": 2200,
        "tool_search": 720,
        "web_search": 100,
    }
    metadata = json.dumps({"session_id": SESSION_ID, "request_kind": "turn", "pad": prose(950, 3)})
    return {
        "model": "gpt-5.5",
        "stream": True,
        "tools": [_tool(name, size, n) for n, (name, size) in enumerate(sizes.items())],
        "tool_choice": "auto",
        "parallel_tool_calls": False,
        "reasoning": {"effort": "medium"},
        "store": False,
        "include": ["reasoning.encrypted_content"],
        "prompt_cache_key": SESSION_ID,
        "text": {"verbosity": "low"},
        "client_metadata": {
            "x-codex-turn-metadata": metadata,
            "session_id": SESSION_ID,
            "thread_id": SESSION_ID,
        },
    }


def opening_input() -> list[dict[str, Any]]:
    """The four messages of Codex's first request (~28 KB): instructions, permissions,
    environment, the prompt."""
    return [
        _message("developer", prose(21_400, 1), 0),
        _message("developer", prose(5_150, 2), 1),
        _message("user", prose(400, 3), 2),
        _message("user", "Read the modules one by one and summarise each.", 3),
    ]


def tool_output(call_id: str, turn: int, size: int = OUTPUT_BYTES) -> dict[str, Any]:
    """The ``function_call_output`` Codex sends back after running a call (``size`` bytes)."""
    head = f"Chunk ID: {turn:06x}\nWall time: 0.0500 seconds\nProcess exited with code 0\nOutput:\n"
    return {
        "type": "function_call_output",
        "id": f"fco_bench_{turn}",
        "call_id": call_id,
        "output": head + prose(max(0, size - len(head)), 100 + turn),
    }


def codex_headers(extra: dict[str, str] | None, websocket: bool = False) -> dict[str, str]:
    """Codex's request headers (a gateway target adds its member key in ``extra``)."""
    headers = {
        "user-agent": CODEX_UA,
        "originator": "codex_exec",
        "session-id": SESSION_ID,
        "thread-id": SESSION_ID,
        "x-codex-window-id": f"{SESSION_ID}:0",
        "x-codex-turn-metadata": json.dumps({"session_id": SESSION_ID, "request_kind": "turn"}),
    }
    if websocket:
        headers["openai-beta"] = "responses_websockets=2026-02-06"
    else:
        headers["accept"] = "text/event-stream"
    headers.update(extra or {})
    return headers


# -- measuring ------------------------------------------------------------------------------


def run_time_ns(pids: list[int]) -> int:
    """Nanoseconds on CPU so far of every thread of ``pids`` (``/proc/<pid>/task/*/schedstat``,
    first field; Linux)."""
    total = 0
    for pid in pids:
        try:
            tasks = os.listdir(f"/proc/{pid}/task")
        except OSError:
            continue
        for tid in tasks:
            try:
                with open(f"/proc/{pid}/task/{tid}/schedstat") as f:
                    total += int(f.read().split()[0])
            except (OSError, ValueError, IndexError):
                continue
    return total


def bytes_sent(sock: Any) -> int | None:
    """Bytes a connected TCP socket has delivered to its peer (``tcpi_bytes_acked`` less the
    SYN); ``None`` when unknown. Read after the peer answered, every byte is acknowledged."""
    if sock is None:
        return None
    try:
        info = sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_INFO, 256)
    except OSError:
        return None
    if len(info) < TCPI_BYTES_ACKED + 8:
        return None
    return max(0, int(struct.unpack_from("<Q", info, TCPI_BYTES_ACKED)[0]) - 1)


class CpuClock:
    """Reads a process tree's CPU time (ms); a clock for ``pid=None`` reads ``None``."""

    def __init__(self, pid: int | None) -> None:
        from bench.targets import tree_pids

        self.pids = tree_pids(pid) if pid is not None else []

    def ms(self) -> float | None:
        return run_time_ns(self.pids) / 1e6 if self.pids else None


@dataclass
class TurnRecord:
    """One turn as the client saw it. ``turn`` 0 is a socket's set-up (handshake + warm-up)."""

    turn: int
    first_event_ms: float
    payload_bytes: int
    wire_bytes: int | None
    cpu_ms: float | None = None
    events: int = 0


@dataclass
class SessionRun:
    """A whole session on one target: its turns in order."""

    target: str
    turns: list[TurnRecord] = field(default_factory=list)


class _Windows:
    """CPU in contiguous windows: :meth:`cut` closes the window of the last record."""

    def __init__(self, clock: CpuClock) -> None:
        self.clock = clock
        self.last = clock.ms()

    def cut(self, record: TurnRecord) -> None:
        now = self.clock.ms()
        if now is not None and self.last is not None:
            record.cpu_ms = round(now - self.last, 3)
        self.last = now


async def http_session(
    port: int, turns: int, headers: dict[str, str] | None, clock: CpuClock, think_s: float
) -> SessionRun:
    """Codex's session over HTTP: each turn POSTs the whole conversation and reads the SSE
    stream to ``response.completed``. Raises RuntimeError on a non-200 or a stream that ends
    without a function call."""
    import aiohttp

    run = SessionRun("http")
    base = request_fields()
    conversation = opening_input()
    url = f"http://127.0.0.1:{port}/v1/responses"
    sent_before: dict[int, int] = {}  # local port -> bytes its connection had sent
    async with aiohttp.ClientSession(
        connector=aiohttp.TCPConnector(limit=1), timeout=aiohttp.ClientTimeout(total=120)
    ) as client:
        windows = _Windows(clock)
        for turn in range(1, turns + 1):
            body = json.dumps({**base, "input": conversation}).encode()
            started = time.perf_counter()
            first: float | None = None
            call: dict[str, Any] | None = None
            events = 0
            async with client.post(
                url,
                data=body,
                headers={**codex_headers(headers), "content-type": "application/json"},
            ) as resp:
                if resp.status != 200:
                    raise RuntimeError(f"turn {turn}: HTTP {resp.status}: {await resp.text()}")
                # The whole request was read before the reply began (the gateway and the
                # upstream both read the body first); the connection goes back to the pool
                # once the stream ends, so its socket is read now.
                conn = resp.connection
                sock = conn.transport.get_extra_info("socket") if conn and conn.transport else None
                wire = bytes_sent(sock)
                local = sock.getsockname()[1] if sock is not None else 0
                async for line in resp.content:
                    if not line.startswith(b"data:"):
                        continue
                    if first is None:
                        first = time.perf_counter()
                    events += 1
                    event = json.loads(line[5:])
                    if event.get("type") == "response.output_item.done":
                        call = event["item"]
                # Read to the end of the stream: a connection left mid-body is closed, and
                # Codex's next turn would then open a new one.
            if call is None or first is None:
                raise RuntimeError(f"turn {turn}: no function call in the stream")
            record = TurnRecord(
                turn,
                round((first - started) * 1000, 3),
                len(body),
                None if wire is None else wire - sent_before.get(local, 0),
                events=events,
            )
            sent_before[local] = wire or 0
            await asyncio.sleep(think_s)  # "runs the tool"
            windows.cut(record)
            run.turns.append(record)
            conversation = [*conversation, call, tool_output(call["call_id"], turn)]
    return run


async def ws_session(
    port: int,
    turns: int,
    headers: dict[str, str] | None,
    clock: CpuClock,
    think_s: float,
    compress: int = 15,
) -> SessionRun:
    """Codex's session over one WebSocket: a warm-up (turn 0, with the handshake), then per
    turn only the new items after ``previous_response_id``. ``compress``: the deflate window
    bits offered (15, as Codex offers ``permessage-deflate``; 0 offers none). Raises
    RuntimeError on an error event or a socket that closes mid-turn."""
    import aiohttp

    run = SessionRun("ws")
    base = {"type": "response.create", **request_fields()}
    opening = opening_input()
    url = f"ws://127.0.0.1:{port}/v1/responses"
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=120)) as client:
        windows = _Windows(clock)
        started = time.perf_counter()
        async with client.ws_connect(
            url, headers=codex_headers(headers, websocket=True), compress=compress, max_msg_size=0
        ) as ws:
            sock = ws.get_extra_info("socket")
            previous: str | None = None
            new_items: list[dict[str, Any]] = opening[:1]
            sent = 0
            for turn in range(0, turns + 1):
                message = {**base, "input": new_items}
                if turn == 0:
                    message["generate"] = False
                else:
                    message["previous_response_id"] = previous
                data = json.dumps(message)
                if turn:
                    started = time.perf_counter()
                await ws.send_str(data)
                first: float | None = None
                call: dict[str, Any] | None = None
                events = 0
                while True:
                    msg = await ws.receive()
                    if msg.type != aiohttp.WSMsgType.TEXT:
                        raise RuntimeError(f"turn {turn}: socket ended ({msg.type}, {msg.data})")
                    if first is None:
                        first = time.perf_counter()
                    events += 1
                    event = json.loads(msg.data)
                    kind = event.get("type")
                    if kind == "error":
                        raise RuntimeError(f"turn {turn}: error event {msg.data[:300]}")
                    if kind == "response.output_item.done":
                        call = event["item"]
                    if kind == "response.completed":
                        previous = event["response"]["id"]
                        break
                wire = bytes_sent(sock)
                assert first is not None
                record = TurnRecord(
                    turn,
                    round((first - started) * 1000, 3),
                    len(data.encode()),
                    None if wire is None else wire - sent,
                    events=events,
                )
                sent = wire or 0
                await asyncio.sleep(think_s)
                windows.cut(record)
                run.turns.append(record)
                if turn == 0:
                    new_items = opening[1:]
                else:
                    if call is None:
                        raise RuntimeError(f"turn {turn}: no function call")
                    new_items = [tool_output(call["call_id"], turn)]
    return run


# -- the run --------------------------------------------------------------------------------


def median(values: list[float | None]) -> float | None:
    """The median of the values present (rounded to µs / bytes), or ``None``."""
    present = [v for v in values if v is not None]
    return round(statistics.median(present), 3) if present else None


def p50(values: list[float | None]) -> float | None:
    """The 50th percentile: the median of the values present."""
    return median(values)


def summarise(runs: list[SessionRun], turns: int) -> dict[str, Any]:
    """Per-turn medians across rounds, the pick of turns 1/10/N, p50 over every turn of every
    round, the socket's set-up (turn 0) and the session's totals (sums of the medians)."""
    per_turn: dict[int, list[TurnRecord]] = {}
    for run in runs:
        for record in run.turns:
            per_turn.setdefault(record.turn, []).append(record)

    def med(turn: int, name: str) -> float | None:
        return median([getattr(r, name) for r in per_turn.get(turn, [])])

    names = ("cpu_ms", "wire_bytes", "payload_bytes", "first_event_ms")
    table = {name: [med(t, name) for t in range(1, turns + 1)] for name in names}
    picks = sorted({1, min(10, turns), turns})
    turn_records = [r for run in runs for r in run.turns if r.turn >= 1]
    out: dict[str, Any] = {
        "per_turn": table,
        "turns": {str(t): {name: table[name][t - 1] for name in names} for t in picks},
        "p50": {name: p50([getattr(r, name) for r in turn_records]) for name in names},
        "events_per_turn": median([r.events for r in turn_records]),
    }
    if 0 in per_turn:
        out["setup"] = {name: med(0, name) for name in names}
    totals: dict[str, float | None] = {}
    for name in ("cpu_ms", "wire_bytes", "payload_bytes"):
        values = table[name] + ([out["setup"][name]] if "setup" in out else [])
        totals[name] = None if any(v is None for v in values) else round(sum(values), 3)  # type: ignore[arg-type]
    out["session_total"] = totals
    return out


def goals(results: dict[str, dict[str, Any]], turns: int) -> dict[str, Any]:
    """Issue 23's two goals from the same run: the gateway's CPU for a WebSocket turn over an
    HTTP turn at the last turn (goal <= 0.5), and the gateway's WebSocket first-event p50 minus
    the direct WebSocket's (goal <= 1 ms); with the same figures for HTTP and the whole
    session alongside."""

    def get(target: str, *path: str) -> float | None:
        value: Any = results.get(target)
        for key in path:
            value = value.get(key) if isinstance(value, dict) else None
        return value if isinstance(value, (int, float)) else None

    def ratio(a: float | None, b: float | None) -> float | None:
        return None if a is None or not b else round(a / b, 3)

    def minus(a: float | None, b: float | None) -> float | None:
        return None if a is None or b is None else round(a - b, 3)

    last = str(turns)
    cpu_ratio = ratio(
        get("gateway-ws", "turns", last, "cpu_ms"), get("gateway-http", "turns", last, "cpu_ms")
    )
    added_ws = minus(
        get("gateway-ws", "p50", "first_event_ms"), get("direct-ws", "p50", "first_event_ms")
    )
    return {
        "ws_cpu_vs_http_cpu_last_turn": cpu_ratio,
        "ws_cpu_vs_http_cpu_last_turn_goal": 0.5,
        "ws_cpu_vs_http_cpu_last_turn_met": None if cpu_ratio is None else cpu_ratio <= 0.5,
        "ws_cpu_vs_http_cpu_p50": ratio(
            get("gateway-ws", "p50", "cpu_ms"), get("gateway-http", "p50", "cpu_ms")
        ),
        "ws_cpu_vs_http_cpu_session": ratio(
            get("gateway-ws", "session_total", "cpu_ms"),
            get("gateway-http", "session_total", "cpu_ms"),
        ),
        "ws_bytes_vs_http_bytes_session": ratio(
            get("gateway-ws", "session_total", "wire_bytes"),
            get("gateway-http", "session_total", "wire_bytes"),
        ),
        "ws_first_event_p50_added_ms": added_ws,
        "ws_first_event_p50_added_goal_ms": 1.0,
        "ws_first_event_p50_added_met": None if added_ws is None else added_ws <= 1.0,
        "http_first_event_p50_added_ms": minus(
            get("gateway-http", "p50", "first_event_ms"),
            get("direct-http", "p50", "first_event_ms"),
        ),
        # What the gateway's addons add to mitmproxy's own relaying, per turn (p50, ms).
        "gateway_over_mitmdump_cpu_ws_ms": minus(
            get("gateway-ws", "p50", "cpu_ms"), get("mitmdump-ws", "p50", "cpu_ms")
        ),
        "gateway_over_mitmdump_cpu_http_ms": minus(
            get("gateway-http", "p50", "cpu_ms"), get("mitmdump-http", "p50", "cpu_ms")
        ),
        "mitmdump_ws_cpu_vs_http_cpu_last_turn": ratio(
            get("mitmdump-ws", "turns", last, "cpu_ms"),
            get("mitmdump-http", "turns", last, "cpu_ms"),
        ),
    }


def usage_rows(database: str) -> dict[str, int]:
    """Usage-ledger rows per route (``/v1/responses``, ``ws:/v1/responses``)."""
    import sqlalchemy as sa

    engine = sa.create_engine(database)
    try:
        with engine.connect() as conn:
            rows = conn.execute(sa.text("SELECT route, count(*) FROM usage GROUP BY route"))
            return {str(route): int(n) for route, n in rows}
    finally:
        engine.dispose()


def idle_cpu_ms_per_s(clock: CpuClock, seconds: float = 2.0) -> float | None:
    """The gateway's own CPU while no client talks to it (ms per s): timers, the member
    directory's refresh, measured after half a second of quiet. Part of every turn's window."""
    time.sleep(0.5)
    before = clock.ms()
    time.sleep(seconds)
    after = clock.ms()
    return None if before is None or after is None else round((after - before) / seconds, 3)


def run_sessions(
    turns: int, repeat: int, think_s: float, out: Path, tmp: Path, gap_ms: int = GAP_MS
) -> dict[str, Any]:
    """The whole session benchmark: start the upstream, bare mitmdump and the gateway, run
    ``repeat`` interleaved rounds of the targets, write ``sessions.json`` / ``sessions.md``
    into ``out``; returns the JSON document. Raises RuntimeError when a target fails."""
    from addons.web import free_port
    from bench.targets import Target, start_gateway, start_target, wait_listening

    up_port = free_port()
    upstream = subprocess.Popen(
        [sys.executable, "-m", "bench.session_upstream", str(up_port), str(gap_ms)],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
        cwd=Path(__file__).resolve().parent.parent,
    )
    started: list[Target] = []
    try:
        wait_listening(up_port, upstream)
        bare = start_target("mitmdump", up_port, tmp)
        started.append(bare)
        gateway = start_gateway(
            f"http://127.0.0.1:{up_port}/v1/responses",
            tmp,
            ["--set", "flow_detail=0", "--set", "termlog_verbosity=warn"],
            ["--websockets"],
        )
        started.append(gateway)
        assert gateway.proc is not None and bare.proc is not None
        member = {"authorization": gateway.extra["headers"]["Authorization"]}
        where = {
            "direct": (up_port, None, None),
            "mitmdump": (bare.port, None, bare.proc.pid),
            "gateway": (gateway.port, member, gateway.proc.pid),
        }
        runs: dict[str, list[SessionRun]] = {t: [] for t in TARGETS}
        for rnd in range(repeat):
            order = TARGETS[rnd % len(TARGETS) :] + TARGETS[: rnd % len(TARGETS)]
            for target in order:
                print(f"  session of {turns} turns, round {rnd + 1}: {target}", flush=True)
                port, headers, pid = where[target.rsplit("-", 1)[0]]
                play = ws_session if target.endswith("-ws") else http_session
                run = asyncio.run(play(port, turns, headers, CpuClock(pid), think_s))
                run.target = target
                runs[target].append(run)
        idle = idle_cpu_ms_per_s(CpuClock(gateway.proc.pid))
        rows = usage_rows(gateway.extra["database"])
    finally:
        for process in started:
            process.stop()
        if upstream.poll() is None:
            upstream.terminate()
            upstream.wait(10)
    results = {t: summarise(runs[t], turns) for t in TARGETS}
    results["gateway-http"]["usage_rows"] = rows.get("/v1/responses", 0)
    results["gateway-ws"]["usage_rows"] = rows.get("ws:/v1/responses", 0)
    meta = {
        "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
        "cpus": os.cpu_count(),
        "turns": turns,
        "repeat": repeat,
        "think_ms": round(think_s * 1000, 1),
        "gap_ms": gap_ms,
        "output_bytes": OUTPUT_BYTES,
        "gateway_idle_cpu_ms_per_s": idle,
    }
    doc = {
        "meta": meta,
        "results": results,
        "goals": goals(results, turns),
        "rounds": {t: [[asdict(r) for r in run.turns] for run in runs[t]] for t in TARGETS},
    }
    out.mkdir(parents=True, exist_ok=True)
    (out / "sessions.json").write_text(json.dumps(doc, indent=2) + "\n")
    (out / "sessions.md").write_text(markdown(doc))
    return doc


def _fmt(v: Any) -> str:
    if v is None:
        return "n/a"
    if isinstance(v, float):
        return f"{v:.2f}" if abs(v) < 100 else f"{v:.0f}"
    return str(v)


def _kb(v: Any) -> str:
    return "n/a" if v is None else f"{v / 1024:.1f}"


def _rows(picks: list[str]) -> list[tuple[str, Any]]:
    """The table's rows: a label and a function of one target's results."""
    rows: list[tuple[str, Any]] = []
    for name, label, conv in (
        ("payload_bytes", "request / message JSON, KB", _kb),
        ("wire_bytes", "bytes read from the client (TCP), KB", _kb),
        ("cpu_ms", "CPU of the proxy process, ms", _fmt),
        ("first_event_ms", "first event, ms", _fmt),
    ):
        for p in picks:
            rows.append((f"{label}, turn {p}", lambda r, p=p, n=name, c=conv: c(r["turns"][p][n])))
        rows.append((f"{label}, p50 of all turns", lambda r, n=name, c=conv: c(r["p50"][n])))

    def setup(name: str, conv: Any) -> Any:
        return lambda r: conv(r["setup"][name]) if "setup" in r else "-"

    rows += [
        ("socket set-up (handshake + warm-up): CPU ms", setup("cpu_ms", _fmt)),
        ("socket set-up: bytes read, KB", setup("wire_bytes", _kb)),
        ("session total: CPU ms", lambda r: _fmt(r["session_total"]["cpu_ms"])),
        ("session total: bytes read, KB", lambda r: _kb(r["session_total"]["wire_bytes"])),
        ("usage rows written (all rounds)", lambda r: str(r.get("usage_rows", "-"))),
    ]
    return rows


def markdown(doc: dict[str, Any]) -> str:
    """The session results as a markdown table (one column per target) and the goals."""
    meta, results, g = doc["meta"], doc["results"], doc["goals"]
    n = str(meta["turns"])
    picks = list(dict.fromkeys(p for p in ("1", "10", n) if p in results["gateway-http"]["turns"]))
    names = list(results)
    lines = [f"| | {' | '.join(names)} |", "|---|" + "---|" * len(names)]
    for label, get in _rows(picks):
        lines.append(f"| {label} | " + " | ".join(get(results[t]) for t in names) + " |")

    def verdict(met: bool | None) -> str:
        return "n/a" if met is None else "met" if met else "missed"

    lines += [
        "",
        f"- Gateway CPU, WebSocket turn / HTTP turn at turn {n}: "
        f"**{_fmt(g['ws_cpu_vs_http_cpu_last_turn'])}** "
        f"(goal <= 0.5: {verdict(g['ws_cpu_vs_http_cpu_last_turn_met'])}); p50 of all turns "
        f"{_fmt(g['ws_cpu_vs_http_cpu_p50'])}; whole session, set-up included, "
        f"{_fmt(g['ws_cpu_vs_http_cpu_session'])}.",
        f"- First event p50, gateway WebSocket minus direct WebSocket: "
        f"**{_fmt(g['ws_first_event_p50_added_ms'])} ms** "
        f"(goal <= 1 ms: {verdict(g['ws_first_event_p50_added_met'])}); over HTTP the gateway "
        f"adds {_fmt(g['http_first_event_p50_added_ms'])} ms.",
        f"- Bytes the gateway read, WebSocket session / HTTP session: "
        f"{_fmt(g['ws_bytes_vs_http_bytes_session'])}.",
        f"- Bare mitmdump (mitmproxy's own relaying, no addons), WebSocket turn / HTTP turn at "
        f"turn {n}: {_fmt(g['mitmdump_ws_cpu_vs_http_cpu_last_turn'])}; the gateway's addons "
        f"add {_fmt(g['gateway_over_mitmdump_cpu_ws_ms'])} ms per WebSocket turn and "
        f"{_fmt(g['gateway_over_mitmdump_cpu_http_ms'])} ms per HTTP turn (p50).",
        "",
        f"{meta['date']}, {meta['cpus']} cores, {meta['turns']} turns per session, medians of "
        f"{meta['repeat']} interleaved rounds, events {meta['gap_ms']} ms apart, "
        f"{meta['think_ms']} ms between turns (the tool run), {meta['output_bytes']} B of tool "
        f"output per turn; gateway idle CPU {_fmt(meta['gateway_idle_cpu_ms_per_s'])} ms/s; "
        "`./run.sh bench --sessions`.",
    ]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    """``python -m bench.sessions`` (``./run.sh bench --sessions`` calls :func:`run_sessions`)."""
    import tempfile

    from bench.targets import RESULTS

    parser = argparse.ArgumentParser(prog="bench.sessions", description=__doc__)
    parser.add_argument("--turns", type=int, default=30)
    parser.add_argument("--repeat", type=int, default=5)
    parser.add_argument("--think-ms", type=int, default=int(THINK_S * 1000))
    parser.add_argument("--out", type=Path, default=RESULTS)
    ns = parser.parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="codex-proxy-sessions-") as tmp:
        doc = run_sessions(ns.turns, ns.repeat, ns.think_ms / 1000, ns.out, Path(tmp))
    print()
    print(markdown(doc))
    return 0


if __name__ == "__main__":
    sys.exit(main())
