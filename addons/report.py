"""``report.html`` of a ``--record`` session: one self-contained page, readable as a CI artifact.

No network, no script, no CDN: inline CSS and SVG only, so it opens from a downloaded artifact
and shows the same everywhere. Contents: the session's totals; one row per forwarded request
(time, model, status, tokens by kind, duration, time to first event, links to its dump pair);
a chart of tokens per turn; a chart of event arrival over time per stream; the refused requests
with their reason. Everything shown is already redacted data (the ledger, the summary, dump
file names); every value is HTML-escaped.
"""

from __future__ import annotations

import html
import time
from collections.abc import Sequence
from typing import Any

from addons.responses_turn import USAGE_KINDS

#: Stream colours (chart lines, legend), cycled.
PALETTE = ("#2563eb", "#dc2626", "#16a34a", "#9333ea", "#ea580c", "#0891b2", "#4b5563")
TOKEN_COLOURS = {"input": "#93c5fd", "cached": "#2563eb", "output": "#f59e0b"}

CSS = """
body{font:14px/1.4 system-ui,-apple-system,Segoe UI,Roboto,sans-serif;margin:24px;color:#111}
h1{font-size:20px;margin:0 0 4px}h2{font-size:16px;margin:28px 0 8px}
.muted{color:#555}table{border-collapse:collapse;margin:6px 0}
th,td{border:1px solid #ddd;padding:4px 8px;text-align:right;white-space:nowrap}
th{background:#f3f4f6}td.l,th.l{text-align:left}tr.fail td{background:#fef2f2}
.totals td{font-weight:600}.swatch{display:inline-block;width:10px;height:10px;margin:0 4px}
svg{background:#fff;border:1px solid #ddd}
"""


def _e(value: Any) -> str:
    return html.escape("" if value is None else str(value), quote=True)


def _when(unix: float | None) -> str:
    if not unix:
        return "-"
    return (
        time.strftime("%Y-%m-%d %H:%M:%S", time.gmtime(unix)) + f".{int(unix * 1000) % 1000:03d}Z"
    )


def _credits(r: dict[str, Any], priced: bool) -> str:
    if r.get("credits") is None:
        return "unpriced" if priced and r.get("usage") else "-"
    fast = " (fast x2)" if r.get("service_tier") == "priority" else ""
    return f"{r['credits']}{fast}"


def chart_scale(requests: Sequence[dict[str, Any]]) -> tuple[int, int, int]:
    """``(most tokens in a turn, longest stream in ms, most events in a stream)`` of
    ``requests``, each at least 1: the axes of :func:`tokens_chart` and :func:`arrival_chart`
    (the max of two runs' scales puts their charts on the same axes)."""
    tokens = [(r.get("usage") or {}) for r in requests]
    streams = [r.get("event_ms") or [] for r in requests]
    return (
        max([u.get("input", 0) + u.get("output", 0) for u in tokens] + [1]),
        max([ms[-1] for ms in streams if ms] + [1]),
        max([len(ms) for ms in streams] + [1]),
    )


