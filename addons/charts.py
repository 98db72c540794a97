"""Charts for the HTML reports (``report.html``, ``compare.html``): inline SVG with axes,
ticks, units and gridlines, no script, nothing fetched.

Why our own and not a charting library: the reports need two chart kinds (stacked bars of
tokens per turn, step lines of SSE events over time), drawn at exit by the credential-holding
proxy itself and by ``compare`` in CI. matplotlib draws them well but brings numpy and half a
dozen compiled packages (tens of MB) into the proxy's runtime for two charts, costs about a
second of import at every recording's exit, and writes its text as glyph paths unless told
otherwise; pygal's pages point at a script on a CDN unless told otherwise and it is thinly
maintained. What a library would really give us is the axis: ticks at round values. That is
:func:`nice_ticks` below (steps of 1, 2 or 5 x 10^k, property-tested in
``tests/test_charts.py``); the rest is a few SVG elements, each value HTML-escaped.

Both charts take a :class:`Scale`, so two runs drawn with the union of their scales
(:meth:`Scale.union`) share their axes: the same turn slots, the same token, ms and event
ranges (``compare.html`` puts BASE beside NEW that way). Each ``<svg>`` carries its axes'
ends as ``data-x-max`` / ``data-y-max`` and its tick labels as ``<g class="tick"><text>``.
"""

from __future__ import annotations

import html
import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

#: Stream colours (chart lines, legend), cycled.
PALETTE = ("#2563eb", "#dc2626", "#16a34a", "#9333ea", "#ea580c", "#0891b2", "#4b5563")
#: Token kinds of a bar, bottom to top, with their colours.
TOKEN_COLOURS = {"input (uncached)": "#93c5fd", "cached": "#2563eb", "output": "#f59e0b"}

#: CSS for the charts and their legends (the pages include it in their ``<style>``).
CHART_CSS = """
svg.chart{background:#fff;border:1px solid #ddd;max-width:100%;height:auto;display:block}
svg.chart text{font:11px system-ui,-apple-system,Segoe UI,Roboto,sans-serif;fill:#374151}
svg.chart .axis-title{font-weight:600;fill:#111}svg.chart .status{fill:#b91c1c;font-weight:600}
svg.chart .grid{stroke:#e5e7eb}svg.chart .axis{stroke:#6b7280}
.legend{color:#555;margin:4px 0 0}.swatch{display:inline-block;width:10px;height:10px;margin:0 4px}
"""

# Margins of the plot area inside a chart (px): room for tick labels and axis titles.
LEFT, RIGHT, TOP, BOTTOM = 66, 18, 14, 46


def _e(value: Any) -> str:
    return html.escape("" if value is None else str(value), quote=True)


def nice_step(span: float, count: int) -> int:
    """The smallest step of 1, 2 or 5 x 10^k (at least 1) that splits ``span`` into at most
    ``count`` intervals. Raises ``ValueError`` when ``count`` < 1."""
    if count < 1:
        raise ValueError(f"count must be >= 1, got {count}")
    raw = max(span, 1) / count
    magnitude = 10 ** max(0, math.floor(math.log10(raw)))
    for mantissa in (1, 2, 5, 10):
        if mantissa * magnitude >= raw:
            return mantissa * magnitude
    raise AssertionError("unreachable: 10 * magnitude >= raw")


def nice_ticks(top: float, count: int = 5) -> list[int]:
    """Tick values ``[0, step, 2 * step, ...]`` for an axis of counts from 0 to ``top``
    (tokens, ms, events): ``step`` from :func:`nice_step`, the last tick the first multiple of
    ``step`` at or above ``top`` (the axis's end), at most ``count`` intervals. ``top`` below 1
    counts as 1."""
    step = nice_step(top, count)
    return [i * step for i in range(max(1, math.ceil(max(top, 1) / step)) + 1)]


def tick_label(value: int) -> str:
    """``value`` short enough for a tick: ``950``, ``1.5k``, ``12k``, ``2.5M``."""
    for size, suffix in ((1_000_000, "M"), (1_000, "k")):
        if abs(value) >= size:
            return f"{value / size:.3g}{suffix}"
    return str(value)


