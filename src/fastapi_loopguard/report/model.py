"""What a report is made of: events and engine statistics, and the summaries drawn from them.

Events are plain dicts in the event log's shape (``dataclasses.asdict(BlockingEvent)``), whether
they come from a file (``loopguard report``) or from a running guard (the live page), so both
pages are drawn by the same code. ``loading.py`` builds them, checking everything read from a
file field by field.

Several logs (the workers of one host, or of many) merge into one report: events are ordered by
time, and each process is told apart by (host, pid), since pids repeat across hosts.

The victims' delay comes from the log's ``request`` records: one per request that waited for
others' blocks or blocked itself, with both figures as the engine summed them up. Requests that
did neither are not in the log, so its percentiles are over the delayed requests of a route,
not over all of them (the Prometheus histogram ``loopguard_request_wait_seconds`` has those).
"""

from __future__ import annotations

import linecache
import math
from collections import Counter
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, TypeGuard

from ..hints import Hint, hint_for_record

Event = dict[str, Any]
Stats = dict[str, Any]
Request = dict[str, Any]


@dataclass
class Report:
    """Events in start order, and the last statistics record of each process."""

    events: list[Event] = field(default_factory=list)
    stats: list[Stats] = field(default_factory=list)
    source: str = ""
    skipped: int = 0  # lines of the log that were not a valid record
    # Requests that waited or blocked, as they ended (see the module's docstring).
    requests: list[Request] = field(default_factory=list)

    @property
    def total_ms(self) -> float:
        return float(sum(e["duration_ms"] for e in self.events))

    @property
    def victims(self) -> int:
        return sum(e["victims"] for e in self.events)

    def workers(self) -> list[Worker]:
        """Every process seen in events or statistics, in order of (host, worker, pid)."""
        keys = {worker_key(e) for e in self.events} | {worker_key(s) for s in self.stats}
        return sorted((Worker(*k) for k in keys), key=Worker.order)

    def stats_of(self, worker: Worker) -> Stats | None:
        return next((s for s in self.stats if worker_key(s) == worker.key), None)


@dataclass(frozen=True)
class Worker:
    """One process: its host, pid, and worker index when the server gave one."""

    host: str
    pid: int
    worker: str | None

    @property
    def key(self) -> tuple[str, int, str | None]:
        return (self.host, self.pid, self.worker)

    def order(self) -> tuple[str, int, str, int]:
        index = self.worker or ""
        return (self.host, int(index) if index.isdigit() else 1 << 30, index, self.pid)

    @property
    def label(self) -> str:
        who = f"worker {self.worker} (pid {self.pid})" if self.worker else f"pid {self.pid}"
        return f"{self.host} {who}" if self.host else who


def worker_key(record: Mapping[str, Any]) -> tuple[str, int, str | None]:
    return (record.get("host") or "", int(record.get("pid") or 0), record.get("worker"))


def by_worker(events: Iterable[Event]) -> dict[tuple[str, int, str | None], Group]:
    """One group per process, keyed like ``Worker.key``."""
    groups: dict[tuple[str, int, str | None], Group] = {}
    for event in events:
        key = worker_key(event)
        groups.setdefault(key, Group((str(key),))).add(event)
    return groups


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
    library: bool = False  # a culprit line in library code: no application frame was on the stack

    def add(self, event: Event) -> None:
        self.events += 1
        self.total_ms += event["duration_ms"]
        self.worst_ms = max(self.worst_ms, event["duration_ms"])
        self.victims += event["victims"]
        self.kinds[event["kind"]] += 1
        self.kind_ms[event["kind"]] += event["duration_ms"]
        self.routes[route_label(event)] += 1


def route_label(event: Event) -> str:
    """``GET /items/{item_id}``: the route template when known, else the raw path.

    Work attributed with ``guard.label(name)`` (the pytest plugin labels each test) is shown by
    its label: per test is what a test run's report and budgets are about. Work outside requests
    is shown with the task that ran it, when the event names one.
    """
    method = event.get("method")
    target = event.get("route") or event.get("path")
    if method is None and target is None:
        label = event.get("request_id")
        if label is not None:
            return f"label {label}"
        task = event.get("task")
        return f"(no request) {task}" if task else "(no request)"
    return f"{method or '?'} {target or '?'}"


