"""``report.html`` of a ``--record`` session: one self-contained page, readable as a CI artifact.

No network, no script, no CDN: inline CSS and SVG only (the charts: :mod:`addons.charts`, with
axes, ticks and units), so it opens from a downloaded artifact and shows the same everywhere.
Contents: the session's totals; one row per forwarded request (its dump pair's links first, then
time, model, status, tokens by kind, duration, time to first event); a chart of tokens per
turn; a chart of event arrival over time per stream; every request the client got no 2xx for
(:func:`refusals`: the proxy's own refusals and the upstream's error answers, such as a
replay's 409 mismatches). Tables fit a 1 400 px window or scroll inside their own box.
Everything shown is already redacted data (the ledger, the summary, dump file names, the error
message of a dump's reply); every value is HTML-escaped.
"""

from __future__ import annotations

import html
import json
import os
import time
from collections.abc import Iterable, Sequence
from typing import Any

from addons.charts import CHART_CSS, Scale, arrival_chart, tokens_chart
from addons.responses_turn import USAGE_KINDS

#: Longest error message quoted from a reply's dump (characters).
REASON_CHARS = 300
#: Largest response dump read for its error message (bytes; error replies are small).
REASON_DUMP_BYTES = 256 * 1024

CSS = (
    """
body{font:14px/1.4 system-ui,-apple-system,Segoe UI,Roboto,sans-serif;margin:24px;color:#111;
max-width:1352px}
h1{font-size:20px;margin:0 0 4px}h2{font-size:16px;margin:28px 0 8px}
.muted{color:#555}.box{overflow-x:auto;max-width:100%}table{border-collapse:collapse;margin:6px 0}
th,td{border:1px solid #ddd;padding:4px 8px;text-align:right;white-space:nowrap}
th{background:#f3f4f6;white-space:normal;vertical-align:bottom}td.l,th.l{text-align:left}
tr.fail td{background:#fef2f2}
td.w{white-space:normal;overflow-wrap:anywhere;min-width:8em;max-width:28em}
.totals td{font-weight:600}.nw{white-space:nowrap}
"""
    + CHART_CSS
)


def _e(value: Any) -> str:
    return html.escape("" if value is None else str(value), quote=True)


def _when(unix: float | None) -> str:
    if not unix:
        return "-"
    return (
        time.strftime("%Y-%m-%d %H:%M:%S", time.gmtime(unix)) + f".{int(unix * 1000) % 1000:03d}Z"
    )


def _clock(unix: float | None, day: str) -> str:
    """``HH:MM:SS.mmm`` of ``unix``, with its date when not ``day`` (``YYYY-MM-DD``)."""
    full = _when(unix)
    return full[11:-1] if full.startswith(day) else full


def _dash(value: Any) -> Any:
    return "-" if value is None else value


def _credits(r: dict[str, Any], priced: bool) -> str:
    if r.get("credits") is None:
        return "unpriced" if priced and r.get("usage") else "-"
    fast = " (fast x2)" if r.get("service_tier") == "priority" else ""
    return f"{r['credits']}{fast}"


def is_refusal(status: Any) -> bool:
    """Whether a client that got ``status`` (``None``: no reply) was refused: anything but a
    2xx answer or a 1xx (a WebSocket's 101 is its upgrade going through)."""
    return not isinstance(status, int) or not 100 <= status < 300


def reply_reasons(
    record_dir: str, links: dict[int, tuple[str, str]], seqs: Iterable[int | None]
) -> dict[int, str]:
    """``{seq: "code: message"}`` from the error replies' response dumps (``links``: as
    :func:`addons.recorder.dump_links`, relative to ``record_dir``), e.g. a replay's
    ``replay_mismatch: request 3 differs from recorded exchange 000003: ...``; a dump missing,
    too large (over :data:`REASON_DUMP_BYTES`) or without a JSON error is left out. Never
    raises for an unreadable file."""
    out = {}
    for seq in seqs:
        if seq not in links:
            continue
        path = os.path.join(record_dir, links[seq][1])
        try:
            if os.path.getsize(path) > REASON_DUMP_BYTES:
                continue
            with open(path, encoding="utf-8") as f:
                body = json.load(f).get("body")
        except (OSError, ValueError, AttributeError):
            continue
        error = body.get("error") if isinstance(body, dict) else None
        if isinstance(error, dict):
            error = ": ".join(str(error[k]) for k in ("code", "message") if error.get(k))
        if isinstance(error, str) and error:
            out[seq] = error if len(error) <= REASON_CHARS else error[: REASON_CHARS - 1] + "…"
    return out


