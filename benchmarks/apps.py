"""The two apps the benchmark compares: the same trivial endpoint, bare and guarded."""

from __future__ import annotations

import os

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


bare = make_app(False)
guarded = make_app(True)
