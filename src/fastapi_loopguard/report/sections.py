"""The report page's sections, each an HTML fragment drawn from a ``Report``.

The live page refreshes them by element id (``SECTION_IDS``) with fragments from this same
module. All text that came from requests, logs or source files goes through ``charts.esc``.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable, Iterable

from ..events import KINDS
from ..hints import Hint, hint_for_record
from . import charts, flame
from .charts import esc
from .model import (
    Event,
    Report,
    by_culprit,
    by_route,
    by_worker,
    culprit_hints,
    delay_by_route,
    lag_percentiles,
    percentile,
    source_lines,
)
from .profile import Node, call_tree

# Sections the live page refreshes, by element id: those drawn from the engine's statistics
# change all the time, those drawn from events only when an event arrives. The events list is
# appended to instead.
STATS_SECTIONS = ("lg-summary", "lg-lag")
EVENT_SECTIONS = (
    "lg-timeline",
    "lg-routes",
    "lg-workers",
    "lg-durations",
    "lg-culprits",
    "lg-profile",
    "lg-events-head",
)
SECTION_IDS = STATS_SECTIONS + EVENT_SECTIONS
# Events drawn one by one in the list (the charts and tables always include every event).
MAX_LISTED_EVENTS = 500


def utc(epoch: float, with_date: bool = False) -> str:
    fmt = "%Y-%m-%d %H:%M:%S" if with_date else "%H:%M:%S"
    millis = int(epoch * 1000) % 1000
    return f"{time.strftime(fmt, time.gmtime(epoch))}.{millis:03d} UTC"


def _threshold(report: Report) -> float | None:
    values = [s["threshold_ms"] for s in report.stats if s.get("threshold_ms")]
    return max(values) if values else None


def summary(report: Report) -> str:
    events = report.events
    cards = [
        (str(len(events)), "blocking events"),
        (charts.fmt_ms(report.total_ms), "loop blocked in all"),
        (charts.fmt_ms(max((e["duration_ms"] for e in events), default=0.0)), "worst block"),
        (str(report.victims), "requests frozen (victims)"),
    ]
    worst_p99 = max((s["lag_p99_ms"] for s in report.stats if "lag_p99_ms" in s), default=None)
    if worst_p99 is not None:
        cards.append((charts.fmt_ms(worst_p99), "loop lag p99"))
    threshold = _threshold(report)
    if threshold is not None:
        cards.append((charts.fmt_ms(threshold), "threshold"))
    dropped = sum(
        int(s.get("events_dropped", 0) + s.get("event_log_lost", 0)) for s in report.stats
    )
    html = "".join(
        f'<div class="card"><b>{esc(v)}</b><span>{esc(k)}</span></div>' for v, k in cards
    )
    notes = []
    if dropped:
        notes.append(f"{dropped} events were dropped or could not be written (see the log).")
    if report.skipped:
        notes.append(f"{report.skipped} lines of the log were not valid records and were skipped.")
    notes_html = "".join(f'<p class="warn">{esc(n)}</p>' for n in notes)
    return f'<div class="cards">{html}</div>{notes_html}'


def timeline(report: Report, now: float | None) -> str:
    events = report.events
    if not events:
        return '<h2>Timeline of blocks</h2><p class="empty">No blocking events yet.</p>'
    t0 = events[0]["started_at"]
    t1 = max(e["started_at"] + e["duration_ms"] / 1000 for e in events)
    if now is not None:
        t1 = max(t1, now)
    kinds = [k for k in KINDS if any(e["kind"] == k for e in events)]
    return (
        "<h2>Timeline of blocks</h2>"
        f'<p class="muted">From {esc(utc(t0, True))}: each bar starts when the loop stopped, '
        "is as wide as the block lasted and as tall as its duration.</p>"
        f"{charts.legend(kinds)}"
        f'<div class="scroll">{charts.timeline(events, t0, t1, _threshold(report))}</div>'
    )


def routes(report: Report) -> str:
    groups = by_route(report.events)
    if not groups:
        return '<h2>Per route</h2><p class="empty">No blocking events yet.</p>'
    scale = max(g.total_ms for g in groups)
    rows = []
    for g in groups:
        kinds = ", ".join(f"{k} x{n}" for k, n in g.kinds.most_common())
        label = f"{g.key[0]}: {charts.fmt_ms(g.total_ms)} blocked"
        figures = ", ".join(phrase.format(figure(g)) for _, figure, phrase in charts.ROUTE_FIGURES)
        rows.append(
            f'<div class="row"><div class="label"><code>{esc(g.key[0])}</code>'
            f"<small>{esc(figures)}; {esc(kinds)}</small></div>"
            f"{charts.stacked_bar(g.kind_ms, scale, label)}"
            f'<div class="value">{esc(charts.fmt_ms(g.total_ms))}</div></div>'
        )
    return (
        '<h2>Per route</h2><p class="muted">Total time each route blocked the loop, by kind.</p>'
        f'<div class="rows">{"".join(rows)}</div>'
    )


def delay(report: Report) -> str:
    """Per route, the delay its delayed requests suffered and inflicted (the log's request
    records; nothing when it has none, as a log older than them or the live page)."""
    rows = delay_by_route(report.requests)
    if not rows:
        return ""

    def ms(value: float | None) -> str:
        return esc(charts.fmt_ms(value)) if value is not None else "-"

    body = []
    for d in rows:
        body.append(
            f'<tr><td data-label="route"><code>{esc(d.key)}</code></td>'
            f'<td class="n" data-label="waited">{len(d.waited)}</td>'
            f'<td class="n" data-label="wait p50">{ms(percentile(d.waited, 0.5))}</td>'
            f'<td class="n" data-label="wait p99">{ms(percentile(d.waited, 0.99))}</td>'
            f'<td class="n" data-label="blocked">{len(d.blocked)}</td>'
            f'<td class="n" data-label="block p50">{ms(percentile(d.blocked, 0.5))}</td>'
            f'<td class="n" data-label="block p99">{ms(percentile(d.blocked, 0.99))}</td></tr>'
        )
    return (
        "<h2>Victims' delay per route</h2>"
        '<p class="muted">How long requests were frozen by blocks that other requests (or code '
        "outside requests) caused, and how long their own code blocked the loop. Percentiles "
        "are over the requests of the route that waited, or blocked: requests that did neither "
        "are not in the log.</p>"
        '<div class="scroll"><table class="culprits delay"><thead><tr><th>route</th>'
        '<th class="n">waited</th><th class="n">wait p50</th><th class="n">wait p99</th>'
        '<th class="n">blocked</th><th class="n">block p50</th><th class="n">block p99</th>'
        f"</tr></thead><tbody>{''.join(body)}</tbody></table></div>"
    )


def workers(report: Report) -> str:
    """Per process, when the report merges more than one (several workers, several hosts)."""
    known = report.workers()
    if len(known) < 2:
        return ""
    groups = by_worker(report.events)
    rows = []
    for worker in known:
        g = groups.get(worker.key)
        stats = report.stats_of(worker)
        p99 = charts.fmt_ms(stats["lag_p99_ms"]) if stats and "lag_p99_ms" in stats else "-"
        rows.append(
            f'<tr><td data-label="worker"><code>{esc(worker.label)}</code></td>'
            f'<td class="n" data-label="events">{g.events if g else 0}</td>'
            f'<td class="n" data-label="total">{esc(charts.fmt_ms(g.total_ms if g else 0))}</td>'
            f'<td class="n" data-label="worst">{esc(charts.fmt_ms(g.worst_ms if g else 0))}</td>'
            f'<td class="n" data-label="froze">{g.victims if g else 0}</td>'
            f'<td class="n" data-label="lag p99">{esc(p99)}</td></tr>'
        )
    return (
        "<h2>Per worker</h2>"
        f'<p class="muted">{len(known)} processes in these logs, by host and worker.</p>'
        '<div class="scroll"><table class="culprits workers"><thead><tr><th>worker</th>'
        '<th class="n">events</th><th class="n">total</th><th class="n">worst</th>'
        '<th class="n">froze</th><th class="n">lag p99</th></tr></thead>'
        f"<tbody>{''.join(rows)}</tbody></table></div>"
    )


def profile(report: Report, tree: Node | None = None) -> str:
    """The flame graph; ``tree`` is the events' call tree when the caller keeps one (live)."""
    if not report.events:
        return '<h2>Blocking profile</h2><p class="empty">No blocking events yet.</p>'
    return (
        "<h2>Blocking profile</h2>"
        '<p class="muted">Every event\'s stack in one call tree, each frame as wide as the loop '
        "time blocked while it was on the stack, outermost on top, coloured by kind. "
        "<code>loopguard report --format collapsed|speedscope</code> exports it.</p>"
        f"{flame.flame_graph(tree if tree is not None else call_tree(report.events))}"
    )


