"""A FastAPI app with one endpoint per kind of culprit, run by the tests under real uvicorn.

Lines marked ``# culprit:NAME`` are where the tests expect the blame to land. The events the
guard reports are collected through ``on_blocking`` and served at ``/_events``.
"""

from __future__ import annotations

import asyncio
import gc
import itertools
import os
import time
import urllib.request

from fastapi import FastAPI, WebSocket

from fastapi_loopguard import BlockingEvent, LoopGuardConfig, LoopGuardMiddleware

from ._plumbing import add_event_routes

EVENTS: list[BlockingEvent] = []

app = FastAPI()
app.add_middleware(
    LoopGuardMiddleware,
    config=LoopGuardConfig(
        dev_mode=os.environ.get("LOOPGUARD_TEST_DEV_MODE", "1") == "1",
        on_blocking=EVENTS.append,
        exclude_paths={"/_events", "/health"},
    ),
)


def burn(seconds: float) -> None:
    # A fixed amount of CPU work, as real work is (a hash, a parse): on a busy host it takes
    # longer, but it never shrinks to the few milliseconds of CPU a wall-clock loop would get.
    # The thread's CPU clock is a system call: read once every 10,000 turns, all on one line, so
    # every sample of the loop lands on the culprit line.
    n = 0
    end = time.thread_time() + seconds
    # Samples land on the loop's backward jump, which CPython puts on the `while` line up to
    # 3.13 and on the body's line from 3.14: with both on one line, every version blames it.
    clock = time.thread_time
    while (n := n + 1) % 10_000 or clock() < end: pass  # culprit:cpu  # noqa: E701  # fmt: skip


@app.get("/innocent")
async def innocent() -> dict[str, bool]:
    await asyncio.sleep(0.8)
    return {"ok": True}


@app.get("/health")
async def health() -> dict[str, bool]:
    return {"ok": True}


@app.get("/sleep/{ms}")
async def sleep(ms: int) -> dict[str, int]:
    time.sleep(ms / 1000)  # culprit:sleep
    return {"slept": ms}


@app.get("/cpu")
async def cpu() -> dict[str, bool]:
    burn(0.3)
    return {"ok": True}


def scan(seconds: float) -> None:
    # A loop whose body is an `if`: both ways through it share the jump back to the header, which
    # 3.11 gives no line of its own. The eval breaker checks right on that jump, so that is where
    # nearly every sample lands: the culprit must still be a line of this loop (3.11: the header;
    # 3.12 on give the jump the `if` line).
    clock = time.thread_time
    end = clock() + seconds
    for n in itertools.count():  # culprit:scan
        if not n % 100_000 and clock() > end:  # culprit:scan-body
            break


@app.get("/scan")
async def scan_endpoint() -> dict[str, bool]:
    scan(0.3)
    return {"ok": True}


@app.get("/io")
async def io(port: int) -> dict[str, int]:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/slow", timeout=5) as r:  # culprit:io
        body = r.read()
    return {"bytes": len(body)}


async def child_sleep() -> None:
    time.sleep(0.3)  # culprit:child


@app.get("/child")
async def child() -> dict[str, bool]:
    await asyncio.create_task(child_sleep())
    return {"ok": True}


@app.websocket("/ws")
async def ws(websocket: WebSocket) -> None:
    await websocket.accept()
    await websocket.receive_text()
    time.sleep(0.2)  # culprit:ws
    await websocket.send_text("done")
    await websocket.close()


add_event_routes(app, EVENTS, clear=True)


# The interpreter's first full collection (tens of ms of real blocking, which the guard rightly
# reports) would otherwise fall into whichever request comes first, at a point that differs
# between Python versions; the tests name their culprits exactly, so it happens here instead.
# Freezing what survived keeps the later full collections (3.12 runs one during the first
# requests) down to the few objects the requests make.
gc.collect()
gc.freeze()
