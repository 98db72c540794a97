"""``--dump-dir``: reference-compatible, redacted request/response dump files."""

from __future__ import annotations

import asyncio
import base64
import concurrent.futures
import itertools
import json
import logging
import multiprocessing
import os
import queue
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import orjson
from mitmproxy import ctx, exceptions, http

from addons import body_decode
from addons.body_decode import DecodeLimits, JsonTooDeep, decode_body, loads_json
from addons.common import (
    ALLOWED,
    BRIDGE_CLIENT_BODY,
    BRIDGE_CLIENT_REPLY,
    DUMP_SEQ,
    REFUSED,
    json_response,
)
from addons.redaction import DEFAULT_EXTRA, extra_names, redact_fields
from addons.socket_turns import SocketTurn, sse_text

logger = logging.getLogger(__name__)


def next_seq(directory: str, start: int, step: int) -> int:
    """The first free sequence number of the class ``start`` mod ``step`` in a dump directory:
    after the highest ``NNNNNN-`` file of that class (a replaced worker's), else ``start``."""
    highest = 0
    try:
        names = os.listdir(directory)
    except OSError:
        return start
    for name in names:
        head = name.split("-", 1)[0]
        if len(head) >= 6 and head.isdigit():
            seq = int(head)
            if seq % step == start % step:
                highest = max(highest, seq)
    return highest + step if highest >= start else start


class _NonFinite(float):
    """NaN/Infinity read from a body. orjson refuses float subclasses (and would write plain
    NaN/inf as null), so a document holding one is rendered by the json module instead."""

    def __new__(cls, literal: str) -> _NonFinite:
        return super().__new__(cls, float(literal))


def _parse_body(data: bytes) -> tuple[Any, str | None]:
    """``(body, note)``: parsed JSON when the whole body parses, else the text; ``note`` says
    why a JSON-looking body was kept as text (nested too deep)."""
    text = data.decode("utf-8", "replace")
    if text.strip():
        try:
            # exact: the json module keeps integers beyond 64 bits (orjson makes them floats).
            return loads_json(text, exact=True, parse_constant=_NonFinite), None
        except JsonTooDeep as e:
            return text, f"{e}; kept as text"
        except ValueError:
            pass
    return text, None


def render_body_fields(
    raw: bytes, content_encoding: str | None, limits: DecodeLimits | None = None
) -> dict[str, Any]:
    """The body fields of a dump document: ``{"body": ...}``, plus marks for an encoded body.

    The body is decoded from gzip/br/zstd/deflate when it says so (for the dump only; the wire
    keeps the bytes), by the shared :mod:`addons.body_decode` within ``limits`` (``None``: the
    process's), then parsed JSON when the whole body parses (at most
    :data:`addons.body_decode.MAX_JSON_DEPTH` deep), else a UTF-8 string (invalid bytes
    replaced); an SSE stream is one string (the reference proxy's rule, plus decoding). An
    encoded body adds ``"body_decoded_from"`` (the codings as applied, e.g. ``"zstd"``). When it
    cannot be decoded completely (a truncated stream, invalid data, an unknown coding),
    ``"body"`` holds what could be decoded (the raw bytes as text when nothing could, as
    mitmproxy's ``get_content(strict=False)`` does), ``"body_decode_error"`` says why and
    ``"body_raw_base64"`` keeps the raw bytes. Past the decode limit (a decompression bomb)
    ``"body"`` is ``null``: the body is kept only as received, base64, with
    ``"body_content_encoding"`` naming its coding and ``"body_decode_error"`` the limit. A JSON
    body nested too deep is kept as text with ``"body_note"`` saying so.
    """
    decoded = decode_body(raw, content_encoding, limits)
    fields: dict[str, Any]
    if decoded.over_limit:
        fields = {"body": None, "body_content_encoding": content_encoding}
    else:
        shown = decoded.data if decoded.data or decoded.error is None else raw
        body, note = _parse_body(shown)
        fields = {"body": body}
        if note:
            fields["body_note"] = note
    if decoded.codings:
        fields["body_decoded_from"] = ", ".join(decoded.codings)
    if decoded.error is not None:
        fields["body_decode_error"] = decoded.error
        fields["body_raw_base64"] = base64.b64encode(raw).decode("ascii")
    return fields


