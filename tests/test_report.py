"""The report: reading a log (hostile and broken lines included), the HTML page, the terminal."""

from __future__ import annotations

import base64
import hashlib
import io
import json
import re
import time
from html.parser import HTMLParser
from pathlib import Path
from typing import Any

import pytest
from rich.console import Console

from fastapi_loopguard import BlockingEvent, Frame
from fastapi_loopguard.report import from_events, load_event_log, render
from fastapi_loopguard.report.assets import content_security_policy
from fastapi_loopguard.report.model import by_culprit, by_route, source_lines
from fastapi_loopguard.report.sections import MAX_LISTED_EVENTS
from fastapi_loopguard.report.terminal import print_report

HOSTILE_ROUTE = '/x/</code></script><script>alert("route")</script><img src=x onerror=alert(1)>'
HOSTILE_FUNCTION = "handler<svg onload=alert(2)>"
HOSTILE_FILE = "/srv/<iframe src=javascript:alert(3)>.py"
ANSI_PATH = "/red\x1b[31mRED\x1b[0m\r\nX-Forged: 1"

SOURCE = """async def handler():
    prepare()
    time.sleep(0.2)  # the culprit line
    return {"ok": True}
"""


class Document(HTMLParser):
    """Every tag with its attributes, and the text as a browser would show it (unescaped)."""

    def __init__(self, html: str) -> None:
        super().__init__(convert_charrefs=True)
        self.tags: list[tuple[str, dict[str, str | None]]] = []
        self.text: list[str] = []
        self.styles: list[str] = []
        self._in_style = False
        self.feed(html)
        self.close()

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        self.tags.append((tag, dict(attrs)))
        self._in_style = tag == "style"

    def handle_endtag(self, tag: str) -> None:
        self._in_style = False

    def handle_data(self, data: str) -> None:
        (self.styles if self._in_style else self.text).append(data)

    def count(self, tag: str, cls: str | None = None) -> int:
        return sum(
            1
            for t, attrs in self.tags
            if t == tag and (cls is None or cls in (attrs.get("class") or "").split())
        )


def event(
    t: float,
    ms: float,
    kind: str,
    route: str,
    culprit: dict[str, Any] | None,
    victims: int = 3,
    path: str | None = None,
) -> dict[str, Any]:
    stack = [{"filename": "/usr/lib/python3/asyncio/events.py", "lineno": 80, "function": "_run"}]
    if culprit is not None:
        stack.append(culprit)
    return {
        "type": "event",
        "pid": 4242,
        "duration_ms": ms,
        "kind": kind,
        "request_id": f"req-{t}",
        "method": "GET",
        "path": path or route,
        "route": route,
        "stack": stack,
        "culprit": culprit,
        "cpu_ms": 1.5,
        "victims": victims,
        "started_at": t,
        "samples": 4,
        "stack_missing": False,
        "hang": False,
    }


@pytest.fixture
def log(tmp_path: Path) -> tuple[Path, Path]:
    source = tmp_path / "shop.py"
    source.write_text(SOURCE)
    here = {"filename": str(source), "lineno": 3, "function": "handler"}
    hostile = {"filename": HOSTILE_FILE, "lineno": 7, "function": HOSTILE_FUNCTION}
    t0 = time.time() - 30
    lines = [
        json.dumps(event(t0 + 1.0, 210.0, "sleep", "/reports/{id}", here, victims=5)),
        json.dumps(event(t0 + 2.0, 120.0, "io", "/prices/{sku}", here)),
        json.dumps(event(t0 + 3.5, 95.0, "cpu", HOSTILE_ROUTE, hostile, victims=2)),
        json.dumps(event(t0 + 4.0, 80.0, "gil", ANSI_PATH, None)),
        json.dumps(event(t0 + 5.0, 60.0, "lock", "/reports/{id}", here)),
        "this is not json",
        "[1, 2, 3]",
        json.dumps({"type": "event", "duration_ms": "slow", "started_at": t0}),
        json.dumps({**event(t0, 1.0, "cpu", "/x", None), "stack": "not a list"}),
        json.dumps({"type": "surprise"}),
        "",
        json.dumps(
            {
                "type": "stats",
                "pid": 4242,
                "threshold_ms": 50.0,
                "lag_count": 1200,
                "lag_p50_ms": 0.1,
                "lag_p90_ms": 2.5,
                "lag_p99_ms": 180.0,
                "lag_max_ms": 210.0,
                "stalls": 5,
                "events_dropped": 0,
                "event_log_lost": 0,
            }
        ),
    ]
    path = tmp_path / "events.jsonl"
    path.write_text("\n".join(lines) + "\n")
    return path, source


