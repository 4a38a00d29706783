"""What a report is made of: events and engine statistics, and the summaries drawn from them.

Events are plain dicts in the event log's shape (``dataclasses.asdict(BlockingEvent)``), whether
they come from a file (``loopguard report``) or from a running guard (the live page), so both
pages are drawn by the same code. Everything read from a file is checked field by field: a log
may be truncated, edited or hostile, and a bad line is skipped and counted, never trusted.
"""

from __future__ import annotations

import dataclasses
import json
import linecache
import math
import os
from collections import Counter
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any, TypeGuard

from ..events import BlockingEvent

# In display order; an unknown kind from a newer engine is drawn like "unknown".
KINDS = (
    "sleep",
    "io",
    "cpu",
    "lock",
    "gil",
    "native",
    "gc",
    "starved",
    "cumulative",
    "unknown",
)

Event = dict[str, Any]
Stats = dict[str, Any]

_MAX_FRAMES = 256
_MAX_TEXT = 4096


@dataclass
class Report:
    """Events in start order, and the last statistics record of each process."""

    events: list[Event] = field(default_factory=list)
    stats: list[Stats] = field(default_factory=list)
    source: str = ""
    skipped: int = 0  # lines of the log that were not a valid record

    @property
    def total_ms(self) -> float:
        return float(sum(e["duration_ms"] for e in self.events))

    @property
    def victims(self) -> int:
        return sum(e["victims"] for e in self.events)


@dataclass
class Group:
    """Events sharing a route or a culprit line."""

    key: tuple[str, ...]
    events: int = 0
    total_ms: float = 0.0
    worst_ms: float = 0.0
    victims: int = 0
    kinds: Counter[str] = field(default_factory=Counter)
    kind_ms: Counter[str] = field(default_factory=Counter)
    routes: Counter[str] = field(default_factory=Counter)

    def add(self, event: Event) -> None:
        self.events += 1
        self.total_ms += event["duration_ms"]
        self.worst_ms = max(self.worst_ms, event["duration_ms"])
        self.victims += event["victims"]
        self.kinds[event["kind"]] += 1
        self.kind_ms[event["kind"]] += event["duration_ms"]
        self.routes[route_label(event)] += 1


def route_label(event: Event) -> str:
    """``GET /items/{item_id}``: the route template when known, else the raw path."""
    method = event.get("method")
    target = event.get("route") or event.get("path")
    if method is None and target is None:
        return "(no request)" if event.get("request_id") is None else "(labelled work)"
    return f"{method or '?'} {target or '?'}"


def by_route(events: Iterable[Event]) -> list[Group]:
    """One group per route, the most blocked-for first."""
    groups: dict[str, Group] = {}
    for event in events:
        label = route_label(event)
        groups.setdefault(label, Group((label,))).add(event)
    return sorted(groups.values(), key=lambda g: (-g.total_ms, g.key))


def by_culprit(events: Iterable[Event]) -> list[Group]:
    """One group per culprit line (filename, line, function), the most blocked-for first."""
    groups: dict[tuple[str, ...], Group] = {}
    for event in events:
        culprit = event.get("culprit")
        if culprit is None:
            continue
        key = (culprit["filename"], str(culprit["lineno"]), culprit["function"])
        groups.setdefault(key, Group(key)).add(event)
    return sorted(groups.values(), key=lambda g: (-g.total_ms, g.key))


def source_lines(filename: str, lineno: int, context: int = 2) -> list[tuple[int, str]]:
    """The culprit's line and its neighbours, read now (the report's point in time).

    Only ``.py`` files are read: the names come from the log, and a report must not become a way
    to copy arbitrary files of the machine that renders it into a page.
    """
    if not filename.endswith(".py") or lineno < 1:
        return []
    lines = []
    for number in range(max(1, lineno - context), lineno + context + 1):
        text = linecache.getline(filename, number)
        if not text and number >= lineno:
            break
        lines.append((number, text.rstrip("\n")[:300]))
    return lines if any(n == lineno for n, _ in lines) else []


