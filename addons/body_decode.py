"""Incremental ``Content-Encoding`` decoding of HTTP bodies, for what the proxy shows or records.

The wire never sees this: the proxy forwards bodies byte-identical, compressed or not. Dumps, the
recording's ledger and (later) content views and accounting decode a body through this one module,
chunk by chunk, so a stream cut off mid-way (the client left, the upstream dropped) still yields
everything that arrived before the cut. mitmproxy's own ``mitmproxy.net.encoding.decode`` is all
or nothing: since 12.3 a truncated zstd body raises, and it keeps no state between chunks.

The codecs are the ones mitmproxy itself depends on (``zlib``, ``brotli``, ``backports.zstd`` /
stdlib ``compression.zstd`` on Python 3.14+), declared in our own ``pyproject.toml`` as well.
"""

from __future__ import annotations

import sys
import zlib
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import brotli

if sys.version_info >= (3, 14):
    from compression import zstd
else:
    from backports import zstd

#: Codings that mean "not encoded" (RFC 9110 8.4.1: ``identity`` only in Accept-Encoding, but
#: servers send it anyway).
IDENTITY = frozenset({"", "identity"})
SUPPORTED = frozenset({"gzip", "x-gzip", "deflate", "br", "zstd"})


class _Stage:
    """One coding's incremental decoder: ``feed(bytes) -> bytes``, ``finish() -> bytes``;
    raises ``ValueError`` on invalid data; ``complete`` tells whether the coding's own stream
    (gzip member, zstd frame, brotli stream) ended properly."""

    complete = False

    def feed(self, data: bytes) -> bytes:
        raise NotImplementedError

    def finish(self) -> bytes:
        return b""


class _Zlib(_Stage):
    """gzip (several members in a row allowed) and deflate (zlib-wrapped, or raw deflate as
    some servers send it)."""

    def __init__(self, coding: str) -> None:
        self._gzip = coding != "deflate"
        self._started = False
        self._obj = self._new()

    def _new(self) -> Any:
        return zlib.decompressobj(16 + zlib.MAX_WBITS if self._gzip else zlib.MAX_WBITS)

    def feed(self, data: bytes) -> bytes:
        out = []
        while data:
            try:
                out.append(self._obj.decompress(data))
            except zlib.error as e:
                if not self._gzip and not self._started:
                    # "deflate" sent as raw deflate (no zlib header): start over as raw.
                    self._started = True
                    self._obj = zlib.decompressobj(-zlib.MAX_WBITS)
                    continue
                raise ValueError(f"invalid data ({e})") from None
            self._started = True
            self.complete = self._obj.eof
            data = self._obj.unused_data if self._obj.eof and self._gzip else b""
            if data:
                self._obj = self._new()  # the next gzip member
                self.complete = False
        return b"".join(out)

    def finish(self) -> bytes:
        return self._obj.flush()


class _Zstd(_Stage):
    """zstd frames, several in a row allowed (a server may start a new frame per flush)."""

    def __init__(self) -> None:
        self._obj = zstd.ZstdDecompressor()

    def feed(self, data: bytes) -> bytes:
        out = []
        while data:
            try:
                out.append(self._obj.decompress(data))
            except zstd.ZstdError as e:
                raise ValueError(f"invalid data ({e})") from None
            self.complete = self._obj.eof
            if not self._obj.eof:
                break
            data = self._obj.unused_data
            if data:
                self._obj = zstd.ZstdDecompressor()
                self.complete = False
        return b"".join(out)


class _Brotli(_Stage):
    def __init__(self) -> None:
        self._obj = brotli.Decompressor()

    def feed(self, data: bytes) -> bytes:
        if not data:
            return b""
        try:
            out = self._obj.process(data)
        except brotli.error as e:
            raise ValueError(f"invalid data ({e})") from None
        self.complete = self._obj.is_finished()
        return out


def _stage(coding: str) -> _Stage:
    if coding in ("gzip", "x-gzip", "deflate"):
        return _Zlib(coding)
    if coding == "zstd":
        return _Zstd()
    return _Brotli()


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
    """

    def __init__(self, content_encoding: str | None) -> None:
        self.codings = parse_codings(content_encoding)
        self.error: str | None = None
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

    def _run(self, data: bytes, step: Callable[[_Stage, bytes], bytes]) -> bytes:
        if self.error is not None:
            return b""
        for coding, stage in self._stages:
            try:
                data = step(stage, data)
            except ValueError as e:
                self.error = f"{coding}: {e}"
                return b""
        return data

    def feed(self, raw: bytes) -> bytes:
        """Decode the next chunk of the body (bytes as they came off the wire)."""
        if not self._stages:
            return b"" if self.error else raw
        return self._run(raw, lambda stage, data: stage.feed(data))

    def finish(self) -> bytes:
        """End of the body: whatever the codecs still hold; sets :attr:`error` when a coding's
        stream did not end (a truncated body)."""
        out = self._run(b"", lambda stage, data: stage.feed(data) + stage.finish())
        if self.error is None:
            for coding, stage in self._stages:
                if not stage.complete:
                    self.error = f"{coding}: the stream ends before its frame does (truncated)"
                    break
        return out


@dataclass(frozen=True)
class DecodedBody:
    """A whole body decoded: ``data`` (all that could be decoded), ``codings`` (as applied,
    ``[]`` for a plain body) and ``error`` (``None`` when the body decoded completely)."""

    data: bytes
    codings: tuple[str, ...]
    error: str | None


def decode_body(raw: bytes, content_encoding: str | None) -> DecodedBody:
    """Decode a complete (or cut-off) body in one call; see :class:`BodyDecoder`."""
    decoder = BodyDecoder(content_encoding)
    if not decoder.encoded:
        return DecodedBody(raw, (), None)
    data = decoder.feed(raw) + decoder.finish() if raw else b""
    error = decoder.error if raw else None
    return DecodedBody(data, tuple(decoder.codings), error)