def by_route(events: Iterable[Event]) -> list[Group]:
    """One group per route, the most blocked-for first."""
    groups: dict[str, Group] = {}
    for event in events:
        label = route_label(event)
        groups.setdefault(label, Group((label,))).add(event)
    return sorted(groups.values(), key=lambda g: (-g.total_ms, g.key))


@dataclass
class Delay:
    """The delay the logged requests of one route suffered (waited) and inflicted (blocked)."""

    key: str
    waited: list[float] = field(default_factory=list)  # ms, of the requests that waited
    blocked: list[float] = field(default_factory=list)  # ms, of the requests that blocked

    def add(self, request: Request) -> None:
        if request["wait_ms"] > 0:
            self.waited.append(request["wait_ms"])
        if request["block_ms"] > 0:
            self.blocked.append(request["block_ms"])

    @property
    def wait_total_ms(self) -> float:
        return sum(self.waited)


def percentile(values: Sequence[float], q: float) -> float | None:
    """Nearest rank: a value that occurred (few requests make p99 their worst), None if none."""
    if not values:
        return None
    ordered = sorted(values)
    return ordered[max(math.ceil(q * len(ordered)), 1) - 1]


def delay_by_route(requests: Iterable[Request]) -> list[Delay]:
    """One row per route of the logged requests, the longest waited for first."""
    rows: dict[str, Delay] = {}
    for request in requests:
        label = route_label(request)
        rows.setdefault(label, Delay(label)).add(request)
    return sorted(rows.values(), key=lambda d: (-d.wait_total_ms, -sum(d.blocked), d.key))


def by_culprit(events: Iterable[Event]) -> list[Group]:
    """One group per culprit line (filename, line, function): application lines first, then
    library lines (stacks without any application frame), each the most blocked-for first."""
    groups: dict[tuple[str, ...], Group] = {}
    for event in events:
        culprit = event.get("culprit")
        if culprit is None:
            continue
        key = (culprit["filename"], str(culprit["lineno"]), culprit["function"])
        group = groups.setdefault(key, Group(key, library=event["culprit_is_library"]))
        group.add(event)
    return sorted(groups.values(), key=lambda g: (g.library, -g.total_ms, g.key))


def culprit_hints(events: Iterable[Event]) -> dict[tuple[str, ...], Hint]:
    """The fix for each culprit line (keyed like ``by_culprit``).

    One hint per line, from the first event of each of its kinds (not one per event: the live
    page redraws these as events arrive). The call is a property of the line, while its events'
    kinds vary with the machine's load (a sleep can look ``starved``), so a hint naming the call
    wins over the kinds' hints; among several, the one whose kind blocked longest.
    """
    first: dict[tuple[str, ...], dict[str, Event]] = {}
    weight: dict[tuple[str, ...], Counter[str]] = {}
    for event in events:
        culprit = event.get("culprit")
        if culprit is None:
            continue
        line: tuple[str, ...] = (culprit["filename"], str(culprit["lineno"]), culprit["function"])
        first.setdefault(line, {}).setdefault(event["kind"], event)
        weight.setdefault(line, Counter())[event["kind"]] += event["duration_ms"]
    hints: dict[tuple[str, ...], Hint] = {}
    for line, kinds in weight.items():
        ranked = [hint_for_record(first[line][kind]) for kind, _ in kinds.most_common()]
        hints[line] = next((h for h in ranked if h.call is not None), ranked[0])
    return hints


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
    rows = [(name, float(stats[key])) for name, key in keys if is_number(stats.get(key))]
    if is_number(stats.get("lag_max_ms")):
        rows.append(("max", float(stats["lag_max_ms"])))
    return rows


def is_number(value: object) -> TypeGuard[float]:
    return isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value)
