"""Reading a recording's files in bounded memory (``compare``, ``replay``).

A recording is a CI artifact, and whoever supplies it controls its size: a 2 GB
``usage.jsonl`` read whole once took 4.86 GB of the runner that compared it (issue 30). So
every reader of a recording that someone else may have made goes through this module, which
reads each file with a cap and stops at the first file over it with a :class:`TooLarge`
naming the file, the limit and the setting it comes from:

- ``usage.jsonl`` is streamed line by line (:func:`ledger_lines`): a line of at most
  :attr:`ReadLimits.line_bytes`, the whole ledger at most :attr:`ReadLimits.ledger_bytes`, at
  most :attr:`ReadLimits.requests` lines (of at most :attr:`ReadLimits.events` events each,
  :attr:`ReadLimits.run_events` in all: ``addons.recorder.read_ledger``). A line longer than
  the cap is never held: the read stops at the cap.
- ``summary.json`` and each dump file are read whole (:func:`read_document`) only up to
  :attr:`ReadLimits.document_bytes`, and parsed only when their JSON holds at most
  :attr:`ReadLimits.values` objects, arrays and strings (an empty ``{}`` costs 64 bytes of
  Python for 3 bytes of JSON, so the byte cap alone does not bound the parse); a dump's SSE
  body is parsed only with at most :attr:`ReadLimits.events` events (:func:`check_stream`).
- A file must be a regular file (a FIFO, ``/dev/zero`` behind a symlink, a directory: refused
  before reading).

The caps are well above what the proxy writes for a CI session (a Codex turn's ledger line is
a few KB; its dump files tens of KB to a few MB), and together keep a reader's peak memory
under the bound stated in docs/recording.md ("Reading a recording in bounded memory"), measured
by ``tests/test_recording_files.py``. The recorder's own process (the supervisor merging its
workers' ledger) reads with :data:`UNBOUNDED`: the files are its own.
"""

from __future__ import annotations

import os
import stat
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any

from addons.body_decode import JsonTooDeep, loads_json

MIB = 1024 * 1024


class TooLarge(ValueError):
    """A recording's file is over a read limit (:class:`ReadLimits`); the message names the
    file and the limit."""


@dataclass(frozen=True)
class ReadLimits:
    """How much of a recording a reader takes in. ``None`` for a field: no limit.

    ``line_bytes``: one ``usage.jsonl`` line; ``ledger_bytes``: the whole ``usage.jsonl``;
    ``requests``: ledger lines, and dump pairs a replay serves; ``document_bytes``: one JSON
    file read whole (``summary.json``, a dump file); ``values``: JSON objects, arrays and
    strings in such a file (counted as its ``{``, ``[`` and unescaped ``"`` bytes, those in
    strings included: an upper bound); ``events``: events of one request (its ledger line's
    ``event_ms``, and its dump's SSE body, :func:`check_stream`); ``run_events``: ``event_ms``
    of the whole ledger (the charts draw one point each).
    """

    line_bytes: int | None = 4 * MIB
    ledger_bytes: int | None = 16 * MIB
    requests: int | None = 5000
    document_bytes: int | None = 8 * MIB
    values: int | None = 500_000
    events: int | None = 100_000
    run_events: int | None = 1_000_000


#: The limits of a recording someone else supplied (``compare``, ``replay``).
LIMITS = ReadLimits()
#: No limit: a process reading the recording it wrote itself (the workers' merge).
UNBOUNDED = ReadLimits(None, None, None, None, None, None, None)


def _size(n: int) -> str:
    return f"{n // MIB} MiB" if n % MIB == 0 else f"{n} bytes"


def open_regular(path: str | Path) -> IO[bytes]:
    """``path`` opened for reading in binary, once it is known to be a regular file (checked
    on the open descriptor, so a symlink to ``/dev/zero`` or a FIFO is refused, never read).

    Raises:
        OSError: it cannot be opened.
        ValueError: it is not a regular file.
    """
    fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC)
    try:
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            raise ValueError(f"{path}: not a regular file")
        os.set_blocking(fd, True)
        return os.fdopen(fd, "rb")
    except BaseException:
        os.close(fd)
        raise


def read_bounded(path: str | Path, limit: int | None, what: str = "file") -> bytes:
    """The bytes of the regular file ``path``, refused past ``limit`` bytes (``None``: no
    limit) after reading at most ``limit + 1`` of them.

    Raises:
        OSError: it cannot be read.
        ValueError: it is not a regular file.
        TooLarge: it is longer than ``limit``.
    """
    with open_regular(path) as f:
        data = f.read() if limit is None else f.read(limit + 1)
    if limit is not None and len(data) > limit:
        raise TooLarge(f"{path}: {what} larger than {_size(limit)} (the read limit)")
    return data


