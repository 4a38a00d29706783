"""A FastAPI app whose endpoints block the loop with the calls the hint table knows.

Each endpoint makes one real blocking call on the loop, so the tests see the stacks the sampler
really captures for it: a C function (``time.sleep``, ``hashlib.pbkdf2_hmac``, a lock's
``__enter__``) leaves the stack at the culprit line, a Python one (``urlopen``, ``Event.wait``,
``subprocess.run``) leaves its frames below it. Lines marked ``# culprit:NAME`` are where the
blame lands. Events are served at ``/_events``.
"""

from __future__ import annotations

import hashlib
import os
import sqlite3
import subprocess
import tempfile
import threading
import time
import urllib.request
from pathlib import Path

from fastapi import FastAPI

from fastapi_loopguard import BlockingEvent, LoopGuardConfig, LoopGuardMiddleware

from ._plumbing import add_event_routes

EVENTS: list[BlockingEvent] = []
LOCK = threading.Lock()
FIFO = Path(tempfile.mkdtemp(prefix="loopguard-hinted-")) / "fifo"
os.mkfifo(FIFO)

app = FastAPI()
app.add_middleware(
    LoopGuardMiddleware,
    config=LoopGuardConfig(on_blocking=EVENTS.append, exclude_paths={"/_events", "/health"}),
)


def _later(seconds: float, action: object) -> None:
    """Runs ``action`` on a thread after ``seconds``: what the blocked loop is waiting for."""
    assert callable(action)
    threading.Timer(seconds, action).start()


@app.get("/health")
async def health() -> dict[str, bool]:
    return {"ok": True}


add_event_routes(app, EVENTS)


@app.get("/sleep")
async def sleep() -> dict[str, bool]:
    time.sleep(0.15)  # culprit:sleep
    return {"ok": True}


@app.get("/urlopen")
async def urlopen(port: int) -> dict[str, int]:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/", timeout=5) as r:  # culprit:urlopen
        return {"bytes": len(r.read())}


@app.get("/hash")
async def hash_password() -> dict[str, str]:
    # 1.5M rounds: about 0.1-0.3 s, as OpenSSL 3.5+ (Debian trixie, sid) is ~1.5x faster than 3.0
    # and 400k rounds came in under the 50 ms threshold there.
    digest = hashlib.pbkdf2_hmac("sha256", b"pw", b"salt", 1_500_000)  # culprit:hash
    return {"digest": digest.hex()[:8]}


@app.get("/lock")
async def lock() -> dict[str, bool]:
    LOCK.acquire()
    _later(0.15, LOCK.release)  # another thread lets go of it in 150 ms
    with LOCK:  # culprit:lock
        pass
    return {"ok": True}


@app.get("/event")
async def event() -> dict[str, bool]:
    done = threading.Event()
    _later(0.15, done.set)
    done.wait(5)  # culprit:event
    return {"ok": True}


@app.get("/fifo")
async def fifo() -> dict[str, int]:
    def write() -> None:
        with open(FIFO, "w") as f:
            f.write("x" * 10)

    _later(0.15, write)
    data = open(FIFO).read()  # culprit:fifo  # noqa: SIM115 (the one-liner is the culprit)
    return {"chars": len(data)}


@app.get("/subprocess")
async def run_child() -> dict[str, int]:
    child = subprocess.run(["sleep", "0.15"], check=True)  # culprit:subprocess
    return {"code": child.returncode}


@app.get("/sqlite")
async def query() -> dict[str, int]:
    conn = sqlite3.connect(":memory:")
    # A recursive query that counts to a few million: sqlite's own work, on the loop thread.
    sql = "WITH RECURSIVE c(x) AS (SELECT 1 UNION ALL SELECT x + 1 FROM c WHERE x < 3000000) "
    row = conn.execute(sql + "SELECT count(*) FROM c").fetchone()  # culprit:sqlite
    conn.close()
    return {"count": row[0]}
