"""Log records: the seed's text line and the JSON format (real uvicorn, both loops), rate
limiting and dedup per culprit, escaping, and never a query string.
"""

from __future__ import annotations

import asyncio
import dataclasses
import json
import logging
import re
import time
from pathlib import Path
from typing import Any

import httpx
import pytest

from fastapi_loopguard import BlockingEvent, Frame, LoopGuard, LoopGuardConfig, LoopGuardMiddleware
from fastapi_loopguard.exporters import logging as log_exporter

from .asgi import call, http_scope
from .conftest import ROOT, Server, culprit_line, start_server, stop_server
from .test_guard import run

APP = "tests.apps.integrations:app"
APP_FILE = ROOT / "tests" / "apps" / "integrations.py"
EVENT_FIELDS = {f.name for f in dataclasses.fields(BlockingEvent)}


def _log_records(server: Server, marker: str, count: int = 1) -> list[str]:
    for _ in range(100):
        records = [r for r in server.log().splitlines() if marker in r]
        if len(records) >= count:
            return records
        time.sleep(0.05)
    raise AssertionError(f"no {marker!r} in:\n{server.log()}")


@pytest.mark.parametrize("log_format", ["text", "json"])
def test_request_id_and_path_without_query(loop_name: str, tmp_path: Path, log_format: str) -> None:
    env = {"LOOPGUARD_TEST_OPTIONS": json.dumps({"log_format": log_format})}
    server = start_server(APP, loop_name, tmp_path, env=env)
    try:
        response = httpx.get(
            server.url + "/sleep/150?token=hunter2&user=bob",
            headers={"x-request-id": f"log-{log_format}"},
            timeout=10,
        )
        assert response.status_code == 200
        # Only this request's record: on a busy machine the server's own start-up can block the
        # loop too (uvicorn binding its socket), and that is a true report of its own.
        marker = "request_id=log-text" if log_format == "text" else '"request_id": "log-json"'
        [record] = _log_records(server, marker)
        assert "hunter2" not in server.log() and "token=" not in server.log()
        line = culprit_line(APP_FILE, "sleep")
        if log_format == "text":
            assert "during GET /sleep/150 [" in record
            assert f"culprit={APP_FILE}:{line} in sleep" in record
            assert "request_id=log-text" in record
            assert record.endswith(" hint=await asyncio.sleep(ms / 1000)]")
            return
        fields = json.loads(record[record.index("{") :])
        assert set(fields) == EVENT_FIELDS | {"message", "hint", "pid", "host", "worker"}
        assert fields["hint"] == "await asyncio.sleep(ms / 1000)"
        assert fields["pid"] == server.process.pid
        assert fields["request_id"] == "log-json"
        assert (fields["method"], fields["path"], fields["route"]) == (
            "GET",
            "/sleep/150",
            "/sleep/{ms}",
        )
        assert fields["kind"] == "sleep"
        assert fields["culprit"] == {"filename": str(APP_FILE), "lineno": line, "function": "sleep"}
        assert fields["stack"][-1] == fields["culprit"]
        assert 100 <= fields["duration_ms"] < 1000
        assert abs(fields["started_at"] - time.time()) < 30
    finally:
        stop_server(server)


def test_json_escapes_control_characters(loop_name: str, caplog: pytest.LogCaptureFixture) -> None:
    async def app(scope: Any, receive: Any, send: Any) -> None:
        time.sleep(0.12)
        await send({"type": "http.response.start", "status": 200, "headers": []})
        await send({"type": "http.response.body", "body": b""})

    path = "/a\r\nforged: record\x1b[31m/" + "x" * 5000

    async def main() -> None:
        middleware = LoopGuardMiddleware(app, LoopGuardConfig(log_format="json"))
        await call(middleware, http_scope(path))
        await asyncio.sleep(0.1)
        middleware.guard.stop()

    caplog.set_level(logging.WARNING, logger="fastapi_loopguard")
    run(loop_name, main)
    [record] = [r.getMessage() for r in caplog.records if "event loop blocked" in r.getMessage()]
    assert "\r" not in record and "\n" not in record and "\x1b" not in record
    assert len(record) < 8000
    fields = json.loads(record)
    assert fields["path"].startswith("/a\r\nforged: record\x1b[31m/xxx")  # intact once parsed
    assert fields["path"].endswith(f"...(+{len(path) - 200})")


