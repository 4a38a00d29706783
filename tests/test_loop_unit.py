"""The guard belongs to its loop: tests without lifespan, new and closed loops, dropped apps,
blocks outside requests, and a delivery promise. Every test runs on asyncio and on uvloop.

These are the ways FastAPI users actually run an app in-process: ``TestClient(app)`` with and
without ``with`` (each request on a new short-lived loop in a new thread without it), and httpx's
``ASGITransport`` inside ``asyncio.run``. No assertion depends on timing: where a test waits, the
bound only decides how long a failing test takes.
"""

from __future__ import annotations

import asyncio
import gc
import logging
import os
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from fastapi import FastAPI
from starlette.testclient import TestClient

from fastapi_loopguard import BlockingEvent, LoopGuard, LoopGuardConfig, LoopGuardMiddleware

from .asgi import call, http_scope
from .conftest import culprit_line
from .test_guard import run

THIS_FILE = str(Path(__file__))


def native_threads() -> int:
    """Every thread of this process, native ones included (threading.enumerate misses ours)."""
    return len(os.listdir("/proc/self/task"))


def settle_threads(limit: int, timeout: float = 10.0) -> int:
    """The thread count once it is at most ``limit`` (threads exit asynchronously), or then."""
    deadline = time.monotonic() + timeout
    while native_threads() > limit and time.monotonic() < deadline:
        time.sleep(0.01)
    return native_threads()


def make_app(config: LoopGuardConfig) -> FastAPI:
    app = FastAPI()

    @app.get("/block")
    async def block() -> dict[str, bool]:
        time.sleep(0.15)  # culprit:block
        return {"ok": True}

    @app.get("/ok")
    async def ok() -> dict[str, bool]:
        return {"ok": True}

    app.add_middleware(LoopGuardMiddleware, config=config)
    return app


def client_for(app: FastAPI, loop_name: str) -> TestClient:
    options: dict[str, Any] = {}
    if loop_name == "uvloop":
        import uvloop

        options["loop_factory"] = uvloop.new_event_loop
    return TestClient(app, backend_options=options)


@pytest.fixture
def loopguard_log(caplog: pytest.LogCaptureFixture) -> Iterator[pytest.LogCaptureFixture]:
    caplog.set_level(logging.INFO, logger="fastapi_loopguard")
    yield caplog


def our_records(caplog: pytest.LogCaptureFixture) -> list[logging.LogRecord]:
    return [r for r in caplog.records if r.name.startswith("fastapi_loopguard")]


def assert_block_event(event: BlockingEvent) -> None:
    assert event.method == "GET"
    assert event.path == "/block"
    assert event.route == "/block"
    assert event.kind == "sleep"
    assert event.culprit is not None
    assert (event.culprit.filename, event.culprit.lineno) == (
        THIS_FILE,
        culprit_line(THIS_FILE, "block"),
    )


@pytest.mark.parametrize("with_block", [False, True], ids=["no-with", "with"])
def test_testclient_delivers_each_event_by_the_time_the_call_returns(
    loop_name: str, with_block: bool, loopguard_log: pytest.LogCaptureFixture
) -> None:
    seen: list[BlockingEvent] = []
    baseline = native_threads()
    app = make_app(LoopGuardConfig(on_blocking=seen.append))
    client = client_for(app, loop_name)
    counts = []
    if with_block:
        with client:
            for _ in range(3):
                assert client.get("/block").status_code == 200
                counts.append(len(seen))
    else:
        for _ in range(3):
            assert client.get("/block").status_code == 200
            counts.append(len(seen))
    assert counts == [1, 2, 3], seen
    for event in seen:
        assert_block_event(event)
    lines = [r.getMessage() for r in our_records(loopguard_log)]
    assert len([m for m in lines if "during GET /block" in m]) == 3, lines
    # Every loop the requests ran on has closed, and its engine's threads with it.
    assert settle_threads(baseline) <= baseline


