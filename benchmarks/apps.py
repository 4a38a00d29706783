"""The two apps the benchmark compares: the same trivial endpoint, bare and guarded."""

from __future__ import annotations

import os
import time

from fastapi import FastAPI

from fastapi_loopguard import LoopGuardConfig, LoopGuardMiddleware


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


bare = make_app(False)
guarded = make_app(True)
detect = make_detect_app()
