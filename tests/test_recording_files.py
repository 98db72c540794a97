"""Reading a recording in bounded memory (issue 30): the read limits of
``addons/recording_files.py``, and ``compare`` / ``replay`` run as processes on hostile
recordings, generated here, with their peak RSS measured against the bound that
docs/recording.md states."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from addons.recording_files import (
    MIB,
    ReadLimits,
    TooLarge,
    check_stream,
    ledger_lines,
    open_regular,
    read_document,
)
from tests.conftest import ROOT

#: The peak RSS docs/recording.md promises for compare and replay, whatever the recording.
BOUND_MB = 300

SSE = "event: response.completed\ndata: " + json.dumps(
    {
        "type": "response.completed",
        "response": {"id": "r", "status": "completed", "usage": {"input_tokens": 10}},
    }
)


def recording(root: Path, n: int = 2, request_body: str | None = None, **line: Any) -> Path:
    """A small valid recording of ``n`` turns in ``root`` (summary, ledger, dump pairs);
    ``request_body``: every request dump's body (JSON text), ``line``: ledger fields."""
    dumps = root / "dumps"
    dumps.mkdir(parents=True)
    lines = []
    for i in range(1, n + 1):
        record = {
            "seq": i,
            "started": 1000.0 + i,
            "duration_ms": 5,
            "status": 200,
            "model": "gpt-5.5",
            "events": 1,
            "usage": {"input": 10, "output": 2, "total": 12},
            "completed": True,
            "turn_status": "completed",
            "event_ms": [1],
            **line,
        }
        lines.append(json.dumps(record) + "\n")
        body = request_body or json.dumps(
            {"model": "gpt-5.5", "stream": True, "input": [{"type": "message", "role": "user"}]}
        )
        (dumps / f"{i:06d}-1000-request.json").write_text(
            '{"method": "POST", "url": "/v1/responses", "headers": [], "body": ' + body + "}"
        )
        (dumps / f"{i:06d}-1000-response.json").write_text(
            json.dumps(
                {
                    "status": 200,
                    "headers": [{"name": "content-type", "value": "text/event-stream"}],
                    "body": SSE + "\n\n",
                }
            )
        )
    (root / "usage.jsonl").write_text("".join(lines))
    summary = {"format_version": 1, "requests": [{}] * n, "totals": {}}
    (root / "summary.json").write_text(json.dumps(summary))
    return root


#: Runs the command in its argv, then prints its peak RSS (KiB; the wrapper's only child),
#: exit code and stderr as JSON.
PEAK = (
    "import json, resource, subprocess, sys\n"
    "r = subprocess.run(sys.argv[1:], capture_output=True, stdin=subprocess.DEVNULL)\n"
    "print(json.dumps([resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss, r.returncode,"
    " r.stderr.decode(errors='replace')]))\n"
)


def peak(*args: str) -> tuple[float, int, str]:
    """``python -m args...`` as a process of its own: (peak RSS in MB, exit code, stderr)."""
    out = subprocess.run(
        [sys.executable, "-c", PEAK, sys.executable, "-m", *args],
        capture_output=True,
        cwd=ROOT,
        timeout=600,
        check=True,
    )
    rss_kib, code, err = json.loads(out.stdout)
    return rss_kib / 1024, code, err


def sparse(path: Path, size: int, head: bytes = b"") -> None:
    """``path`` made ``size`` bytes long: ``head``, then a hole (zeros, no disk, no newline)."""
    path.write_bytes(head)
    os.truncate(path, size)


# ---------------------------------------------------------------- the limits, alone


def test_a_line_longer_than_the_cap_is_refused_without_reading_it_whole(tmp_path):
    path = tmp_path / "usage.jsonl"
    sparse(path, 64 * MIB, b'{"seq": 1}\n')
    limits = ReadLimits(line_bytes=MIB)
    lines = ledger_lines(path, limits)
    assert next(lines) == (1, b'{"seq": 1}\n')
    with pytest.raises(TooLarge, match=r"usage\.jsonl: line 2 longer than 1 MiB"):
        next(lines)


@pytest.mark.parametrize(
    "limits, text, message",
    [
        (ReadLimits(ledger_bytes=20), "{}\n" * 8, r"larger than 20 bytes .*at line 7"),
        (ReadLimits(requests=3), "{}\n\n" * 4, r"more than 3 requests .*at line 7"),
    ],
)
def test_the_ledger_as_a_whole_is_capped(tmp_path, limits, text, message):
    path = tmp_path / "usage.jsonl"
    path.write_text(text)
    with pytest.raises(TooLarge, match=message):
        list(ledger_lines(path, limits))


