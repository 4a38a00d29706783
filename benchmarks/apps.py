"""The apps the benchmarks serve: the same trivial endpoint bare and guarded (bench), the
detection app (bench), and the soak app (soak)."""

from __future__ import annotations

import asyncio
import os
import time
from collections.abc import AsyncIterator

from fastapi import FastAPI, WebSocket, WebSocketDisconnect
from fastapi.responses import StreamingResponse

from fastapi_loopguard import LoopGuardConfig, LoopGuardMiddleware
from testkit.asgi import add_stats_route


def make_app(guarded: bool) -> FastAPI:
    app = FastAPI()

    @app.get("/")
    async def root() -> dict[str, bool]:
        return {"ok": True}

    if guarded:
        config = LoopGuardConfig(
            dev_mode=os.environ.get("BENCH_DEV_MODE") == "1",
            cumulative_blocking_enabled=os.environ.get("BENCH_CUMULATIVE") != "0",
        )
        app.add_middleware(LoopGuardMiddleware, config=config)
    return app


def make_detect_app() -> FastAPI:
    """Defaults, plus the event log (its stats record carries the sample pauses at stop)."""
    app = FastAPI()

    @app.get("/")
    async def root() -> dict[str, bool]:
        return {"ok": True}

    @app.get("/block")
    async def block(ms: int) -> dict[str, int]:
        time.sleep(ms / 1000)
        return {"ms": ms}

    config = LoopGuardConfig(event_log_path=os.environ.get("BENCH_EVENT_LOG"))
    app.add_middleware(LoopGuardMiddleware, config=config)
    return app


def make_same_process_app() -> FastAPI:
    """One guarded app with the trivial endpoint twice: tracked at ``/``, excluded at
    ``/excluded``. wrk against each, in the same process, gives the per-request cost alone (the
    engine, its watchdog and the loop hooks run for both), free of the few percent by which two
    processes of the same app differ on this machine."""
    app = FastAPI()

    @app.get("/")
    async def root() -> dict[str, bool]:
        return {"ok": True}

    @app.get("/excluded")
    async def excluded() -> dict[str, bool]:
        return {"ok": True}

    app.add_middleware(LoopGuardMiddleware, config=LoopGuardConfig(exclude_paths={"/excluded"}))
    return app


class SoakError(RuntimeError):
    """The soak app's own, deliberate failure. Its traceback in the server log is expected; the
    soak tells it apart from anything else by this name."""


def burn_cpu(seconds: float) -> None:
    """Holds the loop thread (and the GIL) on pure bytecode: a ``cpu`` culprit, no system call."""
    end = time.perf_counter() + seconds
    while time.perf_counter() < end:
        pass


def make_soak_app() -> FastAPI:
    """Every kind of traffic a real app serves, and every kind of culprit the guard must catch.

    Defaults, plus the event log (the soak counts its records against the engine's counters),
    and with Prometheus and dev mode on, so their per-request and per-event paths are soaked too.
    """
    app = FastAPI()

    @app.get("/")
    async def root() -> dict[str, bool]:
        return {"ok": True}

    @app.get("/io")
    async def io() -> dict[str, bool]:
        await asyncio.sleep(0.002)  # a well-behaved wait: never an event
        return {"ok": True}

    @app.get("/stream")
    async def stream() -> StreamingResponse:
        async def chunks() -> AsyncIterator[bytes]:
            for i in range(16):
                await asyncio.sleep(0)  # a step per chunk: many short steps, none a culprit
                yield f"chunk {i}\n".encode()

        return StreamingResponse(chunks(), media_type="text/plain")

    @app.websocket("/ws")
    async def ws(websocket: WebSocket) -> None:
        await websocket.accept()
        try:
            while True:
                await websocket.send_text(await websocket.receive_text())
        except WebSocketDisconnect:
            pass

    @app.get("/culprit/sleep")
    async def culprit_sleep(ms: int) -> dict[str, int]:
        time.sleep(ms / 1000)
        return {"ms": ms}

    @app.get("/culprit/cpu")
    async def culprit_cpu(ms: int) -> dict[str, int]:
        burn_cpu(ms / 1000)
        return {"ms": ms}

    @app.get("/culprit/cumulative")
    async def culprit_cumulative(slices: int, ms: int) -> dict[str, int]:
        # Each slice is far below the stall threshold; only their sum within the window is not.
        for _ in range(slices):
            burn_cpu(ms / 1000)
            await asyncio.sleep(0)
        return {"ms": slices * ms}

    @app.get("/culprit/threadpool")
    def culprit_threadpool(ms: int) -> dict[str, int]:
        # A sync endpoint runs in the threadpool: it sleeps there, the loop stays free.
        time.sleep(ms / 1000)
        return {"ms": ms}

    @app.get("/boom")
    async def boom() -> None:
        raise SoakError("deliberate failure of the soak app")

    add_stats_route(app)

    config = LoopGuardConfig(
        dev_mode=True,
        prometheus_enabled=True,
        event_log_path=os.environ.get("SOAK_EVENT_LOG"),
    )
    app.add_middleware(LoopGuardMiddleware, config=config)
    return app


bare = make_app(False)
guarded = make_app(True)
detect = make_detect_app()
same_process = make_same_process_app()
soak = make_soak_app()