def lag_percentiles(stats: Stats) -> list[tuple[str, float]]:
    keys = (("p50", "lag_p50_ms"), ("p90", "lag_p90_ms"), ("p99", "lag_p99_ms"))
    rows = [(name, float(stats[key])) for name, key in keys if _number(stats.get(key))]
    if _number(stats.get("lag_max_ms")):
        rows.append(("max", float(stats["lag_max_ms"])))
    return rows


# -- building a report ---------------------------------------------------------------------------


def from_events(
    events: Iterable[BlockingEvent | Event], stats: Iterable[Stats] = (), source: str = ""
) -> Report:
    """A report of events held in memory (the live page, the demo)."""
    report = Report(source=source)
    for event in events:
        raw = dataclasses.asdict(event) if isinstance(event, BlockingEvent) else event
        normal = normalize_event(raw)
        if normal is None:
            report.skipped += 1
        else:
            report.events.append(normal)
    report.events.sort(key=lambda e: e["started_at"])
    report.stats = [s for s in (normalize_stats(s) for s in stats) if s is not None]
    return report


def load_event_log(path: str) -> Report:
    """Reads an event log; raises OSError if the file cannot be read."""
    events: list[Event] = []
    stats: dict[int, Stats] = {}
    skipped = 0
    with open(path, encoding="utf-8", errors="replace") as f:
        for line in f:
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except ValueError:
                skipped += 1
                continue
            kind = record.get("type") if isinstance(record, dict) else None
            if kind == "event" and (event := normalize_event(record)) is not None:
                events.append(event)
            elif kind == "stats" and (stat := normalize_stats(record)) is not None:
                stats[stat["pid"]] = stat  # the last one of a process is the most complete
            else:
                skipped += 1
    events.sort(key=lambda e: e["started_at"])
    return Report(events, list(stats.values()), os.path.basename(path), skipped)


def normalize_event(raw: object) -> Event | None:
    """A checked copy of one event record, or None when it is not one."""
    if not isinstance(raw, Mapping):
        return None
    duration = raw.get("duration_ms")
    started = raw.get("started_at")
    if not (_number(duration) and _number(started)) or duration < 0:
        return None
    stack_raw = raw.get("stack")
    if not isinstance(stack_raw, list | tuple):  # tuple: asdict() of a BlockingEvent
        return None
    stack = [f for f in (_frame(x) for x in stack_raw[:_MAX_FRAMES]) if f is not None]
    kind = raw.get("kind")
    return {
        "duration_ms": float(duration),
        "kind": kind if kind in KINDS else "unknown",
        "request_id": _text(raw.get("request_id")),
        "method": _text(raw.get("method")),
        "path": _text(raw.get("path")),
        "route": _text(raw.get("route")),
        "stack": stack,
        "culprit": _frame(raw.get("culprit")),
        "cpu_ms": float(raw["cpu_ms"]) if _number(raw.get("cpu_ms")) else 0.0,
        "victims": _count(raw.get("victims")),
        "started_at": float(started),
        "samples": _count(raw.get("samples")),
        "stack_missing": raw.get("stack_missing") is True,
        "hang": raw.get("hang") is True,
        "pid": _count(raw.get("pid")),
    }


def normalize_stats(raw: object) -> Stats | None:
    if not isinstance(raw, Mapping):
        return None
    stats: Stats = {k: float(v) for k, v in raw.items() if isinstance(k, str) and _number(v)}
    stats["pid"] = _count(raw.get("pid"))
    return stats


def _number(value: object) -> TypeGuard[float]:
    return isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value)


def _count(value: object) -> int:
    return int(value) if _number(value) and value >= 0 else 0


def _text(value: object) -> str | None:
    return value[:_MAX_TEXT] if isinstance(value, str) else None


def _frame(raw: object) -> dict[str, Any] | None:
    if not isinstance(raw, Mapping):
        return None
    filename, function, lineno = raw.get("filename"), raw.get("function"), raw.get("lineno")
    if not (isinstance(filename, str) and isinstance(function, str) and _number(lineno)):
        return None
    return {
        "filename": filename[:_MAX_TEXT],
        "lineno": int(lineno),
        "function": function[:_MAX_TEXT],
    }
