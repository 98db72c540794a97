"""Incremental ``Content-Encoding`` decoding of HTTP bodies, for what the proxy shows or records.

The wire never sees this: the proxy forwards bodies byte-identical, compressed or not. Dumps, the
recording's ledger and (later) content views and accounting decode a body through this one module,
chunk by chunk, so a stream cut off mid-way (the client left, the upstream dropped) still yields
everything that arrived before the cut. mitmproxy's own ``mitmproxy.net.encoding.decode`` is all
or nothing: since 12.3 a truncated zstd body raises, and it keeps no state between chunks.

Every decode is bounded (:class:`DecodeLimits`: decoded bytes, and bytes per received byte;
options ``codex_decode_max_mib`` / ``codex_decode_max_ratio``), so a decompression bomb costs
at most the limit in memory and work, and :func:`loads_json` parses JSON with a depth limit.
mitmproxy's own readers (HAR export, mitmweb) decode whole; :func:`fence` keeps a bomb from
them (used by :mod:`addons.bomb_fence`).

The codecs are the ones mitmproxy itself depends on (``zlib``, ``brotli``, ``backports.zstd`` /
stdlib ``compression.zstd`` on Python 3.14+), declared in our own ``pyproject.toml`` as well.
"""

from __future__ import annotations

import json
import sys
import zlib
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import brotli
import orjson

if sys.version_info >= (3, 14):
    from compression import zstd
else:
    from backports import zstd

#: Codings that mean "not encoded" (RFC 9110 8.4.1: ``identity`` only in Accept-Encoding, but
#: servers send it anyway).
IDENTITY = frozenset({"", "identity"})
SUPPORTED = frozenset({"gzip", "x-gzip", "deflate", "br", "zstd"})


class _Stage:
    """One coding's incremental decoder: ``feed(bytes, max_out) -> bytes``, ``finish() ->
    bytes``; raises ``ValueError`` on invalid data; ``complete`` tells whether the coding's own
    stream (gzip member, zstd frame, brotli stream) ended properly. ``feed`` returns at most
    ``max_out + 1`` bytes: one more than allowed means "there is more" (the caller stops there),
    so a bomb never expands past the budget in memory."""

    complete = False

    def feed(self, data: bytes, max_out: int) -> bytes:
        raise NotImplementedError

    def finish(self) -> bytes:
        return b""

    def drain(self, data: bytes, piece: int) -> Iterator[bytes]:
        """All of ``data`` decoded, in pieces of at most ``piece`` bytes (:class:`BodyStream`:
        memory stays bounded however far the body expands)."""
        raise NotImplementedError


class _Zlib(_Stage):
    """gzip (several members in a row allowed) and deflate (zlib-wrapped, or raw deflate as
    some servers send it)."""

    def __init__(self, coding: str) -> None:
        self._gzip = coding != "deflate"
        self._started = False
        self._obj = self._new()

    def _new(self) -> Any:
        return zlib.decompressobj(16 + zlib.MAX_WBITS if self._gzip else zlib.MAX_WBITS)

    def feed(self, data: bytes, max_out: int) -> bytes:
        out: list[bytes] = []
        produced = 0
        while data:
            try:
                chunk = self._obj.decompress(data, max_out + 1 - produced)
            except zlib.error as e:
                if not self._gzip and not self._started:
                    # "deflate" sent as raw deflate (no zlib header): start over as raw.
                    self._started = True
                    self._obj = zlib.decompressobj(-zlib.MAX_WBITS)
                    continue
                raise ValueError(f"invalid data ({e})") from None
            self._started = True
            out.append(chunk)
            produced += len(chunk)
            if produced > max_out:
                break  # over budget: the caller stops decoding
            self.complete = self._obj.eof
            if self._obj.unconsumed_tail:
                data = self._obj.unconsumed_tail
                continue
            data = self._obj.unused_data if self._obj.eof and self._gzip else b""
            if data:
                self._obj = self._new()  # the next gzip member
                self.complete = False
        return b"".join(out)

    def finish(self) -> bytes:
        return self._obj.flush()

    def drain(self, data: bytes, piece: int) -> Iterator[bytes]:
        while data:
            try:
                chunk = self._obj.decompress(data, piece)
            except zlib.error as e:
                if not self._gzip and not self._started:
                    self._started = True
                    self._obj = zlib.decompressobj(-zlib.MAX_WBITS)
                    continue
                raise ValueError(f"invalid data ({e})") from None
            self._started = True
            if chunk:
                yield chunk
            self.complete = self._obj.eof
            if self._obj.unconsumed_tail:
                data = self._obj.unconsumed_tail
                continue
            data = self._obj.unused_data if self._obj.eof and self._gzip else b""
            if data:
                self._obj = self._new()  # the next gzip member
                self.complete = False


