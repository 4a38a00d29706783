"""A shop API with healthy endpoints and the classic ways of blocking an event loop.

It knows nothing of fastapi-loopguard: ``loopguard demo`` runs it through ``loopguard run``, which
wraps it in the middleware, the way a user's own app is run.
"""

from __future__ import annotations

import asyncio
import hashlib
import http.server
import json
import threading
import time
import urllib.request
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

from fastapi import FastAPI

INVENTORY_LOCK = threading.Lock()


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


@app.get("/api/feed")
async def activity_feed() -> dict[str, int]:
    # Never one long block, but 40 short ones: it "yields to the loop" between rows, and still
    # holds it for a third of a second per request (cumulative blocking).
    rendered = 0
    for row in range(40):
        rendered += len(json.dumps([{"row": row, "cell": c} for c in range(8000)]))
        await asyncio.sleep(0)  # "be nice to the loop"
    return {"bytes": rendered}


@app.get("/api/export")
def export_catalogue() -> dict[str, int]:
    # A sync endpoint: Starlette runs it in its threadpool, so it never blocks the loop itself,
    # but this pure-Python loop holds the GIL and the loop thread has to queue for it.
    size = 0
    for i in range(1_500_000):
        size += len(f"{i},item {i},{i * 7 % 1000}")
    return {"bytes": size}
