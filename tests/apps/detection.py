"""A FastAPI app for the detection-depth tests: split stalls, hangs, the GIL, saturation, and
blocking in places other than an endpoint body. Lines marked ``# culprit:NAME`` are where the
tests expect the blame to land.
"""

from __future__ import annotations

import asyncio
import contextvars
import ctypes
import gc
import os
import re
import sqlite3
import sys
import tempfile
import threading
import time
from collections.abc import AsyncIterator, Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import asynccontextmanager

from fastapi import BackgroundTasks, Depends, FastAPI
from fastapi.responses import StreamingResponse

from fastapi_loopguard import BlockingEvent, LoopGuardConfig, LoopGuardMiddleware

from ._plumbing import add_event_routes, add_stats_route

EVENTS: list[BlockingEvent] = []
CATASTROPHIC = re.compile(r"(a+)+$")


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
    while (n := n + 1) % 10_000 or clock() < end: pass  # culprit:burn  # noqa: E701  # fmt: skip


@asynccontextmanager
async def lifespan(app: FastAPI) -> AsyncIterator[None]:
    if os.environ.get("LOOPGUARD_TEST_STARTUP_BLOCK") == "1":
        time.sleep(0.2)  # culprit:startup
    app.state.gate = asyncio.Event()
    # Room for the SQL threads of /sql (asyncio.to_thread runs in the default executor), as
    # many as Datasette-like apps run; on two cores the default would be six.
    asyncio.get_running_loop().set_default_executor(ThreadPoolExecutor(SQL_THREADS))
    yield
    if os.environ.get("LOOPGUARD_TEST_SHUTDOWN_BLOCK") == "1":
        time.sleep(0.2)  # culprit:shutdown


app = FastAPI(lifespan=lifespan)
app.add_middleware(
    LoopGuardMiddleware,
    config=LoopGuardConfig(
        dev_mode=True,
        on_blocking=EVENTS.append,
        exclude_paths={"/_events", "/_stats", "/health"},
    ),
)


@app.get("/health")
async def health() -> dict[str, bool]:
    return {"ok": True}


# -- one stall, three culprits ------------------------------------------------------------------


@app.get("/split/sleep")
async def split_sleep() -> dict[str, bool]:
    await app.state.gate.wait()
    time.sleep(0.15)  # culprit:split-sleep
    return {"ok": True}


@app.get("/split/cpu")
async def split_cpu() -> dict[str, bool]:
    await app.state.gate.wait()
    burn(0.15)
    return {"ok": True}


async def _split_child() -> None:
    await app.state.gate.wait()
    time.sleep(0.15)  # culprit:split-child


@app.get("/split/child")
async def split_child() -> dict[str, bool]:
    await asyncio.create_task(_split_child())
    return {"ok": True}


@app.post("/split/go")
async def split_go() -> dict[str, bool]:
    # Every waiter wakes in the same loop iteration: one stall holding three culprits.
    app.state.gate.set()
    app.state.gate = asyncio.Event()
    return {"ok": True}


# -- hangs and the GIL --------------------------------------------------------------------------


@app.get("/hang")
async def hang() -> dict[str, bool]:
    time.sleep(2.5)  # culprit:hang
    return {"ok": True}


@app.get("/native")
async def native(n: int = 25) -> dict[str, bool]:
    # re holds the GIL for the whole match: nothing Python-level can sample it meanwhile.
    matched = CATASTROPHIC.match("a" * n + "b")  # culprit:native
    return {"matched": matched is not None}


@app.get("/gil-holder")
def gil_holder(n: int = 24) -> dict[str, bool]:
    # A sync endpoint: runs in the threadpool, and holds the GIL in native code for a while.
    matched = CATASTROPHIC.match("a" * n + "b")  # culprit:gil
    return {"matched": matched is not None}


# The interpreter's own symbols, called through PyDLL: ctypes keeps the GIL for the whole call,
# as a C extension stuck in a long computation or a deadlock does.
LIBC_WITH_GIL = ctypes.PyDLL(None)


@app.get("/native-hang")
async def native_hang() -> dict[str, bool]:
    LIBC_WITH_GIL.usleep(2_500_000)  # culprit:native-hang
    return {"ok": True}


def hold_lock(lock: threading.Lock, held: threading.Event) -> None:
    with lock:
        held.set()
        time.sleep(0.6)  # culprit:lock-holder