def _fix(hint: Hint) -> str:
    call = f'<span class="call">fix for {esc(hint.call)}: </span>' if hint.call else "fix: "
    return f'{call}<code>{esc(hint.fix)}</code> <span class="muted">{esc(hint.note)}</span>'


def lag(report: Report) -> str:
    parts = ["<h2>Loop lag</h2>"]
    threshold = _threshold(report)
    if report.stats:
        parts.append(
            '<p class="muted">How late each loop iteration was, as percentiles from the '
            "engine's histogram (log scale; the vertical mark is the threshold).</p>"
        )
        top = max((v for s in report.stats for _, v in lag_percentiles(s)), default=1.0)
        for stats in report.stats:
            if len(report.stats) > 1:
                parts.append(f"<h3>Process {int(stats['pid'])}</h3>")
            rows = []
            for name, value in lag_percentiles(stats):
                rows.append(
                    f'<div class="row"><div class="label">{esc(name)}</div>'
                    f"{charts.lag_bar(value, top, threshold, f'{name} {charts.fmt_ms(value)}')}"
                    f'<div class="value">{esc(charts.fmt_ms(value))}</div></div>'
                )
            count = int(stats.get("lag_count", 0))
            parts.append(
                f'<div class="rows">{"".join(rows)}</div><p class="muted">Over {count} loop '
                f"iterations; {int(stats.get('stalls', 0))} stalls, "
                f"{int(stats.get('events_dropped', 0))} events dropped.</p>"
            )
    else:
        parts.append(
            '<p class="empty">No loop-lag statistics here: the guard writes them to the event '
            "log when it stops.</p>"
        )
    return "".join(parts)