def test_log_is_read_and_bad_lines_are_counted(log: tuple[Path, Path]) -> None:
    report = load_event_log(str(log[0]))
    assert len(report.events) == 5
    assert report.skipped == 5  # not JSON, a list, bad duration, bad stack, unknown type
    assert [e["kind"] for e in report.events] == ["sleep", "io", "cpu", "gil", "lock"]
    assert report.stats[0]["pid"] == 4242 and report.stats[0]["lag_p99_ms"] == 180.0
    routes = by_route(report.events)
    assert routes[0].key == ("GET /reports/{id}",)
    assert (routes[0].events, routes[0].total_ms, routes[0].worst_ms) == (2, 270.0, 210.0)
    assert routes[0].victims == 8
    culprits = by_culprit(report.events)
    assert culprits[0].key == (str(log[1]), "3", "handler")
    assert culprits[0].events == 3
    assert len(culprits) == 2  # the gil event has no application frame


def test_page_has_every_part_with_content(log: tuple[Path, Path]) -> None:
    report = load_event_log(str(log[0]))
    doc = Document(render(report))
    assert doc.count("svg", "timeline") == 1
    # One bar per event on the timeline, plus the legend's swatches and the other charts.
    timeline = render(report).split('class="chart timeline"')[1].split("</svg>")[0]
    assert timeline.count("<rect ") == 5
    assert doc.count("div", "row") == 4 + 4  # 4 routes, 4 lag percentiles
    assert doc.count("svg", "histogram") == 1
    assert doc.count("tbody", "culprit") == 2
    assert doc.count("details", "event") == 5
    text = "".join(doc.text)
    assert "time.sleep(0.2)  # the culprit line" in text  # the snippet, read at report time
    assert "Source not available" in text  # for the file that does not exist
    assert "5 lines of the log were not valid records" in text
    assert "GET /reports/{id}" in text and "froze 8 requests" in text
    hit = [a for t, a in doc.tags if t == "span" and a.get("class") == "hit"]
    assert len(hit) == 1 + 3  # the culprit line: in the table, and in each of its 3 events


def test_hostile_strings_are_text_never_markup(log: tuple[Path, Path]) -> None:
    html = render(load_event_log(str(log[0])))
    doc = Document(html)
    # Nothing from the log became an element or an attribute.
    assert {t for t, _ in doc.tags}.isdisjoint({"script", "img", "iframe", "object", "embed"})
    for tag, attrs in doc.tags:
        assert not any(name.startswith("on") for name in attrs), (tag, attrs)
        assert tag != "svg" or "onload" not in attrs
    # ...and it is all there, as text, exactly.
    text = "".join(doc.text)
    assert HOSTILE_ROUTE in text
    assert HOSTILE_FUNCTION in text
    assert HOSTILE_FILE in text
    # Control characters (ANSI escapes, CR/LF) are shown as visible escapes, never raw.
    assert "\x1b" not in html and "\r" not in html
    assert "GET /red\\x1b[31mRED\\x1b[0m\\x0d\\x0aX-Forged: 1" in text


def test_page_loads_nothing_from_the_network(log: tuple[Path, Path]) -> None:
    html = render(load_event_log(str(log[0])))
    assert not re.search(r"https?://", html)
    assert "@import" not in html and "url(" not in html
    doc = Document(html)
    csp = next(
        a["content"] for t, a in doc.tags if a.get("http-equiv") == "Content-Security-Policy"
    )
    assert csp == content_security_policy(live=False)
    assert csp.startswith("default-src 'none'")
    # The stylesheet is allowed by its hash, so the browser applies it (and nothing else).
    digest = base64.b64encode(hashlib.sha256("".join(doc.styles).encode()).digest()).decode()
    assert f"'sha256-{digest}'" in csp
    assert "script-src" not in csp
    icons = [a for t, a in doc.tags if t == "link"]
    assert icons == [{"rel": "icon", "href": "data:,"}]


