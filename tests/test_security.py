"""Security defaults and hostile input, on real uvicorn with the production defaults.

Without ``dev_mode`` the guard adds nothing to any response: no ``X-Blocking-*`` header, no
request id, no stack or file path, whatever the request and whatever the app does. Query strings
(where tokens and personal data travel) never reach the log, the metrics, the event log or the
report. The live page's loopback/token rule is tested in test_dashboard.py.
"""

from __future__ import annotations

import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest

from .conftest import ROOT, Server, complete_records, start_server, stop_server

SECRET = "s3cr3t-T0KEN"
REQUESTS = [
    # (path with a query, expected status)
    (f"/block?token={SECRET}", 200),
    (f"/boom?token={SECRET}", 500),
    (f"/missing?token={SECRET}", 404),
    (f"/block?{SECRET}=1&a=%0d%0aX-Forged:%201", 200),
]


@pytest.fixture(params=["text", "json"])
def defaults_server(loop_name: str, tmp_path: Path, request: pytest.FixtureRequest) -> Server:
    env = {
        "DEFAULTS_EVENT_LOG": str(tmp_path / "events.jsonl"),
        "DEFAULTS_LOG_FORMAT": request.param,
    }
    server = start_server("tests.apps.defaults:app", loop_name, tmp_path, env=env)
    request.addfinalizer(lambda: stop_server(server))
    return server


def _guard_events(server: Server, count: int) -> list[dict[str, object]]:
    """The event log's events once ``count`` arrived (this app has no /_events route)."""
    path = Path(server.log_path).parent / "events.jsonl"
    deadline = time.monotonic() + 5
    while True:
        events = [r for r in complete_records(path) if r["type"] == "event"]
        if len(events) >= count or time.monotonic() > deadline:
            return events
        time.sleep(0.05)


def test_responses_reveal_nothing_without_dev_mode(defaults_server: Server) -> None:
    for path, status in REQUESTS:
        response = httpx.get(defaults_server.url + path, timeout=10)
        assert response.status_code == status, path
        added = [h for h in response.headers if h.lower().startswith(("x-blocking", "x-request"))]
        assert not added, (path, response.headers)
        body = response.text
        for leak in (".py", "Traceback", "culprit", str(ROOT), "loopguard"):
            assert leak not in body, (path, leak, body[:300])
    # ...while the guard did see and log the blocks (three requests blocked).
    events = _guard_events(defaults_server, 3)
    assert sorted(str(e["path"]) for e in events) == ["/block", "/block", "/boom"], events


def test_query_strings_never_leave(defaults_server: Server, tmp_path: Path) -> None:
    for path, _ in REQUESTS:
        httpx.get(defaults_server.url + path, timeout=10)
    events = _guard_events(defaults_server, 3)
    assert sorted(e["path"] for e in events) == ["/block", "/block", "/boom"]
    metrics = httpx.get(defaults_server.url + "/metrics", timeout=5).text
    assert "loopguard_blocking_events_total" in metrics
    stop_server(defaults_server)
    log = tmp_path / "events.jsonl"
    html = tmp_path / "report.html"
    report = subprocess.run(
        [sys.executable, "-m", "fastapi_loopguard", "report", str(log), "-o", str(html)],
        capture_output=True, text=True, timeout=60, check=True,
    )  # fmt: skip
    written = {
        "server log": defaults_server.log(),
        "metrics": metrics,
        "event log": log.read_text(),
        "report page": html.read_text(),
        "terminal report": report.stdout,
    }
    assert written["server log"].lower().count("event loop blocked") == 3  # text or json
    for where, text in written.items():
        assert SECRET not in text, where
        assert "X-Forged" not in text, where
        assert "token=" not in text, where