def durations(report: Report) -> str:
    if not report.events:
        return ""
    return (
        "<h3>Blocks by duration</h3>"
        f'<div class="scroll">{charts.duration_histogram(report.events)}</div>'
    )


def _snippet(filename: str, lineno: int) -> str:
    lines = source_lines(filename, lineno)
    if not lines:
        return '<p class="empty">Source not available where this report was made.</p>'
    spans = "".join(
        f"<span{' class=hit' if n == lineno else ''}><i>{n}</i>{esc(text)}</span>"
        for n, text in lines
    )
    return f'<pre class="src">{spans}</pre>'


def culprits(report: Report) -> str:
    groups = by_culprit(report.events)
    if not groups:
        return '<h2>Culprit lines</h2><p class="empty">No culprit lines yet.</p>'
    hints = culprit_hints(report.events)
    bodies = []
    for g in groups[:50]:
        filename, lineno, function = g.key
        routes_text = ", ".join(r for r, _ in g.routes.most_common(3))
        bodies.append(
            '<tbody class="culprit"><tr>'
            f'<td data-label="where"><code title="{esc(filename)}">'
            f"{esc(os.path.basename(filename))}:{esc(lineno)}</code> in "
            f"<code>{esc(function)}</code>{' (library code)' if g.library else ''}</td>"
            f'<td data-label="kinds">{esc(", ".join(sorted(g.kinds)))}</td>'
            f'<td class="n" data-label="events">{g.events}</td>'
            f'<td class="n" data-label="total">{esc(charts.fmt_ms(g.total_ms))}</td>'
            f'<td class="n" data-label="worst">{esc(charts.fmt_ms(g.worst_ms))}</td>'
            f'<td class="n" data-label="froze">{g.victims}</td>'
            f'<td data-label="routes"><code>{esc(routes_text)}</code></td></tr>'
            f'<tr><td class="snippet" colspan="7">{_snippet(filename, int(lineno))}</td></tr>'
            f'<tr><td class="fix" colspan="7" data-label="fix">{_fix(hints[g.key])}</td></tr>'
            "</tbody>"
        )
    more = (
        f'<p class="muted">{len(groups) - 50} more lines not shown.</p>' if len(groups) > 50 else ""
    )
    return (
        '<h2>Culprit lines</h2><p class="muted">The innermost line of application code on the '
        "loop thread while it was blocked (of library code, so marked, when the stack held none), "
        "source read when this page was made, and what to write instead: for the call that "
        "blocked when it is a known one, else for its kind.</p>"
        '<div class="scroll"><table class="culprits"><thead><tr><th>where</th><th>kinds</th>'
        '<th class="n">events</th><th class="n">total</th><th class="n">worst</th>'
        '<th class="n">froze</th><th>routes</th></tr></thead>'
        f"{''.join(bodies)}</table></div>{more}"
    )


