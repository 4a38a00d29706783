"""The promise of the product: the request whose code blocked the loop, and only it, is blamed.

Each culprit runs beside 20 innocent requests that are in flight (awaiting) during the block, on
real uvicorn, on asyncio and on uvloop.
"""

from __future__ import annotations

import asyncio
from pathlib import Path

import httpx
import pytest

from .conftest import ROOT, Server, culprit_line, wait_events

APP_FILE = ROOT / "tests" / "apps" / "culprits.py"
INNOCENTS = 20


async def _fire(
    server: Server, guilty_path: str, guilty_id: str
) -> tuple[httpx.Response, list[httpx.Response]]:
    limits = httpx.Limits(max_connections=INNOCENTS + 5)
    async with httpx.AsyncClient(base_url=server.url, timeout=10, limits=limits) as client:
        innocents = [
            asyncio.create_task(client.get("/innocent", headers={"x-request-id": f"innocent-{i}"}))
            for i in range(INNOCENTS)
        ]
        await asyncio.sleep(0.25)  # all innocents are now awaiting inside the app
        guilty = await client.get(guilty_path, headers={"x-request-id": guilty_id})
        return guilty, list(await asyncio.gather(*innocents))


CASES = [
    # (name, path template, route, expected kind, culprit marker or markers, any one of them)
    ("sleep", "/sleep/300", "/sleep/{ms}", "sleep", "sleep"),
    ("cpu", "/cpu", "/cpu", "cpu", "cpu"),
    ("loop", "/scan", "/scan", "cpu", ("scan", "scan-body")),
    ("io", "/io?port={port}", "/io", "io", "io"),
    ("child", "/child", "/child", "sleep", "child"),
]


@pytest.mark.parametrize(
    ("name", "path", "route", "kind", "marker"), CASES, ids=[c[0] for c in CASES]
)
def test_exact_request_and_line_blamed(
    culprit_server: Server,
    slow_peer: int,
    name: str,
    path: str,
    route: str,
    kind: str,
    marker: str | tuple[str, ...],
) -> None:
    guilty_id = f"guilty-{name}"
    guilty, innocents = asyncio.run(_fire(culprit_server, path.format(port=slow_peer), guilty_id))
    assert guilty.status_code == 200
    assert all(r.status_code == 200 for r in innocents)

    events = wait_events(culprit_server)
    blamed = {e["request_id"] for e in events}
    assert blamed == {guilty_id}, f"only the guilty request may be blamed, got {events}"
    assert len(events) == 1, events
    event = events[0]
    assert event["method"] == "GET"
    assert event["path"] == path.format(port=slow_peer).split("?")[0]
    assert event["route"] == route
    assert event["kind"] == kind
    assert event["culprit"]["filename"] == str(APP_FILE)
    markers = (marker,) if isinstance(marker, str) else marker
    assert event["culprit"]["lineno"] in {culprit_line(APP_FILE, m) for m in markers}
    assert event["victims"] >= INNOCENTS
    assert 200 <= event["duration_ms"] <= 2000
    assert all(frame["lineno"] >= 1 for frame in event["stack"])  # never CPython's -1

    # Dev-mode headers: the guilty request learns of its own block, the innocents of none.
    assert guilty.headers["x-request-id"] == guilty_id
    assert guilty.headers["x-blocking-detected"] == "true"
    assert int(guilty.headers["x-blocking-count"]) == 1
    assert float(guilty.headers["x-blocking-total-ms"]) >= 150
    for response in innocents:
        assert response.headers["x-blocking-count"] == "0"
        assert response.headers["x-blocking-detected"] == "false"
        assert response.headers["x-blocking-total-ms"] == "0.00"


def test_log_line_names_request_route_kind_and_culprit(culprit_server: Server) -> None:
    response = httpx.get(culprit_server.url + "/sleep/200", timeout=10)
    assert response.status_code == 200
    line = culprit_line(APP_FILE, "sleep")
    for _ in range(50):
        log = culprit_server.log()
        if "Event loop blocked" in log:
            break
        asyncio.run(asyncio.sleep(0.05))
    records = [r for r in log.splitlines() if "Event loop blocked for" in r]
    assert len(records) == 1, log
    record = records[0]
    assert "during GET /sleep/200 [" in record
    assert "route=/sleep/{ms}" in record
    assert "kind=sleep" in record
    assert f"culprit={APP_FILE}:{line} in sleep" in record


def test_websocket_is_attributed(culprit_server: Server) -> None:
    pytest.importorskip("websockets")
    import websockets.sync.client as ws_client

    url = culprit_server.url.replace("http://", "ws://") + "/ws"
    with ws_client.connect(url) as ws:
        ws.send("go")
        assert ws.recv(timeout=5) == "done"
    events = wait_events(culprit_server)
    assert len(events) == 1, events
    assert events[0]["method"] == "WEBSOCKET"
    assert events[0]["path"] == "/ws"
    assert events[0]["culprit"]["lineno"] == culprit_line(APP_FILE, "ws")


def test_no_headers_without_dev_mode(loop_name: str, tmp_path: Path) -> None:
    from .conftest import start_server, stop_server

    server = start_server(
        "tests.apps.culprits:app", loop_name, tmp_path, env={"LOOPGUARD_TEST_DEV_MODE": "0"}
    )
    try:
        response = httpx.get(server.url + "/sleep/120", timeout=10)
        assert response.status_code == 200
        assert not [h for h in response.headers if h.lower().startswith("x-blocking")]
        assert "x-request-id" not in response.headers
        # Detection itself still runs.
        assert [e["path"] for e in wait_events(server)] == ["/sleep/120"]
    finally:
        stop_server(server)


def test_excluded_path_is_not_tracked(culprit_server: Server) -> None:
    response = httpx.get(culprit_server.url + "/health", timeout=5)
    assert response.status_code == 200
    assert "x-request-id" not in response.headers
