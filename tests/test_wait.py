"""The victims' delay: how long each request was frozen by blocks that others caused.

One real uvicorn server (both loops) runs the integrations app with every surface on: dev-mode
headers, Prometheus, OpenTelemetry (the ASGI instrumentation and the SDK's in-memory exporter)
and the event log. Innocent requests await while another request's ``time.sleep(0.2)`` holds
the loop: each innocent must learn that it waited about that long and blocked nothing, and the
culprit the reverse. Bounds are loose on purpose: a busy host stretches every block, and only
the scenario's physics (a 200 ms sleep freezes whoever is in flight for 200 ms) is asserted.

Then a block with no culprit request (a callback in an empty Context), and, in-process or from
files, the rest: Server-Timing only in dev_mode, the histogram's labels bounded and escaped, and
the report's table from request records, hostile ones included.
"""

from __future__ import annotations

import asyncio
import io
import json
import re
import time
from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path
from typing import Any

import httpx
import pytest
from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.parser import text_string_to_metric_families
from rich.console import Console

from fastapi_loopguard import LoopGuard, LoopGuardConfig, LoopGuardMiddleware
from fastapi_loopguard.events import RequestInfo
from fastapi_loopguard.exporters.base import MAX_ROUTES, OTHER_ROUTE
from fastapi_loopguard.exporters.prometheus import PrometheusExporter
from fastapi_loopguard.report import load_event_log, render
from fastapi_loopguard.report.model import delay_by_route, percentile
from fastapi_loopguard.report.terminal import print_report

from .asgi import call, http_scope
from .conftest import Server, start_server, stop_server
from .test_guard import run
from .test_report import ANSI_PATH, HOSTILE_ROUTE, Document

APP = "tests.apps.integrations:app"
INNOCENTS = 4


@pytest.fixture
def server(loop_name: str, tmp_path: Path) -> Iterator[Server]:
    options = {
        "dev_mode": True,
        "prometheus_enabled": True,
        "otel_enabled": True,
        "event_log_path": str(tmp_path / "events.jsonl"),
    }
    env = {"LOOPGUARD_TEST_OTEL": "1", "LOOPGUARD_TEST_OPTIONS": json.dumps(options)}
    server = start_server(APP, loop_name, tmp_path, env=env)
    yield server
    stop_server(server)


def timing(response: httpx.Response) -> dict[str, float]:
    """``loopguard-wait;dur=12.3, loopguard-block;dur=0`` as {"loopguard-wait": 12.3, ...}."""
    out: dict[str, float] = {}
    for entry in response.headers["server-timing"].split(","):
        name, _, dur = entry.strip().partition(";dur=")
        out[name] = float(dur)
    return out


async def _traffic(url: str) -> tuple[httpx.Response, list[httpx.Response]]:
    limits = httpx.Limits(max_connections=INNOCENTS + 2)
    async with httpx.AsyncClient(base_url=url, timeout=10, limits=limits) as client:
        innocents = [asyncio.create_task(client.get("/innocent")) for _ in range(INNOCENTS)]
        await asyncio.sleep(0.2)  # every innocent awaits inside the app now
        guilty = await client.get("/sleep/200", headers={"x-request-id": "culprit-1"})
        return guilty, list(await asyncio.gather(*innocents))


def _metric(text: str, name: str, **labels: str) -> float:
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name == name and sample.labels == labels:
                return float(sample.value)
    raise AssertionError(f"{name}{labels} not exposed")


def _request_spans(url: str, count: int) -> list[dict[str, Any]]:
    for _ in range(100):
        spans = httpx.get(url + "/_otel", timeout=5).json()["spans"]
        ours = [s for s in spans if "loopguard.wait_ms" in s["attributes"]]
        if len(ours) >= count:
            return ours
        asyncio.run(asyncio.sleep(0.05))
    raise AssertionError(f"no request span carries the delay: {spans}")