def test_asgi_transport_delivers_the_log_line_before_the_call_returns(
    loop_name: str, loopguard_log: pytest.LogCaptureFixture
) -> None:
    seen: list[BlockingEvent] = []
    app = make_app(LoopGuardConfig(on_blocking=seen.append))

    async def main() -> tuple[int, int, str]:
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://test") as client:
            response = await client.get("/block")
            lines = [r.getMessage() for r in our_records(loopguard_log)]
            return len(seen), len([m for m in lines if "during GET /block" in m]), response.text

    events, lines, body = run(loop_name, main)
    assert (events, lines) == (1, 1)
    assert body == '{"ok":true}'
    assert_block_event(seen[0])


def test_nothing_is_printed_once_the_loop_is_gone(
    loop_name: str,
    loopguard_log: pytest.LogCaptureFixture,
    capfd: pytest.CaptureFixture[str],
) -> None:
    baseline = native_threads()
    app = make_app(LoopGuardConfig(hang_threshold_ms=200))
    client_for(app, loop_name).get("/ok")  # an engine ran on that request's loop
    assert settle_threads(baseline) <= baseline

    async def main() -> None:
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://test") as client:
            await client.get("/ok")

    run(loop_name, main)
    # The thread that ran those loops goes on with sync work, far past the hang threshold.
    time.sleep(0.8)
    assert our_records(loopguard_log) == []
    assert "loopguard" not in capfd.readouterr().err
    assert settle_threads(baseline) <= baseline


def test_sync_code_between_two_runs_of_a_loop_is_not_the_loops_blocking(
    loop_name: str, loopguard_log: pytest.LogCaptureFixture, capfd: pytest.CaptureFixture[str]
) -> None:
    seen: list[BlockingEvent] = []
    app = make_app(LoopGuardConfig(on_blocking=seen.append, hang_threshold_ms=200))
    if loop_name == "uvloop":
        import uvloop

        loop: asyncio.AbstractEventLoop = uvloop.new_event_loop()
    else:
        loop = asyncio.new_event_loop()

    async def get(path: str) -> int:
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://test") as client:
            return (await client.get(path)).status_code

    try:
        assert loop.run_until_complete(get("/ok")) == 200
        time.sleep(0.5)  # between the runs: the loop is not running, so not its blocking
        assert loop.run_until_complete(get("/block")) == 200
    finally:
        loop.close()
    assert len(seen) == 1
    assert_block_event(seen[0])
    assert "loopguard:" not in capfd.readouterr().err  # no native hang line for the sync sleep


@pytest.mark.parametrize("how", ["testclient", "asgi-transport"])
def test_a_hundred_dropped_apps_leave_no_engine_behind(
    loop_name: str, how: str, loopguard_log: pytest.LogCaptureFixture
) -> None:
    baseline = native_threads()
    if how == "testclient":
        # The collector runs here, between the requests, where no loop is running: a full
        # collection of a big test process's heap, triggered by the dropped apps' cycles on a
        # request's loop, takes tens of milliseconds there, a real block its guard would report.
        gc.disable()
        try:
            for _ in range(100):
                app = make_app(LoopGuardConfig())
                assert client_for(app, loop_name).get("/ok").status_code == 200
                del app
                gc.collect(1)  # this request's young objects, the dropped app's cycles among them
        finally:
            gc.enable()
    else:
        # One long-lived loop (a session-scoped pytest-asyncio loop, say): the apps are dropped
        # while it runs, and nothing but the guards' own finalizers can stop their engines.
        # Without calibration nothing of a guard's is left on the loop once its request is over,
        # so each guard is garbage right after it. The apps are built beforehand and called
        # through the bare ASGI interface: building a FastAPI app (or an httpx client, with its
        # CA bundle) on the loop takes tens of milliseconds, a real block that guards still
        # alive would rightly report.
        apps = [make_app(LoopGuardConfig(calibration_iterations=0)) for _ in range(100)]
        for app in apps:
            app.middleware_stack = app.build_middleware_stack()
        del app  # the loop variable would keep the last app (and its engine) alive

        async def main() -> int:
            while apps:
                sent = await call(apps.pop(), http_scope("/ok"))
                assert sent[0]["status"] == 200
            deadline = time.monotonic() + 10
            while native_threads() > baseline and time.monotonic() < deadline:
                await asyncio.sleep(0.01)
                gc.collect()  # what the interpreter does by itself sooner or later
            return native_threads()

        assert run(loop_name, main) <= baseline
    gc.collect()
    assert settle_threads(baseline) <= baseline
    if how == "testclient":
        # Each request's loop closed, and its guard with it: nothing was ever left to report.
        records = our_records(loopguard_log)
        assert records == [], [r.getMessage() for r in records]
    # On one long loop, a dropped guard watches until the collector gets to it (FastAPI apps
    # are cycles), so blocks on that loop meanwhile are real and may be reported; once
    # collected, nothing of it is left to print.
    loopguard_log.clear()
    time.sleep(0.3)
    assert our_records(loopguard_log) == []


