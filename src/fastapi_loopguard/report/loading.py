"""Building a report: from events in memory, or from event logs read and checked line by line.

A log may be truncated, edited or hostile: every field is checked, a bad line is skipped and
counted, and text is cut to a bounded length, never trusted.
"""

from __future__ import annotations

import dataclasses
import glob
import json
import os
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

from ..events import KINDS, BlockingEvent
from .model import Event, Report, Request, Stats, is_number, worker_key

_MAX_FRAMES = 256
_MAX_TEXT = 4096
_MAX_NAME = 255  # a hostname or worker name


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
    return load_event_logs([path])


def expand_paths(patterns: Sequence[str]) -> list[str]:
    """Files named, or matched by a glob the shell did not expand (quoted ``'logs/*.jsonl'``).

    Each file once, in the order given; raises FileNotFoundError for a pattern matching nothing.
    """
    paths: list[str] = []
    seen: set[str] = set()
    for pattern in patterns:
        if glob.has_magic(pattern) and not os.path.exists(pattern):
            matches = sorted(glob.glob(pattern))
            if not matches:
                raise FileNotFoundError(2, "no file matches", pattern)
        else:
            matches = [pattern]
        for path in matches:
            real = os.path.realpath(path)
            if real not in seen:
                seen.add(real)
                paths.append(path)
    return paths


def load_event_logs(paths: Sequence[str]) -> Report:
    """Reads and merges event logs; raises OSError if one cannot be read."""
    events: list[Event] = []
    requests: list[Request] = []
    stats: dict[tuple[str, int, str | None], Stats] = {}
    skipped = 0
    for path in paths:
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
                elif kind == "request" and (request := normalize_request(record)) is not None:
                    requests.append(request)
                elif kind == "stats" and (stat := normalize_stats(record)) is not None:
                    stats[worker_key(stat)] = stat  # a process's last one is the most complete
                else:
                    skipped += 1
    events.sort(key=lambda e: e["started_at"])
    source = ", ".join(os.path.basename(p) for p in paths[:3])
    if len(paths) > 3:
        source += f" and {len(paths) - 3} more"
    return Report(events, list(stats.values()), source, skipped, requests)


def normalize_event(raw: object) -> Event | None:
    """A checked copy of one event record, or None when it is not one."""
    if not isinstance(raw, Mapping):
        return None
    duration = raw.get("duration_ms")
    started = raw.get("started_at")
    if not (is_number(duration) and is_number(started)) or duration < 0:
        return None
    stack_raw = raw.get("stack")
    if not isinstance(stack_raw, list | tuple):  # tuple: asdict() of a BlockingEvent
        return None
    stack = [f for f in (_frame(x) for x in stack_raw[:_MAX_FRAMES]) if f is not None]
    holder_raw = raw.get("holder_stack")
    holder_frames = holder_raw[:_MAX_FRAMES] if isinstance(holder_raw, list | tuple) else ()
    holder_stack = [f for f in (_frame(x) for x in holder_frames) if f is not None]
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
        "culprit_is_library": raw.get("culprit_is_library") is True,
        "cpu_ms": float(raw["cpu_ms"]) if is_number(raw.get("cpu_ms")) else 0.0,
        "victims": _count(raw.get("victims")),
        "queued": _count(raw.get("queued")),
        "started_at": float(started),
        "samples": _count(raw.get("samples")),
        "stack_missing": raw.get("stack_missing") is True,
        "hang": raw.get("hang") is True,
        "task": _text(raw.get("task")),
        "holder_thread": _count(raw.get("holder_thread")) or None,
        "holder_stack": holder_stack,
        "holder_culprit": _frame(raw.get("holder_culprit")),
        "pid": _count(raw.get("pid")),
        "host": _name(raw.get("host")),
        "worker": _name(raw.get("worker")),
    }


def normalize_request(raw: object) -> Request | None:
    """A checked copy of one request record, or None when it is not one."""
    if not isinstance(raw, Mapping):
        return None
    wait, block = raw.get("wait_ms"), raw.get("block_ms")
    if not (is_number(wait) and is_number(block)) or wait < 0 or block < 0:
        return None
    return {
        "request_id": _text(raw.get("request_id")),
        "method": _text(raw.get("method")),
        "path": _text(raw.get("path")),
        "route": _text(raw.get("route")),
        "wait_ms": float(wait),
        "block_ms": float(block),
        "blocks": _count(raw.get("blocks")),
        "time": float(raw["time"]) if is_number(raw.get("time")) else 0.0,
        "pid": _count(raw.get("pid")),
        "host": _name(raw.get("host")),
        "worker": _name(raw.get("worker")),
    }


def normalize_stats(raw: object) -> Stats | None:
    if not isinstance(raw, Mapping):
        return None
    stats: Stats = {k: float(v) for k, v in raw.items() if isinstance(k, str) and is_number(v)}
    stats["pid"] = _count(raw.get("pid"))
    for key in ("host", "worker"):  # absent from logs older than them
        if (name := _name(raw.get(key))) is not None:
            stats[key] = name
    return stats


def _count(value: object) -> int:
    return int(value) if is_number(value) and value >= 0 else 0


def _text(value: object) -> str | None:
    return value[:_MAX_TEXT] if isinstance(value, str) else None


def _name(value: object) -> str | None:
    """A hostname or worker index: a short string (a number is taken as its digits)."""
    if isinstance(value, int) and not isinstance(value, bool) and value >= 0:
        return str(value)
    return value[:_MAX_NAME] if isinstance(value, str) and value else None


def _frame(raw: object) -> dict[str, Any] | None:
    if not isinstance(raw, Mapping):
        return None
    filename, function, lineno = raw.get("filename"), raw.get("function"), raw.get("lineno")
    if not (isinstance(filename, str) and isinstance(function, str) and is_number(lineno)):
        return None
    return {
        "filename": filename[:_MAX_TEXT],
        "lineno": int(lineno),
        "function": function[:_MAX_TEXT],
    }
