"""``./run.sh compare BASE NEW``: judge a recording against the last good one (a CI gate).

Reads two ``--record`` directories (strict proxy or gateway) with the recording's own readers:
the ledger (:func:`addons.recorder.read_ledger`), ``summary.json`` (totals, credits, USD,
refusals), the dump pairs (:func:`addons.replay.iter_dump_pairs`: each turn's request shape and,
through :func:`addons.exchange.read_exchange`, its tool calls). It compares, run against
run: tokens by kind, credits and USD, the prompt-cache hit ratio, requests and turns, turn
outcomes (completed / incomplete / failed / cut), HTTP statuses, refusals by kind, tool calls
(names, counts, argument key sets), and timing (time to first event and duration, p50 / p95).
Codex's retries of one request are one turn (:func:`fold_retries`). Turns are aligned by order
and request shape (:func:`align`); an unmatched turn is *added* or *missing*. Every file is
read within :data:`addons.recording_files.LIMITS` (a recording is a CI artifact, its size in
another's hands); over a limit, compare stops at once with exit 2. Thresholds come from
``config/compare.yaml`` (``--set name=value`` per run).

Exit codes: 0 within thresholds, 1 a regression, 2 a recording unreadable or of an unknown
format (the message names the file and why) or a bad option.

Output: a terminal table on stdout; ``--markdown [FILE]`` (for ``$GITHUB_STEP_SUMMARY``),
``--json [FILE]``; ``compare.html`` (into NEW unless ``--html FILE``), self-contained like
``report.html``: inline CSS and SVG, no script, nothing fetched, both runs' charts side by side
on the same axes (rendered by :mod:`addons.compare_html`).
"""

from __future__ import annotations

import argparse
import hashlib
import html
import json
import math
import os
import sys
from array import array
from collections import Counter
from collections.abc import Callable, Hashable, Sequence
from dataclasses import asdict, dataclass, field
from decimal import Decimal, InvalidOperation
from pathlib import Path
from typing import Any

import yaml

from addons.compare_html import as_html
from addons.exchange import OUTCOMES, Reply, outcome, read_exchange
from addons.recorder import SUMMARY_FORMAT_VERSION, RequestRecord, read_ledger
from addons.recording_files import LIMITS, ReadLimits, TooLarge, read_document
from addons.replay import DumpPair, iter_dump_pairs, request_shape
from addons.responses_turn import USAGE_KINDS

ROOT = Path(__file__).resolve().parent.parent
DEFAULT_CONFIG = ROOT / "config" / "compare.yaml"

# Turn outcomes (addons.exchange.OUTCOMES): all but ``completed`` count against
# ``failed_turns``.

#: Threshold names and their kind: ``number`` (null: report only) or ``flag`` (true/false).
THRESHOLDS: dict[str, str] = {
    "tokens_pct": "number",
    "credits_pct": "number",
    "cache_hit_drop_points": "number",
    "requests_pct": "number",
    "failed_turns": "number",
    "new_error_status": "flag",
    "new_refusal_kind": "flag",
    "refusals_increase": "number",
    "new_tool": "flag",
    "vanished_tool": "flag",
    "tool_calls_pct": "number",
    "tool_arguments_changed": "flag",
    "turns_added": "number",
    "turns_missing": "number",
    "first_event_p50_pct": "number",
    "first_event_p95_pct": "number",
    "duration_p50_pct": "number",
    "duration_p95_pct": "number",
}


class Unreadable(Exception):
    """A recording (or the thresholds) cannot be read; the message says which file and why."""


# ---------------------------------------------------------------- thresholds


def _threshold_value(name: str, value: Any) -> Any:
    kind = THRESHOLDS.get(name)
    if kind is None:
        raise ValueError(f"unknown threshold {name!r} (known: {', '.join(THRESHOLDS)})")
    if kind == "flag":
        if not isinstance(value, bool):
            raise ValueError(f"{name}: expected true or false, got {value!r}")
        return value
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int | float) or value < 0:
        raise ValueError(f"{name}: expected a number >= 0 or null, got {value!r}")
    return value


def load_thresholds(path: str | Path, overrides: Sequence[str] = ()) -> dict[str, Any]:
    """Thresholds from the YAML file ``path`` (every name of :data:`THRESHOLDS` must be there),
    then each ``name=value`` of ``overrides`` (the value read as YAML: ``40``, ``null``,
    ``false``).

    Raises:
        Unreadable: the file cannot be read, or a name or value is wrong.
    """
    try:
        data = yaml.safe_load(Path(path).read_text(encoding="utf-8"))
    except (OSError, yaml.YAMLError) as e:
        raise Unreadable(f"thresholds {path}: {e}") from None
    if not isinstance(data, dict):
        raise Unreadable(f"thresholds {path}: not a mapping of threshold names")
    try:
        out = {str(k): _threshold_value(str(k), v) for k, v in data.items()}
        missing = [k for k in THRESHOLDS if k not in out]
        if missing:
            raise ValueError(f"missing {', '.join(missing)}")
        for spec in overrides:
            name, sep, text = spec.partition("=")
            if not sep:
                raise ValueError(f"--set {spec!r}: expected name=value")
            out[name.strip()] = _threshold_value(name.strip(), yaml.safe_load(text))
    except (ValueError, yaml.YAMLError) as e:
        raise Unreadable(f"thresholds {path}: {e}") from None
    return out


