"""Detection depth on real uvicorn, asyncio and uvloop: several culprits in one stall, hangs
reported while they last, the GIL held by native code or by another thread, saturation that is
not blocking, and blocking outside endpoint bodies.
"""

from __future__ import annotations

import asyncio
import re
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from .conftest import ROOT, Server, culprit_line, start_server, stop_server, wait_events

APP = "tests.apps.detection:app"
APP_FILE = ROOT / "tests" / "apps" / "detection.py"


@pytest.fixture
def server(loop_name: str, tmp_path: Path) -> Iterator[Server]:
    s = start_server(APP, loop_name, tmp_path)
    yield s
    stop_server(s)


def stats(server: Server) -> dict[str, Any]:
    result: dict[str, Any] = httpx.get(server.url + "/_stats", timeout=5).json()
    return result


def test_one_stall_three_culprits_three_events(server: Server) -> None:
    async def main() -> None:
        async with httpx.AsyncClient(base_url=server.url, timeout=10) as client:
            waiters = [
                asyncio.create_task(client.get(p, headers={"x-request-id": rid}))
                for p, rid in [
                    ("/split/sleep", "req-sleep"),
                    ("/split/cpu", "req-cpu"),
                    ("/split/child", "req-child"),
                ]
            ]
            await asyncio.sleep(0.3)  # all three wait on the gate
            await client.post("/split/go")
            responses = await asyncio.gather(*waiters)
            assert all(r.status_code == 200 for r in responses)
            for r in responses:  # each request sees exactly its own block
                assert r.headers["x-blocking-count"] == "1", r.headers

    asyncio.run(main())
    events = {e["request_id"]: e for e in wait_events(server, 3)}
    assert set(events) == {"req-sleep", "req-cpu", "req-child"}, events
    expected = {
        "req-sleep": ("/split/sleep", "sleep", culprit_line(APP_FILE, "split-sleep")),
        "req-cpu": ("/split/cpu", "cpu", culprit_line(APP_FILE, "burn")),
        "req-child": ("/split/child", "sleep", culprit_line(APP_FILE, "split-child")),
    }
    total = sum(e["duration_ms"] for e in events.values())
    for rid, (route, kind, lineno) in expected.items():
        event = events[rid]
        assert event["route"] == route
        assert event["kind"] == kind
        assert event["culprit"]["lineno"] == lineno
        # An honest share of the one long stall: about 150 ms each, not all of it. A sleep
        # lasts its 150 ms on any host, so it never gets most of the stall. The CPU culprit's
        # fixed work may take many times longer on a busy host, waiting for a CPU: it is held
        # to its floor only.
        assert event["duration_ms"] >= 100, event["duration_ms"]
        if kind == "sleep":
            assert event["duration_ms"] < 0.6 * total, (event["duration_ms"], total)


def test_hang_is_reported_while_it_lasts(server: Server) -> None:
    async def main() -> tuple[float, httpx.Response, list[tuple[float, str]]]:
        lines: list[tuple[float, str]] = []
        async with httpx.AsyncClient(base_url=server.url, timeout=10) as client:
            request = asyncio.create_task(client.get("/hang", headers={"x-request-id": "hung-1"}))
            sent = time.monotonic()
            seen = 0
            while not request.done():
                text = server.log()
                for found in re.findall(r"loopguard: event loop blocked for .*", text)[seen:]:
                    lines.append((time.monotonic(), found))
                    seen += 1
                await asyncio.sleep(0.01)
            return sent, await request, lines

    sent, response, lines = asyncio.run(main())
    assert response.status_code == 200
    # Reported while ongoing, from the watchdog: the first line came well before the 2.5 s block
    # ended, and then once more (after another hang threshold), not once per sample.
    assert 1 <= len(lines) <= 3, lines
    first_at, first = lines[0]
    assert first_at - sent < 2.3, f"first hang report only after {first_at - sent:.2f} s"
    assert "during GET /hang request_id=hung-1" in first
    assert "kind=sleep" in first
    assert f"{APP_FILE}:{culprit_line(APP_FILE, 'hang')} in hang" in first
    event = wait_events(server, 1)[0]
    assert event["hang"] is True
    assert event["request_id"] == "hung-1"
    assert event["duration_ms"] >= 2400
    assert stats(server)["hangs"] == 1