@dataclass(frozen=True)
class Scale:
    """What the axes of both charts must hold: ``turns`` (bar slots), ``tokens`` (the
    largest turn's input + output), ``ms`` (the longest stream, ms since its response
    headers) and ``events`` (the most events in a stream); each at least 1."""

    turns: int = 1
    tokens: int = 1
    ms: int = 1
    events: int = 1

    @classmethod
    def of(cls, requests: Sequence[dict[str, Any]]) -> Scale:
        """The scale of ``requests`` (report rows: ``usage``, ``event_ms``)."""
        usages = [r.get("usage") or {} for r in requests]
        streams = [r.get("event_ms") or [] for r in requests]
        return cls(
            max(len(requests), 1),
            max([int(u.get("input", 0)) + int(u.get("output", 0)) for u in usages] + [1]),
            max([int(ms[-1]) for ms in streams if ms] + [1]),
            max([len(ms) for ms in streams] + [1]),
        )

    def union(self, other: Scale) -> Scale:
        """A scale holding both: two runs drawn with it share every axis."""
        return Scale(
            max(self.turns, other.turns),
            max(self.tokens, other.tokens),
            max(self.ms, other.ms),
            max(self.events, other.events),
        )


class _Frame:
    """The plot area of one chart: pixel mapping, gridlines, ticks, axis titles."""

    def __init__(self, width: int, height: int) -> None:
        self.width, self.height = width, height
        self.x0, self.x1 = LEFT, width - RIGHT
        self.y0, self.y1 = height - BOTTOM, TOP  # y grows downwards in SVG

    def y(self, value: float, top: int) -> float:
        return self.y0 - (self.y0 - self.y1) * value / top

    def x(self, value: float, right: int) -> float:
        return self.x0 + (self.x1 - self.x0) * value / right

    def y_axis(self, ticks: Sequence[int], title: str) -> list[str]:
        out = []
        for value in ticks:
            y = self.y(value, ticks[-1])
            out.append(
                f'<g class="tick y"><line class="grid" x1="{self.x0}" y1="{y:.1f}" '
                f'x2="{self.x1}" y2="{y:.1f}"/><line class="axis" x1="{self.x0 - 4}" '
                f'y1="{y:.1f}" x2="{self.x0}" y2="{y:.1f}"/><text x="{self.x0 - 7}" '
                f'y="{y + 4:.1f}" text-anchor="end">{_e(tick_label(value))}</text></g>'
            )
        mid = (self.y0 + self.y1) / 2
        out.append(
            f'<text class="axis-title y" x="14" y="{mid:.1f}" text-anchor="middle" '
            f'transform="rotate(-90 14 {mid:.1f})">{_e(title)}</text>'
        )
        out.append(
            f'<line class="axis" x1="{self.x0}" y1="{self.y0}" x2="{self.x0}" y2="{self.y1}"/>'
        )
        return out

    def x_axis(self, ticks: Sequence[tuple[float, str]], title: str) -> list[str]:
        """``ticks``: ``(x in px, label)``."""
        out = [f'<line class="axis" x1="{self.x0}" y1="{self.y0}" x2="{self.x1}" y2="{self.y0}"/>']
        for x, label in ticks:
            out.append(
                f'<g class="tick x"><line class="axis" x1="{x:.1f}" y1="{self.y0}" '
                f'x2="{x:.1f}" y2="{self.y0 + 4}"/><text x="{x:.1f}" y="{self.y0 + 16}" '
                f'text-anchor="middle">{_e(label)}</text></g>'
            )
        out.append(
            f'<text class="axis-title x" x="{(self.x0 + self.x1) / 2:.1f}" '
            f'y="{self.height - 8}" text-anchor="middle">{_e(title)}</text>'
        )
        return out

    def svg(self, label: str, x_max: Any, y_max: Any, body: Sequence[str]) -> str:
        return (
            f'<svg class="chart" role="img" aria-label="{_e(label)}" width="{self.width}" '
            f'height="{self.height}" viewBox="0 0 {self.width} {self.height}" '
            f'data-x-max="{_e(x_max)}" data-y-max="{_e(y_max)}">' + "".join(body) + "</svg>"
        )


def _legend(items: Sequence[tuple[str, str]]) -> str:
    return (
        '<div class="legend">'
        + " ".join(
            f'<span class="swatch" style="background:{colour}"></span>{_e(name)}'
            for name, colour in items
        )
        + "</div>"
    )