# ---------------------------------------------------------------- reading a recording


@dataclass
class RunTurn:
    """One request of a run, as compare sees it, with Codex's retries of it folded in
    (:func:`fold_retries`). ``record``: its last attempt (its outcome is the turn's);
    ``retried``: the earlier attempts, oldest first; ``shape``: the request's model, tool
    names, input item types and fields, each as a digest (:func:`shape_of`; ``None`` without
    a dump); ``calls``: ``[(tool name, sorted argument keys)]`` of the reply; ``request``: a
    digest of the request body and Codex's ``x-client-request-id``, which a retry repeats."""

    index: int
    record: RequestRecord
    shape: dict[str, Any] | None
    calls: list[tuple[str, tuple[str, ...]]] = field(default_factory=list)
    request: tuple[str, str | None] | None = None
    retried: list[RequestRecord] = field(default_factory=list)

    @property
    def outcome(self) -> str:
        return outcome_of(self.record)

    @property
    def model(self) -> str | None:
        return self.record.model

    @property
    def attempts(self) -> list[RequestRecord]:
        """Every request sent for this turn: the retried ones, then the last."""
        return [*self.retried, self.record]

    def keys(self) -> tuple[Hashable, Hashable]:
        """Alignment keys, strongest first: (model, tools, input types), then input types."""
        shape = self.shape or {}
        inputs = shape.get("input")
        return ((self.model, shape.get("tools"), inputs), inputs)


def _digest(value: Any) -> str:
    """A short digest of a JSON-able value (its canonical JSON's SHA-256, 16 hex digits)."""
    text = json.dumps(value, sort_keys=True, ensure_ascii=False, default=str)
    return hashlib.sha256(text.encode("utf-8", "surrogatepass")).hexdigest()[:16]


def shape_of(body: Any) -> dict[str, str]:
    """:func:`addons.replay.request_shape` of a request body with each part (model, stream,
    fields, input, tools) as a digest: equal exactly when the parts are, and a few bytes a
    turn however long the conversation (Codex resends all of it every turn)."""
    return {k: _digest(v) for k, v in request_shape(body).items()}


def is_retry(earlier: RunTurn, later: RunTurn) -> bool:
    """Whether ``later`` is Codex's retry of ``earlier``: ``earlier`` did not complete, and
    ``later`` sent the same request body (compared parsed: Codex 0.171 re-serialises it) with
    the same ``x-client-request-id`` (Codex keeps it across the retries of one request,
    checked with 0.171 against a 409: six requests, one id). Unknown without dumps."""
    if earlier.outcome == "completed" or earlier.request is None or later.request is None:
        return False
    (body_a, id_a), (body_b, id_b) = earlier.request, later.request
    return body_a == body_b and (id_a is None or id_b is None or id_a == id_b)


def fold_retries(turns: Sequence[RunTurn]) -> list[RunTurn]:
    """``turns`` (in order) with each retry folded into the turn it retries
    (:func:`is_retry`), renumbered from 1: six requests of one Codex turn (a first attempt
    and its five retries) are one turn with five ``retried`` attempts."""
    out: list[RunTurn] = []
    for turn in turns:
        if out and is_retry(out[-1], turn):
            last = out[-1]
            last.retried.append(last.record)
            last.record, last.calls = turn.record, turn.calls
            continue
        out.append(turn)
    for i, turn in enumerate(out, 1):
        turn.index = i
    return out


@dataclass
class Run:
    """A recording read for comparison."""

    path: str
    format_version: int
    turns: list[RunTurn]
    refused: list[dict[str, Any]]
    credits: Decimal | None
    usd: Decimal | None
    notes: list[str] = field(default_factory=list)


def outcome_of(record: RequestRecord) -> str:
    """A recorded turn's outcome, by :func:`addons.exchange.outcome`'s rules: ``completed``,
    ``incomplete``, ``failed`` or ``cut``."""
    return outcome(record.turn_status, record.completed, record.status)


def _decimal(value: Any, where: str) -> Decimal | None:
    if value is None:
        return None
    try:
        return Decimal(str(value))
    except InvalidOperation:
        raise Unreadable(f"{where}: not a number: {value!r}") from None


def _calls_of(pair: DumpPair | None) -> list[tuple[str, tuple[str, ...]]]:
    """The tool calls of a dump pair's reply, as :func:`addons.exchange.read_exchange` reads
    them."""
    if pair is None:
        return []
    response = pair.response
    status = response.get("status")
    content_type = next(
        (
            h.get("value", "")
            for h in response.get("headers") or []
            if isinstance(h, dict) and str(h.get("name", "")).lower() == "content-type"
        ),
        "",
    )
    reply = Reply(status if isinstance(status, int) else 0, content_type, response.get("body"))
    return read_exchange(pair.request.get("body"), reply).tool_calls


#: What compare keeps of a refusal in ``summary.json`` (``addons.recorder.refusal_of``).
REFUSAL_FIELDS = frozenset({"time", "method", "path", "status", "reason"})


def _scalar(value: Any) -> Any:
    """A number, ``None`` or a string of at most 200 characters (anything else as text)."""
    if value is None or isinstance(value, bool | int | float):
        return value
    return str(value)[:200]


