"""``--record DIR``: a usage ledger while running, and a session summary at exit.

The recording directory gets (the launcher sets the other parts up): ``dumps/`` (the dump pairs),
``flows.mitm`` (mitmproxy flow file), ``session.har``, and from this addon ``usage.jsonl`` (one
line per request as it finishes), ``summary.json`` (with its :data:`SUMMARY_FORMAT_VERSION`),
``summary.txt`` and ``report.html`` (at exit). ``./run.sh compare`` (``addons/compare.py``)
reads them back.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import json
import logging
import os
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from decimal import Decimal
from typing import Any

from mitmproxy import ctx, exceptions, http

from addons.body_decode import loads_json, parse_codings
from addons.common import ALLOWED, CHUNK_TIMING, DUMP_SEQ, REFUSED
from addons.credits import RateCard, load_rate_card
from addons.dumps import write_file_atomically
from addons.exchange import ExchangeFacts, Reply, read_exchange, read_request
from addons.recording_files import LIMITS, ReadLimits, TooLarge, ledger_lines
from addons.report import is_refusal, render_report, reply_reasons
from addons.responses_turn import USAGE_KINDS
from addons.socket_turns import SocketTurn

logger = logging.getLogger(__name__)

#: Compressed bodies larger than this (bytes, as received) are decoded off the event loop.
HEAVY_BYTES = 64 * 1024


@dataclass
class RequestRecord:
    """One line of ``usage.jsonl`` / one entry of ``summary.json``."""

    seq: int | None
    started: float  # unix seconds
    duration_ms: int
    status: int | None
    model: str | None
    events: int
    usage: dict[str, int] | None
    completed: bool
    error: str | None = None
    #: ``[[ms since response headers, decoded body bytes so far], ...]``, for replay pacing.
    chunk_timing: list[list[int]] = field(default_factory=list)
    #: The reply's ``Content-Encoding`` as the upstream sent it (``None``: not encoded).
    content_encoding: str | None = None
    #: Why the reply body could not be decoded completely (e.g. a truncated zstd stream).
    decode_error: str | None = None
    #: The stream's terminal event (a JSON reply: its ``status``): ``completed``,
    #: ``incomplete``, ``failed``; ``None``: none (``addons.exchange``'s rules).
    turn_status: str | None = None
    #: ms from the response headers to the first SSE event (time to first event).
    first_event_ms: int | None = None
    #: Arrival of each SSE event, ms since the response headers (the report's chart).
    event_ms: list[int] = field(default_factory=list)
    #: The request's ``service_tier`` (``priority`` is Codex's fast mode, charged 2x).
    service_tier: str | None = None
    #: Codex credits this request cost (a decimal string), priced when it finished.
    credits: str | None = None
    #: The rate-card entry that priced it; ``None`` with ``credits``: unpriced.
    rate: str | None = None
    #: ``"websocket"`` for a turn on a socket (``addons/socket_turns.py``; its times count
    #: from its ``response.create`` message); ``None``: an HTTP exchange.
    transport: str | None = None


def is_failure(record: RequestRecord) -> bool:
    """Whether a request failed. A stream that delivered ``response.completed`` succeeded even
    if the connection then broke: Codex closes it right after that event (CODEX.md)."""
    if record.status is None or record.status >= 400:
        return True
    return record.error is not None and not record.completed


def summarize(records: list[RequestRecord], keep_event_ms: bool = False) -> dict[str, Any]:
    """``{"requests": [...], "totals": {...}}`` with token totals over all requests; each
    request says whether it ``failed``. ``keep_event_ms`` keeps each request's event arrival
    times (for the report; ``summary.json`` leaves them to ``usage.jsonl``)."""
    totals: dict[str, Any] = {"requests": len(records), "failed": 0, "events": 0}
    totals.update({k: 0 for k in USAGE_KINDS})
    credits = sum((Decimal(r.credits) for r in records if r.credits is not None), Decimal(0))
    totals["credits"] = str(credits) if any(r.credits is not None for r in records) else None
    totals["unpriced"] = sum(1 for r in records if r.credits is None and r.usage is not None)
    for r in records:
        totals["events"] += r.events
        if is_failure(r):
            totals["failed"] += 1
        for k in USAGE_KINDS:
            totals[k] += (r.usage or {}).get(k, 0)
    reqs = []
    for r in records:
        d = asdict(r)
        d.pop("chunk_timing")
        if not keep_event_ms:
            d.pop("event_ms")
        d["failed"] = is_failure(r)
        reqs.append(d)
    return {"requests": reqs, "totals": totals}


def human_summary(summary: dict[str, Any]) -> str:
    """A short table for people and CI logs."""
    lines = ["codex-responses-api-proxy session summary", ""]
    lines.append(
        f"{'seq':>4} {'status':>6} {'ms':>7} {'events':>6}  model / tokens in,cached,"
        "cache_write,out,reasoning,total"
    )
    for r in summary["requests"]:
        u = r["usage"] or {}
        tokens = ",".join(str(u.get(k, "-")) for k in USAGE_KINDS)
        status = r["status"] if r["status"] is not None else "-"
        note = ""
        if r["error"]:
            note = (
                f"  ({r['error']} after completion)" if r["completed"] else f"  ERROR {r['error']}"
            )
        lines.append(
            f"{r['seq'] or '-':>4} {status:>6} {r['duration_ms']:>7} {r['events']:>6}  "
            f"{r['model'] or '-'} / {tokens}{note}"
        )
    t = summary["totals"]
    lines.append("")
    lines.append(
        f"{t['requests']} request(s), {t['failed']} failed, {t['events']} events; tokens: "
        + ", ".join(f"{k} {t[k]}" for k in USAGE_KINDS)
    )
    if t.get("credits") is not None:
        unpriced = f" ({t['unpriced']} request(s) unpriced)" if t.get("unpriced") else ""
        usd = f", USD {t['usd']}" if t.get("usd") is not None else ""
        lines.append(f"Codex credits: {t['credits']}{usd}{unpriced}")
    return "\n".join(lines) + "\n"


def refusal_of(flow: http.HTTPFlow) -> dict[str, Any]:
    """A refused request for the report: time, method, path (the query string left out: it
    could carry a credential), status, reason (the refusing addon's marker)."""
    path = flow.request.path.split("?", 1)[0]
    if "?" in flow.request.path:
        path += "?…"
    return {
        "time": flow.request.timestamp_start,
        "method": flow.request.method,
        "path": path,
        "status": flow.response.status_code if flow.response is not None else None,
        "reason": flow.metadata.get(REFUSED),
    }


def dump_links(record_dir: str, dump_dir: str) -> dict[int, tuple[str, str]]:
    """``{sequence number: (request file, response file)}`` of the complete dump pairs in
    ``dump_dir``, as paths relative to ``record_dir`` (where the report lies)."""
    if not dump_dir or not os.path.isdir(dump_dir):
        return {}
    rel = os.path.relpath(dump_dir, record_dir)
    names = set(os.listdir(dump_dir))
    links = {}
    for name in sorted(names):
        if name.endswith("-request.json") and name[:6].isdigit():
            response = name.removesuffix("-request.json") + "-response.json"
            if response in names:
                links[int(name[:6])] = (f"{rel}/{name}", f"{rel}/{response}")
    return links


def add_usd(summary: dict[str, Any], rate_card: RateCard | None) -> None:
    """With a rate card, totals always carry credits (``"0"`` when nothing was priced) and
    USD; without one, ``credits`` stays ``None``: no pricing."""
    totals = summary["totals"]
    if rate_card is not None:
        totals["credits"] = totals.get("credits") or "0"
        totals["usd"] = str(rate_card.usd(Decimal(totals["credits"])))


#: The layout of ``summary.json`` (its ``format_version``). A recording written before the field
#: existed has the same layout and reads as version 1; a reader refuses a newer version than it
#: knows (``./run.sh compare`` exits 2). Bump it when a field changes meaning or goes away.
SUMMARY_FORMAT_VERSION = 1


def write_summary(
    directory: str,
    records: list[RequestRecord],
    refused: list[dict[str, Any]],
    rate_card: RateCard | None,
    dump_dir: str,
) -> None:
    """Write ``summary.json``, ``summary.txt`` and ``report.html`` of a session into
    ``directory`` and log the summary. Raises ``OSError`` when a file cannot be written."""
    summary = {"format_version": SUMMARY_FORMAT_VERSION, **summarize(records)}
    summary["refused"] = refused
    add_usd(summary, rate_card)
    write_file_atomically(
        directory,
        "summary.json",
        (json.dumps(summary, indent=2, ensure_ascii=False) + "\n").encode(),
    )
    text = human_summary(summary)
    write_file_atomically(directory, "summary.txt", text.encode())
    logger.warning("%s", text.rstrip())
    full = summarize(records, keep_event_ms=True)
    add_usd(full, rate_card)
    links = dump_links(directory, dump_dir)
    # The error message of each request the upstream refused (a replay's 409 says what differed).
    errors = reply_reasons(directory, links, (r.seq for r in records if is_refusal(r.status)))
    page = render_report(full, refused, links, reasons=errors)
    write_file_atomically(directory, "report.html", page.encode())


#: The type each ledger field must have when read back (``None`` allowed where the recorder
#: writes it); a line with another type is no ledger line.
_FIELD_TYPES: dict[str, tuple[type, ...]] = {
    "seq": (int, type(None)),
    "started": (int, float),
    "duration_ms": (int,),
    "status": (int, type(None)),
    "model": (str, type(None)),
    "events": (int,),
    "usage": (dict, type(None)),
    "completed": (bool,),
    "error": (str, type(None)),
    "chunk_timing": (list,),
    "content_encoding": (str, type(None)),
    "decode_error": (str, type(None)),
    "turn_status": (str, type(None)),
    "first_event_ms": (int, type(None)),
    "event_ms": (list,),
    "service_tier": (str, type(None)),
    "credits": (str, type(None)),
    "rate": (str, type(None)),
    "transport": (str, type(None)),
}
#: Token kinds a ledger line's ``usage`` may hold (the six of ``USAGE_KINDS`` and any a newer
#: upstream adds; a hostile line with thousands is refused).
MAX_USAGE_KINDS = 32


def _ledger_record(data: Any, keep_timing: bool) -> RequestRecord:
    """The :class:`RequestRecord` of one parsed ledger line. Raises ``TypeError`` (naming the
    field) when it is no ledger line."""
    if not isinstance(data, dict):
        raise TypeError(type(data).__name__)
    values = {k: v for k, v in data.items() if k in _FIELD_TYPES}
    for name, value in values.items():
        if isinstance(value, bool) and bool not in _FIELD_TYPES[name]:
            raise TypeError(f"{name}: {value!r}")
        if not isinstance(value, _FIELD_TYPES[name]):
            raise TypeError(f"{name}: a {type(value).__name__}")
    usage = values.get("usage")
    if usage is not None and (
        len(usage) > MAX_USAGE_KINDS
        or not all(isinstance(v, int) and not isinstance(v, bool) for v in usage.values())
    ):
        raise TypeError(f"usage: not up to {MAX_USAGE_KINDS} token counts")
    if not all(isinstance(v, int) for v in values.get("event_ms", [])):
        raise TypeError("event_ms: not a list of ms")
    if not keep_timing:
        values["chunk_timing"] = []
    elif not all(
        isinstance(p, list) and len(p) == 2 and all(isinstance(x, int) for x in p)
        for p in values.get("chunk_timing", [])
    ):
        raise TypeError("chunk_timing: not a list of [ms, bytes] pairs")
    return RequestRecord(**values)


def read_ledger(
    directory: str, limits: ReadLimits = LIMITS, keep_timing: bool = True
) -> list[RequestRecord]:
    """Every ``usage.jsonl`` line of a recording as a :class:`RequestRecord`, oldest first (by
    ``started``); ``[]`` when there is no ledger. Fields a newer writer added are ignored; a
    usage dict keeps every token kind it holds. The file is streamed line by line within
    ``limits`` (:mod:`addons.recording_files`; the recorder's own merge reads with
    ``UNBOUNDED``); ``keep_timing=False`` drops each line's ``chunk_timing`` as it is read
    (only replay paces by it).

    Raises:
        OSError: the file cannot be read.
        ValueError: a line is not a ledger line (e.g. a ledger cut mid-line), naming the line;
            :class:`addons.recording_files.TooLarge`: over a read limit.
    """
    path = os.path.join(directory, "usage.jsonl")
    records = []
    events = 0
    if os.path.lexists(path):
        for number, line in ledger_lines(path, limits):
            try:
                data = loads_json(line)
            except ValueError as e:
                raise ValueError(f"usage.jsonl line {number}: not JSON ({e})") from None
            try:
                record = _ledger_record(data, keep_timing)
            except TypeError as e:
                raise ValueError(f"usage.jsonl line {number}: not a ledger line: {e}") from None
            events += len(record.event_ms)
            if limits.events is not None and len(record.event_ms) > limits.events:
                raise TooLarge(
                    f"{path}: line {number} has more than {limits.events} events (the read limit)"
                )
            if limits.run_events is not None and events > limits.run_events:
                raise TooLarge(
                    f"{path}: more than {limits.run_events} events in all (the read limit), "
                    f"at line {number}"
                )
            records.append(record)
    records.sort(key=lambda r: r.started)
    return records


def make_private(path: str) -> None:
    """Create ``path`` empty if it does not exist, and make it mode 0600 (a recording's files
    hold the session's prompts and replies). Raises ``OSError``."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_CLOEXEC, 0o600)
    try:
        os.fchmod(fd, 0o600)
    finally:
        os.close(fd)


def append_line(path: str, line: str) -> None:
    """Append one line with a single ``write(2)`` on an ``O_APPEND`` descriptor, so lines
    from several worker processes never interleave. Raises ``OSError``."""
    fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600)
    try:
        data = line.encode()
        written = os.write(fd, data)
        while written < len(data):  # regular files take it all at once; be safe anyway
            written += os.write(fd, data[written:])
    finally:
        os.close(fd)


#: In a worker's recording (``codex_record_part``), refusals go here as they happen; the
#: supervisor merges them into the one summary.
REFUSED_PART = ".refused.jsonl"


class Recorder:
    """Writes the usage ledger and the session summary of a ``--record`` session.

    For each allowlisted flow, when it finishes (``response``/``error``): status, duration and
    what :func:`addons.exchange.read_exchange` reads (model, service tier, the number of SSE
    events, token usage, the turn's status) and the arrival times of its chunks
    (used by ``./run.sh replay --pace original``). A line goes to ``usage.jsonl`` at once; at
    exit ``summary.json`` and ``summary.txt`` are written and the summary is logged.
    """

    def __init__(self) -> None:
        self.directory = ""
        #: Prices each request in Codex credits (``codex_rate_card``); ``None``: no pricing.
        self.rate_card: RateCard | None = None
        self.records: list[RequestRecord] = []
        #: Requests answered locally (allowlist 403, WebSocket 426, errors), for the report.
        self.refused: list[dict[str, Any]] = []
        self._executor: concurrent.futures.ThreadPoolExecutor | None = None

    def load(self, loader) -> None:
        loader.add_option(
            "codex_record_dir",
            str,
            "",
            "Write usage.jsonl while running and summary.json/summary.txt at exit here.",
        )
        loader.add_option(
            "codex_record_part",
            str,
            "",
            "Set by --workers: this worker writes usage.jsonl lines and refusals only; the "
            "supervisor writes the one summary and report at exit.",
        )
        loader.add_option(
            "codex_rate_card",
            str,
            "",
            "A Codex rate card (YAML, config/codex-rate-card.yaml) to price each recorded "
            "request in credits and USD; empty: no pricing.",
        )

    def configure(self, updated: set[str]) -> None:
        if "codex_rate_card" in updated:
            path = ctx.options.codex_rate_card
            try:
                self.rate_card = load_rate_card(path) if path else None
            except ValueError as e:
                raise exceptions.OptionsError(f"codex_rate_card: {e}") from None
        if "codex_record_dir" in updated:
            path = ctx.options.codex_record_dir
            if path:
                try:
                    os.makedirs(path, mode=0o700, exist_ok=True)
                except OSError as e:
                    raise exceptions.OptionsError(f"codex_record_dir: {e}") from None
                if not os.access(path, os.W_OK):
                    raise exceptions.OptionsError(f"codex_record_dir: {path!r} not writable")
            self.directory = os.path.abspath(path) if path else ""
        if self.directory and updated & {"codex_record_dir", "save_stream_file", "hardump"}:
            # mitmproxy's flow file and HAR are opened with the umask's mode (0644): made
            # 0600 here, before any flow is written (the HAR is written at exit, into this
            # file), like every other file of a recording.
            for name in ("save_stream_file", "hardump"):
                target = getattr(ctx.options, name, "")
                if target and target != "-":
                    try:
                        make_private(target.removeprefix("+"))
                    except OSError as e:
                        raise exceptions.OptionsError(f"{name}: {e}") from None

    def response(self, flow: http.HTTPFlow) -> Any:
        response = flow.response
        if self.directory and flow.metadata.get(REFUSED) and response is not None:
            if response.status_code >= 400:  # not the 200 of GET /shutdown, also local
                refusal = refusal_of(flow)
                self.refused.append(refusal)
                if ctx.options.codex_record_part:
                    try:
                        append_line(
                            os.path.join(self.directory, REFUSED_PART), json.dumps(refusal) + "\n"
                        )
                    except OSError as e:
                        logger.error("record: cannot append a refusal: %s", e)
        return self._finish(flow, None)

    def error(self, flow: http.HTTPFlow) -> Any:
        return self._finish(flow, flow.error.msg if flow.error else "error")

    def _finish(self, flow: http.HTTPFlow, error: str | None) -> Any:
        """Record the flow; a flow carrying a large compressed body (decoding it to the limit
        takes up to ~100 ms for 32 MiB) is recorded on this addon's one thread, so the event
        loop never decodes it (mitmproxy awaits the returned coroutine)."""
        if self._heavy(flow):
            return self._record_off_loop(flow, error)
        self._record(flow, error)
        return None

    @staticmethod
    def _heavy(flow: http.HTTPFlow) -> bool:
        return any(
            message is not None
            and parse_codings(message.headers.get("content-encoding"))
            and len(message.raw_content or b"") > HEAVY_BYTES
            for message in (flow.request, flow.response)
        )

    async def _record_off_loop(self, flow: http.HTTPFlow, error: str | None) -> None:
        if not self.directory or flow.metadata.get(ALLOWED) is not True:
            return
        if self._executor is None:
            self._executor = concurrent.futures.ThreadPoolExecutor(
                1, thread_name_prefix="record-decode"
            )
        await asyncio.get_running_loop().run_in_executor(self._executor, self._record, flow, error)

    def done(self) -> None:
        if self._executor is not None:
            self._executor.shutdown(wait=True)
            self._executor = None
        if not self.directory or ctx.options.codex_record_part:
            return
        try:
            write_summary(
                self.directory,
                self.records,
                self.refused,
                self.rate_card,
                getattr(ctx.options, "codex_dump_dir", ""),
            )
        except OSError as e:
            logger.error("record: cannot write the summary or report: %s", e)

    def socket_turn_end(self, flow: http.HTTPFlow, turn: SocketTurn) -> None:
        """A turn on a recorded WebSocket (``addons/socket_turns.py``) is a ledger line of its
        own, read like an HTTP exchange (``transport: "websocket"``)."""
        if not self.directory or flow.metadata.get(ALLOWED) is not True:
            return
        self._keep(lambda: socket_record(turn))

    def _record(self, flow: http.HTTPFlow, error: str | None) -> None:
        if not self.directory or flow.metadata.get(ALLOWED) is not True:
            return
        self._keep(lambda: self._make_record(flow, error))

    def _keep(self, make: Callable[[], RequestRecord]) -> None:
        """Price the record ``make`` returns and append it to the ledger."""
        try:
            record = make()
            if self.rate_card is not None:
                # Priced now, with the card of the day: a later rate change rewrites nothing.
                charge = self.rate_card.charge(record.model, record.usage, record.service_tier)
                if charge is not None:
                    record.credits, record.rate = str(charge.credits), charge.rate
        except Exception:
            logger.exception("record: cannot summarise a flow")
            return
        self.records.append(record)
        try:
            append_line(
                os.path.join(self.directory, "usage.jsonl"),
                json.dumps(asdict(record), ensure_ascii=False) + "\n",
            )
        except OSError as e:
            logger.error("record: cannot append to usage.jsonl: %s", e)

    @staticmethod
    def _make_record(flow: http.HTTPFlow, error: str | None) -> RequestRecord:
        facts = read_exchange(
            read_request(
                flow.request.raw_content or b"", flow.request.headers.get("content-encoding")
            ),
            Reply.of(flow.response, flow.metadata.get(CHUNK_TIMING, [])),
        )
        started = flow.request.timestamp_start
        end = (flow.response.timestamp_end if flow.response else None) or time.time()
        return record_of(facts, flow.metadata.get(DUMP_SEQ), started, end, error)


def socket_record(turn: SocketTurn) -> RequestRecord:
    """The ledger line of an ended turn on a WebSocket: its facts by the one reader, its
    events' timing as chunk timing of its SSE dump body (replay's pacing)."""
    ended = turn.ended if turn.ended is not None else time.time()
    record = record_of(turn.facts(), turn.seq, turn.started, ended, turn.error)
    record.chunk_timing = turn.chunk_timing()
    record.transport = "websocket"
    return record


def record_of(
    facts: ExchangeFacts, seq: int | None, started: float, ended: float, error: str | None
) -> RequestRecord:
    """The ledger line of an exchange read by :func:`addons.exchange.read_exchange`; times in
    Unix seconds (``started``: the request, ``ended``: the reply's end)."""
    return RequestRecord(
        seq=seq,
        started=started,
        duration_ms=int(max(0.0, ended - started) * 1000),
        status=facts.status,
        model=facts.model,
        events=facts.events,
        usage=facts.usage,
        completed=facts.completed,
        error=error,
        chunk_timing=facts.decoded_timing,
        content_encoding=facts.content_encoding,
        decode_error=facts.decode_error,
        turn_status=facts.turn_status,
        first_event_ms=facts.first_event_ms,
        event_ms=facts.event_ms,
        service_tier=facts.service_tier,
    )
