"""LoopGuard without ASGI: a plain asyncio worker, and a real aiohttp server on loopback.

Both loops. The aiohttp server attributes each request through a small aiohttp middleware
built on ``guard.begin``/``guard.end``, the same calls LoopGuardMiddleware makes.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable
from pathlib import Path

import aiohttp
from aiohttp import web

from fastapi_loopguard import BlockingEvent, LoopGuard, LoopGuardConfig

from .conftest import culprit_line
from .test_guard import run

THIS_FILE = str(Path(__file__))


def test_worker_jobs_with_labels_and_stats(loop_name: str) -> None:
    async def main() -> tuple[list[BlockingEvent], dict[str, float | int]]:
        async with LoopGuard(LoopGuardConfig(calibration_iterations=0)) as guard:

            async def job(n: int) -> None:
                with guard.label(f"job-{n}"):
                    # The other jobs are still awaiting when job 42 blocks: its victims.
                    await asyncio.sleep(0.02 if n == 42 else 0.3)
                    if n == 42:
                        time.sleep(0.15)  # culprit:job

            await asyncio.gather(*(job(n) for n in (41, 42, 43)))
            await asyncio.sleep(0.05)
            return list(guard.events), guard.stats()

    events, stats = run(loop_name, main)
    assert [(e.request_id, e.method, e.route) for e in events] == [("job-42", None, None)]
    assert events[0].culprit is not None
    assert (events[0].culprit.filename, events[0].culprit.lineno) == (
        THIS_FILE,
        culprit_line(THIS_FILE, "job"),
    )
    assert events[0].victims == 2
    assert stats["events_emitted"] == 1
    assert stats["threshold_ms"] == 50.0  # no calibration: the fallback threshold
    assert stats["lag_max_ms"] >= 140


def test_blocks_during_calibration_leave_the_threshold_alone(loop_name: str) -> None:
    """A server's first requests may block while calibration (10 sleeps of 10 ms) still runs.

    Those lags are blocks, reported as such: had they become the calibrated baseline, the
    threshold would have risen to 5 x 80 ms and hidden every later block of that size.
    """

    async def main() -> tuple[list[BlockingEvent], dict[str, float | int]]:
        seen: list[BlockingEvent] = []
        config = LoopGuardConfig(log_blocking_events=False, on_blocking=seen.append)
        async with LoopGuard(config) as guard:
            for _ in range(8):
                time.sleep(0.08)  # culprit:during-calibration
                await asyncio.sleep(0.001)
            await asyncio.sleep(0.3)  # calibration's last sleeps are over by now
            stats = guard.stats()
            time.sleep(0.08)  # culprit:after-calibration
            await asyncio.sleep(0.05)
        return seen, stats

    seen, stats = run(loop_name, main)
    assert stats["threshold_ms"] == 50.0
    lines = [e.culprit.lineno for e in seen if e.culprit is not None]
    assert culprit_line(THIS_FILE, "after-calibration") in lines, seen
    assert lines.count(culprit_line(THIS_FILE, "during-calibration")) >= 6, seen


Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


def guard_middleware(
    guard: LoopGuard,
) -> Callable[[web.Request, Handler], Awaitable[web.StreamResponse]]:
    @web.middleware
    async def attribute(request: web.Request, handler: Handler) -> web.StreamResponse:
        info, token = guard.begin(
            request.headers.get("x-request-id", "aiohttp"), request.method, request.path
        )
        try:
            return await handler(request)
        finally:
            guard.end(info, token)

    return attribute


def test_aiohttp_server(loop_name: str) -> None:
    async def blocking(request: web.Request) -> web.Response:
        time.sleep(0.15)  # culprit:aiohttp
        return web.json_response({"ok": True})

    async def innocent(request: web.Request) -> web.Response:
        await asyncio.sleep(0.4)
        return web.json_response({"ok": True})

    async def main() -> tuple[list[BlockingEvent], list[int]]:
        async with LoopGuard(LoopGuardConfig()) as guard:
            app = web.Application(middlewares=[guard_middleware(guard)])
            app.router.add_get("/block", blocking)
            app.router.add_get("/innocent", innocent)
            runner = web.AppRunner(app)
            await runner.setup()
            site = web.TCPSite(runner, "127.0.0.1", 0)
            await site.start()
            port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
            try:
                async with aiohttp.ClientSession(
                    f"http://127.0.0.1:{port}", timeout=aiohttp.ClientTimeout(total=10)
                ) as client:

                    async def get(path: str, request_id: str) -> int:
                        async with client.get(path, headers={"x-request-id": request_id}) as r:
                            await r.read()
                            return r.status

                    innocents = [
                        asyncio.create_task(get("/innocent", f"innocent-{i}")) for i in range(3)
                    ]
                    await asyncio.sleep(0.1)
                    statuses = [await get("/block", "aiohttp-guilty")]
                    statuses += await asyncio.gather(*innocents)
                await asyncio.sleep(0.05)
                return list(guard.events), statuses
            finally:
                await runner.cleanup()

    events, statuses = run(loop_name, main)
    assert statuses == [200] * 4
    assert len(events) == 1, events
    event = events[0]
    assert (event.request_id, event.method, event.path) == ("aiohttp-guilty", "GET", "/block")
    assert event.kind == "sleep"
    assert event.culprit is not None
    assert (event.culprit.filename, event.culprit.lineno) == (
        THIS_FILE,
        culprit_line(THIS_FILE, "aiohttp"),
    )
    assert event.victims >= 3
