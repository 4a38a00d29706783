"""The report page: one self-contained HTML file, for ``loopguard report`` and the live page.

No network: the stylesheet is inline, the charts are inline SVG (``charts.py``), and a
Content-Security-Policy in the page itself forbids loading anything, so a report opened from a
mail attachment or an air-gapped machine looks the same. The static page has no script at all;
the live page adds one small script, allowed by its hash, that polls ``data.json`` and swaps in
sections rendered by this same module.

All text that came from requests, logs or source files goes through ``charts.esc`` (control
characters made visible, then ``html.escape``).
"""

from __future__ import annotations

import base64
import hashlib
import json
import os
import time
from collections.abc import Callable, Iterable, Sequence

from .. import __version__
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

_KIND_COLOURS = {
    "sleep": ("#0072b2", "#56a8e0"),
    "io": ("#e69f00", "#f0b534"),
    "cpu": ("#d55e00", "#ff7a2e"),
    "lock": ("#cc79a7", "#e39bc5"),
    "gil": ("#009e73", "#2fc597"),
    "native": ("#5e4fa2", "#9d8ff0"),
    "gc": ("#a68a00", "#d8bd2c"),
    "starved": ("#882255", "#c05090"),
    "cumulative": ("#44aa99", "#6fd3c2"),
    "unknown": ("#808080", "#a0a0a0"),
}


def _kind_css() -> str:
    light = "".join(f"--k-{k}:{c[0]};" for k, c in _KIND_COLOURS.items())
    dark = "".join(f"--k-{k}:{c[1]};" for k, c in _KIND_COLOURS.items())
    rules = "".join(
        f".k-{k}{{fill:var(--k-{k})}}.pill.k-{k}{{background:var(--k-{k})}}" for k in KINDS
    )
    return f":root{{{light}}}@media (prefers-color-scheme:dark){{:root{{{dark}}}}}{rules}"


