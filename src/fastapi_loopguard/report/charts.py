"""Inline SVG charts, drawn here in Python so the report needs no script and no network.

Every piece of text that reaches the markup goes through ``esc``: control characters made visible,
then ``html.escape``. Routes, paths and function names come from requests and logs and are
hostile until proven otherwise. Colours come
from CSS classes (``k-<kind>``), so the page's stylesheet decides them, dark mode included.
"""

from __future__ import annotations

import bisect
import math
from collections import Counter
from collections.abc import Callable, Sequence
from html import escape

from .._text import visible
from ..events import KINDS
from .model import Event, Group, route_label


def esc(text: str) -> str:
    """Text for HTML: control characters made visible, then markup characters escaped."""
    return escape(visible(text))


def kind_class(kind: str) -> str:
    return f"k-{kind if kind in KINDS else 'unknown'}"


def fmt_ms(ms: float) -> str:
    if ms >= 10_000:
        return f"{ms / 1000:.1f} s"
    if ms >= 100:
        return f"{ms:.0f} ms"
    if ms >= 1:
        return f"{ms:.1f} ms"
    return f"{ms:.2f} ms"


# The figures shown for each route, in order: (terminal column, the figure, the page's phrase).
# One list, so a figure added here reaches the terminal table and the page's route rows at once.
# These are drawn from events, by the culprit's route; the victims' delay is about the routes
# that waited, from the request records, and has a table of its own (model.delay_by_route).
ROUTE_FIGURES: tuple[tuple[str, Callable[[Group], str], str], ...] = (
    ("events", lambda g: str(g.events), "{} events"),
    ("total", lambda g: fmt_ms(g.total_ms), "{} in all"),
    ("worst", lambda g: fmt_ms(g.worst_ms), "worst {}"),
    ("froze", lambda g: str(g.victims), "froze {} requests"),
)


def fmt_tick(ms: float) -> str:
    """Axis labels: no decimals a round number does not need."""
    if ms == 0:
        return "0"
    if ms >= 1000:
        return f"{ms / 1000:g} s"
    return f"{ms:g} ms"


def nice_ceiling(value: float) -> float:
    """The smallest of 1, 2, 2.5, 5 x 10^n at or above ``value``: a readable axis end."""
    if value <= 0:
        return 1.0
    power = 10.0 ** math.floor(math.log10(value))
    for step in (1, 2, 2.5, 5, 10):
        if step * power >= value * 0.999:
            return step * power
    return 10 * power


def _axis(largest: float, count: int = 5) -> tuple[float, list[float]]:
    """A readable axis end at or above ``largest`` and its ticks, about ``count`` of them."""
    step = nice_ceiling(max(largest, 1e-9) / count)
    top = step * max(math.ceil(largest / step - 1e-9), 1)
    return top, [i * step for i in range(round(top / step) + 1)]


def timeline(events: Sequence[Event], t0: float, t1: float, threshold_ms: float | None) -> str:
    """Each block as a bar at its start time, as wide as it lasted and as tall as its duration."""
    width, height = 1000, 280
    left, right, top, bottom = 86, 14, 14, 34
    plot_w, plot_h = width - left - right, height - top - bottom
    span = max(t1 - t0, 1.0)
    worst = max([e["duration_ms"] for e in events] + [threshold_ms or 0, 1])
    y_top, y_ticks = _axis(worst)

    def x(t: float) -> float:
        return left + (t - t0) / span * plot_w

    def y(ms: float) -> float:
        return top + plot_h - ms / y_top * plot_h

    parts = [
        f'<svg class="chart timeline" viewBox="0 0 {width} {height}" role="img" '
        f'aria-label="Timeline of {len(events)} blocking events">'
    ]
    for ms in y_ticks:
        parts.append(
            f'<line class="grid" x1="{left}" x2="{width - right}" y1="{y(ms):.1f}" '
            f'y2="{y(ms):.1f}"/><text class="axis" x="{left - 6}" y="{y(ms) + 4:.1f}" '
            f'text-anchor="end">{esc(fmt_tick(ms))}</text>'
        )
    for sec in _axis(span, 8)[1]:
        if sec > span:
            break
        parts.append(
            f'<text class="axis" x="{x(t0 + sec):.1f}" y="{height - 12}" '
            f'text-anchor="middle">{sec:g} s</text>'
        )
    for event in events:
        start, ms = event["started_at"], event["duration_ms"]
        x0 = x(start)
        bar_w = max(x(start + ms / 1000) - x0, 2.0)
        tip = (
            f"+{start - t0:.2f} s  {fmt_ms(ms)}  {event['kind']}  {route_label(event)}  "
            f"froze {event['victims']}"
        )
        parts.append(
            f'<rect class="k {kind_class(event["kind"])}" x="{x0:.1f}" y="{y(ms):.1f}" '
            f'width="{bar_w:.1f}" height="{top + plot_h - y(ms):.1f}">'
            f"<title>{esc(tip)}</title></rect>"
        )
    if threshold_ms:  # drawn over the bars, so it stays visible
        parts.append(
            f'<line class="threshold" x1="{left}" x2="{width - right}" y1="{y(threshold_ms):.1f}" '
            f'y2="{y(threshold_ms):.1f}"/><text class="axis halo" x="{left + 6}" '
            f'y="{y(threshold_ms) - 5:.1f}">threshold {esc(fmt_tick(threshold_ms))}</text>'
        )
    parts.append(
        f'<line class="axis-line" x1="{left}" x2="{width - right}" y1="{top + plot_h}" '
        f'y2="{top + plot_h}"/></svg>'
    )
    return "".join(parts)