def refusals(
    summary: dict[str, Any],
    refused: Sequence[dict[str, Any]],
    reasons: dict[int, str] | None = None,
) -> list[dict[str, Any]]:
    """Every request the client got no 2xx for, by time: the proxy's own refusals
    (``refused``: ``{"time", "method", "path", "status", "reason"}``, e.g. the allowlist's
    403, a WebSocket upgrade's 426, the gateway's 401/403/429) with ``"by": "proxy"``, then
    each forwarded request of ``summary`` whose answer :func:`is_refusal` (an upstream error,
    a replay's 409 mismatch, no reply at all) with ``"by": "upstream"``, its ``seq`` and its
    reason: the reply's error message from ``reasons`` (:func:`reply_reasons`), else the
    exchange's error, else ``"answered <status>"``. A request in both lists (the same
    start time and status) is listed once, as the proxy's."""
    out = [{**x, "by": "proxy"} for x in refused]
    # A flow refused by the proxy after it was allowlisted (workload identity unavailable) is
    # a ledger line too: the same request start and status, listed once.
    local = {(x.get("time"), x.get("status")) for x in refused}
    for r in summary.get("requests", []):
        status = r.get("status")
        if not is_refusal(status) or (r.get("started"), status) in local:
            continue
        seq = r.get("seq")
        reason = (reasons or {}).get(seq) if isinstance(seq, int) else None
        socket = r.get("transport") == "websocket"
        out.append(
            {
                "time": r.get("started"),
                "method": "WebSocket turn" if socket else "POST",
                "path": "/v1/responses",
                "status": status,
                "reason": reason or r.get("error") or f"answered {status}",
                "by": "upstream" if status is not None else "no reply",
                "seq": seq,
            }
        )
    out.sort(key=lambda x: x.get("time") or 0)
    return out


def _dump_cell(seq: Any, links: dict[int, tuple[str, str]]) -> str:
    pair = links.get(seq) if isinstance(seq, int) else None
    if not pair:
        return "-"
    return f'<a href="{_e(pair[0])}">request</a> · <a href="{_e(pair[1])}">response</a>'


def _box(table: str) -> str:
    """A table in a box that scrolls sideways when it is wider than the page."""
    return f'<div class="box">{table}</div>'