def read_document(path: str | Path, limits: ReadLimits = LIMITS) -> Any:
    """The JSON document in file ``path``, read within ``limits`` (``document_bytes``,
    ``containers``) and parsed with the JSON depth limit.

    Raises:
        OSError: it cannot be read.
        TooLarge: over a limit.
        ValueError: not a regular file, or not JSON (the message names the file).
    """
    data = read_bounded(path, limits.document_bytes, "a JSON file")
    if limits.values is not None:
        # Objects, arrays and strings (a string's quotes, less escaped ones: a hostile string
        # ending in an escaped backslash still counts half), each 50 to 100 bytes of Python.
        strings = (data.count(b'"') - data.count(b'\\"')) // 2
        if data.count(b"{") + data.count(b"[") + strings > limits.values:
            raise TooLarge(
                f"{path}: more than {limits.values} JSON objects, arrays and strings "
                "(the read limit)"
            )
    try:
        return loads_json(data)
    except JsonTooDeep as e:
        raise ValueError(f"{path}: {e}") from None
    except ValueError as e:
        raise ValueError(f"{path}: not JSON ({e})") from None


def check_stream(text: str, where: str, limits: ReadLimits = LIMITS) -> None:
    """Refuse an SSE body (a dump's decoded ``body``) before it is parsed (each parsed event
    costs a few hundred bytes of Python) when it has more than ``4 * limits.events`` line
    breaks: a Responses event takes three (``event:``, ``data:``, the blank line), so
    ``limits.events`` of them pass, and a stream of two-line events stops at twice that.

    Raises:
        TooLarge: over the limit (``where`` names the file).
    """
    if limits.events is None:
        return
    breaks = text.count("\n") + text.count("\r")
    if breaks > 4 * limits.events:
        raise TooLarge(f"{where}: an SSE body of more than {limits.events} events (the read limit)")


def ledger_lines(path: str | Path, limits: ReadLimits = LIMITS) -> Iterator[tuple[int, bytes]]:
    """``(line number, line)`` of each non-blank line of the ledger ``path``, read one line
    at a time within ``limits`` (``line_bytes``, ``ledger_bytes``, ``requests``): a line
    longer than its cap is refused after reading the cap, never held whole.

    Raises:
        OSError: it cannot be read.
        TooLarge: over a limit (the message names the line).
        ValueError: not a regular file.
    """
    total = 0
    count = 0
    with open_regular(path) as f:
        number = 0
        while True:
            cap = limits.line_bytes
            line = f.readline() if cap is None else f.readline(cap + 1)
            if not line:
                return
            number += 1
            if cap is not None and len(line) > cap:
                raise TooLarge(f"{path}: line {number} longer than {_size(cap)} (the read limit)")
            total += len(line)
            if limits.ledger_bytes is not None and total > limits.ledger_bytes:
                raise TooLarge(
                    f"{path}: larger than {_size(limits.ledger_bytes)} (the read limit), "
                    f"at line {number}"
                )
            if not line.strip():
                continue
            count += 1
            if limits.requests is not None and count > limits.requests:
                raise TooLarge(
                    f"{path}: more than {limits.requests} requests (the read limit), "
                    f"at line {number}"
                )
            yield number, line


def dump_names(
    dumps: Path, limits: ReadLimits = LIMITS, wanted: set[int] | None = None
) -> list[tuple[int, Path, Path]]:
    """``[(sequence number, request file, response file)]`` of the complete dump pairs in
    ``dumps``, by sequence number (a request without its response is left out: the proxy
    stopped before the exchange finished). ``wanted``: only these sequence numbers (compare
    reads the dumps of its ledger's lines); else at most ``limits.requests`` pairs. The
    directory is walked as a stream: a directory of millions of names is never listed whole.

    Raises:
        OSError: the directory cannot be read.
        TooLarge: more request files than ``limits.requests`` (``wanted`` unset).
    """
    found: list[tuple[int, Path, Path]] = []
    with os.scandir(dumps) as entries:
        for entry in entries:
            name = entry.name
            if not name.endswith("-request.json") or not name[:6].isdigit():
                continue
            seq = int(name[:6])
            if wanted is not None and seq not in wanted:
                continue
            response = dumps / (name.removesuffix("-request.json") + "-response.json")
            if not response.exists():
                continue
            found.append((seq, dumps / name, response))
            if wanted is None and limits.requests is not None and len(found) > limits.requests:
                raise TooLarge(f"{dumps}: more than {limits.requests} dump pairs (the read limit)")
    found.sort(key=lambda item: (item[0], item[1].name))
    return found