def tokens_chart(
    requests: Sequence[dict[str, Any]],
    width: int = 760,
    height: int = 220,
    top: int | None = None,
) -> str:
    """SVG stacked bars per request: uncached input, cached input, output tokens. ``top``:
    the y axis's top in tokens (default: this run's largest turn)."""
    bars = [(r.get("seq"), r.get("usage") or {}) for r in requests]
    top = top or chart_scale(requests)[0]
    left, bottom, plot_h = 60, 30, height - 50
    step = (width - left - 10) / max(1, len(bars))
    out = [f'<svg role="img" aria-label="tokens per turn" width="{width}" height="{height}">']
    out.append(f'<text x="4" y="14" font-size="11">{top} tokens</text>')
    base_y = height - bottom
    out.append(f'<line x1="{left}" y1="{base_y}" x2="{width - 10}" y2="{base_y}" stroke="#999"/>')
    for i, (seq, u) in enumerate(bars):
        w = max(1.0, min(40.0, step * 0.7))
        x = left + i * step + (step - w) / 2
        y = float(base_y)
        parts = (
            ("input", u.get("input", 0) - u.get("cached", 0)),
            ("cached", u.get("cached", 0)),
            ("output", u.get("output", 0)),
        )
        for kind, value in parts:
            h = plot_h * max(0, value) / top
            y -= h
            out.append(
                f'<rect x="{x:.1f}" y="{y:.1f}" width="{w:.1f}" height="{h:.1f}" '
                f'fill="{TOKEN_COLOURS[kind]}"><title>#{_e(seq)} {kind}: {value}</title></rect>'
            )
        out.append(
            f'<text x="{x + w / 2:.1f}" y="{base_y + 14}" font-size="10" '
            f'text-anchor="middle">{_e(seq or i + 1)}</text>'
        )
    out.append("</svg>")
    legend = " ".join(
        f'<span class="swatch" style="background:{c}"></span>{k}' for k, c in TOKEN_COLOURS.items()
    )
    return "".join(out) + f'<div class="muted">{legend.replace("input", "input (uncached)")}</div>'


def arrival_chart(
    requests: Sequence[dict[str, Any]],
    width: int = 760,
    height: int = 240,
    scale: tuple[int, int] | None = None,
) -> str:
    """SVG: for each stream, events received (y) against ms since its response headers (x).
    ``scale``: ``(ms, events)`` at the axes' ends (default: this run's longest stream)."""
    streams = [(r.get("seq"), r.get("event_ms") or []) for r in requests if r.get("event_ms")]
    if not streams:
        return '<p class="muted">No streamed replies with timing.</p>'
    max_ms, max_n = scale or chart_scale(requests)[1:]
    left, bottom, right, top_pad = 60, 30, 10, 20
    plot_w, plot_h = width - left - right, height - bottom - top_pad
    out = [f'<svg role="img" aria-label="event arrival" width="{width}" height="{height}">']
    out.append(f'<text x="4" y="14" font-size="11">{max_n} events</text>')
    out.append(
        f'<text x="{width - right}" y="{height - 4}" font-size="11" '
        f'text-anchor="end">{max_ms} ms</text>'
    )
    base_y = height - bottom
    out.append(
        f'<line x1="{left}" y1="{base_y}" x2="{width - right}" y2="{base_y}" stroke="#999"/>'
    )
    legend = []
    for i, (seq, ms) in enumerate(streams):
        colour = PALETTE[i % len(PALETTE)]
        points = " ".join(
            f"{left + plot_w * t / max_ms:.1f},{base_y - plot_h * (n + 1) / max_n:.1f}"
            for n, t in enumerate(ms)
        )
        out.append(
            f'<polyline fill="none" stroke="{colour}" stroke-width="1.5" points="{points}">'
            f"<title>#{_e(seq)}: {len(ms)} events in {ms[-1]} ms</title></polyline>"
        )
        legend.append(f'<span class="swatch" style="background:{colour}"></span>#{_e(seq)}')
    out.append("</svg>")
    return "".join(out) + f'<div class="muted">{" ".join(legend)}</div>'