class _Zstd(_Stage):
    """zstd frames, several in a row allowed (a server may start a new frame per flush)."""

    def __init__(self) -> None:
        self._obj = zstd.ZstdDecompressor()

    def feed(self, data: bytes, max_out: int) -> bytes:
        out: list[bytes] = []
        produced = 0
        while True:
            if self._obj.eof:
                if not data:
                    break
                self._obj = zstd.ZstdDecompressor()  # the next frame
                self.complete = False
            try:
                chunk = self._obj.decompress(data, max_out + 1 - produced)
            except zstd.ZstdError as e:
                raise ValueError(f"invalid data ({e})") from None
            data = b""
            out.append(chunk)
            produced += len(chunk)
            if produced > max_out:
                break  # over budget: the caller stops decoding
            self.complete = self._obj.eof
            if not self._obj.eof:
                break  # all input taken (needs_input), or output pending past the budget
            data = self._obj.unused_data
            if not data:
                break
        return b"".join(out)

    def drain(self, data: bytes, piece: int) -> Iterator[bytes]:
        while True:
            if self._obj.eof:
                if not data:
                    return
                self._obj = zstd.ZstdDecompressor()  # the next frame
                self.complete = False
            try:
                chunk = self._obj.decompress(data, piece)
            except zstd.ZstdError as e:
                raise ValueError(f"invalid data ({e})") from None
            data = b""
            if chunk:
                yield chunk
            self.complete = self._obj.eof
            if self._obj.eof:
                data = self._obj.unused_data
            elif self._obj.needs_input:
                return


class _Brotli(_Stage):
    def __init__(self) -> None:
        self._obj = brotli.Decompressor()

    def feed(self, data: bytes, max_out: int) -> bytes:
        if not data:
            return b""
        try:
            out = self._obj.process(data, output_buffer_limit=max_out + 1)
        except brotli.error as e:
            raise ValueError(f"invalid data ({e})") from None
        self.complete = self._obj.is_finished()
        return out

    def drain(self, data: bytes, piece: int) -> Iterator[bytes]:
        try:
            out = self._obj.process(data, output_buffer_limit=piece)
            while True:
                if out:
                    yield out
                if self._obj.can_accept_more_data():
                    break
                out = self._obj.process(b"", output_buffer_limit=piece)
        except brotli.error as e:
            raise ValueError(f"invalid data ({e})") from None
        self.complete = self._obj.is_finished()


def _stage(coding: str) -> _Stage:
    if coding in ("gzip", "x-gzip", "deflate"):
        return _Zlib(coding)
    if coding == "zstd":
        return _Zstd()
    return _Brotli()


MIB = 1024 * 1024


