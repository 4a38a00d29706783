"""A FastAPI app for the integration tests, configured through environment variables.

``LOOPGUARD_TEST_OPTIONS`` holds LoopGuardConfig keyword arguments as JSON (so each test starts
the same app under uvicorn or gunicorn with the options it exercises). ``LOOPGUARD_TEST_OTEL=1``
sets up the OpenTelemetry SDK with in-memory exporters and wraps the app in the ASGI
instrumentation, so a real request span exists; ``/_otel`` then serves what was recorded.
``LOOPGUARD_TEST_OTEL_BROKEN=1`` adds a span processor that raises, to prove the hooks failsafe.

Lines marked ``# culprit:NAME`` are where the tests expect the blame to land.
"""

from __future__ import annotations

import asyncio
import gc
import json
import os
import time
from collections.abc import AsyncIterator
from typing import Any

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, StreamingResponse
from starlette.exceptions import HTTPException

from fastapi_loopguard import BlockingEvent, LoopGuardConfig, LoopGuardMiddleware

from ._plumbing import add_event_routes

EVENTS: list[BlockingEvent] = []
OPTIONS: dict[str, Any] = json.loads(os.environ.get("LOOPGUARD_TEST_OPTIONS", "{}"))

fastapi_app = FastAPI()
fastapi_app.add_middleware(
    LoopGuardMiddleware,
    config=LoopGuardConfig(
        on_blocking=EVENTS.append, exclude_paths={"/_events", "/_otel", "/health"}, **OPTIONS
    ),
)


@fastapi_app.get("/health")
async def health() -> dict[str, int]:
    return {"pid": os.getpid()}


@fastapi_app.get("/innocent")
async def innocent() -> dict[str, int]:
    await asyncio.sleep(0.5)
    return {"pid": os.getpid()}


@fastapi_app.get("/sleep/{ms}")
async def sleep(ms: int) -> dict[str, int]:
    time.sleep(ms / 1000)  # culprit:sleep
    return {"slept": ms, "pid": os.getpid()}


@fastapi_app.get("/sleep-twice/{ms}")
async def sleep_twice(ms: int) -> dict[str, int]:
    time.sleep(ms / 1000)  # culprit:twice-first
    await asyncio.sleep(0.05)
    time.sleep(ms / 1000)  # culprit:twice-second
    return {"slept": 2 * ms, "pid": os.getpid()}


@fastapi_app.get("/items/{item_id}")
async def item(item_id: int) -> dict[str, int]:
    time.sleep(0.12)  # culprit:item
    return {"item": item_id, "pid": os.getpid()}


@fastapi_app.get("/cpu")
async def cpu() -> dict[str, bool]:
    # A fixed amount of CPU work (the thread's CPU clock, read every 10,000 turns), as real work
    # is: on a busy host it takes longer instead of shrinking to what a wall-clock loop gets.
    n = 0
    end = time.thread_time() + 0.15
    # Samples land on the loop's backward jump, which CPython puts on the `while` line up to
    # 3.13 and on the body's line from 3.14: with both on one line, every version blames it.
    clock = time.thread_time
    while (n := n + 1) % 10_000 or clock() < end: pass  # culprit:cpu  # noqa: E701  # fmt: skip
    return {"ok": True}


@fastapi_app.get("/stream")
async def stream() -> StreamingResponse:
    async def body() -> AsyncIterator[bytes]:
        yield b"first,"
        await asyncio.sleep(0.01)
        time.sleep(0.15)  # culprit:stream
        yield b"second"

    return StreamingResponse(body(), media_type="text/plain")


@fastapi_app.exception_handler(404)
async def not_found(request: Request, exc: HTTPException) -> JSONResponse:
    time.sleep(0.12)  # culprit:not-found
    return JSONResponse({"detail": "not found"}, status_code=404)


add_event_routes(fastapi_app, EVENTS)


app: Any = fastapi_app

if os.environ.get("LOOPGUARD_TEST_OTEL") == "1":
    from opentelemetry import metrics, trace
    from opentelemetry.instrumentation.asgi import OpenTelemetryMiddleware
    from opentelemetry.sdk.metrics import MeterProvider
    from opentelemetry.sdk.metrics.export import InMemoryMetricReader
    from opentelemetry.sdk.trace import SpanProcessor, TracerProvider
    from opentelemetry.sdk.trace.export import SimpleSpanProcessor
    from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

    SPANS = InMemorySpanExporter()
    READER = InMemoryMetricReader()
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(SPANS))

    class BrokenProcessor(SpanProcessor):
        def on_end(self, span: Any) -> None:
            if span.name == "event loop blocked":
                raise RuntimeError("span processor bug")

    if os.environ.get("LOOPGUARD_TEST_OTEL_BROKEN") == "1":
        provider.add_span_processor(BrokenProcessor())
    trace.set_tracer_provider(provider)
    metrics.set_meter_provider(MeterProvider(metric_readers=[READER]))

    @fastapi_app.get("/_otel")
    async def otel() -> dict[str, Any]:
        spans = [json.loads(span.to_json()) for span in SPANS.get_finished_spans()]
        data = READER.get_metrics_data()
        return {"spans": spans, "metrics": json.loads(data.to_json()) if data else {}}

    # The ASGI instrumentation outermost, as FastAPIInstrumentor puts it: the request span is
    # current when LoopGuardMiddleware sees the request.
    app = OpenTelemetryMiddleware(fastapi_app)

# The interpreter's first full collection (tens of ms of real blocking, which the guard rightly
# reports) would otherwise fall into whichever request comes first, at a point that differs
# between Python versions; the tests name their culprits exactly, so it happens here instead.
# Freezing what survived keeps the later full collections (3.12 runs one during the first
# requests) down to the few objects the requests make.
gc.collect()
gc.freeze()