@app.get("/lock-held")
async def lock_held() -> dict[str, bool]:
    # Another thread holds a threading.Lock the loop then waits on: the holder is named.
    lock = threading.Lock()
    held = threading.Event()
    threading.Thread(target=hold_lock, args=(lock, held), daemon=True).start()
    held.wait()
    with lock:  # culprit:lock-wait
        pass
    return {"ok": True}


# Enough tracked objects that one full collection of them takes several thresholds of 50 ms
# (about 110 ms on an idle machine): built once, by /gc-heap, in the threadpool.
GC_HEAP: list[list[int]] = []


@app.get("/gc-heap")
def gc_heap() -> dict[str, int]:
    # One collection after building rather than dozens during it, and on this thread: left in
    # the youngest generation, all of them would be collected by the next allocation, on the
    # loop thread maybe. Building is CPU work in the threadpool, which may itself keep the loop
    # from the GIL (its heartbeat, while a request is in flight): reported as its own.
    gc.disable()
    try:
        GC_HEAP[:] = [[] for _ in range(4_000_000)]
    finally:
        gc.enable()
    gc.collect()
    return {"objects": len(GC_HEAP)}


def collect_then_set(done: threading.Event) -> None:
    gc.collect()  # holds the GIL from start to end: the loop waits for it
    done.set()


@app.get("/gc-elsewhere")
async def gc_elsewhere() -> dict[str, bool]:
    # This step lasts until another thread's full collection is over, and all that time the loop
    # waits for the GIL the collector holds: the collection is the block, not the GIL's holder.
    done = threading.Event()
    threading.Thread(target=collect_then_set, args=(done,), daemon=True).start()
    while not done.is_set():
        pass
    return {"ok": True}


def fill_future_late() -> int:
    time.sleep(0.6)  # culprit:future-holder
    return 1


@app.get("/future-wait")
async def future_wait() -> dict[str, bool]:
    # The loop waits on a future that a pool thread is to set once its sleep is over.
    with ThreadPoolExecutor(1, thread_name_prefix="setter") as pool:
        value = pool.submit(fill_future_late).result()  # culprit:future-wait
    return {"ok": value == 1}


@app.get("/ping")
async def ping() -> dict[str, bool]:
    return {"ok": True}


# -- SQL threads keeping the GIL busy (the Datasette pattern) ----------------------------------

SQL_THREADS = 12
SQL_DB = os.path.join(tempfile.mkdtemp(prefix="loopguard-sql-"), "rows.db")
with sqlite3.connect(SQL_DB) as _db:
    _db.execute("create table t (id integer primary key, b integer)")
    _db.executemany("insert into t (b) values (?)", ((i % 101,) for i in range(20_000)))


def _query(repeat: int, hold: float, passes: int = 1) -> int:
    time.sleep(hold)  # GIL released: lets a warm-up start every thread of the pool at once
    total = 0
    with sqlite3.connect(SQL_DB) as con:
        for _ in range(repeat):
            # sqlite3 builds the rows' tuples with the GIL held, between steps run without it.
            rows = con.execute("select id, b from t").fetchall()
            # The rows turned into what the page shows, in Python: the GIL is this thread's
            # until the interpreter makes it switch, every 5 ms.
            for _ in range(passes):
                for row_id, b in rows:
                    total += len(f"<td>{row_id}</td><td>{b * 3 % 7}</td>")
    return total


# One connection shared by the pool's threads, as a connection pool of one: SQLite serialises them
# on the connection's mutex, held for as long as each sqlite3_step runs.
SHARED_SQL = sqlite3.connect(SQL_DB, check_same_thread=False)
COUNT_TO = (
    "with recursive c(x) as (select 1 union all select x + 1 from c limit ?) select count(x) from c"
)


def _open_cursor() -> sqlite3.Cursor:
    cursor = SHARED_SQL.execute("select id from t")
    cursor.fetchone()  # its statement stays in use until the cursor is done, or freed
    return cursor


def _count(n: int) -> int:
    return int(SHARED_SQL.execute(COUNT_TO, (n,)).fetchone()[0])  # culprit:sql-holder


@app.get("/sql-lock")
async def sql_lock(n: int = 2_000_000) -> dict[str, int]:
    cursor = await asyncio.to_thread(_open_cursor)
    query = asyncio.ensure_future(asyncio.to_thread(_count, n))
    await asyncio.sleep(0.1)  # the query runs, holding the connection
    # The cursor freed on the loop between two callbacks, in no request's Context, as a
    # traceback's frames are: its statement's reset waits for the connection's mutex.
    kept = [cursor]
    del cursor
    asyncio.get_running_loop().call_soon(kept.clear, context=contextvars.Context())
    del kept
    return {"count": await query}