def _request_id(pair: DumpPair) -> str | None:
    """The ``x-client-request-id`` header of a dump pair's request (``None``: none)."""
    headers = pair.request.get("headers")
    for h in headers if isinstance(headers, list) else []:
        if isinstance(h, dict) and str(h.get("name", "")).lower() == "x-client-request-id":
            value = h.get("value")
            return value[:200] if isinstance(value, str) else None
    return None


def load_run(path: str | Path, limits: ReadLimits = LIMITS) -> Run:
    """Read the recording in directory ``path``, every file within ``limits``
    (:mod:`addons.recording_files`): the ledger streamed, one dump pair at a time, only
    digests of each request kept, so memory does not grow with the files' sizes.

    Raises:
        Unreadable: not a directory or not a recording, ``summary.json`` missing, not JSON or
            of a newer format than :data:`addons.recorder.SUMMARY_FORMAT_VERSION`,
            ``usage.jsonl`` cut or disagreeing with the summary, a dump file not JSON, or a
            file over a read limit (the message names the file and the limit).
    """
    root = Path(path)
    if not root.is_dir():
        raise Unreadable(f"{root}: not a directory")
    summary_path = root / "summary.json"
    if not os.path.lexists(summary_path):
        if (root / "usage.jsonl").exists() or (root / "dumps").is_dir():
            raise Unreadable(
                f"{summary_path}: missing; the proxy writes it when it stops cleanly "
                "(GET /shutdown with --http-shutdown, or SIGINT/SIGTERM)"
            )
        raise Unreadable(f"{root}: not a recording (no summary.json, usage.jsonl or dumps/)")
    try:
        summary = read_document(summary_path, limits)
    except TooLarge as e:
        raise Unreadable(str(e)) from None
    except (OSError, ValueError) as e:
        raise Unreadable(f"{summary_path}: not readable JSON ({e})") from None
    if not isinstance(summary, dict) or not isinstance(summary.get("requests"), list):
        raise Unreadable(f"{summary_path}: not a recording summary (no requests list)")
    version = summary.get("format_version", 1)
    if not isinstance(version, int) or not 1 <= version <= SUMMARY_FORMAT_VERSION:
        raise Unreadable(
            f"{summary_path}: format version {version!r} is unknown to this compare "
            f"(it reads 1 to {SUMMARY_FORMAT_VERSION}); update the proxy"
        )
    requests = len(summary["requests"])
    totals = summary.get("totals")
    totals = totals if isinstance(totals, dict) else {}
    credits = _decimal(totals.get("credits"), f"{summary_path}: totals.credits")
    usd = _decimal(totals.get("usd"), f"{summary_path}: totals.usd")
    refused = [
        {k: _scalar(v) for k, v in r.items() if k in REFUSAL_FIELDS}
        for r in summary.get("refused") or []
        if isinstance(r, dict)
    ]
    del summary  # only the figures above are kept
    try:
        records = read_ledger(str(root), limits, keep_timing=False)
    except (OSError, ValueError) as e:
        raise Unreadable(f"{root}: {e}") from None
    if len(records) != requests:
        raise Unreadable(
            f"{root / 'usage.jsonl'}: {len(records)} line(s) but summary.json has "
            f"{requests} request(s) (a cut or mixed-up ledger)"
        )
    # A WebSocket upgrade (101) is no turn: its turns are ledger lines of their own.
    records = [r for r in records if r.status != 101]
    # Per dump pair, only its shape, tool calls and request digest are kept, a pair at a time.
    facts: dict[int, tuple[dict[str, str], Any, tuple[str, str | None] | None]] = {}
    if (root / "dumps").is_dir():
        wanted = {r.seq for r in records if isinstance(r.seq, int)}
        try:
            for pair in iter_dump_pairs(root, limits, wanted):
                body = pair.request.get("body")
                if isinstance(body, dict):
                    request = (_digest(body), _request_id(pair))
                    facts[pair.seq] = (shape_of(body), _calls_of(pair), request)
                else:
                    facts[pair.seq] = ({}, _calls_of(pair), None)
        except (OSError, ValueError) as e:
            raise Unreadable(str(e)) from None
    turns = []
    for i, record in enumerate(records, 1):
        known = facts.get(record.seq) if isinstance(record.seq, int) else None
        if known is None:
            turns.append(RunTurn(i, record, None))
        else:
            turns.append(RunTurn(i, record, known[0] or None, known[1], known[2]))
    notes = []
    if records and not facts:
        notes.append("no dumps: tool calls, request shapes and retries unknown")
    return Run(str(path), version, fold_retries(turns), refused, credits, usd, notes)


# ---------------------------------------------------------------- alignment


