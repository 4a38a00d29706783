"""OpenTelemetry: a span per blocking event, child of the request's span, and metrics.

The app runs under real uvicorn (both loops), wrapped in opentelemetry-instrumentation-asgi so a
real request span exists, with the SDK's in-memory span exporter and metric reader; the test
reads what they recorded from the app.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from .conftest import ROOT, Server, culprit_line, start_server, stop_server, wait_events

APP = "tests.apps.integrations:app"
APP_FILE = ROOT / "tests" / "apps" / "integrations.py"
BLOCK_SPAN = "event loop blocked"


def _otel_server(loop_name: str, tmp_path: Path, broken: bool = False) -> Server:
    env = {
        "LOOPGUARD_TEST_OTEL": "1",
        "LOOPGUARD_TEST_OTEL_BROKEN": "1" if broken else "0",
        "LOOPGUARD_TEST_OPTIONS": json.dumps({"otel_enabled": True}),
    }
    return start_server(APP, loop_name, tmp_path, env=env)


@pytest.fixture
def otel_server(loop_name: str, tmp_path: Path) -> Iterator[Server]:
    server = _otel_server(loop_name, tmp_path)
    yield server
    stop_server(server)


def _recorded(server: Server, spans_named: str, count: int) -> dict[str, Any]:
    for _ in range(100):
        data: dict[str, Any] = httpx.get(server.url + "/_otel", timeout=5).json()
        if sum(s["name"] == spans_named for s in data["spans"]) >= count:
            return data
        asyncio.run(asyncio.sleep(0.05))
    raise AssertionError(f"no {spans_named!r} span recorded: {data['spans']}")


def _metric_points(data: dict[str, Any], name: str) -> list[dict[str, Any]]:
    points: list[dict[str, Any]] = []
    for resource in data["metrics"].get("resource_metrics", []):
        for scope in resource["scope_metrics"]:
            for metric in scope["metrics"]:
                if metric["name"] == name:
                    points += metric["data"]["data_points"]
    return points


def _path(attributes: dict[str, Any]) -> Any:
    # The semantic-convention name changed (http.target -> url.path) across versions.
    return attributes.get("url.path", attributes.get("http.target"))


def test_block_span_is_a_child_of_the_request_span(otel_server: Server) -> None:
    async def traffic() -> httpx.Response:
        async with httpx.AsyncClient(base_url=otel_server.url, timeout=10) as client:
            innocents = [asyncio.create_task(client.get("/innocent")) for _ in range(3)]
            await asyncio.sleep(0.2)
            guilty = await client.get("/sleep/150", headers={"x-request-id": "otel-1"})
            await asyncio.gather(*innocents)
            return guilty

    assert asyncio.run(traffic()).status_code == 200
    data = _recorded(otel_server, BLOCK_SPAN, 1)
    blocks = [s for s in data["spans"] if s["name"] == BLOCK_SPAN]
    assert len(blocks) == 1, blocks
    block = blocks[0]
    # Its parent is the request's server span (the one current when the request reached the
    # middleware: recent FastAPI versions open their own, inside the ASGI instrumentation's).
    by_id = {s["context"]["span_id"]: s for s in data["spans"]}
    request_span = by_id[block["parent_id"]]
    assert request_span["kind"] == "SpanKind.SERVER"
    assert _path(request_span["attributes"]) == "/sleep/150"
    assert block["context"]["trace_id"] == request_span["context"]["trace_id"]
    attributes = block["attributes"]
    assert attributes["loopguard.kind"] == "sleep"
    assert attributes["loopguard.request_id"] == "otel-1"
    assert attributes["http.route"] == "/sleep/{ms}"
    assert attributes["http.request.method"] == "GET"
    assert attributes["code.file.path"] == str(APP_FILE)
    assert attributes["code.line.number"] == culprit_line(APP_FILE, "sleep")
    assert attributes["code.function.name"] == "sleep"
    assert attributes["loopguard.victims"] >= 3
    # The span covers the blocked interval itself, inside the request's span.
    duration_ms = attributes["loopguard.duration_ms"]
    assert 100 <= duration_ms < 1000
    from datetime import datetime

    def ts(text: str) -> float:
        return datetime.fromisoformat(text.replace("Z", "+00:00")).timestamp()

    assert abs((ts(block["end_time"]) - ts(block["start_time"])) * 1000 - duration_ms) < 1
    assert ts(request_span["start_time"]) - 0.05 <= ts(block["start_time"])
    assert ts(block["end_time"]) <= ts(request_span["end_time"]) + 0.05
    # The innocents were frozen, not guilty: no block span hangs under theirs.
    innocent_ids = {
        s["context"]["span_id"]
        for s in data["spans"]
        if s["kind"] == "SpanKind.SERVER" and s is not request_span
    }
    assert block["parent_id"] not in innocent_ids

    events = _metric_points(data, "loopguard.blocking.events")
    assert [(p["value"], p["attributes"]) for p in events] == [
        (1, {"http.route": "/sleep/{ms}", "http.request.method": "GET", "loopguard.kind": "sleep"})
    ]
    [duration] = _metric_points(data, "loopguard.blocking.duration")
    assert duration["count"] == 1
    assert 0.1 <= duration["sum"] < 1.0  # seconds
    [delayed] = _metric_points(data, "loopguard.requests.delayed")
    assert delayed["value"] >= 3
    [threshold] = _metric_points(data, "loopguard.threshold")
    assert 0.04 <= threshold["value"] < 1
    [hangs] = _metric_points(data, "loopguard.hangs")
    assert hangs["value"] == 0


def test_broken_sdk_never_breaks_the_request(loop_name: str, tmp_path: Path) -> None:
    server = _otel_server(loop_name, tmp_path, broken=True)
    try:
        response = httpx.get(server.url + "/sleep/150", timeout=10)
        assert response.status_code == 200
        assert response.json()["slept"] == 150
        events = wait_events(server, 1)
        # The exporter raised; the event still reached the log and on_blocking.
        assert [e["path"] for e in events] == ["/sleep/150"]
        log = server.log()
        assert "span processor bug" in log
        assert "exporter <fastapi_loopguard.exporters.otel.OTelExporter" in log
        assert "Event loop blocked for" in log
        # And the next request is served as well.
        assert httpx.get(server.url + "/health", timeout=5).status_code == 200
    finally:
        stop_server(server)
