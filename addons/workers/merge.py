"""One recording from N workers, made by the supervisor at exit.

Workers share the recording directory: each appends its ``usage.jsonl`` lines (one
``write(2)`` per line, ``O_APPEND``, so lines never interleave) and refusals (``.refused.jsonl``),
and writes its own ``flows-<i>.mitm`` and ``session-<i>.har``. This module turns that into what a
single process leaves: ``flows.mitm`` (the flow files concatenated: mitmproxy reads a
concatenation of flow streams as one), ``session.har`` (the entries of every HAR, by start time),
and ``summary.json`` / ``summary.txt`` / ``report.html`` from the one ledger.
"""

from __future__ import annotations

import glob
import json
import logging
import os
import re
from typing import IO, Any

from addons.credits import RateCard, load_rate_card
from addons.recorder import REFUSED_PART, read_ledger, write_summary
from addons.recording_files import UNBOUNDED

logger = logging.getLogger(__name__)


def _by_index(paths: list[str]) -> list[str]:
    def index(path: str) -> int:
        match = re.search(r"-(\d+)\.[a-z]+$", path)
        return int(match.group(1)) if match else 0

    return sorted(paths, key=index)


def _private(path: str, mode: str) -> IO[Any]:
    """``path`` opened for writing (truncated), mode 0600 like every file of a recording
    (it holds the session's prompts and replies), whatever the umask or an older file's mode."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o600)
    os.fchmod(fd, 0o600)
    return os.fdopen(fd, mode, encoding=None if "b" in mode else "utf-8")


def merge_flows(directory: str) -> None:
    """``flows-<i>.mitm`` → ``flows.mitm`` (concatenated), parts removed."""
    parts = _by_index(glob.glob(os.path.join(directory, "flows-*.mitm")))
    if not parts:
        return
    with _private(os.path.join(directory, "flows.mitm"), "wb") as out:
        for part in parts:
            with open(part, "rb") as f:
                out.write(f.read())
    for part in parts:
        os.unlink(part)


def merge_har(directory: str) -> None:
    """``session-<i>.har`` → ``session.har`` (every entry, by start time), parts removed."""
    parts = _by_index(glob.glob(os.path.join(directory, "session-*.har")))
    if not parts:
        return
    merged: dict[str, Any] | None = None
    entries: list[Any] = []
    for part in parts:
        with open(part, encoding="utf-8") as f:
            doc = json.load(f)
        merged = merged or doc
        entries += doc.get("log", {}).get("entries", [])
    assert merged is not None
    entries.sort(key=lambda e: e.get("startedDateTime", ""))
    merged.setdefault("log", {})["entries"] = entries
    with _private(os.path.join(directory, "session.har"), "w") as f:
        json.dump(merged, f, indent=4)
    for part in parts:
        os.unlink(part)


def merge_recording(
    directory: str, workers: int, rate_card: str | None = None, dump_dir: str = ""
) -> None:
    """Make ``directory`` what a single-process recording would be (see the module
    docstring). ``rate_card``: the card's path, to total USD as the recorder would.

    Raises:
        OSError / ValueError: a part cannot be read or the result written.
    """
    merge_flows(directory)
    merge_har(directory)
    refused: list[dict[str, Any]] = []
    path = os.path.join(directory, REFUSED_PART)
    if os.path.exists(path):
        with open(path, encoding="utf-8") as f:
            refused = [json.loads(line) for line in f if line.strip()]
    card: RateCard | None = load_rate_card(rate_card) if rate_card else None
    write_summary(directory, read_ledger(directory, UNBOUNDED), refused, card, dump_dir)
    if os.path.exists(path):
        os.unlink(path)
    logger.info("recording of %d workers merged in %s", workers, directory)