def test_connections_the_server_has_not_taken_up_are_counted(server: Server) -> None:
    host, port = server.url.removeprefix("http://").split(":")

    async def main() -> httpx.Response:
        async with httpx.AsyncClient(base_url=server.url, timeout=10) as client:
            blocked = asyncio.create_task(client.get("/hang", headers={"x-request-id": "q-1"}))
            await asyncio.sleep(0.5)  # the loop is in the 2.5 s sleep now
            # Five more clients: the kernel accepts them, the blocked server cannot.
            streams = [await asyncio.open_connection(host, int(port)) for _ in range(5)]
            for _, writer in streams:
                writer.write(b"GET /ping HTTP/1.1\r\nHost: t\r\n\r\n")
                await writer.drain()
            response = await blocked
            for reader, writer in streams:
                assert b" 200 " in await reader.readline()  # each was served after the block
                writer.close()
            return response

    assert asyncio.run(main()).status_code == 200
    event = wait_events(server, 1)[0]
    assert event["request_id"] == "q-1"
    # Nobody else was in flight as far as the middleware knew, but five clients waited.
    assert event["victims"] == 0
    assert event["queued"] == 5, event


def test_native_code_holding_the_gil(server: Server) -> None:
    response = httpx.get(server.url + "/native", headers={"x-request-id": "regex-1"}, timeout=30)
    assert response.status_code == 200
    events = wait_events(server, 1)
    assert len(events) == 1, events
    event = events[0]
    assert event["kind"] == "native"
    assert event["request_id"] == "regex-1"
    # No sample could take the GIL during the match; the first one after it names the line.
    assert event["culprit"]["lineno"] == culprit_line(APP_FILE, "native")
    assert event["duration_ms"] >= 300
    s = stats(server)
    assert s["stack_timeouts"] >= 1
    assert s["late_stacks"] >= 1
    # The hang report was still written, without the GIL, while the match ran.
    assert "kind=native" in server.log()


def test_native_hang_names_its_line_while_it_lasts(server: Server) -> None:
    async def main() -> tuple[httpx.Response, str]:
        async with httpx.AsyncClient(base_url=server.url, timeout=30) as client:
            request = asyncio.create_task(
                client.get("/native-hang", headers={"x-request-id": "native-1"})
            )
            first = ""
            while not request.done() and not first:
                found = re.search(r"loopguard: event loop blocked for .*", server.log())
                first = found.group(0) if found else ""
                await asyncio.sleep(0.01)
            # Read while the call still holds the GIL: the culprit is known before it returns.
            assert not request.done(), "the first hang line came only after the call returned"
            return await request, first

    # A sync endpoint first, so that an idle threadpool worker is there to be listed.
    assert httpx.get(server.url + "/gil-holder?n=5", timeout=10).status_code == 200
    response, first = asyncio.run(main())
    assert response.status_code == 200
    native_hang = culprit_line(APP_FILE, "native-hang")
    where = f"culprit={APP_FILE}:{native_hang} in native_hang (read without the GIL)"
    assert where in first, first
    assert "; stack=" + f"{APP_FILE}:{native_hang} in native_hang <- " in first, first
    # Whose Context the loop runs in is not read without the GIL: the line names the request in
    # flight as the one it may be, and does not say there is none.
    in_flight = "(its request unknown without the GIL; the one in flight: GET /native-hang "
    assert in_flight + "request_id=native-1)" in first, first
    # The first report lists the Python threads, the loop's first: the GIL was held throughout,
    # so every thread was frozen and read without it, the idle threadpool worker included.
    log = server.log()
    dump = log[log.index("loopguard: Python threads at the first report of this hang:") :]
    assert "(the event loop), innermost frame first:" in dump
    assert "in WorkerThread.run" in dump, dump
    assert log.count("loopguard: Python threads at the first report") == 1
    # The warm-up request may have an event of its own (its regex holds the GIL, on a busy host
    # long enough): the hang's is the one of its request.
    deadline = time.monotonic() + 10
    while not (found := [e for e in wait_events(server, 1) if e["request_id"] == "native-1"]):
        assert time.monotonic() < deadline, wait_events(server, 1)
        time.sleep(0.05)
    event = found[0]
    assert event["culprit"]["lineno"] == native_hang
    assert stats(server)["unlocked_stacks"] >= 1