def test_empty_log_still_makes_a_page(tmp_path: Path) -> None:
    empty = tmp_path / "empty.jsonl"
    empty.write_text("")
    doc = Document(render(load_event_log(str(empty))))
    text = "".join(doc.text)
    assert "No blocking events yet." in text
    assert "No loop-lag statistics here" in text
    assert doc.count("svg", "timeline") == 0


def test_events_list_is_capped_but_charts_count_all(tmp_path: Path) -> None:
    t0 = time.time()
    lines = [json.dumps(event(t0 + i * 0.01, 60.0, "cpu", "/r", None)) for i in range(600)]
    path = tmp_path / "many.jsonl"
    path.write_text("\n".join(lines))
    html = render(load_event_log(str(path)))
    doc = Document(html)
    assert doc.count("details", "event") == MAX_LISTED_EVENTS
    assert f"the latest {MAX_LISTED_EVENTS} of 600" in "".join(doc.text)
    timeline = html.split('class="chart timeline"')[1].split("</svg>")[0]
    assert timeline.count("<rect ") == 600


def test_source_lines_only_from_python_files(tmp_path: Path) -> None:
    secret = tmp_path / "secret.txt"
    secret.write_text("password=hunter2\n")
    assert source_lines(str(secret), 1) == []
    script = tmp_path / "mod.py"
    script.write_text("a = 1\nb = 2\nc = 3\n")
    assert source_lines(str(script), 2, context=1) == [(1, "a = 1"), (2, "b = 2"), (3, "c = 3")]
    assert source_lines(str(script), 99) == []


def test_terminal_report(log: tuple[Path, Path]) -> None:
    out = io.StringIO()
    console = Console(file=out, width=160, color_system=None, force_terminal=False)
    print_report(console, load_event_log(str(log[0])))
    text = out.getvalue()
    assert "5 blocking events, 565 ms of blocked loop in all, 16 requests frozen" in text
    assert "GET /reports/{id}" in text
    assert "shop.py:3 in handler" in text
    assert "time.sleep(0.2)  # the culprit line" in text
    assert "froze 11 other requests" in text  # 5 + 3 + 3 victims of the shop.py line
    assert "Loop lag: p50 0.10 ms, p90 2.5 ms, p99 180 ms, max 210 ms over 1200" in text
    assert "5 invalid lines in the log were skipped" in text
    # The ANSI sequence and CR/LF of the hostile path arrive escaped, not interpreted.
    assert "\x1b" not in text
    assert "\\x1b[31mRED" in text


def test_report_from_events_in_memory() -> None:
    frame = Frame("/srv/app/main.py", 12, "handler")
    events = [
        BlockingEvent(
            duration_ms=120.0 + i,
            kind="sleep",
            request_id=f"r{i}",
            method="GET",
            path=f"/items/{i}",
            route="/items/{item_id}",
            stack=(Frame("/usr/lib/python3.11/asyncio/events.py", 80, "_run"), frame),
            culprit=frame,
            cpu_ms=0.0,
            victims=i,
            started_at=1_700_000_000.0 - i,  # out of order: the report sorts them
        )
        for i in range(3)
    ]
    report = from_events(events, [{"lag_p99_ms": 130.0, "pid": 7}], source="memory")
    assert [e["request_id"] for e in report.events] == ["r2", "r1", "r0"]
    assert report.events[0]["stack"][-1] == {
        "filename": "/srv/app/main.py",
        "lineno": 12,
        "function": "handler",
    }
    assert by_route(report.events)[0].key == ("GET /items/{item_id}",)
    assert report.stats == [{"lag_p99_ms": 130.0, "pid": 7}]
    assert "GET /items/{item_id}" in render(report)