def events_head(report: Report) -> str:
    shown = min(len(report.events), MAX_LISTED_EVENTS)
    note = (
        f" (the latest {shown} of {len(report.events)}; charts and tables include all)"
        if len(report.events) > shown
        else ""
    )
    return (
        f"<h2>Events</h2><p class=muted>Newest first{esc(note)}. Open one for its stack; "
        "victims are the other requests that were in flight, frozen, while it blocked.</p>"
    )


def event_html(event: Event) -> str:
    """One event as a collapsible entry: what, when, whose, and the stack."""
    culprit = event["culprit"]
    target = event["path"] or event["route"] or event["request_id"] or "(no request)"
    head = (
        f'<summary><span class="pill {charts.kind_class(event["kind"])}">'
        f"{esc(event['kind'])}</span><b>{esc(charts.fmt_ms(event['duration_ms']))}</b>"
        f"<code>{esc((event['method'] or '') + ' ' + target)}</code>"
        f'<span class="muted">{esc(utc(event["started_at"]))}, froze {event["victims"]}'
        f"{', hang' if event['hang'] else ''}</span></summary>"
    )
    fields = [
        ("route", event["route"]),
        ("request id", event["request_id"]),
        ("started", utc(event["started_at"], True)),
        ("victims", f"{event['victims']} other requests in flight"),
        (
            "queued",
            f"{event['queued']} connections waiting, not yet read by the server"
            if event["queued"]
            else None,
        ),
        ("CPU time", charts.fmt_ms(event["cpu_ms"])),
        ("samples", str(event["samples"])),
    ]
    if event["pid"]:
        host = f"{event['host']}, " if event.get("host") else ""
        worker = f"worker {event['worker']}, " if event.get("worker") else ""
        fields.append(("process", f"{host}{worker}pid {event['pid']}"))
    if event["stack_missing"]:
        fields.append(("stack", "not available (the GIL was not free in time)"))
    elif event["kind"] == "gil" and event["stack"]:
        fields.append(("stack", "sampled from the thread running Python meanwhile, if found"))
    dl = "".join(f"<dt>{esc(k)}</dt><dd>{esc(v)}</dd>" for k, v in fields if v is not None)
    dl += f'<dt>fix</dt><dd class="fix">{_fix(hint_for_record(event))}</dd>'
    frames = []
    for frame in event["stack"]:
        is_culprit = culprit is not None and frame == culprit
        where = f"{frame['filename']}:{frame['lineno']}"
        frames.append(
            f"<li{' class=culprit' if is_culprit else ''}><code>{esc(where)}</code> in "
            f"<code>{esc(frame['function'])}</code>"
            f"{_snippet(frame['filename'], frame['lineno']) if is_culprit else ''}</li>"
        )
    stack = f'<ol class="stack">{"".join(frames)}</ol>' if frames else ""
    return f'<details class="event">{head}<dl>{dl}</dl>{stack}{_holder(event)}</details>'


def _holder(event: Event) -> str:
    """A lock wait's likely holder: the other thread's stack, its culprit line marked."""
    if not event.get("holder_stack"):
        return ""
    culprit = event.get("holder_culprit")
    frames = "".join(
        f"<li{' class=culprit' if frame == culprit else ''}>"
        f"<code>{esc(frame['filename'] + ':' + str(frame['lineno']))}</code> in "
        f"<code>{esc(frame['function'])}</code></li>"
        for frame in event["holder_stack"]
    )
    title = f"likely holder: thread {event['holder_thread']}" if event["holder_thread"] else ""
    return f'<p class="muted">{esc(title or "likely holder")}</p><ol class="stack">{frames}</ol>'


def sections(
    report: Report,
    now: float | None = None,
    ids: Iterable[str] = SECTION_IDS,
    tree: Node | None = None,
) -> dict[str, str]:
    """The refreshable parts of the page, by element id (only those in ``ids``); ``tree`` is
    the events' call tree if the caller keeps one."""
    makers: dict[str, Callable[[], str]] = {
        "lg-summary": lambda: summary(report),
        "lg-lag": lambda: lag(report),
        "lg-timeline": lambda: timeline(report, now),
        "lg-routes": lambda: routes(report),
        "lg-workers": lambda: workers(report),
        "lg-durations": lambda: durations(report),
        "lg-culprits": lambda: culprits(report),
        "lg-profile": lambda: profile(report, tree),
        "lg-events-head": lambda: events_head(report),
    }
    return {name: makers[name]() for name in ids}