def test_innocents_wait_the_culprit_blocks(server: Server, tmp_path: Path) -> None:
    guilty, innocents = asyncio.run(_traffic(server.url))
    assert guilty.status_code == 200
    assert all(r.status_code == 200 for r in innocents)

    # Server-Timing, read at each response's start.
    culprit = timing(guilty)
    assert culprit["loopguard-block"] >= 150
    assert culprit["loopguard-wait"] < 100  # nobody else blocked meanwhile
    assert float(guilty.headers["x-blocking-total-ms"]) >= 150  # the old headers stay
    for response in innocents:
        t = timing(response)
        assert t["loopguard-block"] == 0
        assert t["loopguard-wait"] >= 150, response.headers
        assert response.headers["x-blocking-count"] == "0"

    # Prometheus: one observation per request, in seconds, by route template.
    text = httpx.get(server.url + "/metrics", timeout=10).text
    name = "loopguard_request_wait_seconds"
    assert _metric(text, f"{name}_count", route="/innocent") == INNOCENTS
    assert _metric(text, f"{name}_sum", route="/innocent") >= INNOCENTS * 0.15
    assert _metric(text, f"{name}_bucket", route="/innocent", le="0.1") == 0
    assert _metric(text, f"{name}_count", route="/sleep/{ms}") == 1
    assert _metric(text, f"{name}_sum", route="/sleep/{ms}") < 0.1

    # OpenTelemetry: the request spans carry both figures.
    spans = _request_spans(server.url, INNOCENTS + 1)
    by_wait = sorted(spans, key=lambda s: s["attributes"]["loopguard.wait_ms"])
    assert by_wait[0]["attributes"]["loopguard.block_ms"] >= 150  # the culprit waited least
    for span in by_wait[1:]:
        assert span["attributes"]["loopguard.wait_ms"] >= 150
        assert span["attributes"]["loopguard.block_ms"] == 0

    # The event log: a record per delayed request, which the report reads.
    stop_server(server)
    report = load_event_log(str(tmp_path / "events.jsonl"))
    [culprit_record] = [r for r in report.requests if r["route"] == "/sleep/{ms}"]
    assert culprit_record["block_ms"] >= 150 and culprit_record["blocks"] == 1
    assert culprit_record["request_id"] == "culprit-1"
    innocent = [r for r in report.requests if r["route"] == "/innocent"]
    assert len(innocent) == INNOCENTS
    assert all(r["wait_ms"] >= 150 and r["block_ms"] == 0 for r in innocent)
    rows = {d.key: d for d in delay_by_route(report.requests)}
    assert len(rows["GET /innocent"].waited) == INNOCENTS
    assert rows["GET /innocent"].blocked == []
    assert len(rows["GET /sleep/{ms}"].blocked) == 1


def test_block_outside_requests_makes_victims(loop_name: str, tmp_path: Path) -> None:
    """A callback in an empty Context blocks: no request is its culprit, and every request in
    flight waits for it, the one that scheduled it included (it awaits meanwhile)."""
    server = start_server("tests.apps.detection:app", loop_name, tmp_path)
    try:

        async def traffic() -> tuple[httpx.Response, httpx.Response]:
            async with httpx.AsyncClient(base_url=server.url, timeout=10) as client:
                idle = asyncio.create_task(client.get("/idle"))
                await asyncio.sleep(0.1)
                scheduler = await client.get("/callback")
                return scheduler, await idle

        scheduler, idle = asyncio.run(traffic())
    finally:
        stop_server(server)
    for response in (scheduler, idle):
        assert response.status_code == 200
        t = timing(response)
        assert t["loopguard-wait"] >= 80, response.headers  # the callback's 120 ms sleep
        assert t["loopguard-block"] == 0
        assert response.headers["x-blocking-count"] == "0"


def test_wait_histogram_labels_are_bounded_and_escaped() -> None:
    registry = CollectorRegistry()
    guard = LoopGuard(LoopGuardConfig(prometheus_enabled=True, prometheus_registry=registry))
    [exporter] = [e for e in guard.exporters if isinstance(e, PrometheusExporter)]

    def ended(method: str | None, route: str | None, wait_ms: float = 12.0) -> None:
        info = RequestInfo(1, "id", method, "/raw/path?secret=1", None, _route=route)
        exporter.request_ended(info, wait_ms, 0.0)

    hostile = '/a"b\\c\n{x}'
    ended("GET", hostile)
    ended("GET", None)  # matched no route
    ended(None, None)  # labelled work (lifespan, a test): not a request, not observed
    for i in range(MAX_ROUTES + 5):
        ended("GET", f"/r{i}", 0.0)
    text = generate_latest(registry).decode()
    assert "/raw/path" not in text and "secret" not in text
    assert 'route="/a\\"b\\\\c\\n{x}"' in text  # prometheus_client's own escaping
    name = "loopguard_request_wait_seconds"
    assert _metric(text, f"{name}_count", route=hostile) == 1
    assert _metric(text, f"{name}_sum", route=hostile) == 0.012
    assert _metric(text, f"{name}_count", route="<unmatched>") == 1
    # The hostile template took one of the MAX_ROUTES slots: the last 6 /r{i} share <other>.
    assert _metric(text, f"{name}_count", route=OTHER_ROUTE) == 6
    assert _metric(text, f"{name}_bucket", route=OTHER_ROUTE, le="0.001") == 6  # zeros count
    routes = {
        s.labels["route"]
        for f in text_string_to_metric_families(text)
        for s in f.samples
        if s.name == f"{name}_count"
    }
    assert "<none>" not in routes


def _record(route: str, wait_ms: float, block_ms: float, **extra: Any) -> str:
    fields = {"type": "request", "method": "GET", "route": route, "path": route}
    return json.dumps({**fields, "wait_ms": wait_ms, "block_ms": block_ms, **extra})


