"""The blocking profile: every event's stack in one call tree, weighted by blocked milliseconds.

Go has a blocking profile; this is asyncio's. Each event adds its duration along its stack (from
the outermost frame to the innermost), so a node's weight is the loop time blocked while that
frame was on the stack, and its self weight the time blocked with it innermost: the culprit
lines, plus library code below them. Frames are told apart by file, line and function, as
py-spy does: the line shows which call of a function blocked.

Two standard formats carry it to other tools:

- ``collapsed`` (Brendan Gregg's folded stacks, read by flamegraph.pl, inferno, speedscope and
  Pyroscope): ``outer;...;inner weight`` per line, the weight in whole microseconds, because
  several of these readers accept only integers;
- ``speedscope``'s own JSON file format (https://www.speedscope.app/file-format-schema.json): one
  sampled profile in milliseconds, an event per sample in time order, and one more profile per
  worker when the report merges several.

An event without a stack (the GIL was not free in time, or stacks are off) still weighs: it
hangs under a single pseudo-frame naming its kind, so the totals match the report's.
"""

from __future__ import annotations

import json
from collections import Counter
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

from .. import __version__
from .._text import visible
from .model import Event, Report, worker_key

FrameKey = tuple[str, int, str]  # filename, lineno, function
NO_STACK_FILE = ""  # the pseudo-frame of an event without a stack has no file


def stack_of(event: Event) -> list[FrameKey]:
    """The event's frames, outermost first; a pseudo-frame when it has none."""
    frames = [(f["filename"], f["lineno"], f["function"]) for f in event["stack"]]
    return frames or [(NO_STACK_FILE, 0, f"[no stack: {event['kind']}]")]


@dataclass
class Node:
    """One frame in the call tree, with what blocked while it was on the stack."""

    frame: FrameKey | None  # None for the root
    total_ms: float = 0.0
    self_ms: float = 0.0
    events: int = 0
    kind_ms: dict[str, float] = field(default_factory=dict)
    children: dict[FrameKey, Node] = field(default_factory=dict)
    culprits: int = 0  # events whose culprit line this is: the flame graph draws it alone

    @property
    def culprit(self) -> bool:
        return self.culprits > 0

    def add(self, event: Event, sign: int = 1) -> None:
        """Adds the event's stack (or, with ``sign=-1``, takes an added one out again)."""
        ms, kind = event["duration_ms"] * sign, event["kind"]
        c = event["culprit"]
        culprit = (c["filename"], c["lineno"], c["function"]) if c is not None else None
        node = self
        node._count(ms, kind, sign)
        for frame in stack_of(event):
            child = node.children.get(frame)
            if child is None:
                child = node.children[frame] = Node(frame)
            child._count(ms, kind, sign)
            child.culprits += sign * (frame == culprit)
            if child.events == 0:  # the last event through it was taken out
                del node.children[frame]
                return
            node = child
        node.self_ms += ms

    def _count(self, ms: float, kind: str, sign: int) -> None:
        self.total_ms += ms
        self.events += sign
        left = self.kind_ms.get(kind, 0.0) + ms
        if sign < 0 and left <= 1e-9:
            self.kind_ms.pop(kind, None)
        else:
            self.kind_ms[kind] = left

    def sorted_children(self) -> list[Node]:
        """Heaviest first: what a reader looks for, and a stable order for the same data."""
        return sorted(self.children.values(), key=lambda n: (-n.total_ms, n.frame or ("", 0, "")))

    @property
    def kind(self) -> str:
        """The kind that weighs most under this frame."""
        return max(self.kind_ms.items(), key=lambda kv: (kv[1], kv[0]))[0] if self.kind_ms else ""


def call_tree(events: Iterable[Event]) -> Node:
    root = Node(None)
    for event in events:
        root.add(event)
    return root


def frame_name(frame: FrameKey) -> str:
    """``function (file:line)``, py-spy's way of naming a frame in folded stacks."""
    filename, lineno, function = frame
    return f"{function} ({filename}:{lineno})" if filename else function


def _folded(text: str) -> str:
    # ';' separates frames and a line break ends the record: neither may appear inside a name.
    # Names come from logs: other control characters (terminal escapes) are made visible.
    return visible(text.replace(";", ":").replace("\r", " ").replace("\n", " "))


def collapsed(events: Iterable[Event]) -> str:
    """Folded stacks, one line per distinct stack, weights in microseconds of blocked loop."""
    weights: Counter[tuple[FrameKey, ...]] = Counter()
    for event in events:
        weights[tuple(stack_of(event))] += event["duration_ms"]
    lines = []
    for stack, ms in sorted(weights.items(), key=lambda kv: kv[0]):
        micros = round(ms * 1000)
        if micros > 0:
            lines.append(f"{';'.join(_folded(frame_name(f)) for f in stack)} {micros}")
    return "".join(line + "\n" for line in lines)


def speedscope(report: Report, name: str = "blocked event loop") -> dict[str, Any]:
    """The speedscope file: shared frames, one sampled profile of all events, one per worker."""
    frames: list[dict[str, Any]] = []
    index: dict[FrameKey, int] = {}

    def frame_index(frame: FrameKey) -> int:
        at = index.get(frame)
        if at is None:
            filename, lineno, function = frame
            entry: dict[str, Any] = {"name": function}
            if filename:
                entry["file"] = filename
                entry["line"] = lineno
            at = index[frame] = len(frames)
            frames.append(entry)
        return at

    def profile(title: str, events: Sequence[Event]) -> dict[str, Any]:
        samples = [[frame_index(f) for f in stack_of(e)] for e in events]
        weights = [e["duration_ms"] for e in events]
        return {
            "type": "sampled",
            "name": title,
            "unit": "milliseconds",
            "startValue": 0,
            "endValue": sum(weights),
            "samples": samples,
            "weights": weights,
        }

    profiles = [profile(name, report.events)]
    workers = report.workers()
    if len(workers) > 1:
        for worker in workers:
            own = [e for e in report.events if worker_key(e) == worker.key]
            if own:
                profiles.append(profile(f"{name}: {worker.label}", own))
    return {
        "$schema": "https://www.speedscope.app/file-format-schema.json",
        "name": f"fastapi-loopguard: {report.source}" if report.source else "fastapi-loopguard",
        "exporter": f"fastapi-loopguard@{__version__}",
        "activeProfileIndex": 0,
        "shared": {"frames": frames},
        "profiles": profiles,
    }


def speedscope_json(report: Report) -> str:
    return json.dumps(speedscope(report), ensure_ascii=True, separators=(",", ":")) + "\n"