def test_a_lock_waits_holder_is_shown_with_its_line_and_escaped(tmp_path: Path) -> None:
    # The event log's shape of a lock wait whose holder was singled out (asdict of the event).
    waits = {"filename": "/srv/app/main.py", "lineno": 12, "function": "handler"}
    holds = {"filename": HOSTILE_FILE, "lineno": 30, "function": HOSTILE_FUNCTION}
    pool = {"filename": "/usr/lib/python3/threading.py", "lineno": 1002, "function": "_bootstrap"}
    record = {
        **event(time.time() - 5, 600.0, "lock", "/lock", waits),
        "holder_thread": 5151,
        "holder_stack": [pool, holds],
        "holder_culprit": holds,
    }
    path = tmp_path / "events.jsonl"
    path.write_text(
        json.dumps(record) + "\n" + json.dumps(event(time.time(), 90, "sleep", "/x", waits))
    )
    report = load_event_log(str(path))
    held, plain = report.events
    assert held["holder_thread"] == 5151
    assert held["holder_stack"] == [pool, holds]
    assert held["holder_culprit"] == holds
    assert plain["holder_stack"] == [] and plain["holder_thread"] is None
    html = render(report)
    doc = Document(html)
    text = "".join(doc.text)
    assert "likely holder: thread 5151" in text
    assert f"{HOSTILE_FILE}:30 in {HOSTILE_FUNCTION}" in text
    assert "iframe" not in {t for t, _ in doc.tags}
    assert not any(name.startswith("on") for _, attrs in doc.tags for name in attrs)
    assert text.count("likely holder") == 1  # only the lock wait has one


def test_one_list_of_kinds_matches_the_engine_and_every_style() -> None:
    from fastapi_loopguard import _native
    from fastapi_loopguard.events import KINDS
    from fastapi_loopguard.hints import ANY, KIND_ONLY
    from fastapi_loopguard.report import assets, terminal

    assert sorted(_native.load().event_kinds()) == sorted(KINDS)
    assert len(set(KINDS)) == len(KINDS)
    assert set(assets._KIND_COLOURS) == set(KINDS)
    assert set(terminal._KIND_STYLE) == set(KINDS)
    assert set(KINDS) == ANY | KIND_ONLY


def test_library_culprits_are_grouped_as_such(tmp_path: Path) -> None:
    """Events whose stacks held no application code name a library line; the report keeps them
    apart from the app's own lines, which come first however long the library ones took."""
    app = {"filename": "/srv/app/main.py", "lineno": 12, "function": "handler"}
    lib = {"filename": "/venv/site-packages/datasette/database.py", "lineno": 212, "function": "f"}
    path = tmp_path / "events.jsonl"
    records = [
        event(1.0, 80.0, "sleep", "/items/{id}", app),
        {**event(2.0, 900.0, "gil", "/db/{table}", lib), "culprit_is_library": True},
        {**event(3.0, 700.0, "cpu", "/db/{table}", lib), "culprit_is_library": True},
    ]
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    report = load_event_log(str(path))
    groups = by_culprit(report.events)
    assert [(g.key[0], g.library, g.events) for g in groups] == [
        (app["filename"], False, 1),
        (lib["filename"], True, 2),
    ]
    out = io.StringIO()
    print_report(Console(file=out, width=160, color_system=None), report)
    text = out.getvalue()
    own, library = text.split("Library code (no line of the app was on the stack)")
    assert "main.py:12 in handler" in own and "database.py" not in own
    assert "database.py:212 in f" in library
    assert "database.py:212</code> in <code>f</code> (library code)" in render(report)


def test_terminal_report_takes_the_whole_line_when_not_on_a_terminal(
    log: tuple[Path, Path], monkeypatch: pytest.MonkeyPatch
) -> None:
    """Piped or captured, nothing sets a width: rich's 80 columns would wrap every row."""
    monkeypatch.delenv("COLUMNS", raising=False)
    long_route = "/reports/" + "x" * 150
    path = log[0]
    path.write_text(
        path.read_text() + json.dumps(event(time.time(), 75.0, "sleep", long_route, None)) + "\n"
    )
    out = io.StringIO()
    print_report(Console(file=out, color_system=None), load_event_log(str(path)))
    rows = [line for line in out.getvalue().splitlines() if long_route in line]
    assert len(rows) == 1, out.getvalue()  # the route in one piece, on one row
    assert "sleep x1" in rows[0]
