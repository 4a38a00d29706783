"""A shop API with healthy endpoints and the classic ways of blocking an event loop.

Run by ``python -m fastapi_loopguard.demo`` under uvicorn. Every blocking event is appended as a
JSON line to ``$LOOPGUARD_DEMO_EVENTS`` so the demo driver can build its report.
"""

from __future__ import annotations

import asyncio
import dataclasses
import hashlib
import http.server
import json
import os
import threading
import time
import urllib.request
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

from fastapi import FastAPI

from fastapi_loopguard import BlockingEvent, LoopGuardConfig, LoopGuardMiddleware

EVENTS_PATH = os.environ.get("LOOPGUARD_DEMO_EVENTS", "loopguard-demo-events.jsonl")
INVENTORY_LOCK = threading.Lock()


def write_event(event: BlockingEvent) -> None:
    with open(EVENTS_PATH, "a", encoding="utf-8") as f:
        f.write(json.dumps(dataclasses.asdict(event)) + "\n")


class _SlowSupplier(http.server.BaseHTTPRequestHandler):
    """A legacy supplier API that takes 120 ms to answer."""

    def do_GET(self) -> None:
        time.sleep(0.12)
        body = b'{"price": 42}'
        self.send_response(200)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args: object) -> None:
        pass


def _restocker(stop: threading.Event) -> None:
    """A background thread that holds the inventory lock for a while, now and then."""
    while not stop.is_set():
        with INVENTORY_LOCK:
            time.sleep(0.15)
        stop.wait(0.6)


@asynccontextmanager
async def lifespan(app: FastAPI) -> AsyncIterator[None]:
    supplier = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _SlowSupplier)
    app.state.supplier_port = supplier.server_address[1]
    stop = threading.Event()
    threads = [
        threading.Thread(target=supplier.serve_forever, daemon=True),
        threading.Thread(target=_restocker, args=(stop,), daemon=True),
    ]
    for t in threads:
        t.start()
    yield
    stop.set()
    supplier.shutdown()


app = FastAPI(title="loopguard demo shop", lifespan=lifespan)
app.add_middleware(
    LoopGuardMiddleware,
    config=LoopGuardConfig(dev_mode=True, on_blocking=write_event, log_blocking_events=False),
)


# -- healthy ------------------------------------------------------------------------------------


@app.get("/api/items/{item_id}")
async def get_item(item_id: int) -> dict[str, Any]:
    await asyncio.sleep(0.02)  # a well-behaved async database call
    return {"id": item_id, "name": f"item {item_id}"}


@app.get("/api/search")
async def search(q: str = "") -> dict[str, Any]:
    await asyncio.sleep(0.01)
    return {"q": q, "hits": []}


# -- culprits -----------------------------------------------------------------------------------


@app.get("/api/reports/{report_id}")
async def build_report(report_id: int) -> dict[str, Any]:
    time.sleep(0.2)  # "just a quick sleep while the file lands"
    return {"report": report_id}


@app.get("/api/prices/{sku}")
async def supplier_price(sku: str) -> dict[str, Any]:
    url = f"http://127.0.0.1:{app.state.supplier_port}/price/{sku}"
    with urllib.request.urlopen(url, timeout=5) as response:  # a sync HTTP client in async code
        return {"sku": sku, "price": json.loads(response.read())["price"]}


@app.get("/api/recommendations")
async def recommendations() -> dict[str, Any]:
    scores = [sum(i * j for j in range(500)) for i in range(2500)]  # CPU work on the loop
    return {"top": max(scores)}


@app.post("/api/login")
async def login() -> dict[str, Any]:
    digest = hashlib.pbkdf2_hmac("sha256", b"hunter2", b"salt", 200_000)  # password hashing
    return {"token": digest.hex()[:16]}


@app.post("/api/orders")
async def place_order() -> dict[str, Any]:
    with INVENTORY_LOCK:  # a threading.Lock shared with a background thread
        return {"order": "accepted"}


async def _send_receipt() -> None:
    time.sleep(0.1)  # blocking SMTP-style call, in a child task


@app.post("/api/checkout")
async def checkout() -> dict[str, Any]:
    await asyncio.gather(_send_receipt(), asyncio.sleep(0.01))
    return {"checkout": "done"}


@app.get("/_loopguard/stats")
async def loopguard_stats() -> dict[str, Any]:
    stack: Any = app.middleware_stack
    while stack is not None and not isinstance(stack, LoopGuardMiddleware):
        stack = getattr(stack, "app", None)
    return stack.guard.stats() if stack is not None else {}