def render_document(doc: dict[str, Any]) -> bytes:
    """The reference proxy's file format: JSON, 2-space indent, non-ASCII kept, final newline.

    Rendered by orjson (50x faster than the json module's indented encoder, byte-identical
    output; ``tests/test_dumps.py`` checks that property), falling back to ``json`` for what
    orjson cannot encode (NaN, integers beyond 64 bits, nesting past its 255 levels).

    Raises:
        RecursionError: a body nested too deep for the json module as well (callers keep it
            as text, see :func:`render_and_write`).
    """
    try:
        return orjson.dumps(doc, option=orjson.OPT_INDENT_2 | orjson.OPT_APPEND_NEWLINE)
    except (orjson.JSONEncodeError, TypeError):
        return (json.dumps(doc, indent=2, ensure_ascii=False) + "\n").encode("utf-8")


def write_file_atomically(directory: str, name: str, data: bytes) -> str:
    """Write ``data`` as ``directory/name`` with mode 0600; readers never see a partial file
    (a hidden ``.name.tmp`` created with ``O_EXCL`` and mode 0600, then ``os.replace``).
    Names are unique per process (sequence numbers), so no random temporary names are needed.
    Returns the path.

    Raises:
        OSError: on any write error (the temporary file is removed).
    """
    path = os.path.join(directory, name)
    tmp = os.path.join(directory, f".{name}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600)
    try:
        # Plain os.write, not a file object: 4 syscalls per file instead of 7 (no fstat,
        # isatty ioctl, lseek), each of which hands the GIL back and forth with the event loop.
        try:
            view = memoryview(data)
            while view:
                view = view[os.write(fd, view) :]
        finally:
            os.close(fd)
        os.replace(tmp, path)
        return path
    except BaseException:
        try:
            os.unlink(tmp)
        except FileNotFoundError:
            pass
        raise


def render_and_write(directory: str, name: str, doc: dict[str, Any]) -> str | None:
    """Render one dump document and write it; runs on the :class:`DumpThread`, or in the
    worker process for large bodies. ``doc["body"]`` may be ``(raw bytes, content-encoding,
    decode limits)``, rendered here by :func:`render_body_fields`. A parsed body too deep to
    render is written as its text. Returns ``None`` on success, else the error text (never
    raises, so the caller can count and log failures)."""
    try:
        body = doc.get("body")
        if isinstance(body, tuple):
            doc = {**doc, **render_body_fields(*body)}
        try:
            data = render_document(doc)
        except RecursionError:
            raw, encoding, limits = body if isinstance(body, tuple) else (b"", None, None)
            text = decode_body(raw, encoding, limits).data.decode("utf-8", "replace")
            doc = {**doc, "body": text, "body_note": "JSON nested too deep to render; kept as text"}
            data = render_document(doc)
        write_file_atomically(directory, name, data)
        return None
    except Exception as e:
        return f"{type(e).__name__}: {e}"


def prepare_dump_dir(path: str) -> str:
    """Create the dump directory (mode 0700) if needed and check it is a writable directory.

    Returns the absolute path. Raises:
        ValueError: when it is not a directory or not writable.
    """
    path = os.path.abspath(path)
    try:
        os.makedirs(path, mode=0o700, exist_ok=True)
    except OSError as e:
        raise ValueError(f"cannot create {path!r}: {e.strerror}") from None
    if not os.path.isdir(path):
        raise ValueError(f"{path!r} is not a directory")
    if not os.access(path, os.W_OK | os.X_OK):
        raise ValueError(f"{path!r} is not writable")
    return path


class DumpThread:
    """One daemon thread that renders and writes dump documents, in the order they are put.

    Cheaper for the event loop than a ``ThreadPoolExecutor``: :meth:`put` is one append to a
    C-level ``queue.SimpleQueue``, with no ``Future``, ``Condition`` or ``Semaphore`` per
    document (profiled: those took 11% of the loop thread's samples at 600 req/s, mostly waiting
    for the GIL). A ``Future`` is made only by a caller that waits for the result
    (``--dump-required``). Each outcome goes to ``report(name, error or None)``, called on this
    thread.
    """

    def __init__(self, report: Callable[[str, str | None], None]) -> None:
        self._queue: queue.SimpleQueue[Any] = queue.SimpleQueue()
        self._report = report
        self._thread = threading.Thread(target=self._run, name="codex-dumps", daemon=True)
        self._thread.start()

    def put(
        self,
        directory: str,
        name: str,
        doc: dict[str, Any],
        future: concurrent.futures.Future[Any] | None = None,
    ) -> None:
        """Queue one document (see :func:`render_and_write`); ``future``, if given, gets the
        error text or ``None``."""
        self._queue.put((directory, name, doc, future))

    def drain(self, timeout: float) -> bool:
        """Block until everything put so far is written (or failed); False on timeout."""
        marker = threading.Event()
        self._queue.put(marker)
        return marker.wait(timeout)

    def stop(self, timeout: float) -> None:
        """Write what is queued, then end the thread (waits at most ``timeout`` seconds)."""
        self._queue.put(None)
        self._thread.join(timeout)

    def _run(self) -> None:
        while True:
            item = self._queue.get()
            if item is None:
                return
            if isinstance(item, threading.Event):
                item.set()
                continue
            directory, name, doc, future = item
            try:
                error = render_and_write(directory, name, doc)
            except BaseException as e:  # render_and_write catches Exception; keep the thread
                error = f"dump worker failed: {type(e).__name__}"
            try:
                self._report(name, error)
            finally:
                if future is not None:
                    future.set_result(error)


class DumpSink:
    """Where dump documents go: rendered and written off the event loop, each outcome counted.

    Small documents are rendered and written on one :class:`DumpThread` (cheap, no
    inter-process copy); with ``workers="auto"`` a document whose body is over
    :attr:`LARGE_BODY` goes to a worker process, so rendering multi-MB JSON never holds this
    process's GIL (on a thread it stalls the event loop for tens of ms). ``workers="thread"``:
    always the thread (the seam unit tests use to inject faults with monkeypatch). Outcomes:
    :attr:`written` and :attr:`lost` (a failure is logged with the file's name).

    Raises:
        ValueError: ``workers`` is neither ``"auto"`` nor ``"thread"``.
    """

    #: Bodies larger than this (bytes) are rendered in the worker process.
    LARGE_BODY = 256 * 1024
    #: The worker process exits after this many idle seconds (large bodies are rare; it costs
    #: ~40 MB of memory while it lives).
    LARGE_WORKER_IDLE_S = 5.0

    def __init__(self, workers: str = "auto") -> None:
        if workers not in ("auto", "thread"):
            raise ValueError(f"workers must be 'auto' or 'thread', not {workers!r}")
        self.workers = workers
        self.lost = 0
        self.written = 0
        self._thread: DumpThread | None = None
        self._large_executor: concurrent.futures.Executor | None = None
        self._large_pending: set[concurrent.futures.Future[Any]] = set()
        self._large_last_used = 0.0
        self._count_lock = threading.Lock()

    def start(self) -> None:
        """Start the writer thread (once; again after :meth:`close`)."""
        if self._thread is None:
            self._thread = DumpThread(self._count)

    def submit(
        self, directory: str, name: str, doc: dict[str, Any], wait: bool = False
    ) -> concurrent.futures.Future[Any] | None:
        """Hand one document (see :func:`render_and_write`) to a worker. Returns a future of
        its outcome (error text or ``None``) when the caller will ``wait`` for it
        (``--dump-required``) or it went to the worker process; else ``None`` (the outcome is
        counted). Nothing is written before :meth:`start`."""
        body = doc.get("body")
        large = isinstance(body, tuple) and len(body[0]) > self.LARGE_BODY
        if large and self.workers == "auto":
            return self._submit_large(directory, name, doc)
        self._retire_idle_large_worker()
        if self._thread is None:
            return None
        future: concurrent.futures.Future[Any] | None = (
            concurrent.futures.Future() if wait else None
        )
        self._thread.put(directory, name, doc, future)
        return future

    def flush(self, timeout: float = 30.0) -> None:
        """Wait (at most about ``timeout`` seconds) until every document handed over so far is
        on disk or failed."""
        deadline = time.monotonic() + timeout
        if self._thread is not None:
            self._thread.drain(timeout)
        concurrent.futures.wait(
            list(self._large_pending), timeout=max(0.0, deadline - time.monotonic())
        )

    def close(self) -> None:
        """Write what is queued, then end the thread and the worker process."""
        self.flush()
        if self._thread is not None:
            self._thread.stop(timeout=30.0)
        if self._large_executor is not None:
            self._large_executor.shutdown(wait=True)
        self._thread = self._large_executor = None

    def _submit_large(
        self, directory: str, name: str, doc: dict[str, Any]
    ) -> concurrent.futures.Future[Any] | None:
        if self._large_executor is None:
            self._large_executor = concurrent.futures.ProcessPoolExecutor(
                max_workers=1, mp_context=multiprocessing.get_context("spawn")
            )
        self._large_last_used = time.monotonic()
        try:
            future = self._large_executor.submit(render_and_write, directory, name, doc)
        except (concurrent.futures.BrokenExecutor, RuntimeError) as e:
            # The worker died (killed, out of memory): count the loss; a new one comes next time.
            self._count(name, f"dump worker unavailable: {e}")
            self._large_executor = None
            return None
        self._large_pending.add(future)
        future.add_done_callback(lambda f: self._large_done(name, f))
        return future

    def _retire_idle_large_worker(self) -> None:
        if (
            self._large_executor is not None
            and not self._large_pending
            and time.monotonic() - self._large_last_used > self.LARGE_WORKER_IDLE_S
        ):
            self._large_executor.shutdown(wait=False)
            self._large_executor = None

    def _large_done(self, name: str, future: concurrent.futures.Future[Any]) -> None:
        self._large_pending.discard(future)
        try:
            error = future.result()
        except Exception as e:
            error = f"dump worker failed: {type(e).__name__}: {e}"
        self._count(name, error)

    def _count(self, name: str, error: str | None) -> None:
        """Count one outcome; called on the worker threads and the loop (hence the lock)."""
        with self._count_lock:
            if error is None:
                self.written += 1
                return
            self.lost += 1
        logger.error("dump: cannot write %s: %s", name, error)


def _client_side(text: Any) -> Any:
    """A bridged flow's client-side body for its dump: parsed JSON, else the text; ``None``
    when the flow was not bridged."""
    if not isinstance(text, str):
        return None
    try:
        return loads_json(text)
    except ValueError:  # not JSON, or nested too deep
        return text


@dataclass
class _Exchange:
    prefix: str
    method: str
    url: str
    headers: list[dict[str, str]]
    request_written: bool = False


class DumpWriter:
    """Writes one ``NNNNNN-<unix ms>-request.json`` / ``-response.json`` pair per accepted flow.

    Same names, shapes and format as the reference proxy: request ``{method, url, headers,
    body}`` with the client's headers as received (before our rewriting), response ``{status,
    headers, body}`` with the upstream's headers; plus ``"error"`` when the exchange failed
    (client gone early, upstream down or dropping mid-stream), with the partial body.
    Sequence numbers count from 1 per process, assigned on the event loop (unique under
    concurrency). This addon keeps the hooks; rendering and writing run off the event loop in
    its :class:`DumpSink` (a :class:`DumpThread`, and a worker process for large bodies so
    their rendering never holds the loop's GIL); files appear atomically with mode 0600 in a
    0700 directory. A failed write is logged and counted in ``lost``; forwarding goes on,
    unless ``codex_dump_required`` is set: then the request file is written before the
    request may leave (a failure answers 503 and nothing is sent upstream), and a failed
    response file kills the flow (the client sees a truncated reply, never a clean one without
    its dump). Turns on a WebSocket (``addons/socket_turns.py``) are pairs of their own
    (:meth:`socket_turn_start`, :meth:`socket_turn_end`).
    """

    def __init__(self, workers: str = "auto") -> None:
        #: Renders and writes the documents off the event loop (``workers``: see
        #: :class:`DumpSink`; raises ``ValueError`` for another value).
        self.sink = DumpSink(workers)
        self.directory = ""
        self.extra_redact: frozenset[str] = frozenset(DEFAULT_EXTRA)
        self.required = False
        self._seq = itertools.count(1)
        self._open: dict[str, _Exchange] = {}
        #: An open WebSocket flow's upgrade request, as dumped: each turn's request file.
        self._sockets: dict[str, _Exchange] = {}

    @property
    def written(self) -> int:
        """Dump files written so far."""
        return self.sink.written

    @property
    def lost(self) -> int:
        """Dump files that could not be written."""
        return self.sink.lost

    def load(self, loader) -> None:
        loader.add_option(
            "codex_dump_dir",
            str,
            "",
            "Write redacted request/response dump files (reference proxy format) to this "
            "directory; created with mode 0700.",
        )
        loader.add_option(
            "codex_dump_seq_start",
            int,
            1,
            "First dump sequence number (set by --workers: worker i of N starts at i+1).",
        )
        loader.add_option(
            "codex_dump_seq_step",
            int,
            1,
            "Step between this process's dump sequence numbers (set by --workers: N, so each "
            "worker has its own residue class and a replacement resumes after its predecessor).",
        )
        loader.add_option(
            "codex_dump_required",
            bool,
            False,
            "Fail closed when a dump cannot be written: refuse the request (503) if its request "
            "file fails, kill the reply if its response file fails.",
        )

    def configure(self, updated: set[str]) -> None:
        if "codex_dump_required" in updated:
            self.required = ctx.options.codex_dump_required
        if "codex_redact_headers" in updated:  # declared by addons.redaction.HeaderRedaction
            self.extra_redact = extra_names(ctx.options.codex_redact_headers)
        if "codex_dump_dir" in updated:
            path = ctx.options.codex_dump_dir
            if path:
                try:
                    self.directory = prepare_dump_dir(path)
                except ValueError as e:
                    raise exceptions.OptionsError(f"codex_dump_dir: {e}") from None
                self.sink.start()
            else:
                self.directory = ""
        if {"codex_dump_dir", "codex_dump_seq_start", "codex_dump_seq_step"} & updated:
            start, step = ctx.options.codex_dump_seq_start, ctx.options.codex_dump_seq_step
            if start < 1 or step < 1:
                raise exceptions.OptionsError("codex_dump_seq_start and _step must be >= 1")
            if step > 1 and self.directory:
                start = next_seq(self.directory, start, step)
            self._seq = itertools.count(start, step)

    # Hooks -------------------------------------------------------------------------------

    def requestheaders(self, flow: http.HTTPFlow) -> None:
        if not self.directory or flow.response or flow.metadata.get(ALLOWED) is not True:
            return
        try:
            seq = next(self._seq)
            flow.metadata[DUMP_SEQ] = seq
            self._open[flow.id] = _Exchange(
                prefix=f"{seq:06d}-{int(time.time() * 1000)}",
                method=flow.request.method,
                url=flow.request.path,
                headers=redact_fields(flow.request.headers.fields, self.extra_redact),
            )
        except Exception:
            logger.exception("dump: cannot record request headers")

    async def request(self, flow: http.HTTPFlow) -> None:
        exchange = self._open.get(flow.id)
        if exchange is None or exchange.request_written:
            return
        future = self._write_request(exchange, flow)
        if self.required and future is not None and not await self._succeeded(future):
            self._open.pop(flow.id, None)
            flow.metadata.pop(ALLOWED, None)
            flow.metadata[REFUSED] = "dump-failed"
            flow.response = json_response(
                503, "dump_failed", "the request dump could not be written (dump required)"
            )

    async def response(self, flow: http.HTTPFlow) -> None:
        future = self._finish(flow, None)
        if self.required and future is not None and not await self._succeeded(future):
            flow.kill()

    def error(self, flow: http.HTTPFlow) -> None:
        self._finish(flow, flow.error.msg if flow.error else "unknown error")

    def socket_turn_start(self, flow: http.HTTPFlow, turn: SocketTurn) -> None:
        """A turn on a dumped WebSocket (``addons/socket_turns.py``) gets the next sequence
        number and its request file now: the upgrade's method, path and redacted headers, the
        ``response.create`` message as the body, ``"transport": "websocket"``, its ``route``
        and the upgrade's own pair as ``upgrade_seq``."""
        upgrade = self._sockets.get(flow.id)
        if upgrade is None:
            return
        seq = self.start_pair()
        turn.seq = seq
        self.write_part(
            seq,
            turn.started,
            "request",
            {
                "method": upgrade.method,
                "url": upgrade.url,
                "headers": upgrade.headers,
                "body": (turn.request, None, body_decode.LIMITS),
                "transport": "websocket",
                "route": turn.route,
                "upgrade_seq": flow.metadata.get(DUMP_SEQ),
            },
        )

    def socket_turn_end(self, flow: http.HTTPFlow, turn: SocketTurn) -> None:
        """The turn's response file: ``status`` (200, an error event's status; ``null`` when
        the socket closed mid-turn), ``content-type: text/event-stream``, the server's events
        as the SSE dump shows them, ``"transport": "websocket"``, and ``error`` when the
        turn did not end with a terminal event."""
        if turn.seq is None or flow.id not in self._sockets:
            return
        doc: dict[str, Any] = {
            "status": turn.status,
            "headers": [{"name": "content-type", "value": "text/event-stream"}],
            "body": (sse_text(turn).encode(), None, body_decode.LIMITS),
            "transport": "websocket",
        }
        if turn.error is not None:
            doc["error"] = turn.error
        self.write_part(turn.seq, turn.started, "response", doc)

    def websocket_end(self, flow: http.HTTPFlow) -> None:
        self._sockets.pop(flow.id, None)

    # Entry points for exchanges that are not flows ---------------------------------------

    def start_pair(self) -> int:
        """A new dump pair's sequence number (this process's next), for an exchange that is
        not a flow of its own (a turn on a WebSocket)."""
        return next(self._seq)

    def write_part(self, seq: int, started: float, part: str, doc: dict[str, Any]) -> None:
        """Write one file of pair ``seq`` (``part``: ``"request"`` or ``"response"``), named
        ``NNNNNN-<started, unix ms>-<part>.json`` like a flow's pair; ``doc`` as
        :func:`render_and_write` takes it (its ``body`` may be ``(raw, content-encoding,
        limits)``). Off the event loop, like every dump; a failure is logged and counted."""
        if part not in ("request", "response"):
            raise ValueError(f"part must be 'request' or 'response', not {part!r}")
        if self.directory:
            self._submit(f"{seq:06d}-{int(started * 1000)}-{part}.json", doc)

    def done(self) -> None:
        for flow_id in list(self._open):
            exchange = self._open.pop(flow_id)
            if not exchange.request_written:
                self._submit(
                    exchange.prefix + "-request.json", self._request_doc(exchange, b"", None)
                )
            self._submit(
                exchange.prefix + "-response.json",
                {
                    "status": None,
                    "headers": [],
                    "body": "",
                    "error": "proxy shut down before the exchange finished",
                },
            )
        self.sink.close()
        if self.lost:
            logger.error(
                "dump: %d dump file(s) could not be written (%d written)", self.lost, self.written
            )
        elif self.directory:
            logger.info("dump: %d dump file(s) written", self.written)

    # Internals ---------------------------------------------------------------------------

    def flush(self, timeout: float = 30.0) -> None:
        """Wait (at most about ``timeout`` seconds) until every dump handed to a worker is on
        disk or failed."""
        self.sink.flush(timeout)

    @staticmethod
    def _request_doc(
        exchange: _Exchange, raw: bytes, content_encoding: str | None, client_body: Any = None
    ) -> dict:
        doc = {
            "method": exchange.method,
            "url": exchange.url,
            "headers": exchange.headers,
            "body": (raw, content_encoding, body_decode.LIMITS),
        }
        if client_body is not None:  # the Chat Completions bridge: what the client sent
            doc["client_body"] = client_body
        return doc

    @staticmethod
    async def _succeeded(future: concurrent.futures.Future[Any]) -> bool:
        try:
            return await asyncio.wrap_future(future) is None
        except Exception:
            return False

    def _write_request(
        self, exchange: _Exchange, flow: http.HTTPFlow
    ) -> concurrent.futures.Future[Any] | None:
        exchange.request_written = True
        raw = flow.request.raw_content or b""
        return self._submit(
            exchange.prefix + "-request.json",
            self._request_doc(
                exchange,
                raw,
                flow.request.headers.get("content-encoding"),
                _client_side(flow.metadata.get(BRIDGE_CLIENT_BODY)),
            ),
        )

    def _finish(
        self, flow: http.HTTPFlow, error: str | None
    ) -> concurrent.futures.Future[Any] | None:
        exchange = self._open.pop(flow.id, None)
        if exchange is None:
            return None
        if not exchange.request_written:
            self._write_request(exchange, flow)
        if flow.websocket is not None and error is None:
            self._sockets[flow.id] = exchange  # its turns are dumped as pairs of their own
        response = flow.response
        doc: dict[str, Any]
        if response is None:
            doc = {"status": 502, "headers": [], "body": ""}
        else:
            doc = {
                "status": response.status_code,
                "headers": redact_fields(response.headers.fields, self.extra_redact),
                "body": (
                    response.raw_content or b"",
                    response.headers.get("content-encoding"),
                    body_decode.LIMITS,
                ),
            }
        if error is not None:
            doc["error"] = error
        client_reply = _client_side(flow.metadata.get(BRIDGE_CLIENT_REPLY))
        if client_reply is not None:  # the Chat Completions bridge: what the client got
            doc["client_body"] = client_reply
        return self._submit(exchange.prefix + "-response.json", doc)

    def _submit(self, name: str, doc: dict[str, Any]) -> concurrent.futures.Future[Any] | None:
        """Hand one document to the sink; a future of its outcome when ``--dump-required``
        waits for it or it went to the worker process, else ``None``."""
        return self.sink.submit(self.directory, name, doc, wait=self.required)