@pytest.mark.parametrize(
    ("path", "wait", "holder", "function"),
    [
        ("/lock-held", "lock-wait", "lock-holder", "hold_lock"),
        ("/future-wait", "future-wait", "future-holder", "fill_future_late"),
    ],
)
def test_lock_wait_names_the_other_threads_line(
    server: Server, path: str, wait: str, holder: str, function: str
) -> None:
    response = httpx.get(server.url + path, headers={"x-request-id": "held-1"}, timeout=30)
    assert response.status_code == 200
    events = wait_events(server, 1)
    assert len(events) == 1, events
    event = events[0]
    assert event["kind"] == "lock", event
    assert event["request_id"] == "held-1"
    assert event["culprit"]["lineno"] == culprit_line(APP_FILE, wait)
    assert event["holder_culprit"] is not None, event
    assert event["holder_culprit"]["lineno"] == culprit_line(APP_FILE, holder), event
    assert event["holder_culprit"]["function"] == function
    # Innermost last, as in `stack`: the holder's own line, in time.sleep (C, so no frame).
    assert event["holder_stack"][-1] == event["holder_culprit"]
    assert event["holder_thread"] > 0


@pytest.mark.xfail(
    sys.version_info >= (3, 14),
    reason="3.14: the loop's wait behind another thread's collection read as 'lock' once in CI "
    "(its futex was not the GIL's known one); not yet explained",
    strict=False,
)
def test_a_collection_on_another_thread_is_gc_not_the_gil(server: Server) -> None:
    # The heap is built first, in a request of its own, so that only the collection blocks.
    built = httpx.get(server.url + "/gc-heap", headers={"x-request-id": "gc-heap"}, timeout=60)
    assert built.json() == {"objects": 4_000_000}
    response = httpx.get(
        server.url + "/gc-elsewhere", headers={"x-request-id": "gc-victim"}, timeout=60
    )
    assert response.status_code == 200
    deadline = time.monotonic() + 10
    while True:
        events = wait_events(server, 1)
        victim = [e for e in events if e["request_id"] == "gc-victim"]
        if victim or time.monotonic() > deadline:
            break
        time.sleep(0.05)
    # Building the heap is CPU work and a collection in the threadpool, which may have kept the
    # loop from the GIL too, in that request's steps or in the loop's own callbacks meanwhile.
    assert {e["request_id"] for e in events} <= {"gc-heap", None, "gc-victim"}, events
    assert [e["kind"] for e in victim] == ["gc"], events
    event = victim[0]
    # The collector is named by its thread: not the loop's, and it ran no Python to show.
    assert event["holder_thread"] > 0, event
    assert event["holder_stack"] == [], event
    assert re.search(r"kind=gc .*holder_thread=\d+", server.log()), server.log()