@dataclass(frozen=True)
class DecodeLimits:
    """How far a body may expand when decoded for reading (dumps, recordings, content views,
    the gateway's request facts). The wire never sees this: forwarded bytes are unchanged.

    ``max_bytes``: decoded bytes at most (default 32 MiB, about 800 times Codex's ~40 KB first
    request). ``max_ratio``: decoded bytes per byte on the wire, enforced above ``floor``
    (default 1 MiB) so small bodies that compress well are never cut. A body may decode to
    ``min(max_bytes, max(floor, max_ratio * wire_bytes))`` bytes (:meth:`for_wire`).
    """

    max_bytes: int = 32 * MIB
    max_ratio: int = 100
    floor: int = MIB

    def for_wire(self, wire_bytes: int) -> int:
        """Decoded bytes allowed for a body of ``wire_bytes`` bytes as received."""
        return min(self.max_bytes, max(self.floor, self.max_ratio * wire_bytes))

    def describe(self, wire_bytes: int) -> str:
        """Which limit applies to a body of ``wire_bytes`` bytes, for messages."""
        allowed = self.for_wire(wire_bytes)
        if allowed == self.max_bytes:
            return f"{_size(self.max_bytes)} decoded (codex_decode_max_mib)"
        return (
            f"{_size(allowed)} decoded, {self.max_ratio}x the {wire_bytes} bytes received "
            "(codex_decode_max_ratio)"
        )


def _size(n: int) -> str:
    return f"{n // MIB} MiB" if n % MIB == 0 else f"{n} bytes"


#: The limits in force in this process, set by :class:`DecodeLimitOptions` (a worker process
#: that renders dumps gets them passed along instead).
LIMITS = DecodeLimits()


def parse_codings(content_encoding: str | None) -> list[str]:
    """The codings of a ``Content-Encoding`` value, in the order they were applied, lower-case,
    ``identity`` left out: ``"gzip, br"`` -> ``["gzip", "br"]``, ``None`` -> ``[]``."""
    if not content_encoding:
        return []
    codings = [c.strip().lower() for c in content_encoding.split(",")]
    return [c for c in codings if c not in IDENTITY]


class BodyDecoder:
    """Decodes a body chunk by chunk: ``feed(raw) -> decoded bytes``, then ``finish()``.

    ``codings`` (see :func:`parse_codings`) are undone in reverse order of application. Never
    raises: on invalid data, an unsupported coding or a truncated stream, :attr:`error` says what
    happened (``"zstd: the stream ends before its frame does (truncated)"``) and what was decoded
    before the problem is still returned; later chunks decode to nothing.

    Bounded: the decoded bytes never exceed ``limits.for_wire(bytes fed so far)``
    (:class:`DecodeLimits`; ``None``: the process's :data:`LIMITS`). Past it, decoding stops,
    :attr:`over_limit` is set and :attr:`error` names the limit. A plain (identity) body is
    passed through: it is what crossed the wire.
    """

    def __init__(self, content_encoding: str | None, limits: DecodeLimits | None = None) -> None:
        self.codings = parse_codings(content_encoding)
        self.limits = limits if limits is not None else LIMITS
        self.error: str | None = None
        self.over_limit = False
        self.wire_bytes = 0
        self.decoded_bytes = 0
        unsupported = [c for c in self.codings if c not in SUPPORTED]
        if unsupported:
            self.error = f"unsupported content-encoding {unsupported[0]!r}"
        self._stages: list[tuple[str, _Stage]] = (
            [] if self.error else [(c, _stage(c)) for c in reversed(self.codings)]
        )

    @property
    def encoded(self) -> bool:
        """Whether the body carries any coding (other than identity)."""
        return bool(self.codings)

    def _run(self, data: bytes, final: bool) -> bytes:
        if self.error is not None:
            return b""
        budget = self.limits.for_wire(self.wire_bytes) - self.decoded_bytes
        for coding, stage in self._stages:
            try:
                data = stage.feed(data, budget)
                if final and len(data) <= budget:
                    data += stage.finish()
            except ValueError as e:
                self.error = f"{coding}: {e}"
                return b""
            if len(data) > budget:
                self.over_limit = True
                self.error = (
                    f"decoding stopped at the limit of {self.limits.describe(self.wire_bytes)}"
                )
                return b""
        self.decoded_bytes += len(data)
        return data

    def feed(self, raw: bytes) -> bytes:
        """Decode the next chunk of the body (bytes as they came off the wire)."""
        self.wire_bytes += len(raw)
        if not self._stages:
            return b"" if self.error else raw
        return self._run(raw, final=False)

    def finish(self) -> bytes:
        """End of the body: whatever the codecs still hold; sets :attr:`error` when a coding's
        stream did not end (a truncated body)."""
        if not self._stages:
            return b""
        out = self._run(b"", final=True)
        if self.error is None:
            for coding, stage in self._stages:
                if not stage.complete:
                    self.error = f"{coding}: the stream ends before its frame does (truncated)"
                    break
        return out