def _lcs(a: Sequence[Hashable], b: Sequence[Hashable]) -> list[tuple[int, int]]:
    """Index pairs of a longest common subsequence of ``a`` and ``b``. The common head and
    tail are matched directly (two runs of one client mostly agree); the rest, less the items
    only one side has, by dynamic programming, O(len * len) time and 2 bytes a cell (an
    ``array`` row per item: 50 MB for two runs of
    :attr:`addons.recording_files.ReadLimits.requests` turns, where lists of Python ints took
    36 bytes a cell)."""
    n, m = len(a), len(b)
    head = 0
    while head < n and head < m and a[head] == b[head]:
        head += 1
    tail = 0
    while tail < n - head and tail < m - head and a[n - 1 - tail] == b[m - 1 - tail]:
        tail += 1
    pairs = [(k, k) for k in range(head)]
    # Between them, only items both sides have can match: the others are left out of the
    # table (a run whose turns BASE never had costs nothing to align).
    common = set(a[head : n - tail]) & set(b[head : m - tail])
    ia = [i for i in range(head, n - tail) if a[i] in common]
    ib = [j for j in range(head, m - tail) if b[j] in common]
    a2, b2 = [a[i] for i in ia], [b[j] for j in ib]
    n2, m2 = len(a2), len(b2)
    if n2 and m2:
        code = "H" if min(n2, m2) < 65536 else "I"
        width = array(code).itemsize
        table = [array(code, bytes(width * (m2 + 1))) for _ in range(n2 + 1)]
        for i in range(n2 - 1, -1, -1):
            row, below = table[i], table[i + 1]
            ai = a2[i]
            for j in range(m2 - 1, -1, -1):
                row[j] = below[j + 1] + 1 if ai == b2[j] else max(below[j], row[j + 1])
        i = j = 0
        while i < n2 and j < m2:
            if a2[i] == b2[j]:
                pairs.append((ia[i], ib[j]))
                i, j = i + 1, j + 1
            elif table[i + 1][j] >= table[i][j + 1]:
                i += 1
            else:
                j += 1
    pairs += [(n - tail + k, m - tail + k) for k in range(tail)]
    return pairs


def align(
    base: Sequence[Sequence[Hashable]], new: Sequence[Sequence[Hashable]]
) -> list[tuple[int | None, int | None]]:
    """Pair the turns of two runs: ``[(base index or None, new index or None), ...]`` in
    order; ``(i, None)``: turn i is missing from NEW, ``(None, j)``: turn j was added.

    Each turn is given by its keys, strongest first (:meth:`RunTurn.keys`). Turns are
    matched by a longest common subsequence of the first key; between two matches, the
    unmatched stretches are matched by the next key, and so on; stretches of equal length
    left after the last key are paired in order (the same turn, its shape changed); anything
    else is added or missing. So a turn inserted into (removed from) a run is reported as
    exactly one added (missing) turn.
    """
    out: list[tuple[int | None, int | None]] = []

    def walk(bs: range, ns: range, level: int) -> None:
        if not bs or not ns or level == len(base[bs[0]]):
            if len(bs) == len(ns):
                out.extend(zip(bs, ns, strict=True))
            else:
                out.extend((i, None) for i in bs)
                out.extend((None, j) for j in ns)
            return
        matches = _lcs([base[i][level] for i in bs], [new[j][level] for j in ns])
        bi, nj = bs.start, ns.start
        for i, j in matches:
            walk(range(bi, bs.start + i), range(nj, ns.start + j), level + 1)
            out.append((bs.start + i, ns.start + j))
            bi, nj = bs.start + i + 1, ns.start + j + 1
        walk(range(bi, bs.stop), range(nj, ns.stop), level + 1)

    walk(range(len(base)), range(len(new)), 0)
    return out


# ---------------------------------------------------------------- figures


@dataclass
class Figure:
    """One compared figure. ``regression``: over its threshold; ``rule``: the threshold as
    text (empty: not gated); ``timing``: noisy by nature (excluded from the replay check)."""

    name: str
    base: Any
    new: Any
    change: str = ""
    rule: str = ""
    regression: bool = False
    timing: bool = False

    @property
    def changed(self) -> bool:
        return self.base != self.new

    @property
    def mark(self) -> str:
        """:func:`_mark`: ``REGRESSION``, ``changed`` or empty (for ``compare.html``)."""
        return _mark(self)


def _pct(base: float, new: float) -> float:
    if base == new:
        return 0.0
    return math.inf if base == 0 else (new - base) * 100.0 / base


def _pct_text(value: float) -> str:
    return "new" if math.isinf(value) else f"{value:+.1f}%"


def _increase(name: str, base: Any, new: Any, limit: float | None, timing: bool = False) -> Figure:
    """A figure gated on its relative increase: regression when over ``limit`` percent."""
    change = _pct(float(base or 0), float(new or 0))
    rule = f"+{limit:g}%" if limit is not None else ""
    over = limit is not None and change > limit
    return Figure(name, base, new, _pct_text(change), rule, over, timing)


def _count(name: str, base: int, new: int, allowed: float | None) -> Figure:
    """A count gated on how many more NEW may have."""
    rule = f"+{allowed:g}" if allowed is not None else ""
    over = allowed is not None and new - base > allowed
    return Figure(name, base, new, f"{new - base:+d}", rule, over)


def _counts_per_key(
    label: str,
    base: Counter[str],
    new: Counter[str],
    allowed: float | None,
    *,
    new_key: str,
    rule: str,
    gated: bool,
    called_out: Callable[[str], bool] = lambda _key: True,
) -> list[Figure]:
    """A :func:`_count` figure per key of either run (``label`` formatted with the key), by
    key. A key BASE never had (and ``called_out`` accepts) shows ``new_key`` as its change;
    when ``gated`` it is a regression under ``rule``, whatever its count."""
    figs = []
    for key in sorted(base.keys() | new.keys()):
        fig = _count(label.format(key), base[key], new[key], allowed)
        if not base[key] and called_out(key):
            fig.change = new_key
            if gated:
                fig.rule, fig.regression = rule, True
        figs.append(fig)
    return figs