def tokens_chart(
    requests: Sequence[dict[str, Any]],
    scale: Scale | None = None,
    width: int = 960,
    height: int = 260,
    x_title: str = "turn",
) -> str:
    """Stacked bars per request: uncached input, cached input, output tokens (y: tokens, with
    ticks; x: one slot per turn of ``scale.turns``, labelled with the request's ``seq`` or its
    position). ``requests``: report rows (``seq``, ``usage`` with ``input``, ``cached``,
    ``output``; ``status``: a non-2xx turn without usage is labelled with it). ``scale``: the
    axes (default :meth:`Scale.of` ``requests``). Sizes in px."""
    scale = scale or Scale.of(requests)
    frame = _Frame(width, height)
    ticks = nice_ticks(scale.tokens)
    top = ticks[-1]
    slots = max(scale.turns, len(requests), 1)
    step = (frame.x1 - frame.x0) / slots
    bar_w = max(1.0, min(40.0, step * 0.7))
    every = nice_step(slots, max(1, int((frame.x1 - frame.x0) / 36)))
    body = frame.y_axis(ticks, "tokens")
    x_ticks = []
    for i, r in enumerate(requests):
        u = r.get("usage") or {}
        seq = r.get("seq") or i + 1
        centre = frame.x0 + (i + 0.5) * step
        y = float(frame.y0)
        parts = (
            ("input (uncached)", int(u.get("input", 0)) - int(u.get("cached", 0))),
            ("cached", int(u.get("cached", 0))),
            ("output", int(u.get("output", 0))),
        )
        for kind, value in parts:
            if value <= 0:
                continue
            h = (frame.y0 - frame.y1) * value / top
            y -= h
            body.append(
                f'<rect class="bar" x="{centre - bar_w / 2:.1f}" y="{y:.1f}" '
                f'width="{bar_w:.1f}" height="{h:.1f}" fill="{TOKEN_COLOURS[kind]}">'
                f"<title>#{_e(seq)} {kind}: {value} tokens</title></rect>"
            )
        status = r.get("status")
        if not r.get("usage") and isinstance(status, int) and status >= 300:
            # No tokens to draw: say why at a glance (the refused turn's status).
            body.append(
                f'<text class="status" x="{centre:.1f}" y="{frame.y0 - 5}" '
                f'text-anchor="middle">{_e(status)}</text>'
            )
        if (i + 1) % every == 0 or i == 0:
            x_ticks.append((centre, str(seq)))
    body += frame.x_axis(x_ticks, x_title)
    chart = frame.svg("tokens per turn", slots, top, body)
    return chart + _legend(list(TOKEN_COLOURS.items()))


def arrival_chart(
    requests: Sequence[dict[str, Any]],
    scale: Scale | None = None,
    width: int = 960,
    height: int = 280,
) -> str:
    """For each stream, the SSE events received so far (y) against ms since its response
    headers (x): a step line from 0 that rises by one at each event. ``requests``: report
    rows (``seq``, ``event_ms``: each event's arrival in ms). ``scale``: the axes (default
    :meth:`Scale.of` ``requests``). Sizes in px."""
    streams = [(r.get("seq") or i + 1, r.get("event_ms") or []) for i, r in enumerate(requests)]
    streams = [(seq, ms) for seq, ms in streams if ms]
    if not streams:
        return '<p class="muted">No streamed replies with timing.</p>'
    scale = scale or Scale.of(requests)
    frame = _Frame(width, height)
    y_ticks, x_ticks = nice_ticks(scale.events), nice_ticks(scale.ms, 8)
    y_top, x_right = y_ticks[-1], x_ticks[-1]
    seconds = x_right >= 10_000
    body = frame.y_axis(y_ticks, "events received")
    for value in x_ticks[1:]:
        x = frame.x(value, x_right)
        body.append(
            f'<line class="grid" x1="{x:.1f}" y1="{frame.y0}" x2="{x:.1f}" y2="{frame.y1}"/>'
        )
    legend = []
    for i, (seq, ms) in enumerate(streams):
        colour = PALETTE[i % len(PALETTE)]
        points = [f"{frame.x0},{frame.y0}"]
        for n, t in enumerate(ms):
            x = frame.x(t, x_right)
            points.append(f"{x:.1f},{frame.y(n, y_top):.1f} {x:.1f},{frame.y(n + 1, y_top):.1f}")
        body.append(
            f'<polyline fill="none" stroke="{colour}" stroke-width="1.5" '
            f'points="{" ".join(points)}"><title>#{_e(seq)}: {len(ms)} events, the first at '
            f"{ms[0]} ms, the last at {ms[-1]} ms</title></polyline>"
        )
        legend.append((f"#{seq}", colour))
    labels = [(frame.x(v, x_right), f"{v / 1000:g}" if seconds else tick_label(v)) for v in x_ticks]
    unit = "s" if seconds else "ms"
    body += frame.x_axis(labels, f"{unit} since the response headers")
    return frame.svg("event arrival", x_right, y_top, body) + _legend(legend)
