"""``compare.html``: the page of ``./run.sh compare BASE NEW`` (:mod:`addons.compare` reads and
judges; this module only renders its :class:`addons.compare.Comparison`).

Self-contained like ``report.html``: inline CSS and SVG (:mod:`addons.charts`), no script,
nothing fetched. Contents: the verdict, every figure (regressions marked), the turn table,
and both runs' charts side by side, BASE beside NEW on the same axes: one
:class:`addons.charts.Scale` for both (the union of theirs), so the same turn slots, token,
ms and event ranges. Tables fit a 1 400 px window or scroll inside their own box; every value
is HTML-escaped.
"""

from __future__ import annotations

import html
import time
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from addons.charts import Scale, arrival_chart, tokens_chart
from addons.report import CSS

if TYPE_CHECKING:  # for annotations only: addons.compare imports this module
    from addons.compare import Comparison, Run

#: Width of each of the two charts side by side (px); both fit a 1 400 px window.
CHART_WIDTH = 660

PAGE_CSS = CSS + ".pair{display:grid;grid-template-columns:1fr 1fr;gap:16px}.pair h3{margin:0}"


def _e(value: Any) -> str:
    return html.escape("-" if value is None or value == "" else str(value), quote=True)


def chart_requests(run: Run) -> list[dict[str, Any]]:
    """A run's turns as the charts' rows: ``seq`` (the turn's index), ``status``, ``usage``,
    ``event_ms``."""
    return [
        {
            "seq": t.index,
            "status": t.record.status,
            "usage": t.record.usage,
            "event_ms": t.record.event_ms,
        }
        for t in run.turns
    ]


def _side_by_side(render: Callable[[list[dict[str, Any]]], str], base: Any, new: Any) -> str:
    return (
        '<div class="pair">'
        + "".join(
            f'<div class="side {label.lower()}"><h3>{label}</h3>{render(rows)}</div>'
            for label, rows in (("BASE", base), ("NEW", new))
        )
        + "</div>"
    )


def as_html(c: Comparison) -> str:
    """``compare.html`` of comparison ``c``: the verdict, every figure, the turns, and both
    runs' charts side by side on the same axes."""
    colour = "#b91c1c" if c.exit_code else "#15803d"
    figure_rows = "".join(
        f'<tr class="{"fail" if f.regression else ""}"><td class=l>{_e(f.name)}</td>'
        f"<td>{_e(f.base)}</td><td>{_e(f.new)}</td><td>{_e(f.change)}</td>"
        f"<td>{_e(f.rule)}</td><td class=l>{_e(f.mark)}</td></tr>"
        for f in c.figures
    )
    turn_rows = "".join(
        f'<tr class="{"fail" if t.note else ""}"><td>{_e(t.base)}</td><td>{_e(t.new)}</td>'
        f'<td class="l w">{_e(t.model)}</td><td class=l>{_e(t.outcome)}</td>'
        f'<td>{_e(t.tokens)}</td><td class="l w">{_e(t.tools)}</td>'
        f'<td class="l w">{_e(t.note)}</td></tr>'
        for t in c.turns
    )
    base, new = chart_requests(c.base), chart_requests(c.new)
    scale = Scale.of(base).union(Scale.of(new))
    notes = "".join(
        f"<p class=muted>{label}: {_e(n)}</p>"
        for run, label in ((c.base, "BASE"), (c.new, "NEW"))
        for n in run.notes
    )
    return (
        "<!doctype html><html lang=en><head><meta charset=utf-8>"
        f"<title>Codex recording compare</title><style>{PAGE_CSS}</style></head><body>"
        "<h1>Codex recording compare</h1>"
        f'<p class=verdict style="color:{colour};font-weight:600">{_e(c.verdict)}</p>'
        f"<div class=muted>BASE {_e(c.base.path)} · NEW {_e(c.new.path)} · written "
        f"{time.strftime('%Y-%m-%d %H:%M:%SZ', time.gmtime())}</div>{notes}"
        "<h2>Figures</h2><div class=box><table class=figures><tr><th class=l>figure</th>"
        "<th>BASE</th><th>NEW</th><th>change</th><th>threshold</th><th class=l></th></tr>"
        f"{figure_rows}</table></div>"
        "<h2>Turns</h2><div class=box><table class=turns><tr><th>BASE #</th><th>NEW #</th>"
        "<th class=l>model</th><th class=l>outcome</th><th>total tokens</th>"
        f"<th class=l>tool calls</th><th class=l>note</th></tr>{turn_rows}</table></div>"
        "<h2>Tokens per turn</h2>"
        + _side_by_side(lambda r: tokens_chart(r, scale, width=CHART_WIDTH), base, new)
        + "<h2>Event arrival per stream</h2>"
        + _side_by_side(lambda r: arrival_chart(r, scale, width=CHART_WIDTH), base, new)
        + "</body></html>\n"
    )
