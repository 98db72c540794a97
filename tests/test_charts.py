"""addons/charts.py: nice ticks (property-tested), shared scales, and the SVG the charts write."""

from __future__ import annotations

import itertools
import math
import re

import pytest
from hypothesis import given
from hypothesis import strategies as st

from addons.charts import Scale, arrival_chart, nice_step, nice_ticks, tick_label, tokens_chart


@given(st.integers(0, 10**12), st.integers(1, 12))
def test_nice_ticks_cover_the_top_in_round_steps(top, count):
    ticks = nice_ticks(top, count)
    step = ticks[1] - ticks[0]
    assert ticks[0] == 0 and all(b - a == step for a, b in itertools.pairwise(ticks))
    mantissa = step / 10 ** math.floor(math.log10(step))
    assert mantissa in (1, 2, 5)
    # The axis ends at the first tick at or above the top, within count intervals.
    assert ticks[-1] >= max(top, 1) > ticks[-2]
    assert len(ticks) - 1 <= count


@pytest.mark.parametrize(
    ("top", "count", "ticks"),
    [
        (1, 5, [0, 1]),
        (7, 5, [0, 2, 4, 6, 8]),
        (40, 5, [0, 10, 20, 30, 40]),
        (41, 5, [0, 10, 20, 30, 40, 50]),
        (26_437, 5, [0, 10_000, 20_000, 30_000]),
        (7_615, 8, [0, 1_000, 2_000, 3_000, 4_000, 5_000, 6_000, 7_000, 8_000]),
    ],
)
def test_nice_ticks_examples(top, count, ticks):
    assert nice_ticks(top, count) == ticks


def test_nice_step_refuses_no_intervals():
    with pytest.raises(ValueError, match="count"):
        nice_step(10, 0)


@pytest.mark.parametrize(
    ("value", "label"),
    [(0, "0"), (950, "950"), (1_000, "1k"), (1_500, "1.5k"), (12_000, "12k"), (2_500_000, "2.5M")],
)
def test_tick_labels_are_short(value, label):
    assert tick_label(value) == label


ROWS = [
    {"seq": 1, "usage": {"input": 1000, "cached": 600, "output": 300}, "event_ms": [40, 90]},
    {"seq": 2, "status": 409, "usage": None, "event_ms": []},
]


def test_scales_of_two_runs_unite():
    a = Scale.of(ROWS)
    assert a == Scale(turns=2, tokens=1300, ms=90, events=2)
    b = Scale.of([{"usage": {"input": 5, "output": 1}, "event_ms": [1, 2, 3, 4000]}])
    assert a.union(b) == b.union(a) == Scale(turns=2, tokens=1300, ms=4000, events=4)
    assert Scale.of([]) == Scale(1, 1, 1, 1)


def test_tokens_chart_draws_axes_bars_and_a_refused_turns_status():
    svg = tokens_chart(ROWS, Scale(turns=8, tokens=1300, ms=1, events=1), width=600)
    assert 'data-x-max="8"' in svg and 'data-y-max="1500"' in svg  # 8 slots; 0..1500 by 500
    ticks = re.findall(r'<g class="tick y">.*?<text[^>]*>([^<]*)</text>', svg)
    assert ticks == ["0", "500", "1k", "1.5k"]
    assert re.findall(r'<g class="tick x">.*?<text[^>]*>([^<]*)</text>', svg) == ["1", "2"]
    assert svg.count('class="bar"') == 3 and ">tokens</text>" in svg and ">turn</text>" in svg
    assert '<text class="status"' in svg and ">409</text>" in svg


def test_arrival_chart_draws_step_lines_on_a_time_axis_in_seconds_when_long():
    svg = arrival_chart([{"seq": 3, "event_ms": [100, 12_000, 25_000]}])
    assert svg.count("<polyline") == 1 and ">s since the response headers</text>" in svg
    assert re.findall(r'<g class="tick x">.*?<text[^>]*>([^<]*)</text>', svg)[:3] == [
        "0",
        "5",
        "10",
    ]
    assert 'data-x-max="25000"' in svg and 'data-y-max="3"' in svg
    assert arrival_chart([{"seq": 1, "event_ms": []}]).startswith('<p class="muted">')


def test_chart_text_is_escaped():
    svg = tokens_chart([{"seq": "<b>", "usage": {"input": 1, "output": 1}}], x_title="a<b")
    assert "<b>" not in svg and "&lt;b&gt;" in svg
