"""The blocking profile: the call tree, its collapsed and speedscope exports, the flame graph.

The speedscope file is validated against the constraints of speedscope's published JSON schema,
written below from its source (jlfwong/speedscope, src/lib/file-format-spec.ts, from which
https://www.speedscope.app/file-format-schema.json is generated), plus what its importer
checks on top (one weight per sample, stacks as indices into the shared frames).
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

import jsonschema
import pytest

from fastapi_loopguard.report import from_events, load_event_log, render
from fastapi_loopguard.report.profile import call_tree, collapsed, speedscope

from .conftest import culprit_line
from .test_cli import PLAIN, block_with_bystanders, loopguard, loopguard_run

SPEEDSCOPE_SCHEMA: dict[str, Any] = {
    "$schema": "http://json-schema.org/draft-07/schema#",
    "type": "object",
    "required": ["$schema", "shared", "profiles"],
    "properties": {
        "$schema": {"const": "https://www.speedscope.app/file-format-schema.json"},
        "name": {"type": "string"},
        "activeProfileIndex": {"type": "number"},
        "exporter": {"type": "string"},
        "shared": {
            "type": "object",
            "required": ["frames"],
            "properties": {"frames": {"type": "array", "items": {"$ref": "#/definitions/Frame"}}},
        },
        "profiles": {
            "type": "array",
            "items": {
                "anyOf": [
                    {"$ref": "#/definitions/SampledProfile"},
                    {"$ref": "#/definitions/EventedProfile"},
                ]
            },
        },
    },
    "definitions": {
        "Frame": {
            "type": "object",
            "required": ["name"],
            "properties": {
                "name": {"type": "string"},
                "file": {"type": "string"},
                "line": {"type": "number"},
                "col": {"type": "number"},
            },
        },
        "ValueUnit": {
            "enum": ["none", "nanoseconds", "microseconds", "milliseconds", "seconds", "bytes"]
        },
        "SampledProfile": {
            "type": "object",
            "required": ["type", "name", "unit", "startValue", "endValue", "samples", "weights"],
            "properties": {
                "type": {"const": "sampled"},
                "name": {"type": "string"},
                "unit": {"$ref": "#/definitions/ValueUnit"},
                "startValue": {"type": "number"},
                "endValue": {"type": "number"},
                "samples": {
                    "type": "array",
                    "items": {"type": "array", "items": {"type": "number"}},
                },
                "weights": {"type": "array", "items": {"type": "number"}},
            },
        },
        "EventedProfile": {
            "type": "object",
            "required": ["type", "name", "unit", "startValue", "endValue", "events"],
            "properties": {
                "type": {"const": "evented"},
                "name": {"type": "string"},
                "unit": {"$ref": "#/definitions/ValueUnit"},
                "startValue": {"type": "number"},
                "endValue": {"type": "number"},
                "events": {
                    "type": "array",
                    "items": {
                        "type": "object",
                        "required": ["type", "at", "frame"],
                        "properties": {
                            "type": {"enum": ["O", "C"]},
                            "at": {"type": "number"},
                            "frame": {"type": "number"},
                        },
                    },
                },
            },
        },
    },
}


def assert_speedscope(document: dict[str, Any]) -> None:
    jsonschema.validate(document, SPEEDSCOPE_SCHEMA)
    frames = document["shared"]["frames"]
    for profile in document["profiles"]:
        assert len(profile["samples"]) == len(profile["weights"])
        assert profile["startValue"] <= profile["endValue"]
        assert abs(sum(profile["weights"]) - (profile["endValue"] - profile["startValue"])) < 1e-6
        for stack in profile["samples"]:
            assert stack and all(isinstance(i, int) and 0 <= i < len(frames) for i in stack)


ASYNCIO = "/usr/lib/python3.11/asyncio"
TRUNK = [(f"{ASYNCIO}/base_events.py", 600 + i, f"loop_frame_{i}") for i in range(20)]
HOSTILE = 'h<svg onload="alert(1)">;x\nforged'


def _event(
    t: float, ms: float, kind: str, leaf: list[tuple[str, int, str]], worker: str = "1"
) -> dict[str, Any]:
    stack = [{"filename": f, "lineno": n, "function": fn} for f, n, fn in [*TRUNK, *leaf]]
    culprit = next((f for f in reversed(stack) if f["filename"].startswith("/srv")), None)
    return {
        "duration_ms": ms,
        "kind": kind,
        "request_id": f"r{t}",
        "method": "GET",
        "path": "/x",
        "route": "/x",
        "stack": stack,
        "culprit": culprit,
        "cpu_ms": 0.0,
        "victims": 1,
        "started_at": 1_700_000_000.0 + t,
        "pid": 100 + int(worker),
        "host": "web-1",
        "worker": worker,
    }


def _report() -> Any:
    app = "/srv/app/main.py"
    events = [
        _event(0, 200.0, "sleep", [(app, 10, "build"), (app, 12, "slow")]),
        _event(1, 100.0, "sleep", [(app, 10, "build"), (app, 12, "slow")], worker="2"),
        _event(2, 50.5, "cpu", [(app, 20, HOSTILE)]),
        {**_event(3, 70.0, "gil", []), "stack": [], "culprit": None},
    ]
    return from_events(events)


def test_call_tree_weighs_every_stack() -> None:
    report = _report()
    root = call_tree(report.events)
    assert root.total_ms == pytest.approx(420.5) and root.events == 4
    trunk = root.children[(f"{ASYNCIO}/base_events.py", 600, "loop_frame_0")]
    assert trunk.total_ms == pytest.approx(350.5)
    [no_stack] = [n for n in root.children.values() if n.frame and n.frame[0] == ""]
    assert no_stack.frame == ("", 0, "[no stack: gil]") and no_stack.self_ms == 70.0
    node = trunk
    while node.children:
        node = max(node.children.values(), key=lambda n: n.total_ms)
    assert node.frame == ("/srv/app/main.py", 12, "slow") and node.self_ms == 300.0
    assert node.culprit and node.kind_ms == {"sleep": 300.0}


def test_events_leave_the_tree_as_they_came() -> None:
    """The live page keeps its tree up to date as events arrive and drop out of its window."""
    events = _report().events
    tree = call_tree(events)
    for event in events[:2]:
        tree.add(event, sign=-1)
    expected = call_tree(events[2:])

    def shape(node: Any) -> Any:
        return (
            node.frame,
            round(node.total_ms, 6),
            round(node.self_ms, 6),
            node.events,
            node.culprit,
            {k: round(v, 6) for k, v in node.kind_ms.items()},
            sorted(shape(c) for c in node.children.values()),
        )

    assert shape(tree) == shape(expected)
    assert not any(n.frame and n.frame[2] == "slow" for n in _walk(tree))


def _walk(node: Any) -> Any:
    yield node
    for child in node.children.values():
        yield from _walk(child)


def test_collapsed_stacks() -> None:
    text = collapsed(_report().events)
    lines = text.splitlines()
    assert len(lines) == 3  # two events share a stack
    weights = {line.rsplit(" ", 1)[0].split(";")[-1]: int(line.rsplit(" ", 1)[1]) for line in lines}
    assert weights["slow (/srv/app/main.py:12)"] == 300_000  # microseconds
    assert weights["[no stack: gil]"] == 70_000
    assert sum(weights.values()) == 420_500
    slow = next(line for line in lines if "slow (" in line).split(";")
    assert slow[0] == f"loop_frame_0 ({ASYNCIO}/base_events.py:600)"  # outermost first
    # A name with ';' or a line break cannot split a frame or a record.
    hostile = next(line for line in lines if "forged" in line)
    assert hostile.count(";") == len(TRUNK) and "\n" not in hostile


def test_speedscope_file_matches_the_schema() -> None:
    report = _report()
    document = speedscope(report)
    assert_speedscope(document)
    frames = document["shared"]["frames"]
    everything = document["profiles"][0]
    assert everything["unit"] == "milliseconds" and everything["endValue"] == pytest.approx(420.5)
    assert frames[everything["samples"][0][0]]["name"] == "loop_frame_0"  # root first
    assert frames[everything["samples"][0][-1]] == {
        "name": "slow",
        "file": "/srv/app/main.py",
        "line": 12,
    }
    # Two workers: a profile each after the whole.
    names = [p["name"] for p in document["profiles"]]
    assert len(names) == 3 and "web-1 worker 2 (pid 102)" in names[2]
    assert json.loads(json.dumps(document)) == document


def test_flame_graph_in_the_page() -> None:
    page = render(_report())
    section = page.split('id="lg-profile"')[1].split("</section>")[0]
    wide = section.split('class="flame fg-wide"')[1].split("</svg>")[0]
    assert 'class="flame fg-narrow"' in section
    # The 20 loop frames that never branch are one box; the culprit lines have their own.
    assert "20 frames: loop_frame_0 \u2026 loop_frame_19" in wide
    assert ">build</text>" in wide and ">slow</text>" in wide
    assert wide.count('tabindex="0"') >= 5
    assert "/srv/app/main.py:12" in wide  # what a tap or hover shows
    assert "<svg onload" not in page and "h&lt;svg onload=&quot;alert(1)&quot;&gt;" in page
    # Every fix is shown with its culprit line.
    assert "fix for " in page or "fix: " in page


def test_report_exports_from_a_real_server(loop_name: str, tmp_path: Path) -> None:
    events = tmp_path / "events.jsonl"
    with loopguard_run(
        tmp_path, loop_name, "tests.apps.plain:app", "--event-log", str(events)
    ) as server:
        # Sleeps: a busy test machine starves a wall-clock spin of CPU, not a sleep.
        block_with_bystanders(server.url, "/sleep/150")
        block_with_bystanders(server.url, "/sleep/250")
        time.sleep(0.3)
    folded = loopguard("report", str(events), "--format", "collapsed", "-o", "-")
    assert folded.returncode == 0, folded.stderr
    lines = folded.stdout.splitlines()
    sleep_line = culprit_line(PLAIN, "sleep")
    assert any(line.split(" ")[-2].endswith(f"plain.py:{sleep_line})") for line in lines)
    assert all(int(line.rsplit(" ", 1)[1]) > 0 for line in lines)
    out = tmp_path / "profile.json"
    result = loopguard("report", str(events), "--format", "speedscope", "-o", str(out), "-q")
    assert result.returncode == 0, result.stderr
    document = json.loads(out.read_text())
    assert_speedscope(document)
    report = load_event_log(str(events))
    assert len(document["profiles"][0]["samples"]) == len(report.events) >= 2
    leaves = {
        document["shared"]["frames"][s[-1]]["name"] for s in document["profiles"][0]["samples"]
    }
    assert leaves == {"sleep"}  # the culprit, plain.py's sleep(), innermost: time.sleep is C