def test_report_shows_delay_percentiles_per_route(tmp_path: Path) -> None:
    lines = [_record("/a", float(ms), 0.0) for ms in range(1, 101)]  # waits of 1 .. 100 ms
    lines += [_record("/b", 0.0, 300.0, blocks=2), _record("/b", 40.0, 100.0, blocks=1)]
    lines += [_record(HOSTILE_ROUTE, 5.0, 0.0), _record(ANSI_PATH, 7.0, 0.0)]
    lines += [
        _record("/bad", -1.0, 0.0),  # negative: not a record
        json.dumps({"type": "request", "wait_ms": "long", "block_ms": 0}),
    ]
    path = tmp_path / "events.jsonl"
    path.write_text("\n".join(lines) + "\n")
    report = load_event_log(str(path))
    assert report.skipped == 2
    rows = {d.key: d for d in delay_by_route(report.requests)}
    a, b = rows["GET /a"], rows["GET /b"]
    assert (percentile(a.waited, 0.5), percentile(a.waited, 0.99)) == (50.0, 99.0)
    assert a.blocked == []
    assert (b.waited, sorted(b.blocked)) == ([40.0], [100.0, 300.0])
    assert percentile(b.blocked, 0.5) == 100.0 and percentile(b.blocked, 0.99) == 300.0

    html = render(report)
    doc = Document(html)
    assert {t for t, _ in doc.tags}.isdisjoint({"script", "img"})
    text = "".join(doc.text)
    assert "Victims' delay per route" in text
    assert f"GET {HOSTILE_ROUTE}" in text  # as text, exactly
    assert "\x1b" not in html and "\r" not in html
    row = html.split("<code>GET /a</code>")[1].split("</tr>")[0]
    assert ">100<" in row and ">50.0 ms<" in row and ">99.0 ms<" in row

    out = io.StringIO()
    print_report(Console(file=out, width=200, color_system=None), report)
    terminal = out.getvalue()
    assert "Victims' delay per route" in terminal
    assert "\x1b" not in terminal and "\\x1b[31mRED" in terminal


def test_server_timing_only_in_dev_mode_and_beside_the_apps_own(loop_name: str) -> None:
    async def app(scope: Any, receive: Any, send: Any) -> None:
        time.sleep(0.12)
        headers = [(b"server-timing", b"db;dur=3")]
        await send({"type": "http.response.start", "status": 200, "headers": headers})
        await send({"type": "http.response.body", "body": b""})

    async def main(config: LoopGuardConfig) -> list[tuple[bytes, bytes]]:
        middleware = LoopGuardMiddleware(app, config)
        messages = await call(middleware, http_scope("/x"))
        middleware.guard.stop()
        start = next(m for m in messages if m["type"] == "http.response.start")
        return list(start["headers"])

    quiet = LoopGuardConfig(log_blocking_events=False)
    dev = run(loop_name, lambda: main(replace(quiet, dev_mode=True)))
    timings = [v.decode() for k, v in dev if k == b"server-timing"]
    assert timings[0] == "db;dur=3"  # the app's own, untouched
    ours = dict(e.strip().split(";dur=") for e in timings[1].split(","))
    assert float(ours["loopguard-block"]) >= 100 and ours["loopguard-wait"] == "0"
    # warn mode adds the X-Blocking headers without dev_mode; Server-Timing stays dev-only.
    warn = run(loop_name, lambda: main(replace(quiet, enforcement_mode="warn")))
    assert (b"x-blocking-detected", b"true") in warn
    assert [v for k, v in warn if k == b"server-timing"] == [b"db;dur=3"]


def test_the_guards_headers_go_on_a_copy_of_the_apps_own(loop_name: str) -> None:
    # The app may reuse one header list (or tuple) for every response, or send none: each
    # response gets the guard's headers once, and the app's own are never changed.
    shared = [(b"content-type", b"text/plain")]
    frozen = ((b"x-app", b"1"),)

    async def app(scope: Any, receive: Any, send: Any) -> None:
        start: dict[str, Any] = {"type": "http.response.start", "status": 200}
        if scope["path"] != "/none":
            start["headers"] = shared if scope["path"] == "/list" else frozen
        await send(start)
        await send({"type": "http.response.body", "body": b""})

    async def main() -> list[list[tuple[bytes, bytes]]]:
        middleware = LoopGuardMiddleware(app, LoopGuardConfig(dev_mode=True))
        starts = []
        for path in ("/list", "/list", "/tuple", "/none"):
            messages = await call(middleware, http_scope(path))
            starts.append(next(m for m in messages if m["type"] == "http.response.start"))
        middleware.guard.stop()
        return [list(s["headers"]) for s in starts]

    first, second, from_tuple, from_none = run(loop_name, main)
    assert shared == [(b"content-type", b"text/plain")] and frozen == ((b"x-app", b"1"),)
    ours = [b"x-request-id", b"x-blocking-count", b"x-blocking-total-ms", b"x-blocking-detected"]
    ours.append(b"server-timing")
    assert [k for k, _ in first] == [b"content-type", *ours]
    assert [k for k, _ in second] == [b"content-type", *ours]  # once each, not piled up
    assert [k for k, _ in from_tuple] == [b"x-app", *ours]
    assert [k for k, _ in from_none] == ours
    # Values only by their shape: a host busy enough to starve the loop may give it a block.
    values = dict(from_none)
    assert re.fullmatch(rb"\d+\.\d\d", values[b"x-blocking-total-ms"]), values
    timing = rb"loopguard-wait;dur=\d+(\.\d)?, loopguard-block;dur=\d+(\.\d)?"
    assert re.fullmatch(timing, values[b"server-timing"]), values
