"""A FastAPI app for the fault matrix: streaming, disconnects, shutdown mid-block, a failing
startup, and a second guard (a mounted sub-app with its own middleware) in the same process.

Lines marked ``# culprit:NAME`` are where the tests expect the blame to land. Knobs come from
the environment, because the tests start this app in real uvicorn (and gunicorn) processes:

- ``FAULTS_STARTUP_FAIL=1``: the lifespan startup raises.
- ``FAULTS_EVENT_LOG=path``: the outer guard writes its event log there.
"""

from __future__ import annotations

import asyncio
import gc
import os
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

from fastapi import FastAPI
from fastapi.responses import StreamingResponse

from fastapi_loopguard import BlockingEvent, LoopGuardConfig, LoopGuardMiddleware

from ._plumbing import add_event_routes, add_stats_route

EVENTS: list[BlockingEvent] = []
INNER_EVENTS: list[BlockingEvent] = []
STREAM_CHUNKS = 20
PLUMBING = {"/_events", "/_stats", "/health", "/pid", "/sub/_events"}


class StartupFailed(RuntimeError):
    pass


@asynccontextmanager
async def lifespan(app: FastAPI) -> AsyncIterator[None]:
    if os.environ.get("FAULTS_STARTUP_FAIL") == "1":
        raise StartupFailed("the app's own startup failed (expected by the test)")
    yield


app = FastAPI(lifespan=lifespan)
app.add_middleware(
    LoopGuardMiddleware,
    config=LoopGuardConfig(
        dev_mode=True,
        on_blocking=EVENTS.append,
        exclude_paths=PLUMBING,
        event_log_path=os.environ.get("FAULTS_EVENT_LOG") or None,
    ),
)


@app.get("/health")
async def health() -> dict[str, bool]:
    return {"ok": True}


@app.get("/pid")
async def pid() -> dict[str, int]:
    return {"pid": os.getpid()}


@app.get("/block/{ms}")
async def block(ms: int) -> dict[str, int]:
    time.sleep(ms / 1000)  # culprit:block
    return {"ms": ms, "pid": os.getpid()}


@app.get("/stream")
async def stream() -> StreamingResponse:
    async def body() -> AsyncIterator[bytes]:
        for i in range(STREAM_CHUNKS):
            if i == STREAM_CHUNKS // 2:
                time.sleep(0.15)  # culprit:stream
            yield f"chunk {i:02d}\n".encode()
            await asyncio.sleep(0)

    return StreamingResponse(body(), media_type="text/plain")


@app.get("/late-block")
async def late_block() -> dict[str, bool]:
    # The client hangs up during this await; the block after it still happens on the server.
    await asyncio.sleep(0.4)
    time.sleep(0.15)  # culprit:after-disconnect
    return {"ok": True}


# -- a second guard in the same process: a mounted app with its own middleware -------------------

inner = FastAPI()
inner.add_middleware(
    LoopGuardMiddleware,
    config=LoopGuardConfig(on_blocking=INNER_EVENTS.append, exclude_paths={"/_events"}),
)


@inner.get("/block")
async def inner_block() -> dict[str, bool]:
    time.sleep(0.15)  # culprit:inner
    return {"ok": True}


add_event_routes(inner, INNER_EVENTS)


app.mount("/sub", inner)


# -- test plumbing ------------------------------------------------------------------------------


add_event_routes(app, EVENTS)
add_stats_route(app)


# The interpreter's first full collection (tens of ms of real blocking, which the guard rightly
# reports) would otherwise fall into whichever request comes first, at a point that differs
# between Python versions; the tests name their culprits exactly, so it happens here instead.
# Freezing what survived keeps the later full collections (3.12 runs one during the first
# requests) down to the few objects the requests make.
gc.collect()
gc.freeze()
