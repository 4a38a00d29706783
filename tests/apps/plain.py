"""An ordinary FastAPI app that knows nothing of fastapi-loopguard: what `loopguard run` guards.

Lines marked ``# culprit:NAME`` are where the tests expect the blame to land.
"""

from __future__ import annotations

import asyncio
import os
import time

from fastapi import FastAPI

app = FastAPI()

# Built once: /rows returns it at once, and FastAPI's jsonable_encoder (no response model, so no
# native serializer) then walks it on the loop with no frame of this file on the stack: the
# Datasette pattern, where the framework rather than the app renders on the loop. 40,000 rows:
# about 170 ms of CPU on 3.14 and 330 ms on 3.11 (12,000 took 50 ms on 3.14, the threshold).
ROWS = [{"id": i, "name": f"row {i}", "tags": ["a", "b"], "score": i / 2} for i in range(40_000)]


@app.get("/health")
async def health() -> dict[str, bool]:
    return {"ok": True}


@app.get("/pid")
async def pid() -> dict[str, int]:
    return {"pid": os.getpid()}


@app.get("/innocent")
async def innocent() -> dict[str, bool]:
    await asyncio.sleep(0.5)
    return {"ok": True}


@app.get("/sleep/{ms}")
async def sleep(ms: int) -> dict[str, int]:
    time.sleep(ms / 1000)  # culprit:sleep
    return {"slept": ms}


@app.get("/cpu")
async def cpu() -> dict[str, bool]:
    # A fixed amount of CPU work (the thread's CPU clock, read every 10,000 turns), as real work
    # is: on a busy host it takes longer instead of shrinking to what a wall-clock loop gets.
    n = 0
    end = time.thread_time() + 0.2
    # Samples land on the loop's backward jump, which CPython puts on the `while` line up to
    # 3.13 and on the body's line from 3.14: with both on one line, every version blames it.
    clock = time.thread_time
    while (n := n + 1) % 10_000 or clock() < end: pass  # culprit:cpu  # noqa: E701  # fmt: skip
    return {"ok": True}


@app.get("/rows", response_model=None)
async def rows() -> list[dict[str, object]]:
    return ROWS


def create_app() -> FastAPI:
    """For `loopguard run --factory tests.apps.plain:create_app`."""
    return app
