"""What a stack sample names across samples: every sample the line it was taken at, even in code
sampled before at another line, and nothing of the code it saw kept alive once its loop is gone.
Every test runs on asyncio and on uvloop.
"""

from __future__ import annotations

import asyncio
import gc
import time
import weakref
from pathlib import Path
from typing import Any

from fastapi_loopguard import BlockingEvent, LoopGuardConfig, LoopGuardMiddleware

from .asgi import call, http_scope
from .conftest import culprit_line
from .test_guard import run

THIS_FILE = str(Path(__file__))


def test_one_function_blocking_at_two_lines_is_named_at_each_every_time(loop_name: str) -> None:
    # The same code object sampled at two offsets, twice over: each event names its own line.
    seen: list[BlockingEvent] = []

    async def app(scope: Any, receive: Any, send: Any) -> None:
        time.sleep(0.15)  # culprit:first
        await asyncio.sleep(0.02)  # the loop turns: the first stall is over
        time.sleep(0.15)  # culprit:second
        await send({"type": "http.response.start", "status": 200, "headers": []})
        await send({"type": "http.response.body", "body": b"ok"})

    async def main() -> None:
        middleware = LoopGuardMiddleware(app, LoopGuardConfig(on_blocking=seen.append))
        for _ in range(2):
            await call(middleware, http_scope("/twice"))
        middleware.guard.stop()

    run(loop_name, main)
    first, second = culprit_line(THIS_FILE, "first"), culprit_line(THIS_FILE, "second")
    # Only the sleeps: on a busy machine a collection can stall the loop too, a true report of
    # its own with a line of its own.
    sleeps = [e for e in seen if e.kind == "sleep"]
    lines = [(e.culprit.filename, e.culprit.lineno) if e.culprit else None for e in sleeps]
    assert lines == [(THIS_FILE, first), (THIS_FILE, second)] * 2, seen


def test_code_the_sampler_saw_is_let_go_once_its_loop_is_gone(loop_name: str) -> None:
    # With the engine gone, nothing of ours may keep the code it sampled alive.
    seen: list[BlockingEvent] = []
    namespace: dict[str, Any] = {}
    source = "import time\nasync def handler():\n    time.sleep(0.15)\n"
    exec(compile(source, "<generated handler>", "exec"), namespace)
    code = weakref.ref(namespace["handler"].__code__)

    async def app(scope: Any, receive: Any, send: Any) -> None:
        await namespace["handler"]()
        await send({"type": "http.response.start", "status": 200, "headers": []})
        await send({"type": "http.response.body", "body": b"ok"})

    async def main() -> None:
        await call(
            LoopGuardMiddleware(app, LoopGuardConfig(on_blocking=seen.append)), http_scope("/")
        )

    run(loop_name, main)
    assert [e.stack[-1].function for e in seen if e.kind == "sleep"] == ["handler"], seen
    # The events hold names and lines only; the app's own references go with its namespace.
    namespace.clear()
    gc.collect()
    assert code() is None