def render_report(
    summary: dict[str, Any],
    refused: Sequence[dict[str, Any]] = (),
    dump_links: dict[int, tuple[str, str]] | None = None,
    title: str = "Codex session",
    reasons: dict[int, str] | None = None,
) -> str:
    """The whole HTML page.

    ``summary`` is :func:`addons.recorder.summarize`'s ``{"requests": [...], "totals": {...}}``
    with each request's ``event_ms`` kept; ``refused`` holds the proxy's own refusals,
    ``{"time", "method", "path", "status", "reason"}``; ``dump_links`` maps a dump sequence
    number to the (request, response) file paths, relative to the report; ``reasons`` maps a
    sequence number to its error reply's message (:func:`reply_reasons`).
    """
    links = dump_links or {}
    t = summary.get("totals", {})
    requests = summary.get("requests", [])
    day = _when(min((r.get("started") or 0 for r in requests), default=0) or time.time())[:10]
    time_head = f"time (UTC)<br><span class=nw>{day}</span>"
    kinds = USAGE_KINDS
    head = "".join(f"<th>{k}</th>" for k in kinds)
    totals_row = "".join(f"<td>{_e(t.get(k, 0))}</td>" for k in kinds)
    priced = t.get("credits") is not None
    rows = []
    for r in requests:
        u = r.get("usage") or {}
        seq = r.get("seq")
        status = f"{_e(r.get('status') or '-')} {_e(r.get('turn_status') or '')}".strip()
        if r.get("transport") == "websocket":
            status += " · WebSocket turn"
        if r.get("error"):
            status += f" ({_e(r['error'])})"
        failed = r.get("failed")
        rows.append(
            f'<tr class="{"fail" if failed else ""}"><td>{_e(seq or "-")}</td>'
            f'<td class="l dumps">{_dump_cell(seq, links)}</td>'
            f'<td class="l">{_clock(r.get("started"), day)}</td>'
            f'<td class="l w">{_e(r.get("model"))}</td><td class="l w">{status}</td>'
            + "".join(f"<td>{_e(u.get(k, '-'))}</td>" for k in kinds)
            + f"<td>{_e(_dash(r.get('duration_ms')))}</td>"
            f"<td>{_e(_dash(r.get('first_event_ms')))}</td><td>{_e(r.get('events'))}</td>"
            f"<td>{_e(_credits(r, priced))}</td></tr>"
        )
    refusal_list = refusals(summary, refused, reasons)
    refused_rows = "".join(
        f'<tr><td class="l">{_clock(x.get("time"), day)}</td><td>{_e(x.get("seq") or "-")}</td>'
        f'<td class="l">{_e(x.get("by"))}</td>'
        f'<td class="l">{_e(x.get("method"))} {_e(x.get("path"))}</td>'
        f'<td>{_e(x.get("status") or "-")}</td><td class="l w">{_e(x.get("reason"))}</td>'
        f'<td class="l dumps">{_dump_cell(x.get("seq"), links)}</td></tr>'
        for x in refusal_list
    )
    refused_html = (
        _box(
            f"<table class=refused><tr><th class=l>{time_head}</th><th>#</th>"
            "<th class=l>answered by</th><th class=l>request</th><th>status</th>"
            f"<th class=l>reason</th><th class=l>dumps</th></tr>{refused_rows}</table>"
        )
        if refusal_list
        else '<p class="muted">None: every request got a 2xx answer.</p>'
    )
    unpriced = (
        f'<p class="muted">{_e(t["unpriced"])} request(s) unpriced: their model is not on the '
        "rate card (config/codex-rate-card.yaml).</p>"
        if t.get("unpriced") and t.get("credits") is not None
        else ""
    )
    scale = Scale.of(requests)
    return (
        "<!doctype html><html lang=en><head><meta charset=utf-8>"
        f"<title>{_e(title)}</title><style>{CSS}</style></head><body>"
        f"<h1>{_e(title)}</h1><div class=muted>codex-responses-api-proxy recording, "
        f"written {_when(time.time())}</div>"
        "<h2>Totals</h2>"
        + _box(
            "<table class=totals><tr><th>requests</th><th>failed</th><th>refused</th>"
            f"<th>events</th>{head}<th>credits</th><th>USD</th></tr>"
            f"<tr><td>{_e(t.get('requests', 0))}</td><td>{_e(t.get('failed', 0))}</td>"
            f"<td>{len(refusal_list)}</td><td>{_e(t.get('events', 0))}</td>{totals_row}"
            f"<td>{_e(t.get('credits') or '-')}</td><td>{_e(t.get('usd') or '-')}</td></tr>"
            "</table>"
        )
        + f"{unpriced}<h2>Requests</h2>"
        + _box(
            "<table class=requests><tr><th>#</th><th class=l>dumps</th>"
            f"<th class=l>{time_head}</th><th class=l>model</th><th class=l>status</th>"
            f"{head}<th>ms</th><th>first event ms</th><th>events</th><th>credits</th></tr>"
            f"{''.join(rows)}</table>"
        )
        + "<h2>Tokens per turn</h2>"
        + tokens_chart(requests, scale, x_title="request # (dump sequence)")
        + "<h2>Event arrival per stream</h2>"
        + arrival_chart(requests, scale)
        + f"<h2>Refused requests</h2>{refused_html}"
        + "</body></html>\n"
    )