def test_loop_starved_of_the_gil_by_a_sync_endpoint(server: Server) -> None:
    async def main() -> None:
        async with httpx.AsyncClient(base_url=server.url, timeout=30) as client:
            holder = asyncio.create_task(
                client.get("/gil-holder?n=25", headers={"x-request-id": "sync-holder"})
            )
            await asyncio.sleep(0.1)  # the match is running in the threadpool now
            # Requests keep arriving while it runs: the loop needs the GIL to serve them.
            pings = []
            while not holder.done() and len(pings) < 200:
                headers = {"x-request-id": f"ping-{len(pings)}"}
                pings.append(asyncio.create_task(client.get("/ping", headers=headers)))
                await asyncio.sleep(0.03)
            responses = await asyncio.gather(holder, *pings)
            assert all(r.status_code == 200 for r in responses)

    asyncio.run(main())
    events = wait_events(server, 1)
    gil_events = [e for e in events if e["kind"] == "gil"]
    assert len(gil_events) == 1, f"{events}\n{stats(server)}\n{server.log()[-2000:]}"
    event = gil_events[0]
    # Blamed on the thread that held the GIL, through its request's Context, not on a ping.
    assert event["request_id"] == "sync-holder", [(k, v) for k, v in event.items() if k != "stack"]
    assert event["route"] == "/gil-holder"
    assert event["culprit"]["lineno"] == culprit_line(APP_FILE, "gil")
    assert not [e for e in events if (e["request_id"] or "").startswith("ping-")]


def test_sql_threads_holding_the_gil_are_gil_not_lock(server: Server) -> None:
    """SQLite queries in asyncio.to_thread, calling Python for every row, keep the GIL busy while
    requests arrive: the loop thread waits on the GIL's futex at its bytecode boundaries. That
    is kind gil, blamed on the SQL threads' request and line, never a lock."""

    async def main() -> None:
        async with httpx.AsyncClient(base_url=server.url, timeout=60) as client:
            # Every thread of the default pool started first: a loop starting a thread waits
            # for it in Thread.start, a real lock wait that is not what this test is about.
            assert (await client.get("/sql?repeat=0&hold=0.2")).status_code == 200
            assert (await client.delete("/_events")).status_code == 200
            # Each pure-Python run between two fetches well past the 50 ms threshold: a pass is
            # about 4 ms (3.7 on 3.14), so 10 of them left the loop's longest wait at 37-47 ms
            # on 3.14, never a stall. 30 outlast the 100 ms slice, so the loop waits it out.
            query = asyncio.create_task(
                client.get(
                    "/sql?slice_ms=100&passes=30&repeat=3", headers={"x-request-id": "sql-1"}
                )
            )
            await asyncio.sleep(0.1)  # the SQL threads are running now
            pings = []
            while not query.done() and len(pings) < 500:
                headers = {"x-request-id": f"ping-{len(pings)}"}
                pings.append(asyncio.create_task(client.get("/ping", headers=headers)))
                await asyncio.sleep(0.01)
            responses = await asyncio.gather(query, *pings)
            assert all(r.status_code == 200 for r in responses)

    def holder_named(event: dict[str, Any]) -> bool:
        return event["culprit"] is not None and event["culprit"]["function"] == "_query"

    # Which thread the GIL goes to at each hand-over is up to the scheduler: a stall whose late
    # stack was taken from another waiter names nothing. A few rounds at most, events kept.
    events: list[dict[str, Any]] = []
    for _ in range(8):
        asyncio.run(main())
        events = wait_events(server, 1, timeout=1)
        if any(e["kind"] == "gil" and holder_named(e) for e in events):
            break
    kinds = [e["kind"] for e in events]
    assert "gil" in kinds, f"{events}\n{stats(server)}"
    # A real lock wait may come too: the loop submitting to the pool takes the executor's idle
    # semaphore, whose lock a worker holds while it waits for the GIL. The SQL request's own
    # events, though, are GIL waits, never a lock.
    assert not [e for e in events if e["kind"] == "lock" and e["request_id"] == "sql-1"], events
    # The holder's stack, through the Context to_thread copied: the SQL request's code. (When
    # no sample gets the GIL in time, the loop's own stack taken later may name a ping instead.)
    held = [e for e in events if holder_named(e)]
    assert held, events
    for event in held:
        assert event["kind"] == "gil", [(k, v) for k, v in event.items() if k != "stack"]
        assert event["request_id"] == "sql-1"
        assert event["culprit"]["filename"] == str(APP_FILE)
        assert event["culprit_is_library"] is False


