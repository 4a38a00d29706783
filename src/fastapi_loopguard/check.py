"""``loopguard check``: a CI gate over event logs, with a budget and a baseline.

    loopguard check events.jsonl                      # fails on any blocking event
    loopguard check events.jsonl --write-baseline .loopguard-baseline   # accept today's culprits
    loopguard check 'logs/*.jsonl' --baseline .loopguard-baseline --max-ms-per-route 500

Exit status: 0 within budget, 1 over it, 2 when the input cannot be used (a log or baseline that
cannot be read, a glob matching nothing, a log with lines but not one valid record). A gate that
cannot read its input must not pass.

What is checked:

- ``--baseline FILE``: every culprit must be in it, else it is a new culprit and fails, listed
  with each of its lines and the fix for it. Culprits are keyed by file and function
  (``app/main.py:handler``), not by line: line numbers drift with every edit above them. Files
  are relative to ``--root`` (default: the current directory, the checkout in CI), so a baseline
  written on one machine matches another's.
- ``--max-events N``: at most N events in all.
- ``--max-ms-per-route MS``: no route (or pytest test, by its label) blocked the loop longer than
  MS milliseconds in all.

With none of the three, every culprit is new: any event fails. Budgets count every event, known
culprits included; the baseline only decides which culprits are new. Every failure lists the
culprit lines behind it, each with its source and the fix for it. ``--write-baseline FILE``
records the culprits of the logs given and passes: it is how today's state is accepted.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass, field

from ._text import escape
from .culprits import culprit_key
from .hints import hint_for_record
from .report.charts import fmt_ms
from .report.model import Event, Report, by_route, culprit_hints, route_label, source_lines

OK, OVER, UNUSABLE = 0, 1, 2
NO_CULPRIT = "<no application frame>"
BASELINE_HEADER = (
    "# fastapi-loopguard baseline: the culprits `loopguard check --baseline` tolerates.\n"
    "# One file:function per line, files relative to the checkout; no line numbers, they drift.\n"
)


class BaselineError(ValueError):
    """A baseline file that is not one."""


def key_of(event: Event, root: str) -> str:
    culprit = event["culprit"]
    if culprit is None:
        return f"{NO_CULPRIT}:{event['kind']}"
    return culprit_key(culprit["filename"], culprit["function"], root)


def read_baseline(path: str) -> set[str]:
    """The keys in a baseline file; raises OSError or BaselineError."""
    keys = set()
    with open(path, encoding="utf-8") as f:
        for number, raw in enumerate(f, 1):
            line = raw.strip()
            if not line or line.startswith("#"):
                continue
            if ":" not in line:
                raise BaselineError(f"{path}:{number}: expected file:function, got {line!r}")
            keys.add(line)
    return keys


def write_baseline(path: str, report: Report, root: str) -> int:
    """Writes the report's culprits as a baseline; returns how many."""
    keys = sorted({key_of(e, root) for e in report.events})
    with open(path, "w", encoding="utf-8") as f:
        f.write(BASELINE_HEADER)
        f.writelines(escape(k, 1000) + "\n" for k in keys)
    return len(keys)


@dataclass
class Outcome:
    status: int
    lines: list[str] = field(default_factory=list)


def check(
    report: Report,
    *,
    baseline: set[str] | None = None,
    max_events: int | None = None,
    max_ms_per_route: float | None = None,
    root: str = ".",
) -> Outcome:
    """The verdict on a report, and the lines that explain it."""
    given = baseline is not None
    if baseline is None and max_events is None and max_ms_per_route is None:
        baseline = set()  # nothing is known: every culprit is new
    events = report.events
    problems: list[str] = []
    if baseline is not None:
        new: dict[str, list[Event]] = {}
        for event in events:
            key = key_of(event, root)
            if key not in baseline:
                new.setdefault(key, []).append(event)
        for key, own in sorted(new.items(), key=lambda kv: -sum(e["duration_ms"] for e in kv[1])):
            total = sum(e["duration_ms"] for e in own)
            kinds = ", ".join(sorted({e["kind"] for e in own}))
            known = " (not in the baseline)" if given else ""
            problems.append(
                f"new culprit {escape(key, 400)}{known}: {len(own)} events, "
                f"{fmt_ms(total)}, {kinds}"
            )
            problems.extend(_culprit_lines(own))
    if max_events is not None and len(events) > max_events:
        problems.append(f"{len(events)} blocking events, over the budget of {max_events}")
        problems.extend(_culprit_lines(events, top=5))
    if max_ms_per_route is not None:
        for group in by_route(events):
            if group.total_ms > max_ms_per_route:
                problems.append(
                    f"{escape(group.key[0])}: {fmt_ms(group.total_ms)} of blocked loop in "
                    f"{group.events} events, over the budget of {max_ms_per_route:g} ms per route"
                )
                own = [e for e in events if route_label(e) == group.key[0]]
                problems.extend(_culprit_lines(own, top=3))
    summary = (
        f"{len(events)} events, {fmt_ms(report.total_ms)} of blocked loop"
        f"{f' ({report.source})' if report.source else ''}"
    )
    if problems:
        count = sum(1 for p in problems if not p.startswith(" "))
        head = f"loopguard check: FAILED ({count} over budget): {summary}"
        return Outcome(OVER, [head, *(f"  {p}" for p in problems)])
    checked = []
    if given and baseline is not None:
        checked.append(f"every culprit in the baseline ({len(baseline)} known)")
    if max_events is not None:
        checked.append(f"at most {max_events} events")
    if max_ms_per_route is not None:
        checked.append(f"at most {max_ms_per_route:g} ms per route")
    checked = checked or ["no blocking at all"]
    return Outcome(OK, [f"loopguard check: OK: {summary}; {', '.join(checked)}"])


def _culprit_lines(events: Sequence[Event], top: int | None = None) -> list[str]:
    """Each culprit line of ``events`` (the most blocking first), its source and its fix."""
    by_line: dict[tuple[str, int], list[Event]] = {}
    for event in events:
        culprit = event["culprit"]
        where = (culprit["filename"], culprit["lineno"]) if culprit else ("", 0)
        by_line.setdefault(where, []).append(event)
    ranked = sorted(by_line.items(), key=lambda kv: -sum(e["duration_ms"] for e in kv[1]))
    lines = []
    for (filename, lineno), own in ranked[:top]:
        # The same choice as the report's: the call's hint over the kinds' (report.model).
        hint = next(iter(culprit_hints(own).values()), None) or hint_for_record(own[0])
        ms = fmt_ms(sum(e["duration_ms"] for e in own))
        if filename:
            source = [text for n, text in source_lines(filename, lineno, 0)]
            code = f"  {escape(source[0].strip(), 160)}" if source else ""
            lines.append(f"  {escape(_shown(filename), 400)}:{lineno} ({ms}){code}")
        else:
            lines.append(f"  (no application frame; {ms})")
        lines.append(f"    fix: {escape(hint.fix, 400)}")
        if hint.call is None:
            lines.append(f"    ({escape(hint.note, 400)})")
    if top is not None and len(ranked) > top:
        lines.append(f"  ... and {len(ranked) - top} more lines")
    return lines


def _shown(filename: str) -> str:
    """The file as the developer knows it: relative to the current directory when inside it."""
    here = os.path.abspath(".") + os.sep
    return filename[len(here) :] if filename.startswith(here) else filename