CSS = (
    """
:root{--bg:#fff;--fg:#1c2230;--muted:#5d6677;--card:#f3f5f9;--line:#dfe3ea;--hit:#fde7d6;
--lag:#6a7fb0;--over:#d55e00}
@media (prefers-color-scheme:dark){:root{--bg:#14171d;--fg:#e7eaf0;--muted:#9aa3b5;
--card:#1e232c;--line:#2f3643;--hit:#4a2e1c;--lag:#8fa3d6}}
*{box-sizing:border-box}
body{margin:0;background:var(--bg);color:var(--fg);
font:15px/1.45 system-ui,-apple-system,"Segoe UI",Roboto,"DejaVu Sans",sans-serif}
main{max-width:1200px;margin:0 auto;padding:20px 24px 48px}
header h1{font-size:22px;margin:0}
header p{margin:4px 0 0;color:var(--muted)}
.live{display:inline-block;margin-left:8px;padding:1px 8px;border-radius:10px;
background:var(--card);font-size:13px}
.live.err{color:var(--over)}
section{margin-top:30px}
section:empty{margin:0}
#lg-durations{margin-top:14px}
h2{font-size:18px;margin:0 0 10px}
.muted{color:var(--muted)}
.empty{color:var(--muted);font-style:italic}
.warn{color:var(--over)}
code{font:13px/1.4 ui-monospace,"DejaVu Sans Mono",monospace;overflow-wrap:anywhere}
.cards{display:grid;grid-template-columns:repeat(auto-fit,minmax(165px,1fr));gap:12px}
.card{background:var(--card);border-radius:8px;padding:10px 14px}
.card b{display:block;font-size:22px;font-variant-numeric:tabular-nums}
.card span{color:var(--muted);font-size:13px}
.scroll{overflow-x:auto}
.chart{display:block;width:100%;min-width:600px;height:auto}
svg text{font-family:inherit}
.axis{font-size:13px;fill:var(--muted)}
.halo{paint-order:stroke;stroke:var(--bg);stroke-width:4px;fill:var(--fg)}
.count{font-size:13px;fill:var(--fg)}
.grid{stroke:var(--line)}
.axis-line{stroke:var(--muted)}
.threshold{stroke:var(--fg);stroke-dasharray:6 4;opacity:.55}
rect.k{opacity:.85}
.legend{list-style:none;display:flex;flex-wrap:wrap;gap:4px 14px;padding:0;margin:0 0 8px;
font-size:13px}
.legend li{display:flex;align-items:center;gap:5px}
.swatch{width:11px;height:11px}
.rows{display:grid;gap:10px}
.row{display:grid;grid-template-columns:minmax(0,2fr) minmax(0,3fr) 96px;gap:4px 14px;
align-items:center}
.row .value{text-align:right;font-variant-numeric:tabular-nums}
.row .label small{display:block;color:var(--muted)}
.hbar{display:block;width:100%;height:16px;background:var(--card);border-radius:3px}
.lag{fill:var(--lag)}
.lag-over{fill:var(--over)}
.marker{stroke:var(--fg);stroke-width:2}
table{width:100%;border-collapse:collapse}
th,td{text-align:left;padding:6px 8px;vertical-align:top}
th{font-size:13px;color:var(--muted);font-weight:600;border-bottom:1px solid var(--line)}
th.n,td.n{text-align:right;font-variant-numeric:tabular-nums;white-space:nowrap}
tbody.culprit{border-bottom:1px solid var(--line)}
td.snippet{padding-top:0}
pre.src{margin:0;padding:6px 0;background:var(--card);border-radius:6px;overflow-x:auto;
font:13px/1.45 ui-monospace,"DejaVu Sans Mono",monospace}
pre.src span{display:block;padding:0 10px;white-space:pre}
pre.src span.hit{background:var(--hit)}
pre.src i{display:inline-block;min-width:3.5em;color:var(--muted);font-style:normal}
.pill{display:inline-block;min-width:4.2em;text-align:center;padding:0 7px;border-radius:9px;
color:#fff;font-size:12px;font-weight:600}
details.event{border:1px solid var(--line);border-radius:6px;margin:6px 0;padding:4px 10px}
details.event summary{cursor:pointer;display:flex;flex-wrap:wrap;gap:2px 10px;
align-items:baseline}
details.event dl{display:grid;grid-template-columns:max-content minmax(0,1fr);gap:2px 12px;
margin:8px 0}
details.event dt{color:var(--muted)}
details.event dd{margin:0;overflow-wrap:anywhere}
ol.stack{margin:6px 0 8px;padding-left:2.2em;font-size:13px}
ol.stack li.culprit{font-weight:600}
ol.stack pre.src{margin:4px 0;font-weight:400}
td.fix{padding-top:2px}
.fix code{font-weight:600}
.fix .call{color:var(--muted)}
footer{margin-top:40px;color:var(--muted);font-size:13px}
@media (max-width:700px){
main{padding:14px 12px 40px}
.axis,.count{font-size:19px}
.row{grid-template-columns:minmax(0,1fr) auto}
.row .label{grid-column:1/-1}
table.culprits{display:block}
table.culprits thead{display:none}
table.culprits tr,table.culprits td{display:block}
table.culprits td{padding:2px 4px}
table.culprits td.n{text-align:left}
table.culprits td[data-label]::before{content:attr(data-label) ": ";color:var(--muted)}
tbody.culprit{display:block;padding:8px 0}
}
""".strip()
    + _kind_css()
    + flame.CSS
)

# The live page's only script: poll data.json, replace the sections, prepend new events.
LIVE_JS = """
(function () {
  "use strict";
  var cfg = JSON.parse(document.getElementById("lg-config").textContent);
  var seq = cfg.seq;
  var status = document.getElementById("lg-status");
  var list = document.getElementById("lg-events-list");
  var token = new URLSearchParams(location.search).get("token");
  var url = location.pathname.replace(/\\/?$/, "/") + "data.json";
  function poll() {
    var headers = token ? {"X-LoopGuard-Token": token} : {};
    fetch(url + "?since=" + seq, {headers: headers, cache: "no-store"})
      .then(function (r) {
        if (!r.ok) { throw new Error("HTTP " + r.status); }
        return r.json();
      })
      .then(function (data) {
        Object.keys(data.sections).forEach(function (id) {
          var el = document.getElementById(id);
          if (el) { el.innerHTML = data.sections[id]; }
        });
        if (data.reset) { list.innerHTML = ""; }
        data.events.forEach(function (html) { list.insertAdjacentHTML("afterbegin", html); });
        while (list.children.length > cfg.max_events) { list.lastElementChild.remove(); }
        seq = data.seq;
        status.textContent = "live, updated " + new Date().toLocaleTimeString();
        status.className = "live";
      })
      .catch(function () {
        status.textContent = "live, server unreachable: retrying";
        status.className = "live err";
      })
      .then(function () { setTimeout(poll, cfg.interval_ms); });
  }
  setTimeout(poll, cfg.interval_ms);
})();
""".strip()


