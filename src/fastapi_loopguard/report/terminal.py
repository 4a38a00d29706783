"""The report in a terminal, with rich: routes, the victims' delay, culprit lines with their source,
victims, loop lag.

Strings from requests and logs are passed through ``_text.escape`` (control characters, ANSI
sequences) and put into ``rich.text.Text`` objects, which never interpret markup, so a path
cannot restyle or rewrite the terminal.
"""

from __future__ import annotations

import os

from rich.console import Console
from rich.console import Group as Lines
from rich.table import Table
from rich.text import Text

from .._text import escape
from ..hints import Hint
from .charts import ROUTE_FIGURES, fmt_ms
from .model import (
    Group,
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

_KIND_STYLE = {
    "sleep": "blue",
    "io": "yellow",
    "cpu": "red",
    "lock": "magenta",
    "gil": "green",
    "native": "cyan",
    "gc": "bright_yellow",
    "starved": "bright_magenta",
    "cumulative": "bright_cyan",
    "unknown": "white",
}


def _kinds(counts: dict[str, int]) -> Text:
    text = Text()
    for i, (kind, n) in enumerate(sorted(counts.items(), key=lambda kv: -kv[1])):
        if i:
            text.append(", ")
        text.append(f"{kind} x{n}", style=_KIND_STYLE.get(kind, "white"))
    return text


def _print_delay(console: Console, report: Report) -> None:
    """Per route, the delay suffered and inflicted, from the log's request records (if any)."""
    rows = delay_by_route(report.requests)
    if not rows:
        return

    def ms(values: list[float], q: float) -> str:
        value = percentile(values, q)
        return fmt_ms(value) if value is not None else "-"

    table = Table(
        title="Victims' delay per route (over the requests that waited, or blocked)",
        title_justify="left",
        expand=False,
    )
    table.add_column("route", overflow="fold")
    for column in ("waited", "wait p50", "wait p99", "blocked", "block p50", "block p99"):
        table.add_column(column, justify="right")
    for d in rows:
        table.add_row(
            Text(escape(d.key)),
            str(len(d.waited)),
            ms(d.waited, 0.5),
            ms(d.waited, 0.99),
            str(len(d.blocked)),
            ms(d.blocked, 0.5),
            ms(d.blocked, 0.99),
        )
    console.print(table)


def _print_culprits(
    console: Console, groups: list[Group], hints: dict[tuple[str, ...], Hint], top: int
) -> None:
    for g in groups[:top]:
        filename, lineno, function = g.key
        line = Text("  ")
        line.append(f"{escape(os.path.basename(filename))}:{lineno}", style="bold cyan")
        line.append(f" in {escape(function)}  ")
        line.append_text(_kinds(g.kinds))
        line.append(
            f"  {g.events} events, {fmt_ms(g.total_ms)} (worst {fmt_ms(g.worst_ms)}), "
            f"froze {g.victims} other requests"
        )
        source = [text for n, text in source_lines(filename, int(lineno), 0)]
        parts: list[Text] = [line]
        if source:
            parts.append(Text(f"      {escape(source[0].strip(), 160)}", style="dim"))
        hint = hints[g.key]
        fix = Text("      fix: ", style="green")
        fix.append(escape(hint.fix, 300), style="bold green")
        parts.append(fix)
        if hint.call is None:  # a hint by kind: its note says what the placeholder means
            parts.append(Text(f"      {escape(hint.note, 400)}", style="dim"))
        console.print(Lines(*parts))
    if len(groups) > top:
        console.print(Text(f"  ... and {len(groups) - top} more lines", style="dim"))


# Lines are as long as their content when nothing sets a width (see print_report).
_UNBOUNDED = 100_000


def print_report(console: Console, report: Report, top: int = 8) -> None:
    if not console.is_terminal and "COLUMNS" not in os.environ:
        # Piped or captured, nothing says how wide the lines may be, and rich's default of 80
        # columns would wrap every table row; a file or a pager takes the whole line instead.
        console.width = _UNBOUNDED
    events = report.events
    console.print()
    headline = Text(f"{len(events)} blocking events", style="bold")
    headline.append(
        f", {fmt_ms(report.total_ms)} of blocked loop in all, {report.victims} requests frozen",
        style="default",
    )
    console.print(headline)
    if report.skipped:
        console.print(Text(f"{report.skipped} invalid lines in the log were skipped", "yellow"))
    if not events:
        console.print("No blocking: the loop kept up.")
    else:
        routes = Table(title="Per route", title_justify="left", expand=False)
        routes.add_column("route", overflow="fold")
        for name, _, _ in ROUTE_FIGURES:
            routes.add_column(name, justify="right")
        routes.add_column("kinds")
        for g in by_route(events):
            figures = [figure(g) for _, figure, _ in ROUTE_FIGURES]
            routes.add_row(Text(escape(g.key[0])), *figures, _kinds(g.kinds))
        console.print(routes)

    _print_delay(console, report)
    if events:
        workers = report.workers()
        if len(workers) > 1:
            groups = by_worker(events)
            table = Table(title="Per worker", title_justify="left", expand=False)
            for column in ("worker", "events", "total", "worst", "froze", "lag p99"):
                table.add_column(column, justify="left" if column == "worker" else "right")
            for worker in workers:
                own = groups.get(worker.key)
                stats = report.stats_of(worker)
                p99 = fmt_ms(stats["lag_p99_ms"]) if stats and "lag_p99_ms" in stats else "-"
                table.add_row(
                    Text(escape(worker.label)),
                    str(own.events if own else 0),
                    fmt_ms(own.total_ms if own else 0),
                    fmt_ms(own.worst_ms if own else 0),
                    str(own.victims if own else 0),
                    p99,
                )
            console.print(table)

        culprits = by_culprit(events)
        hints = culprit_hints(events)
        app_lines = [g for g in culprits if not g.library]
        library_lines = [g for g in culprits if g.library]
        console.print(Text("Top culprit lines", style="bold italic"))
        _print_culprits(console, app_lines, hints, top)
        if library_lines:
            console.print(
                Text("Library code (no line of the app was on the stack)", style="bold italic")
            )
            _print_culprits(console, library_lines, hints, top)
        missing = sum(1 for e in events if e["culprit"] is None)
        if missing:
            console.print(
                Text(
                    f"  {missing} events without a culprit line (no stack, or only the loop's and "
                    "the runtime's frames)",
                    style="dim",
                )
            )

    for stats in report.stats:
        pct = ", ".join(f"{name} {fmt_ms(v)}" for name, v in lag_percentiles(stats))
        who = f" (process {int(stats['pid'])})" if len(report.stats) > 1 else ""
        console.print(
            Text(f"\nLoop lag{who}: {pct} over {int(stats.get('lag_count', 0))} iterations")
        )
        console.print(
            Text(
                f"Engine: threshold {fmt_ms(stats.get('threshold_ms', 0))}, "
                f"{int(stats.get('stalls', 0))} stalls, "
                f"{int(stats.get('events_emitted', 0))} events, "
                f"{int(stats.get('events_dropped', 0))} dropped, "
                f"{int(stats.get('event_log_lost', 0))} not written; stack sample pause p50 "
                f"{stats.get('sample_pause_p50_us', 0):.0f} us, p99 "
                f"{stats.get('sample_pause_p99_us', 0):.0f} us",
                style="dim",
            )
        )