def percentile(values: Sequence[float], p: float) -> float | None:
    """Nearest-rank percentile ``p`` (0-100) of ``values``; ``None`` when empty."""
    ordered = sorted(values)
    if not ordered:
        return None
    return ordered[max(0, math.ceil(p / 100 * len(ordered)) - 1)]


def token_kinds(*runs: Run) -> list[str]:
    """Every token kind the runs' usage holds, in :data:`USAGE_KINDS` then by name."""
    kinds = {k for run in runs for t in run.turns for r in t.attempts for k in (r.usage or {})}
    return [k for k in USAGE_KINDS if k in kinds] + sorted(kinds - set(USAGE_KINDS))


def token_totals(run: Run, kinds: Sequence[str]) -> dict[str, int]:
    """The run's tokens per kind over every request, retries included (a kind a request's
    usage lacks counts 0)."""
    records = [r for t in run.turns for r in t.attempts]
    return {k: sum(int((r.usage or {}).get(k, 0)) for r in records) for k in kinds}


def cache_hit(totals: dict[str, int]) -> float | None:
    """cached / input tokens in percent (``None`` without input tokens)."""
    return totals.get("cached", 0) * 100.0 / totals["input"] if totals.get("input") else None


def refusal_kinds(run: Run) -> Counter[str]:
    """Refused requests by kind: ``reason (status)``, e.g. ``not-allowlisted (403)``."""
    return Counter(f"{r.get('reason') or 'refused'} ({r.get('status')})" for r in run.refused)


def tool_counts(run: Run) -> tuple[Counter[str], dict[str, set[str]]]:
    """Calls per tool name, and the union of argument keys per tool name."""
    counts: Counter[str] = Counter()
    keys: dict[str, set[str]] = {}
    for turn in run.turns:
        for name, args in turn.calls:
            counts[name] += 1
            keys.setdefault(name, set()).update(args)
    return counts, keys


#: A group of figures: ``(BASE, NEW, thresholds, aligned turn pairs) -> figures``.
FigureGroup = Callable[
    [Run, Run, dict[str, Any], list[tuple[int | None, int | None]]], list[Figure]
]


def token_figures(base: Run, new: Run, th: dict[str, Any], _pairs: Any) -> list[Figure]:
    """Tokens per kind (``cached`` reported, not gated), credits and USD, cache hit ratio."""
    kinds = token_kinds(base, new)
    bt, nt = token_totals(base, kinds), token_totals(new, kinds)
    figs = [
        _increase(f"tokens {k}", bt[k], nt[k], None if k == "cached" else th["tokens_pct"])
        for k in kinds
    ]
    if base.credits is not None and new.credits is not None:
        figs.append(_increase("credits", base.credits, new.credits, th["credits_pct"]))
        # Rounded to cents' hundredths in the summary: its own change would mislead.
        figs.append(Figure("USD", base.usd, new.usd, "as credits" if base.usd != new.usd else ""))
    else:
        figs.append(Figure("credits", base.credits, new.credits, "not priced"))
    bh, nh = cache_hit(bt), cache_hit(nt)
    hit = Figure(
        "cache hit ratio %",
        None if bh is None else round(bh, 1),
        None if nh is None else round(nh, 1),
    )
    if bh is not None and nh is not None:
        hit.change = f"{nh - bh:+.1f} pt"
        limit = th["cache_hit_drop_points"]
        hit.rule = f"-{limit:g} pt" if limit is not None else ""
        hit.regression = limit is not None and bh - nh > limit
    return [*figs, hit]


def request_figures(base: Run, new: Run, th: dict[str, Any], _pairs: Any) -> list[Figure]:
    """Requests (every attempt and refusal), turns, retries (:func:`fold_retries`), outcomes,
    HTTP statuses of every attempt."""
    attempts = [sum(len(t.attempts) for t in run.turns) for run in (base, new)]
    figs = [
        _increase(
            "requests",
            attempts[0] + len(base.refused),
            attempts[1] + len(new.refused),
            th["requests_pct"],
        ),
        _count("turns", len(base.turns), len(new.turns), None),
    ]
    retries = [attempts[0] - len(base.turns), attempts[1] - len(new.turns)]
    if any(retries):
        figs.append(_count("retries", retries[0], retries[1], None))
    bo, no = Counter(t.outcome for t in base.turns), Counter(t.outcome for t in new.turns)
    for kind in OUTCOMES:
        if bo[kind] or no[kind]:
            allowed = None if kind == "completed" else th["failed_turns"]
            figs.append(_count(f"turns {kind}", bo[kind], no[kind], allowed))
    bs = Counter(str(r.status) for t in base.turns for r in t.attempts)
    ns = Counter(str(r.status) for t in new.turns for r in t.attempts)
    return figs + _counts_per_key(
        "HTTP {}",
        bs,
        ns,
        None,
        new_key="new status",
        rule="new error status",
        gated=th["new_error_status"],
        called_out=lambda status: status.isdigit() and int(status) >= 400,
    )