def test_lock_wait_outside_requests_names_the_mutex_owner(server: Server) -> None:
    """Datasette's lock events: a cursor freed on the loop, between two callbacks, waits in
    sqlite3_reset for the connection a SQL thread runs a query on. The loop's stack has nothing
    to name; the mutex's owner does: the SQL thread's line, in its request's Context."""
    response = httpx.get(server.url + "/sql-lock", headers={"x-request-id": "lock-1"}, timeout=30)
    assert response.status_code == 200
    events = wait_events(server, 1)
    locks = [e for e in events if e["kind"] == "lock"]
    assert len(locks) == 1, events
    event = locks[0]
    assert event["culprit"] is not None, event
    assert event["culprit"]["lineno"] == culprit_line(APP_FILE, "sql-holder")
    assert event["request_id"] == "lock-1"  # asyncio.to_thread copied the request's Context
    assert event["culprit_is_library"] is False


def test_many_short_blocks_are_cumulative(server: Server) -> None:
    async def main() -> None:
        async with httpx.AsyncClient(base_url=server.url, timeout=30) as client:
            bystanders = [
                asyncio.create_task(client.get("/idle", headers={"x-request-id": f"idle-{i}"}))
                for i in range(5)
            ]
            await asyncio.sleep(0.05)
            response = await client.get("/cuts", headers={"x-request-id": "cuts-1"})
            assert response.status_code == 200
            # Counted in the request's own dev headers, like any block it caused.
            assert response.headers["x-blocking-count"] == "1", response.headers
            assert all(r.status_code == 200 for r in await asyncio.gather(*bystanders))

    asyncio.run(main())
    events = wait_events(server, 1)
    assert len(events) == 1, events
    event = events[0]
    assert event["kind"] == "cumulative"
    assert event["request_id"] == "cuts-1"
    assert event["route"] == "/cuts"
    # Reported as soon as the window held 200 ms: 25 slices of 8 ms of CPU each. Up to half the
    # threshold is summed on the wall clock before the steps' CPU time is read, and a busy host
    # stretches those, so fewer slices may do; the CPU-clock half alone takes 13.
    assert 200 <= event["duration_ms"] < 280, event["duration_ms"]
    assert 13 <= event["samples"] <= 40, event["samples"]
    assert event["victims"] >= 1
    # Where the request waited right after its last slice.
    assert event["culprit"]["lineno"] == culprit_line(APP_FILE, "cuts")
    assert event["culprit"]["function"] == "cuts"
    assert stats(server)["cumulative_events"] == 1


def test_cumulative_spares_spread_out_work_and_single_blocks(server: Server) -> None:
    # 40 slices, but never 200 ms within one second: nothing cumulative.
    async def spread() -> None:
        async with httpx.AsyncClient(base_url=server.url, timeout=30) as client:
            for _ in range(8):
                assert (await client.get("/cuts?slices=5")).status_code == 200
                await asyncio.sleep(0.5)

    asyncio.run(spread())
    # A busy host may stretch an 8 ms slice past the threshold, waiting for a CPU: that is a
    # real stall of its own, an ordinary event of /cuts. Never a cumulative one.
    spread_events = wait_events(server, 0)
    assert all(e["path"] == "/cuts" and e["kind"] != "cumulative" for e in spread_events)
    # One 150 ms block and 80 ms of slices: the block is an ordinary event, never counted again.
    response = httpx.get(server.url + "/block-once", timeout=30)
    assert response.status_code == 200
    events = wait_events(server, len(spread_events) + 1)[len(spread_events) :]
    assert [(e["kind"], e["culprit"]["lineno"]) for e in events] == [
        ("sleep", culprit_line(APP_FILE, "block-once"))
    ], events
    assert stats(server)["cumulative_events"] == 0


def test_saturation_is_not_blocking(server: Server) -> None:
    async def main() -> None:
        limits = httpx.Limits(max_connections=300)
        async with httpx.AsyncClient(base_url=server.url, timeout=30, limits=limits) as client:
            responses = await asyncio.gather(*[client.get("/saturate") for _ in range(300)])
            assert all(r.status_code == 200 for r in responses)

    asyncio.run(main())
    time.sleep(0.3)
    assert wait_events(server, 1, timeout=0.5) == []
    # The loop was busy for long stretches; that time is reported as saturation instead.
    s = stats(server)
    assert s["saturation_ms"] > 0 or s["stalls"] == 0