@dataclass(frozen=True)
class DecodedBody:
    """A whole body decoded: ``data`` (all that could be decoded; nothing past a limit),
    ``codings`` (as applied, ``[]`` for a plain body), ``error`` (``None`` when the body decoded
    completely) and ``over_limit`` (decoding stopped at :class:`DecodeLimits`)."""

    data: bytes
    codings: tuple[str, ...]
    error: str | None
    over_limit: bool = False


def decode_body(
    raw: bytes, content_encoding: str | None, limits: DecodeLimits | None = None
) -> DecodedBody:
    """Decode a complete (or cut-off) body in one call; see :class:`BodyDecoder`. Past the
    limit, ``data`` is empty (a partial decode of a bomb is of no use to any reader)."""
    decoder = BodyDecoder(content_encoding, limits)
    if not decoder.encoded:
        return DecodedBody(raw, (), None)
    if not raw:
        return DecodedBody(b"", tuple(decoder.codings), None)
    data = decoder.feed(raw)
    data += decoder.finish()
    if decoder.over_limit:
        data = b""
    return DecodedBody(data, tuple(decoder.codings), decoder.error, decoder.over_limit)


#: Decoded bytes at most that :class:`BodyStream` reads of one body (64 GiB): past it the body
#: is not read further. Metering decodes past the display limits (a bomb's usage still counts)
#: but not without end: gzip expands at most ~1 030 times, so this is a 64 MiB gzip body
#: (``body_size_limit``), about a minute of one thread; zstd has no such ceiling.
STREAM_MAX_BYTES = 64 * 1024 * MIB
#: Largest decoded piece :class:`BodyStream` holds at once (bytes).
STREAM_PIECE = MIB
#: Bytes :class:`BodyStream` hands a codec at a time.
STREAM_SLICE = 16 * 1024