def refusal_figures(base: Run, new: Run, th: dict[str, Any], _pairs: Any) -> list[Figure]:
    """Refused requests per kind; a kind BASE never had is called out."""
    return _counts_per_key(
        "refusals {}",
        refusal_kinds(base),
        refusal_kinds(new),
        th["refusals_increase"],
        new_key="new kind",
        rule="new kind",
        gated=th["new_refusal_kind"],
    )


def tool_figures(base: Run, new: Run, th: dict[str, Any], _pairs: Any) -> list[Figure]:
    """Calls per tool (new and vanished tools called out) and each tool's argument key set."""
    figs = []
    (bc, bk), (nc, nk) = tool_counts(base), tool_counts(new)
    for name in sorted(bc.keys() | nc.keys()):
        fig = _increase(f"tool {name} calls", bc[name], nc[name], th["tool_calls_pct"])
        if not bc[name] or not nc[name]:
            flag = "new_tool" if not bc[name] else "vanished_tool"
            fig.change = "new tool" if not bc[name] else "vanished"
            fig.rule = flag.replace("_", " ") if th[flag] else ""
            fig.regression = th[flag]
        figs.append(fig)
        if bc[name] and nc[name]:
            old_keys, new_keys = sorted(bk[name]), sorted(nk[name])
            fig = Figure(f"tool {name} argument keys", ",".join(old_keys), ",".join(new_keys))
            if old_keys != new_keys:
                fig.change = " ".join(
                    [f"+{k}" for k in new_keys if k not in old_keys]
                    + [f"-{k}" for k in old_keys if k not in new_keys]
                )
                fig.rule = "changed" if th["tool_arguments_changed"] else ""
                fig.regression = th["tool_arguments_changed"]
            figs.append(fig)
    return figs


def alignment_figures(
    _base: Run, _new: Run, th: dict[str, Any], pairs: list[tuple[int | None, int | None]]
) -> list[Figure]:
    """Turns added to / missing from NEW (:func:`align`)."""
    added = sum(1 for i, _ in pairs if i is None)
    missing = sum(1 for _, j in pairs if j is None)
    return [
        _count("turns added", 0, added, th["turns_added"]),
        _count("turns missing", 0, missing, th["turns_missing"]),
    ]


def timing_figures(base: Run, new: Run, th: dict[str, Any], _pairs: Any) -> list[Figure]:
    """Time to first event and duration of the turns (ms), p50 and p95."""
    figs = []
    for label, attr in (("first event", "first_event_ms"), ("duration", "duration_ms")):
        bv, nv = (
            [v for t in run.turns if (v := getattr(t.record, attr)) is not None]
            for run in (base, new)
        )
        for p in (50, 95):
            a, b = percentile(bv, p), percentile(nv, p)
            limit = th[f"{label.replace(' ', '_')}_p{p}_pct"]
            if a is None or b is None:
                figs.append(Figure(f"{label} p{p} ms", a, b, "", "", False, True))
            else:
                figs.append(_increase(f"{label} p{p} ms", a, b, limit, True))
    return figs


#: The figures of a comparison, in the order shown.
FIGURE_GROUPS: tuple[FigureGroup, ...] = (
    token_figures,
    request_figures,
    refusal_figures,
    tool_figures,
    alignment_figures,
    timing_figures,
)


def run_figures(
    base: Run, new: Run, th: dict[str, Any], pairs: list[tuple[int | None, int | None]]
) -> list[Figure]:
    """Every run-level figure of the comparison (:data:`FIGURE_GROUPS`), gated by ``th``."""
    return [fig for group in FIGURE_GROUPS for fig in group(base, new, th, pairs)]


@dataclass
class TurnRow:
    """One line of the turn table: a matched pair, an added or a missing turn."""

    base: int | None
    new: int | None
    model: str
    outcome: str
    tokens: str
    tools: str
    note: str


def _tools_text(turn: RunTurn | None) -> str:
    if turn is None:
        return ""
    counts = Counter(name for name, _ in turn.calls)
    return ",".join(f"{n}x{c}" if c > 1 else n for n, c in sorted(counts.items()))


def turn_rows(base: Run, new: Run, pairs: list[tuple[int | None, int | None]]) -> list[TurnRow]:
    """The turn table: per aligned pair, model, outcome, total tokens and tool calls in BASE
    → NEW, and what differs (added, missing, shape, outcome, tools, tokens)."""
    rows = []
    for i, j in pairs:
        a = base.turns[i] if i is not None else None
        b = new.turns[j] if j is not None else None

        def both(get: Callable[[RunTurn], Any], a: Any = a, b: Any = b) -> str:
            x = "" if a is None else str(get(a))
            y = "" if b is None else str(get(b))
            return x if x == y else f"{x or '-'} → {y or '-'}"

        notes = []
        if a is None:
            notes.append("added")
        elif b is None:
            notes.append("missing")
        for label, turn in (("BASE", a), ("NEW", b)):
            if turn is not None and turn.retried:
                notes.append(
                    f"{label}: {len(turn.retried)} retr{'y' if len(turn.retried) == 1 else 'ies'}"
                )
        if a is not None and b is not None:
            if a.keys() != b.keys():
                diffs = [
                    k
                    for k in ("model", "tools", "input")
                    if (a.shape or {}).get(k) != (b.shape or {}).get(k)
                ]
                notes.append("shape differs: " + ", ".join(diffs or ["model"]))
            if a.outcome != b.outcome:
                notes.append(f"outcome {a.outcome} → {b.outcome}")
            if _tools_text(a) != _tools_text(b):
                notes.append("tool calls differ")
            totals = [(t.record.usage or {}).get("total", 0) for t in (a, b)]
            if totals[0] != totals[1]:
                notes.append(f"tokens {_pct_text(_pct(totals[0], totals[1]))}")
        rows.append(
            TurnRow(
                None if i is None else i + 1,
                None if j is None else j + 1,
                both(lambda t: t.model or "-"),
                both(lambda t: t.outcome),
                both(lambda t: (t.record.usage or {}).get("total", 0)),
                both(_tools_text),
                "; ".join(notes),
            )
        )
    return rows