def test_only_a_regular_file_is_read(tmp_path):
    fifo = tmp_path / "fifo"
    os.mkfifo(fifo)
    zero = tmp_path / "zero.json"
    zero.symlink_to("/dev/zero")
    for path in (fifo, zero, tmp_path):
        with pytest.raises(ValueError, match="not a regular file"):
            open_regular(path)


@pytest.mark.parametrize(
    "document, passes",
    [
        ([{}] * 9, True),
        ([{}] * 10, False),  # 11 containers
        (["ab"] * 10, False),  # 10 strings and an array
        (['a\\"b'] * 9, True),  # escaped quotes are no strings
        ('x"' * 30, True),  # one string, its quotes escaped inside
    ],
)
def test_a_document_with_too_many_values_is_refused_before_parsing(tmp_path, document, passes):
    path = tmp_path / "d.json"
    path.write_text(json.dumps(document))
    limits = ReadLimits(values=10)
    if passes:
        assert read_document(path, limits) == document
    else:
        with pytest.raises(TooLarge, match="more than 10 JSON objects, arrays and strings"):
            read_document(path, limits)


def test_a_document_over_its_byte_cap_is_refused(tmp_path):
    path = tmp_path / "summary.json"
    sparse(path, 2 * MIB)
    with pytest.raises(TooLarge, match=r"summary\.json: a JSON file larger than 1 MiB"):
        read_document(path, ReadLimits(document_bytes=MIB))


def test_an_sse_body_of_too_many_events_is_refused():
    check_stream((SSE + "\n\n") * 5, "d", ReadLimits(events=5))
    with pytest.raises(TooLarge, match="d: an SSE body of more than 5 events"):
        check_stream("data: 1\n\n" * 11, "d", ReadLimits(events=5))


# ---------------------------------------------------------------- hostile recordings, measured


@pytest.fixture(scope="module")
def good(tmp_path_factory) -> Path:
    return recording(tmp_path_factory.mktemp("good") / "rec")


def hostile(root: Path, how: str) -> tuple[Path, str]:
    """A recording made hostile in one way, and what compare and replay must say."""
    if how == "2 GiB ledger line":
        rec = recording(root)
        sparse(rec / "usage.jsonl", 2048 * MIB, (rec / "usage.jsonl").read_bytes())
        return rec, r"usage\.jsonl: line 3 longer than 4 MiB \(the read limit\)"
    if how == "2 GiB summary":
        rec = recording(root)
        sparse(rec / "summary.json", 2048 * MIB)
        return rec, r"summary\.json: a JSON file larger than 8 MiB \(the read limit\)"
    if how == "2 GiB dump":
        rec = recording(root)
        sparse(next((rec / "dumps").glob("*-response.json")), 2048 * MIB)
        return rec, r"-response\.json: a JSON file larger than 8 MiB \(the read limit\)"
    if how == "dump is /dev/zero":
        rec = recording(root)
        dump = next((rec / "dumps").glob("*-request.json"))
        dump.unlink()
        dump.symlink_to("/dev/zero")
        return rec, r"-request\.json: not a regular file"
    if how == "too many requests":
        rec = recording(root, 5001)
        return rec, r"(more than 5000 requests|more than 5000 dump pairs) \(the read limit\)"
    # Within every limit, the most a dump can cost (measured: numbers, then empty objects).
    if how == "8 MiB of numbers in a dump":
        body = json.dumps({"model": "m", "input": [10000] * (8 * MIB // 7 - 100)})
    else:
        assert how == "490 000 empty objects in a dump"
        body = json.dumps({"model": "m", "input": [{}] * 490_000})
    return recording(root, request_body=body), ""


@pytest.mark.parametrize(
    "how",
    [
        "2 GiB ledger line",
        "2 GiB summary",
        "2 GiB dump",
        "dump is /dev/zero",
        "too many requests",
        "8 MiB of numbers in a dump",
        "490 000 empty objects in a dump",
    ],
)
def test_a_hostile_recording_costs_compare_and_replay_at_most_the_bound(tmp_path, good, how):
    rec, message = hostile(tmp_path / "rec", how)
    mb, code, err = peak("addons.compare", str(good), str(rec), "--html", str(tmp_path / "c.html"))
    assert mb < BOUND_MB, f"compare: peak RSS {mb:.0f} MB"
    if message:
        assert code == 2, err
        assert f"error: NEW {rec}" in err
        assert __import__("re").search(message, err), err
    else:
        assert code in (0, 1), err
    if how == "2 GiB summary" or not message:
        return  # replay reads no summary; a costly dump it reads as compare does
    mb, code, err = peak("addons.replay", str(rec), "--port", "0")
    assert mb < BOUND_MB, f"replay: peak RSS {mb:.0f} MB"
    assert code == 2 and __import__("re").search(message, err), err
