"""Enforcement modes on real uvicorn, on asyncio and uvloop.

strict: the guilty request gets a 503 page naming its culprit line and the fix (HTML or JSON by
Accept), innocent requests are served as usual. warn: the response is served with headers, and
one prominent record names the culprit line. A block after the response started cannot change
it any more: it is logged.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from .conftest import ROOT, Server, culprit_line, start_server, stop_server, wait_events

APP = "tests.apps.integrations:app"
APP_FILE = ROOT / "tests" / "apps" / "integrations.py"


def _server(loop_name: str, tmp_path: Path, **options: object) -> Server:
    return start_server(
        APP, loop_name, tmp_path, env={"LOOPGUARD_TEST_OPTIONS": json.dumps(options)}
    )


@pytest.fixture
def strict_server(loop_name: str, tmp_path: Path) -> Iterator[Server]:
    server = _server(loop_name, tmp_path, enforcement_mode="strict")
    yield server
    stop_server(server)


def test_strict_json_page_names_the_culprit_and_the_fix(strict_server: Server) -> None:
    response = httpx.get(
        strict_server.url + "/sleep/150",
        headers={"accept": "application/json", "x-request-id": "strict-1"},
        timeout=10,
    )
    assert response.status_code == 503
    assert response.headers["content-type"] == "application/json"
    assert response.headers["x-request-id"] == "strict-1"
    assert response.headers["x-blocking-count"] == "1"
    page = response.json()
    assert page["error"] == "event_loop_blocked"
    assert page["request_id"] == "strict-1"
    assert (page["method"], page["path"], page["count"]) == ("GET", "/sleep/150", 1)
    assert "pending" not in page  # the culprit was delivered in time, not "pending"
    [block] = page["blocks"]
    assert block["kind"] == "sleep"
    assert block["culprit"] == f"{APP_FILE}:{culprit_line(APP_FILE, 'sleep')} in sleep"
    assert "await asyncio.sleep" in block["fix"]
    assert 100 <= block["duration_ms"] < 1000
    assert "slept" not in response.text  # the app's own body was swallowed


@pytest.mark.parametrize("path", ["/sleep/300", "/sleep-twice/120"])
def test_one_number_in_headers_page_log_and_events(strict_server: Server, path: str) -> None:
    """The count and total the headers and the strict page show are the events' own, to the
    printed precision: not the live counters of the moment the response started, which knew the
    last sample's length and said 297.5 ms for a 300.4 ms event."""
    for accept in ("application/json", "text/html"):
        request_id = f"one-number-{accept.replace('/', '-')}"
        headers = {"accept": accept, "x-request-id": request_id}
        response = httpx.get(strict_server.url + path, headers=headers, timeout=10)
        assert response.status_code == 503
        assert "pending" not in response.text  # every event arrived before the page was made
        count = int(response.headers["x-blocking-count"])
        durations = [e["duration_ms"] for e in _events_of(strict_server, request_id, count)]
        assert count == len(durations) == (2 if "twice" in path else 1), (
            response.text,
            [(e["request_id"], e["kind"], e["duration_ms"]) for e in wait_events(strict_server)],
        )
        assert response.headers["x-blocking-total-ms"] == f"{sum(durations):.2f}"
        if accept == "text/html":
            assert f"{count} time(s), {sum(durations):.1f} ms in total" in response.text
            for duration in durations:
                assert f", {duration:.1f} ms at <code>" in response.text
        else:
            page = response.json()
            assert page["count"] == count
            assert page["total_ms"] == round(sum(durations), 2)
            assert [b["duration_ms"] for b in page["blocks"]] == [round(d, 2) for d in durations]
        for duration in durations:  # each event's own log line, at its precision
            line = f"Event loop blocked for {duration:.2f}ms during GET {path}"
            assert line in _log(strict_server, request_id)


def _events_of(server: Server, request_id: str, count: int) -> list[dict[str, object]]:
    for _ in range(100):
        events = [e for e in wait_events(server) if e["request_id"] == request_id]
        if len(events) >= count:
            break
        asyncio.run(asyncio.sleep(0.05))
    return events


def _log(server: Server, request_id: str) -> str:
    for _ in range(100):  # the log record is written right after the event is delivered
        if f"request_id={request_id}" in server.log():
            break
        asyncio.run(asyncio.sleep(0.05))
    return server.log()