def render_report(
    summary: dict[str, Any],
    refused: Sequence[dict[str, Any]] = (),
    dump_links: dict[int, tuple[str, str]] | None = None,
    title: str = "Codex session",
) -> str:
    """The whole HTML page.

    ``summary`` is :func:`addons.recorder.summarize`'s ``{"requests": [...], "totals": {...}}``
    with each request's ``event_ms`` kept; ``refused`` holds ``{"time", "method", "path",
    "status", "reason"}``; ``dump_links`` maps a dump sequence number to the (request,
    response) file paths, relative to the report.
    """
    links = dump_links or {}
    t = summary.get("totals", {})
    requests = summary.get("requests", [])
    kinds = USAGE_KINDS
    head = "".join(f"<th>{k}</th>" for k in kinds)
    totals_row = "".join(f"<td>{_e(t.get(k, 0))}</td>" for k in kinds)
    priced = t.get("credits") is not None
    rows = []
    for r in requests:
        u = r.get("usage") or {}
        seq = r.get("seq")
        pair = links.get(seq) if isinstance(seq, int) else None
        dump = (
            f'<a href="{_e(pair[0])}">request</a> · <a href="{_e(pair[1])}">response</a>'
            if pair
            else "-"
        )
        status = f"{_e(r.get('status') or '-')} {_e(r.get('turn_status') or '')}".strip()
        if r.get("transport") == "websocket":
            status += " · WebSocket turn"
        if r.get("error"):
            status += f" ({_e(r['error'])})"
        failed = r.get("failed")
        rows.append(
            f'<tr class="{"fail" if failed else ""}"><td>{_e(seq or "-")}</td>'
            f'<td class="l">{_when(r.get("started"))}</td><td class="l">{_e(r.get("model"))}</td>'
            f'<td class="l">{status}</td>'
            + "".join(f"<td>{_e(u.get(k, '-'))}</td>" for k in kinds)
            + f"<td>{_e(r.get('duration_ms'))}</td><td>{_e(r.get('first_event_ms', '-'))}</td>"
            f"<td>{_e(r.get('events'))}</td><td>{_e(_credits(r, priced))}</td>"
            f'<td class="l">{dump}</td></tr>'
        )
    refused_rows = "".join(
        f'<tr><td class="l">{_when(x.get("time"))}</td><td class="l">{_e(x.get("method"))}</td>'
        f'<td class="l">{_e(x.get("path"))}</td><td>{_e(x.get("status"))}</td>'
        f'<td class="l">{_e(x.get("reason"))}</td></tr>'
        for x in refused
    )
    refused_html = (
        "<table><tr><th class=l>time (UTC)</th><th class=l>method</th><th class=l>path</th>"
        f"<th>status</th><th class=l>reason</th></tr>{refused_rows}</table>"
        if refused
        else '<p class="muted">None.</p>'
    )
    unpriced = (
        f'<p class="muted">{_e(t["unpriced"])} request(s) unpriced: their model is not on the '
        "rate card (config/codex-rate-card.yaml).</p>"
        if t.get("unpriced") and t.get("credits") is not None
        else ""
    )
    return (
        "<!doctype html><html lang=en><head><meta charset=utf-8>"
        f"<title>{_e(title)}</title><style>{CSS}</style></head><body>"
        f"<h1>{_e(title)}</h1><div class=muted>codex-responses-api-proxy recording, "
        f"written {_when(time.time())}</div>"
        "<h2>Totals</h2><table class=totals><tr><th>requests</th><th>failed</th><th>events</th>"
        f"{head}<th>credits</th><th>USD</th></tr><tr><td>{_e(t.get('requests', 0))}</td>"
        f"<td>{_e(t.get('failed', 0))}</td><td>{_e(t.get('events', 0))}</td>{totals_row}"
        f"<td>{_e(t.get('credits') or '-')}</td><td>{_e(t.get('usd') or '-')}</td></tr></table>"
        f"{unpriced}"
        "<h2>Requests</h2><table><tr><th>#</th><th class=l>time (UTC)</th><th class=l>model</th>"
        f"<th class=l>status</th>{head}<th>ms</th><th>first event ms</th><th>events</th>"
        f"<th>credits</th><th class=l>dumps</th></tr>{''.join(rows)}</table>"
        f"<h2>Tokens per turn</h2>{tokens_chart(requests)}"
        f"<h2>Event arrival per stream</h2>{arrival_chart(requests)}"
        f"<h2>Refused requests</h2>{refused_html}"
        "</body></html>\n"
    )