def _blocker(n: int) -> None:
    time.sleep(0.08)  # culprit:rate-a


def _other_blocker() -> None:
    time.sleep(0.08)  # culprit:rate-b


def test_rate_limited_per_culprit_with_suppressed_count(
    loop_name: str, caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    # A short window, so that the "suppressed" note can be seen within the test.
    monkeypatch.setattr(log_exporter, "WINDOW_S", 1.0)
    config = LoopGuardConfig(log_rate_limit_per_minute=2, calibration_iterations=0)
    seen: list[BlockingEvent] = []

    async def main() -> None:
        async with LoopGuard(config) as guard:
            guard.add_listener(seen.append)
            with guard.label("job"):
                for i in range(5):
                    _blocker(i)
                    await asyncio.sleep(0.03)
                _other_blocker()  # another source: its own budget
                await asyncio.sleep(1.1)  # the window ends
                _blocker(5)
                await asyncio.sleep(0.03)
                for i in range(4):
                    _blocker(i)
                    await asyncio.sleep(0.03)
                await asyncio.sleep(0.05)

    caplog.set_level(logging.WARNING, logger="fastapi_loopguard")
    run(loop_name, main)
    assert len(seen) == 11  # every event is delivered; only the log is limited
    messages = [r.getMessage() for r in caplog.records]
    a = f"{__file__}:{culprit_line(__file__, 'rate-a')} in _blocker"
    b = f"{__file__}:{culprit_line(__file__, 'rate-b')} in _other_blocker"
    logged_a = [m for m in messages if a in m]
    assert len([m for m in messages if b in m]) == 1
    # Window 1: 2 of 5 logged. Window 2: the first says 3 were suppressed, 1 more logged, then 3
    # suppressed again, summarized when the guard stops.
    assert len(logged_a) == 4, messages
    assert "suppressed" not in logged_a[0] + logged_a[1]
    assert re.search(r" \(\+3 similar suppressed in the last \d+ s\)$", logged_a[2])
    summary = [m for m in messages if m.startswith("fastapi_loopguard: 3 similar")]
    assert len(summary) == 1, messages
    assert f"{__file__}:_blocker suppressed" in summary[0]


def test_no_rate_limit_when_zero(caplog: pytest.LogCaptureFixture) -> None:
    config = LoopGuardConfig(log_rate_limit_per_minute=0, calibration_iterations=0)

    async def main() -> None:
        async with LoopGuard(config) as guard:
            with guard.label("job"):
                for i in range(4):
                    _blocker(i)
                    await asyncio.sleep(0.03)
                await asyncio.sleep(0.05)

    caplog.set_level(logging.WARNING, logger="fastapi_loopguard")
    asyncio.run(main())
    assert len([r for r in caplog.records if "Event loop blocked" in r.getMessage()]) == 4


def test_rate_limit_keys_on_the_library_culprit(caplog: pytest.LogCaptureFixture) -> None:
    """Stacks without application code name their innermost library frame, and each library
    source has a budget of its own: one noisy library line cannot silence another."""
    site = "/venv/lib/python3.11/site-packages"
    execute = Frame(f"{site}/datasette/database.py", 212, "execute_fn")
    render = Frame(f"{site}/jinja2/environment.py", 1295, "Template.render")

    def blocked(culprit: Frame) -> BlockingEvent:
        return BlockingEvent(
            duration_ms=120.0,
            kind="cpu",
            request_id="r",
            method="GET",
            path="/db/t",
            route="/db/{table}",
            stack=(culprit,),
            culprit=culprit,
            culprit_is_library=True,
            cpu_ms=120.0,
            victims=0,
            started_at=time.time(),
        )

    exporter = log_exporter.LoggingExporter("text", per_minute=2)
    caplog.set_level(logging.WARNING, logger="fastapi_loopguard")
    for _ in range(5):
        exporter.export(blocked(execute), None)
    exporter.export(blocked(render), None)
    messages = [r.getMessage() for r in caplog.records]
    assert len([m for m in messages if "in execute_fn (library code)" in m]) == 2
    assert len([m for m in messages if "in Template.render (library code)" in m]) == 1
    exporter.flush()
    assert "3 similar blocking events from " + f"{execute.filename}:execute_fn" in (
        caplog.records[-1].getMessage()
    )