def _sha256(text: str) -> str:
    return base64.b64encode(hashlib.sha256(text.encode("utf-8")).digest()).decode("ascii")


def content_security_policy(live: bool) -> str:
    """Nothing may load or run but this page's own stylesheet (and, live, its own script)."""
    policy = f"default-src 'none'; style-src 'sha256-{_sha256(CSS)}'; img-src data:"
    if live:
        policy += f"; script-src 'sha256-{_sha256(LIVE_JS)}'; connect-src 'self'"
    return policy


# -- sections ------------------------------------------------------------------------------------


def _utc(epoch: float, with_date: bool = False) -> str:
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
        f'<p class="muted">From {esc(_utc(t0, True))}: each bar starts when the loop stopped, '
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
        f'<span class="muted">{esc(_utc(event["started_at"]))}, froze {event["victims"]}'
        f"{', hang' if event['hang'] else ''}</span></summary>"
    )
    fields = [
        ("route", event["route"]),
        ("request id", event["request_id"]),
        ("started", _utc(event["started_at"], True)),
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


def _json_for_script(value: object) -> str:
    # Inside <script>, "</" would end the element: escape the characters HTML cares about.
    text = json.dumps(value)
    return text.replace("<", "\\u003c").replace(">", "\\u003e").replace("&", "\\u0026")


def render(
    report: Report,
    *,
    title: str = "fastapi-loopguard report",
    now: float | None = None,
    live: dict[str, object] | None = None,
    events_html: Sequence[str] | None = None,
    tree: Node | None = None,
) -> str:
    """The whole page. ``live`` (seq, interval_ms) makes it poll for updates; ``events_html``
    are the events' entries already rendered, oldest first (the live page keeps them)."""
    parts = sections(report, now, tree=tree)
    if events_html is None:
        events_html = [event_html(e) for e in report.events[-MAX_LISTED_EVENTS:]]
    events_list = "".join(reversed(events_html[-MAX_LISTED_EVENTS:]))
    origin = f"Source: {report.source}. " if report.source else ""
    generated = f"{origin}Made {_utc(time.time(), True)} by fastapi-loopguard {__version__}."
    status = script = ""
    if live is not None:
        status = '<span id="lg-status" class="live">live</span>'
        config = {**live, "max_events": MAX_LISTED_EVENTS}
        script = (
            f'<script id="lg-config" type="application/json">{_json_for_script(config)}</script>'
            f"<script>{LIVE_JS}</script>"
        )
    return (
        "<!DOCTYPE html>"
        '<html lang="en"><head><meta charset="utf-8">'
        f'<meta http-equiv="Content-Security-Policy" '
        f'content="{esc(content_security_policy(live is not None))}">'
        '<meta name="viewport" content="width=device-width, initial-scale=1">'
        '<meta name="referrer" content="no-referrer">'
        '<link rel="icon" href="data:,">'
        f"<title>{esc(title)}</title><style>{CSS}</style></head><body><main>"
        f"<header><h1>{esc(title)}{status}</h1><p>{esc(generated)}</p></header>"
        f'<section id="lg-summary">{parts["lg-summary"]}</section>'
        f'<section id="lg-timeline">{parts["lg-timeline"]}</section>'
        f'<section id="lg-routes">{parts["lg-routes"]}</section>'
        f'<section id="lg-delay">{delay(report)}</section>'
        f'<section id="lg-workers">{parts["lg-workers"]}</section>'
        f'<section id="lg-lag">{parts["lg-lag"]}</section>'
        f'<section id="lg-durations">{parts["lg-durations"]}</section>'
        f'<section id="lg-culprits">{parts["lg-culprits"]}</section>'
        f'<section id="lg-profile">{parts["lg-profile"]}</section>'
        f'<section id="lg-events"><div id="lg-events-head">{parts["lg-events-head"]}</div>'
        f'<div id="lg-events-list">{events_list}</div></section>'
        "<footer>Kinds: sleep (time.sleep and friends), io (blocking reads, writes, "
        "connects), cpu (Python or native work), lock (a threading lock), gil (waiting for "
        "the GIL another thread holds), native (native code holding the GIL), gc (a garbage "
        "collection), starved (the OS did not schedule the loop thread), unknown.</footer>"
        f"</main>{script}</body></html>"
    )