class BodyStream:
    """Decodes a body in bounded pieces and hands each on: ``pieces(raw) -> iterator of
    bytes`` per received chunk, then ``end()`` for what the codecs still hold.

    Unlike :class:`BodyDecoder`, it is not capped by :class:`DecodeLimits`: a reader that must
    see the whole decoded body (gateway metering: the usage is in a stream's last event) reads
    it piece by piece and keeps what it needs, so memory stays at ``piece`` bytes per stage
    whatever the ratio. It stops at ``max_bytes`` decoded (:data:`STREAM_MAX_BYTES`), with
    :attr:`over_limit` and :attr:`error` set. Never raises: invalid data, an unsupported
    coding or a truncated body set :attr:`error` (as :class:`BodyDecoder` words it) and end
    the pieces. A plain body is handed on as received, cut into pieces.
    """

    def __init__(
        self,
        content_encoding: str | None,
        max_bytes: int = STREAM_MAX_BYTES,
        piece: int = STREAM_PIECE,
    ) -> None:
        self.codings = parse_codings(content_encoding)
        self.max_bytes = max_bytes
        self.piece = piece
        self.error: str | None = None
        self.over_limit = False
        self.decoded_bytes = 0
        unsupported = [c for c in self.codings if c not in SUPPORTED]
        if unsupported:
            self.error = f"unsupported content-encoding {unsupported[0]!r}"
        self._stages: list[tuple[str, _Stage]] = (
            [] if self.error else [(c, _stage(c)) for c in reversed(self.codings)]
        )

    def _through(self, index: int, data: bytes) -> Iterator[bytes]:
        if index == len(self._stages):
            for start in range(0, len(data), self.piece):
                yield data[start : start + self.piece]
            return
        coding, stage = self._stages[index]
        try:
            # Small slices in: a codec copies its unread input on every bounded call, so a
            # large slice at a high ratio would be copied once per piece out.
            for start in range(0, len(data), STREAM_SLICE):
                for out in stage.drain(data[start : start + STREAM_SLICE], self.piece):
                    yield from self._through(index + 1, out)
        except ValueError as e:
            if self.error is None:
                self.error = f"{coding}: {e}"

    def _counted(self, pieces: Iterator[bytes]) -> Iterator[bytes]:
        for out in pieces:
            if self.error is not None:
                return
            if self.decoded_bytes + len(out) > self.max_bytes:
                self.over_limit = True
                self.error = f"decoding stopped after {self.max_bytes // MIB} MiB decoded"
                return
            self.decoded_bytes += len(out)
            yield out

    def pieces(self, raw: bytes) -> Iterator[bytes]:
        """The decoded pieces of the next received chunk (each at most ``piece`` bytes)."""
        if self.error is not None or not raw:
            return iter(())
        return self._counted(self._through(0, raw))

    def end(self) -> Iterator[bytes]:
        """The pieces the codecs still hold at the end of the body; sets :attr:`error` when a
        coding's stream did not end (a truncated body)."""
        if self.error is not None:
            return
        for index, (coding, stage) in enumerate(self._stages):
            try:
                tail = stage.finish()
            except ValueError as e:
                self.error = f"{coding}: {e}"
                return
            if tail:
                yield from self._counted(self._through(index + 1, tail))
            if self.error is not None:
                return
        for coding, stage in self._stages:
            if not stage.complete:
                self.error = f"{coding}: the stream ends before its frame does (truncated)"
                return


def original_encoding(content_encoding: str | None) -> str | None:
    """The ``Content-Encoding`` a body arrived with: the value itself, or the original kept in
    a fenced one (:func:`fence`: ``x-codex-undecoded (gzip; ...)`` -> ``gzip``)."""
    if content_encoding and content_encoding.startswith(FENCED):
        inner = content_encoding[len(FENCED) :].strip().removeprefix("(")
        return inner.split(";", 1)[0].strip() or None
    return content_encoding


class JsonTooDeep(ValueError):
    """A JSON document nested deeper than :data:`MAX_JSON_DEPTH`."""


#: Nesting depth a JSON document may have: orjson's own limit (1024 arrays/objects), which no
#: Responses API or Chat Completions body comes near.
MAX_JSON_DEPTH = 1024


def loads_json(data: bytes | str, exact: bool = False, **json_kwargs: Any) -> Any:
    """Parse JSON with a depth limit, never raising ``RecursionError``.

    By default orjson parses (fast; it refuses nesting past :data:`MAX_JSON_DEPTH`), and the
    json module only what orjson refuses otherwise (``NaN``, integers beyond 64 bits). With
    ``exact`` the json module parses (integers beyond 64 bits kept, ``NaN``/``Infinity`` read
    through ``json_kwargs`` such as ``parse_constant``): its depth limit is the interpreter's
    recursion limit, past which it is the same :class:`JsonTooDeep`.

    Raises:
        JsonTooDeep: nested too deep.
        ValueError: not JSON.
    """
    if not exact:
        try:
            return orjson.loads(data)
        except orjson.JSONDecodeError as e:
            if "depth limit" in str(e) or "recursion" in str(e):
                raise JsonTooDeep(f"JSON nested deeper than {MAX_JSON_DEPTH} levels") from None
    try:
        return json.loads(data, **json_kwargs)
    except RecursionError:
        limit = f"{MAX_JSON_DEPTH} levels" if not exact else "the parser's recursion limit"
        raise JsonTooDeep(f"JSON nested deeper than {limit}") from None