@dataclass
class Comparison:
    """The whole verdict: figures, turn table, thresholds used, exit code (0 or 1)."""

    base: Run
    new: Run
    figures: list[Figure]
    turns: list[TurnRow]
    thresholds: dict[str, Any]

    @property
    def regressions(self) -> list[Figure]:
        return [f for f in self.figures if f.regression]

    @property
    def exit_code(self) -> int:
        return 1 if self.regressions else 0

    @property
    def verdict(self) -> str:
        n = len(self.regressions)
        if not n:
            return "PASS: no figure over its threshold"
        return f"REGRESSION: {n} figure(s) over threshold: " + "; ".join(
            f"{f.name}: {f.change}" if f.change == f.rule else f"{f.name} {f.change} (> {f.rule})"
            for f in self.regressions
        )


def compare(base: Run, new: Run, thresholds: dict[str, Any]) -> Comparison:
    """Compare two read recordings (:func:`load_run`) under ``thresholds``."""
    pairs = align([t.keys() for t in base.turns], [t.keys() for t in new.turns])
    return Comparison(
        base,
        new,
        run_figures(base, new, thresholds, pairs),
        turn_rows(base, new, pairs),
        thresholds,
    )


# ---------------------------------------------------------------- output


def _cell(value: Any) -> str:
    return "-" if value is None or value == "" else str(value)


def _mark(f: Figure) -> str:
    """``REGRESSION``; ``changed`` (not for an ungated timing figure: timing always moves)."""
    if f.regression:
        return "REGRESSION"
    return "changed" if f.changed and not (f.timing and not f.rule) else ""


def as_text(c: Comparison) -> str:
    """The terminal table: the verdict first, then every figure, then the turns."""
    lines = [c.verdict, f"BASE {c.base.path}", f"NEW  {c.new.path}", ""]
    rows = [("figure", "BASE", "NEW", "change", "threshold", "")] + [
        (f.name, _cell(f.base), _cell(f.new), f.change, f.rule, _mark(f)) for f in c.figures
    ]
    widths = [max(len(r[i]) for r in rows) for i in range(6)]
    for r in rows:
        lines.append("  ".join(x.ljust(w) for x, w in zip(r, widths, strict=True)).rstrip())
    lines += ["", "turns (BASE # / NEW #): model, outcome, total tokens, tool calls"]
    for t in c.turns:
        lines.append(
            f"  {_cell(t.base):>4} {_cell(t.new):>4}  {t.model}  {t.outcome}  {t.tokens}  "
            f"{t.tools or '-'}  {t.note}".rstrip()
        )
    for run, label in ((c.base, "BASE"), (c.new, "NEW")):
        lines += [f"{label}: {n}" for n in run.notes]
    return "\n".join(lines) + "\n"


#: Characters a Markdown table cell quotes with a backslash: GitHub-flavoured Markdown's code,
#: emphasis, link, strikethrough and cell syntax (``_`` only at a word's edge, where it could
#: open emphasis; ``#``, ``-``, ``+`` mean something only at a line's start, never in a cell).
MD_PUNCTUATION = frozenset("\\`*[]|~")
#: The longest value a Markdown cell quotes (the rest becomes "…"; a step summary holds 1 MiB).
MD_MAX_CHARS = 200


def _md(value: Any) -> str:
    """A value quoted into a Markdown table cell as text: HTML-escaped (a model named
    ``<img src=x onerror=…>`` or ``<script>`` shows as written, never as HTML), Markdown
    punctuation and ``|`` backslash-escaped (the table keeps its columns), line breaks as
    spaces, autolinks broken (``://`` and ``www.`` with an entity), at most
    :data:`MD_MAX_CHARS` characters."""
    text = _cell(value)
    if len(text) > MD_MAX_CHARS:
        text = text[:MD_MAX_CHARS] + "…"
    text = " ".join(text.splitlines())
    out = []
    for i, c in enumerate(text):
        inner = 0 < i < len(text) - 1 and text[i - 1].isalnum() and text[i + 1].isalnum()
        out.append("\\" + c if c in MD_PUNCTUATION or (c == "_" and not inner) else c)
    text = html.escape("".join(out), quote=True)
    return text.replace("://", "&#58;//").replace("www.", "www&#46;")