def stacked_bar(kind_ms: Counter[str], scale_max: float, label: str) -> str:
    """A horizontal bar for one row, split by kind; stretches to its box."""
    parts = [
        f'<svg class="hbar" viewBox="0 0 1000 16" preserveAspectRatio="none" role="img" '
        f'aria-label="{esc(label)}">'
    ]
    x = 0.0
    for kind in KINDS:
        ms = kind_ms.get(kind, 0.0)
        if ms <= 0:
            continue
        w = max(ms / scale_max * 1000, 1.0) if scale_max > 0 else 0.0
        parts.append(
            f'<rect class="k {kind_class(kind)}" x="{x:.1f}" y="0" width="{w:.1f}" height="16">'
            f"<title>{esc(f'{kind}: {fmt_ms(ms)}')}</title></rect>"
        )
        x += w
    parts.append("</svg>")
    return "".join(parts)


# Log scale for loop lag: from 10 us (an idle loop) to the worst value seen.
_LAG_FLOOR_MS = 0.01


def lag_bar(value_ms: float, scale_max_ms: float, threshold_ms: float | None, label: str) -> str:
    def pos(ms: float) -> float:
        low, high = math.log10(_LAG_FLOOR_MS), math.log10(max(scale_max_ms, _LAG_FLOOR_MS * 10))
        return (math.log10(max(ms, _LAG_FLOOR_MS)) - low) / (high - low) * 1000

    over = threshold_ms is not None and value_ms > threshold_ms
    parts = [
        f'<svg class="hbar" viewBox="0 0 1000 16" preserveAspectRatio="none" role="img" '
        f'aria-label="{esc(label)}">',
        f'<rect class="{"lag-over" if over else "lag"}" x="0" y="0" '
        f'width="{max(pos(value_ms), 2.0):.1f}" height="16"/>',
    ]
    if threshold_ms:
        t = pos(threshold_ms)
        parts.append(
            f'<line class="marker" x1="{t:.1f}" x2="{t:.1f}" y1="0" y2="16" '
            f'vector-effect="non-scaling-stroke"/>'
        )
    parts.append("</svg>")
    return "".join(parts)


# Bucket edges (ms) of the block-duration histogram: 1-2-5 steps, like a log axis.
_EDGES = [m * 10**e for e in range(0, 7) for m in (1, 2, 5)]


def duration_histogram(events: Sequence[Event]) -> str:
    """How long the blocks were: counts per duration bucket, stacked by kind."""
    durations = [e["duration_ms"] for e in events]
    low = max([x for x in _EDGES if x <= min(durations)] or [_EDGES[0]])
    high = min([x for x in _EDGES if x > max(durations)] or [_EDGES[-1]])
    edges = [x for x in _EDGES if low <= x <= high]
    buckets: list[Counter[str]] = [Counter() for _ in edges[:-1]]
    for event in events:
        i = bisect.bisect_right(edges, event["duration_ms"]) - 1
        buckets[min(max(i, 0), len(buckets) - 1)][event["kind"]] += 1
    width, height = 1000, 200
    left, right, top, bottom = 40, 10, 22, 44
    plot_w, plot_h = width - left - right, height - top - bottom
    y_top, y_ticks = _axis(max(4, *(sum(b.values()) for b in buckets)), 4)  # whole counts
    col_w = plot_w / len(buckets)
    parts = [
        f'<svg class="chart histogram" viewBox="0 0 {width} {height}" role="img" '
        f'aria-label="Blocking events by duration">'
    ]
    for count in y_ticks:
        yy = top + plot_h - count / y_top * plot_h
        parts.append(
            f'<line class="grid" x1="{left}" x2="{width - right}" y1="{yy:.1f}" y2="{yy:.1f}"/>'
            f'<text class="axis" x="{left - 6}" y="{yy + 4:.1f}" text-anchor="end">{count:g}</text>'
        )
    for i, bucket in enumerate(buckets):
        x0 = left + i * col_w + col_w * 0.12
        bar_w = col_w * 0.76
        base = float(top + plot_h)
        label = _range_label(edges[i], edges[i + 1])
        for kind in KINDS:
            n = bucket.get(kind, 0)
            if not n:
                continue
            h = n / y_top * plot_h
            base -= h
            parts.append(
                f'<rect class="k {kind_class(kind)}" x="{x0:.1f}" y="{base:.1f}" '
                f'width="{bar_w:.1f}" height="{h:.1f}"><title>'
                f"{esc(f'{label}: {n} {kind}')}</title></rect>"
            )
        total = sum(bucket.values())
        parts.append(
            f'<text class="axis" x="{x0 + bar_w / 2:.1f}" y="{height - 24}" '
            f'text-anchor="middle">{esc(label)}</text>'
        )
        if total:
            parts.append(
                f'<text class="count" x="{x0 + bar_w / 2:.1f}" y="{base - 5:.1f}" '
                f'text-anchor="middle">{total}</text>'
            )
    parts.append(
        f'<text class="axis" x="{left + plot_w / 2:.1f}" y="{height - 4}" '
        f'text-anchor="middle">duration of the block</text></svg>'
    )
    return "".join(parts)


def _range_label(low: float, high: float) -> str:
    """``50-100 ms``, or ``500 ms-1 s`` when the unit changes."""
    a, b = fmt_tick(low), fmt_tick(high)
    if a.split()[-1] == b.split()[-1]:
        a = a.split()[0]
    return f"{a}-{b}"


def legend(kinds: Sequence[str]) -> str:
    items = "".join(
        f'<li><svg class="swatch" viewBox="0 0 10 10" aria-hidden="true">'
        f'<rect class="k {kind_class(k)}" width="10" height="10"/></svg>{esc(k)}</li>'
        for k in kinds
    )
    return f'<ul class="legend">{items}</ul>'