class DecodeLimitOptions:
    """Owns ``codex_decode_max_mib`` and ``codex_decode_max_ratio``: how far any body may
    expand when this process decodes it to read it (:class:`DecodeLimits`; dumps, recordings,
    content views, the gateway's request facts). Forwarded bytes are never changed by them."""

    def load(self, loader: Any) -> None:
        loader.add_option(
            "codex_decode_max_mib",
            int,
            DecodeLimits.max_bytes // MIB,
            "MiB a compressed body may decode to when the proxy reads it (dumps, recordings, "
            "views, gateway request facts); past it decoding stops and the body is kept as "
            "received. The gateway answers such a request 413.",
        )
        loader.add_option(
            "codex_decode_max_ratio",
            int,
            DecodeLimits.max_ratio,
            "Decoded bytes per received byte a compressed body may reach (above 1 MiB decoded).",
        )

    def configure(self, updated: set[str]) -> None:
        from mitmproxy import ctx, exceptions

        if not {"codex_decode_max_mib", "codex_decode_max_ratio"} & updated:
            return
        global LIMITS
        try:
            LIMITS = parse_limits(
                ctx.options.codex_decode_max_mib, ctx.options.codex_decode_max_ratio
            )
        except ValueError as e:
            raise exceptions.OptionsError(str(e)) from None


def parse_limits(max_mib: int, max_ratio: int) -> DecodeLimits:
    """:class:`DecodeLimits` from the two options.

    Raises:
        ValueError: ``max_mib`` outside 1..4096 or ``max_ratio`` outside 1..100000.
    """
    if not 1 <= max_mib <= 4096:
        raise ValueError("codex_decode_max_mib must be between 1 and 4096")
    if not 1 <= max_ratio <= 100_000:
        raise ValueError("codex_decode_max_ratio must be between 1 and 100000")
    return DecodeLimits(max_mib * MIB, max_ratio, min(MIB, max_mib * MIB))


#: What a fenced body's ``Content-Encoding`` starts with (see :func:`fence_undecodable`).
FENCED = "x-codex-undecoded"


def needs_fence(message: Any, limits: DecodeLimits | None = None) -> bool:
    """Whether the body of ``message`` (a mitmproxy ``http.Request`` / ``Response``) decodes
    past ``limits`` (``None``: the process's): a decompression bomb. Decodes at most the
    limit; thread-safe (reads only)."""
    encoding = message.headers.get("content-encoding")
    raw = message.raw_content
    if not raw or not parse_codings(encoding) or encoding.startswith(FENCED):
        return False
    return decode_body(raw, encoding, limits).over_limit


def fence(message: Any) -> None:
    """Keep mitmproxy's own readers from expanding a decompression bomb (see
    :func:`needs_fence`): the ``Content-Encoding`` of ``message`` in the flow object becomes
    ``x-codex-undecoded (<original>; decoding stopped at the proxy's limit)``, a coding
    mitmproxy does not know, so the HAR export and mitmweb keep the bytes as received instead of
    decoding them whole (a HAR then holds at most 6 bytes per received byte: non-UTF-8 bytes
    escape as ``\\udcXX``). Call it only after the message went over the wire and was saved to
    the flow file (the ``response`` / ``error`` hooks of a script addon: mitmproxy's ``save``
    and ``savehar`` are default addons and run first)."""
    encoding = message.headers.get("content-encoding")
    message.headers["content-encoding"] = (
        f"{FENCED} ({encoding}; decoding stopped at the proxy's limit)"
    )