def test_strict_html_page_for_browsers(strict_server: Server) -> None:
    response = httpx.get(
        strict_server.url + "/cpu", headers={"accept": "text/html,*/*;q=0.8"}, timeout=10
    )
    assert response.status_code == 503
    assert response.headers["content-type"] == "text/html; charset=utf-8"
    assert int(response.headers["content-length"]) == len(response.content)
    text = response.text
    assert text.startswith("<!doctype html>")
    assert f"<code>{APP_FILE}:{culprit_line(APP_FILE, 'cpu')} in cpu</code>" in text
    assert "<strong>cpu</strong>" in text
    assert "asyncio.to_thread" in text and "run_in_threadpool" in text


def test_strict_html_escapes_the_path(strict_server: Server) -> None:
    response = httpx.get(
        strict_server.url + "/<script>x</script>", headers={"accept": "text/html"}, timeout=10
    )
    # The 404 handler blocks: the request's own code, so strict mode answers.
    assert response.status_code == 503
    assert "<script>" not in response.text
    assert "&lt;script&gt;" in response.text
    assert f"{culprit_line(APP_FILE, 'not-found')} in not_found" in response.text


def test_strict_leaves_innocent_requests_alone(strict_server: Server) -> None:
    async def fire() -> tuple[httpx.Response, list[httpx.Response]]:
        async with httpx.AsyncClient(base_url=strict_server.url, timeout=10) as client:
            innocents = [asyncio.create_task(client.get("/innocent")) for _ in range(5)]
            await asyncio.sleep(0.2)
            guilty = await client.get("/items/7", headers={"accept": "application/json"})
            return guilty, list(await asyncio.gather(*innocents))

    guilty, innocents = asyncio.run(fire())
    assert guilty.status_code == 503
    assert guilty.json()["blocks"][0]["culprit"].endswith(
        f":{culprit_line(APP_FILE, 'item')} in item"
    )
    # Frozen by the guilty request, but not guilty themselves: served normally.
    assert [r.status_code for r in innocents] == [200] * 5
    assert all(r.headers["x-blocking-count"] == "0" for r in innocents)


def test_strict_block_after_response_start_is_logged(strict_server: Server) -> None:
    response = httpx.get(strict_server.url + "/stream", timeout=10)
    assert response.status_code == 200
    assert response.text == "first,second"
    line = culprit_line(APP_FILE, "stream")
    for _ in range(100):
        if f"integrations.py:{line}" in strict_server.log():
            break
        asyncio.run(asyncio.sleep(0.05))
    assert f"culprit={APP_FILE}:{line} in stream.<locals>.body" in strict_server.log()


def test_warn_serves_the_response_and_names_the_culprit(loop_name: str, tmp_path: Path) -> None:
    server = _server(loop_name, tmp_path, enforcement_mode="warn")
    try:
        response = httpx.get(
            server.url + "/sleep/150", headers={"x-request-id": "warn-1"}, timeout=10
        )
        assert response.status_code == 200
        assert response.json()["slept"] == 150
        # Headers without dev_mode: warn mode shows them.
        assert response.headers["x-blocking-count"] == "1"
        assert response.headers["x-request-id"] == "warn-1"
        quiet = httpx.get(server.url + "/innocent", timeout=10)
        assert quiet.headers["x-blocking-count"] == "0"
        line = culprit_line(APP_FILE, "sleep")
        for _ in range(100):
            if "!!! LOOPGUARD" in server.log():
                break
            asyncio.run(asyncio.sleep(0.05))
        records = [r for r in server.log().splitlines() if "!!! LOOPGUARD" in r]
        assert len(records) == 1, server.log()
        record = records[0]
        assert "GET /sleep/150 blocked the event loop 1 time(s)" in record
        assert "request_id=warn-1" in record
        assert f"sleep at {APP_FILE}:{line} in sleep" in record
        assert "await asyncio.sleep" in record
    finally:
        stop_server(server)


def test_dev_mode_never_changes_the_status(loop_name: str, tmp_path: Path) -> None:
    server = _server(loop_name, tmp_path, dev_mode=True)
    try:
        response = httpx.get(server.url + "/sleep/150", timeout=10)
        assert response.status_code == 200
        assert response.headers["x-blocking-count"] == "1"
        assert "!!! LOOPGUARD" not in server.log()
    finally:
        stop_server(server)