def test_plain_asyncio_program_without_labels_sees_every_block(loop_name: str) -> None:
    async def main() -> list[BlockingEvent]:
        async with LoopGuard(LoopGuardConfig(log_blocking_events=False)) as guard:
            time.sleep(0.2)  # culprit:main-block
            await asyncio.sleep(0.05)

            async def worker() -> None:
                for _ in range(3):
                    await asyncio.sleep(0.1)
                    time.sleep(0.12)  # culprit:worker-block

            await asyncio.create_task(worker(), name="bg-worker")
            # The promise for blocks outside requests: delivered by the next loop iteration.
            await asyncio.sleep(0)
            return list(guard.events)

    events = run(loop_name, main)
    lines = [e.culprit.lineno if e.culprit else None for e in events]
    worker = culprit_line(THIS_FILE, "worker-block")
    assert lines == [culprit_line(THIS_FILE, "main-block")] + [worker] * 3
    assert all(e.request_id is None and e.kind == "sleep" for e in events)


def test_a_block_right_at_start_is_seen(loop_name: str) -> None:
    """Calibration is still running in the first second: blocks then are blocks all the same."""

    async def main() -> list[BlockingEvent]:
        async with LoopGuard(LoopGuardConfig(log_blocking_events=False)) as guard:
            time.sleep(0.15)  # culprit:at-start
            await asyncio.sleep(0.05)
            return list(guard.events)

    events = run(loop_name, main)
    assert [e.culprit.lineno if e.culprit else None for e in events] == [
        culprit_line(THIS_FILE, "at-start")
    ]


def test_trio_is_served_unguarded_with_one_clear_line(
    loopguard_log: pytest.LogCaptureFixture,
) -> None:
    pytest.importorskip("trio")
    app = make_app(LoopGuardConfig())
    with TestClient(app, backend="trio") as client:
        for _ in range(3):
            assert client.get("/ok").status_code == 200
    with TestClient(app, backend="trio") as client:
        assert client.get("/ok").status_code == 200
    records = our_records(loopguard_log)
    said = [r for r in records if "runs on trio, so it is served unguarded" in r.getMessage()]
    assert len(said) <= 1  # once per process: an earlier test may have said it already
    assert all(r.exc_info is None and r.levelno < logging.ERROR for r in records)
    assert [r for r in records if r not in said] == []


def test_events_outside_requests_name_what_ran(loop_name: str) -> None:
    seen: list[BlockingEvent] = []

    def callback() -> None:
        time.sleep(0.12)  # culprit:plain-callback

    async def main() -> None:
        async with LoopGuard(LoopGuardConfig(log_blocking_events=False, on_blocking=seen.append)):

            async def named_job() -> None:
                await asyncio.sleep(0.05)
                time.sleep(0.12)  # culprit:named-task

            await asyncio.create_task(named_job(), name="nightly-report")
            asyncio.get_running_loop().call_soon(callback)
            await asyncio.sleep(0.3)

    run(loop_name, main)
    by_line: dict[int, BlockingEvent] = {e.culprit.lineno: e for e in seen if e.culprit}
    task_event = by_line[culprit_line(THIS_FILE, "named-task")]
    assert task_event.task is not None
    assert task_event.task.startswith("nightly-report")
    assert "named_job" in task_event.task
    assert by_line[culprit_line(THIS_FILE, "plain-callback")].task == "(callback)"