@pytest.mark.parametrize(
    ("path", "marker", "route"),
    [
        ("/background", "async-background", "/background"),
        ("/dependency", "dependency", "/dependency"),
        ("/stream", "stream", "/stream"),
    ],
)
def test_blocking_outside_the_endpoint_body_is_attributed(
    server: Server, path: str, marker: str, route: str
) -> None:
    response = httpx.get(server.url + path, headers={"x-request-id": "ctx-1"}, timeout=10)
    assert response.status_code == 200
    # The app's block, and nothing else of the app's. A fresh server's first request may also
    # pay for a library's first import on the loop (anyio imports lazily: 65 ms on a busy host),
    # which is reported too, as library code.
    deadline = time.monotonic() + 5
    while True:
        events = wait_events(server, 1)
        own = [e for e in events if e["culprit"] and e["culprit"]["filename"] == str(APP_FILE)]
        if own or time.monotonic() > deadline:
            break
        time.sleep(0.05)
    assert len(own) == 1, events
    assert all(e["culprit_is_library"] for e in events if e not in own), events
    event = own[0]
    assert event["request_id"] == "ctx-1"
    assert event["route"] == route
    assert event["culprit"]["lineno"] == culprit_line(APP_FILE, marker)
    if path == "/stream":
        # The block came after the headers left: it is in the event, not in the headers.
        assert response.text == "head,tail"
        assert response.headers["x-blocking-count"] == "0"
    if path == "/dependency":
        assert response.headers["x-blocking-count"] == "1"


def test_sync_background_task_does_not_block_the_loop(server: Server) -> None:
    response = httpx.get(server.url + "/background-sync", timeout=10)
    assert response.status_code == 200
    time.sleep(0.4)
    assert wait_events(server, 1, timeout=0.3) == []


def test_callback_without_a_request_names_the_line(server: Server) -> None:
    response = httpx.get(server.url + "/callback", headers={"x-request-id": "cb-1"}, timeout=10)
    assert response.status_code == 200
    events = wait_events(server, 1)
    assert len(events) == 1, events
    event = events[0]
    assert event["request_id"] is None
    assert event["culprit"]["lineno"] == culprit_line(APP_FILE, "callback")
    assert event["victims"] >= 1  # the /callback request itself was in flight, frozen


def test_blocking_during_lifespan_shutdown(loop_name: str, tmp_path: Path) -> None:
    server = start_server(APP, loop_name, tmp_path, env={"LOOPGUARD_TEST_SHUTDOWN_BLOCK": "1"})
    stop_server(server)  # SIGTERM: uvicorn runs the lifespan shutdown, which blocks
    # The guard stops once the shutdown completed, and delivers the block first: the log line
    # (the process is gone, so its log is all there is) names the line, with no request.
    lines = [x for x in server.log().splitlines() if "Event loop blocked" in x]
    assert len(lines) == 1, server.log()
    assert f"culprit={APP_FILE}:{culprit_line(APP_FILE, 'shutdown')} in lifespan" in lines[0]
    assert "kind=sleep" in lines[0]
    assert "during lifespan.shutdown" in lines[0]


def test_blocking_during_lifespan_startup(loop_name: str, tmp_path: Path) -> None:
    server = start_server(APP, loop_name, tmp_path, env={"LOOPGUARD_TEST_STARTUP_BLOCK": "1"})
    try:
        events = wait_events(server, 1)
        assert len(events) == 1, events
        # The startup code runs under a label of its own, as the shutdown code does.
        assert events[0]["request_id"] == "lifespan.startup"
        assert events[0]["culprit"]["lineno"] == culprit_line(APP_FILE, "startup")
        assert events[0]["kind"] == "sleep"
    finally:
        stop_server(server)