@app.get("/sql")
async def sql(
    threads: int = SQL_THREADS,
    repeat: int = 10,
    hold: float = 0.0,
    slice_ms: float = 0.0,
    passes: int = 1,
) -> dict[str, int]:
    # Heavy queries in a thread pool, as Datasette runs them; asyncio.to_thread copies this
    # request's Context into each thread, so whatever they hold is this request's doing.
    # slice_ms: how long a thread may keep the GIL before it must let another have it (5 ms by
    # default), and passes: how long each thread's pure-Python part runs between two fetches.
    # On a quiet two-core host, 5 ms slices never leave the loop waiting 50 ms for the GIL; on a
    # busy one they do, as each hand-over waits for a CPU. Long slices of long Python runs stand
    # for that (or for C code that holds the GIL between rows) and make the wait certain.
    previous = sys.getswitchinterval()
    if slice_ms > 0:
        sys.setswitchinterval(slice_ms / 1000)
    try:
        jobs = (asyncio.to_thread(_query, repeat, hold, passes) for _ in range(threads))
        results = await asyncio.gather(*jobs)
    finally:
        sys.setswitchinterval(previous)
    return {"sum": sum(results)}


# -- death by a thousand cuts --------------------------------------------------------------------


@app.get("/cuts")
async def cuts(slices: int = 40) -> dict[str, int]:
    # Each slice is far below the 50 ms threshold; 25 of them reach the cumulative 200 ms.
    for _ in range(slices):
        burn(0.008)
        await asyncio.sleep(0)  # culprit:cuts
    return {"slices": slices}


@app.get("/block-once")
async def block_once() -> dict[str, bool]:
    time.sleep(0.15)  # culprit:block-once
    for _ in range(10):
        await asyncio.sleep(0)
        burn(0.008)
    return {"ok": True}


@app.get("/idle")
async def idle() -> dict[str, bool]:
    # In flight all along, on the loop for almost no time: an innocent bystander.
    for _ in range(20):
        await asyncio.sleep(0.03)
    return {"ok": True}


@app.get("/saturate")
async def saturate() -> dict[str, bool]:
    burn(0.001)
    return {"ok": True}


# -- other contexts -----------------------------------------------------------------------------


def _background_job() -> None:
    time.sleep(0.12)  # culprit:background


async def _async_background_job() -> None:
    time.sleep(0.12)  # culprit:async-background


@app.get("/background")
async def background(tasks: BackgroundTasks) -> dict[str, bool]:
    tasks.add_task(_async_background_job)
    return {"ok": True}


@app.get("/background-sync")
async def background_sync(tasks: BackgroundTasks) -> dict[str, bool]:
    # A sync background task runs in the threadpool: it never blocks the loop itself.
    tasks.add_task(_background_job)
    return {"ok": True}


def _body() -> Iterator[bytes]:
    yield b"head,"
    time.sleep(0.12)  # culprit:stream
    yield b"tail"


@app.get("/stream")
async def stream() -> StreamingResponse:
    async def body() -> AsyncIterator[bytes]:
        for chunk in _body():
            yield chunk

    return StreamingResponse(body(), media_type="text/plain")


async def blocking_dependency() -> int:
    time.sleep(0.12)  # culprit:dependency
    return 1


@app.get("/dependency")
async def dependency(value: int = Depends(blocking_dependency)) -> dict[str, int]:
    return {"value": value}


def _callback() -> None:
    time.sleep(0.12)  # culprit:callback


@app.get("/callback")
async def callback() -> dict[str, bool]:
    # Scheduled in an empty Context: the block belongs to no request, but its line is known.
    asyncio.get_running_loop().call_soon(_callback, context=contextvars.Context())
    await asyncio.sleep(0.3)
    return {"ok": True}


# -- test plumbing ------------------------------------------------------------------------------


add_event_routes(app, EVENTS, clear=True)
add_stats_route(app)


# The interpreter's first full collection (tens of ms of real blocking, which the guard rightly
# reports) would otherwise fall into whichever request comes first, at a point that differs
# between Python versions; the tests name their culprits exactly, so it happens here instead.
# Freezing what survived keeps the later full collections (3.12 runs one during the first
# requests) down to the few objects the requests make.
gc.collect()
gc.freeze()
