"""Your code run by a framework in tasks of its own, outside any request.

Gradio's queue is the pattern: a worker task started at startup takes jobs that requests put in a
queue, and runs the app's handlers. The request that asked only waits; the block is the worker
task's. Unlabelled, an event names that task; with ``fastapi_loopguard.label`` each job is its own
event, even when the worker runs two jobs back to back in one loop iteration.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path

from fastapi import FastAPI

from fastapi_loopguard import BlockingEvent, LoopGuardConfig, LoopGuardMiddleware, label
from fastapi_loopguard.events import format_event

from .conftest import culprit_line
from .test_loop_unit import client_for

THIS_FILE = Path(__file__)


Job = tuple[int, bool, "asyncio.Future[int]"]


def make_app(seen: list[BlockingEvent]) -> FastAPI:
    queue: asyncio.Queue[Job] = asyncio.Queue()

    async def worker() -> None:
        while True:
            batch = [await queue.get()]
            while not queue.empty():  # the jobs queued meanwhile, back to back, no await between
                batch.append(queue.get_nowait())
            for n, labelled, done in batch:
                if labelled:
                    with label(f"job-{n}"):
                        time.sleep(0.12)  # culprit:labelled
                else:
                    time.sleep(0.12)  # culprit:unlabelled
                done.set_result(n)

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        task = asyncio.get_running_loop().create_task(worker(), name="queue-worker")
        yield
        task.cancel()

    app = FastAPI(lifespan=lifespan)

    @app.post("/submit")
    async def submit(count: int = 1, labelled: bool = False) -> dict[str, list[int]]:
        loop = asyncio.get_running_loop()
        jobs = [(n, labelled, loop.create_future()) for n in range(count)]
        for job in jobs:
            queue.put_nowait(job)
        return {"done": [await done for _, _, done in jobs]}

    @app.post("/fire")
    async def fire() -> dict[str, bool]:
        async def later() -> None:
            await asyncio.sleep(0.05)  # the request is over by then
            time.sleep(0.12)  # culprit:fired

        # Fire and forget: the task inherits the request's Context, and outlives the request.
        app.state.fired = asyncio.get_running_loop().create_task(later(), name="fired")
        return {"ok": True}

    app.add_middleware(
        LoopGuardMiddleware,
        config=LoopGuardConfig(on_blocking=seen.append, log_blocking_events=False),
    )
    return app


def test_a_framework_task_s_block_names_the_task(loop_name: str) -> None:
    seen: list[BlockingEvent] = []
    with client_for(make_app(seen), loop_name) as client:
        assert client.post("/submit").json() == {"done": [0]}
    assert len(seen) == 1, seen
    event = seen[0]
    assert event.method is None and event.path is None  # no request's code: the task's
    assert event.task is not None and event.task.startswith("queue-worker ("), event.task
    assert event.kind == "sleep"
    assert event.culprit is not None
    assert (event.culprit.filename, event.culprit.lineno) == (
        str(THIS_FILE),
        culprit_line(THIS_FILE, "unlabelled"),
    )
    assert event.victims >= 1  # the request that waits for the job
    # Where the task came from: it was started during lifespan startup, whose Context it carries.
    assert event.task_created_by == "lifespan.startup"
    assert "created_by=lifespan.startup" in format_event(event)


def test_a_task_a_request_left_behind_says_which_request_created_it(loop_name: str) -> None:
    seen: list[BlockingEvent] = []
    with client_for(make_app(seen), loop_name) as client:
        response = client.post("/fire", headers={"x-request-id": "fire-1"})
        assert response.status_code == 200
        deadline = time.monotonic() + 10
        while not seen and time.monotonic() < deadline:
            time.sleep(0.02)
    assert len(seen) == 1, seen
    event = seen[0]
    assert event.request_id is None  # the request had ended: the block is the task's
    assert event.task is not None and event.task.startswith("fired ("), event.task
    assert event.task_created_by == "POST /fire request_id=fire-1"
    assert event.culprit is not None
    assert event.culprit.lineno == culprit_line(THIS_FILE, "fired")


def test_labelled_jobs_run_back_to_back_are_one_event_each(loop_name: str) -> None:
    seen: list[BlockingEvent] = []
    with client_for(make_app(seen), loop_name) as client:
        assert client.post("/submit", params={"count": 2, "labelled": True}).json() == {
            "done": [0, 1]
        }
    assert sorted(e.request_id for e in seen) == ["job-0", "job-1"], seen
    for event in seen:
        assert event.kind == "sleep"
        assert event.culprit is not None
        assert (event.culprit.filename, event.culprit.lineno) == (
            str(THIS_FILE),
            culprit_line(THIS_FILE, "labelled"),
        )
        assert event.victims >= 1


def test_label_outside_a_running_loop_does_nothing() -> None:
    with label("sync-code"):
        time.sleep(0)