def as_markdown(c: Comparison) -> str:
    """Markdown for ``$GITHUB_STEP_SUMMARY``: the verdict, the regressions, every figure,
    the turns (folded)."""
    icon = "❌" if c.exit_code else "✅"
    out = [f"### {icon} Codex recording compare: {_md(c.verdict)}", ""]
    out += [f"BASE {_md(c.base.path)} · NEW {_md(c.new.path)}", ""]
    out += ["| figure | BASE | NEW | change | threshold | |", "|---|--:|--:|--:|--:|---|"]
    ordered = c.regressions + [f for f in c.figures if not f.regression]
    for f in ordered:
        mark = "**REGRESSION**" if f.regression else _mark(f)
        out.append(
            f"| {_md(f.name)} | {_md(f.base)} | {_md(f.new)} | {_md(f.change)} | "
            f"{_md(f.rule)} | {mark} |"
        )
    out += ["", "<details><summary>Turns</summary>", ""]
    out += ["| BASE # | NEW # | model | outcome | tokens | tools | note |"]
    out += ["|--:|--:|---|---|--:|---|---|"]
    for t in c.turns:
        out.append(
            f"| {_md(t.base)} | {_md(t.new)} | {_md(t.model)} | {_md(t.outcome)} | "
            f"{_md(t.tokens)} | {_md(t.tools)} | {_md(t.note)} |"
        )
    out += ["", "</details>", ""]
    return "\n".join(out)


def as_json(c: Comparison) -> dict[str, Any]:
    """The comparison for tools: ``{"exit_code", "verdict", "base", "new", "figures": [{name,
    base, new, change, threshold, regression, changed, timing}], "turns": [...],
    "thresholds"}``."""

    def plain(v: Any) -> Any:
        return str(v) if isinstance(v, Decimal) else v

    return {
        "exit_code": c.exit_code,
        "verdict": c.verdict,
        "base": {"path": c.base.path, "format_version": c.base.format_version},
        "new": {"path": c.new.path, "format_version": c.new.format_version},
        "figures": [
            {
                "name": f.name,
                "base": plain(f.base),
                "new": plain(f.new),
                "change": f.change,
                "threshold": f.rule,
                "regression": f.regression,
                "changed": f.changed,
                "timing": f.timing,
            }
            for f in c.figures
        ],
        "turns": [asdict(t) for t in c.turns],
        "thresholds": c.thresholds,
    }


# ---------------------------------------------------------------- command line


def _write(target: str, text: str, append: bool = False) -> None:
    """``text`` to stdout (``-``) or into ``target``; a file compare creates is mode 0600, like
    the recording it lands in (``compare.html`` goes into NEW). Raises ``OSError``."""
    if target == "-":
        sys.stdout.write(text)
    else:
        flags = os.O_WRONLY | os.O_CREAT | os.O_CLOEXEC | (os.O_APPEND if append else os.O_TRUNC)
        with os.fdopen(os.open(target, flags, 0o600), "w", encoding="utf-8") as f:
            f.write(text)


def main(argv: Sequence[str] | None = None) -> int:
    """``compare BASE NEW [--config F] [--set name=value]... [--markdown [FILE]] [--json
    [FILE]] [--html FILE]``; returns the exit code (0 pass, 1 regression, 2 unreadable)."""
    from addons.invocation import prog

    parser = argparse.ArgumentParser(
        prog=prog("compare"),
        description="Compare a recording (NEW) with the last good one (BASE). Exit 0 within "
        "the thresholds, 1 on a regression, 2 when a recording cannot be read.",
    )
    parser.add_argument("base", help="the last good recording (a --record directory)")
    parser.add_argument("new", help="the recording to judge")
    parser.add_argument("--config", default=str(DEFAULT_CONFIG), help="thresholds (YAML)")
    parser.add_argument(
        "--set", action="append", default=[], metavar="NAME=VALUE", help="override a threshold"
    )
    parser.add_argument(
        "--markdown",
        nargs="?",
        const="-",
        metavar="FILE",
        help="Markdown on stdout in place of the table, or appended to FILE "
        '(--markdown "$GITHUB_STEP_SUMMARY")',
    )
    parser.add_argument(
        "--json", nargs="?", const="-", metavar="FILE", help="JSON on stdout, or into FILE"
    )
    parser.add_argument(
        "--html", metavar="FILE", help="where compare.html goes (default: NEW/compare.html)"
    )
    ns = parser.parse_args(argv)
    try:
        thresholds = load_thresholds(ns.config, ns.set)
        runs = []
        for label, path in (("BASE", ns.base), ("NEW", ns.new)):
            try:
                runs.append(load_run(path))
            except Unreadable as e:
                raise Unreadable(f"{label} {e}") from None
    except Unreadable as e:
        sys.stderr.write(f"{parser.prog}: error: {e}\n")
        return 2
    result = compare(runs[0], runs[1], thresholds)
    page = ns.html or os.path.join(ns.new, "compare.html")
    try:
        if ns.markdown != "-" and ns.json != "-":
            sys.stdout.write(as_text(result))
        if ns.markdown:
            _write(ns.markdown, as_markdown(result), append=True)
        if ns.json:
            _write(ns.json, json.dumps(as_json(result), indent=2, ensure_ascii=False) + "\n")
        _write(page, as_html(result))
    except OSError as e:
        sys.stderr.write(f"{parser.prog}: error: cannot write the comparison: {e}\n")
        return 2
    return result.exit_code


if __name__ == "__main__":
    sys.exit(main())
