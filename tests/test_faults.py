"""The fault matrix: the guard must never be what crashes, hangs or leaks, whatever the app, the
client or the server does around it.

Each case runs on asyncio and on uvloop: in-process where the property is the middleware's own
(exceptions, cancellation, two guards on one loop), on real uvicorn or gunicorn where a server is
part of the story (streaming, disconnects, shutdown mid-block, failing startup, reload, preload
and fork). Websockets are covered by test_attribution.py::test_websocket_is_attributed.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import functools
import gc
import os
import random
import shutil
import signal
import socket
import subprocess
import sys
import textwrap
import time
from pathlib import Path
from typing import Any

import httpx
import pytest

import fastapi_loopguard
from fastapi_loopguard import LoopGuardConfig, LoopGuardMiddleware

from .asgi import call, http_scope
from .conftest import (
    ROOT,
    Server,
    complete_records,
    culprit_line,
    free_port,
    start_server,
    stop_server,
    wait_events,
)
from .test_guard import run

APP_FILE = ROOT / "tests" / "apps" / "faults.py"
APP = "tests.apps.faults:app"


def _culprit(event: dict[str, Any]) -> tuple[str, int]:
    return event["culprit"]["filename"], event["culprit"]["lineno"]


def _wait_exit(process: subprocess.Popen[bytes], seconds: float) -> int:
    try:
        return process.wait(timeout=seconds)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait()
        raise AssertionError(f"process {process.args!r} still running after {seconds} s") from None


def _no_guard_failure(log: str) -> None:
    """The guard's failsafe paths log "fastapi_loopguard: ... failed": none may have fired."""
    assert "serving without the guard" not in log, log
    assert "Fatal Python error" not in log, log


# ---- in-process: the middleware's own contract -------------------------------------------------


class Boom(Exception):
    pass


@pytest.mark.parametrize("cumulative", [True, False], ids=["timed-steps", "plain-await"])
def test_app_exception_propagates_as_the_same_object(loop_name: str, cumulative: bool) -> None:
    raised = Boom("from the app")

    async def app(scope: Any, receive: Any, send: Any) -> None:
        await asyncio.sleep(0)
        time.sleep(0.08)
        raise raised

    async def main() -> tuple[BaseException | None, dict[str, Any]]:
        config = LoopGuardConfig(dev_mode=True, cumulative_blocking_enabled=cumulative)
        middleware = LoopGuardMiddleware(app, config)
        caught = None
        try:
            await call(middleware, http_scope("/boom"))
        except Boom as error:
            caught = error
        await asyncio.sleep(0.05)
        stats = middleware.guard.stats()
        middleware.guard.stop()
        return caught, stats

    caught, stats = run(loop_name, main)
    assert caught is raised  # the very object, not a wrapper or a copy
    # The app's frame is still in its traceback: nothing re-raised it from elsewhere.
    frames = []
    tb = caught.__traceback__
    while tb is not None:
        frames.append(tb.tb_frame.f_code.co_name)
        tb = tb.tb_next
    assert frames[-1] == "app"
    assert stats["inflight"] == 0  # the request was ended despite the exception


@pytest.mark.parametrize("cumulative", [True, False], ids=["timed-steps", "plain-await"])
def test_cancelled_request_is_ended_and_the_next_one_blamed(
    loop_name: str, cumulative: bool
) -> None:
    cleaned_up: list[str] = []

    async def app(scope: Any, receive: Any, send: Any) -> None:
        if scope["path"] == "/hang":
            try:
                await asyncio.sleep(30)
            finally:
                cleaned_up.append(scope["path"])  # cancellation reached the app's own code
        time.sleep(0.12)
        await send({"type": "http.response.start", "status": 200, "headers": []})
        await send({"type": "http.response.body", "body": b""})

    async def main() -> tuple[dict[str, Any], list[str]]:
        config = LoopGuardConfig(cumulative_blocking_enabled=cumulative, log_blocking_events=False)
        middleware = LoopGuardMiddleware(app, config)
        task = asyncio.ensure_future(
            call(middleware, http_scope("/hang", [(b"x-request-id", b"cancelled")]))
        )
        await asyncio.sleep(0.05)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        await call(middleware, http_scope("/next", [(b"x-request-id", b"next")]))
        await asyncio.sleep(0.1)
        stats = middleware.guard.stats()
        ids = [e.request_id for e in middleware.guard.events]
        middleware.guard.stop()
        return stats, ids

    stats, ids = run(loop_name, main)
    assert cleaned_up == ["/hang"]
    assert stats["inflight"] == 0
    assert ids == ["next"]


def test_two_guards_on_one_loop_stop_in_either_order(loop_name: str) -> None:
    async def app(scope: Any, receive: Any, send: Any) -> None:
        time.sleep(0.12)
        await send({"type": "http.response.start", "status": 200, "headers": []})
        await send({"type": "http.response.body", "body": b""})

    async def main(inner_first: bool) -> tuple[list[str], list[str], bool]:
        quiet = LoopGuardConfig(log_blocking_events=False)
        inner = LoopGuardMiddleware(app, quiet)
        outer = LoopGuardMiddleware(inner, quiet)
        await call(outer, http_scope("/twice", [(b"x-request-id", b"both")]))
        await asyncio.sleep(0.1)
        outer_ids = [e.request_id for e in outer.guard.events]
        inner_ids = [e.request_id for e in inner.guard.events]
        first, second = (inner, outer) if inner_first else (outer, inner)
        first.guard.stop()
        second.guard.stop()
        # Both stopped: the loop's selector is the loop's own again (asyncio), nothing left over.
        selector = getattr(asyncio.get_running_loop(), "_selector", None)
        restored = selector is None or "select" not in vars(selector)
        return outer_ids, inner_ids, restored

    for inner_first in (True, False):
        outer_ids, inner_ids, restored = run(loop_name, functools.partial(main, inner_first))
        assert outer_ids == ["both"]
        assert inner_ids == ["both"]
        assert restored


def test_the_select_pulse_passes_results_and_errors_through_and_lets_go_when_released() -> None:
    # The native pulse in select's place (select_pulse.h), called here as the loop calls it.
    async def main() -> None:
        guard = fastapi_loopguard.LoopGuard(LoopGuardConfig(log_blocking_events=False))
        guard.start()
        engine = guard._engine
        calls: list[float | None] = []

        def select(timeout: float | None = None) -> list[Any]:
            calls.append(timeout)
            if timeout == -1:
                raise InterruptedError("select was interrupted")
            return [("key", 1)]

        pulse = engine.select_pulse(select)
        assert any(r is engine for r in gc.get_referents(pulse))
        assert pulse(0.5) == [("key", 1)] and pulse(timeout=None) == [("key", 1)]
        with pytest.raises(InterruptedError, match="interrupted"):
            pulse(-1)
        assert calls == [0.5, None, -1]
        assert pulse._loopguard_below is None and not pulse._loopguard_inert
        pulse._loopguard_below = select
        assert pulse._loopguard_below is select
        pulse.release()
        assert pulse._loopguard_inert and pulse(0) == [("key", 1)]  # a pass-through now
        # Released, it holds no engine: the engine goes with its guard, wherever the pulse stays.
        assert not any(r is engine for r in gc.get_referents(pulse))
        guard.stop()
        assert pulse(0) == [("key", 1)]

    asyncio.run(main())


def test_a_guard_with_nothing_in_flight_ignores_a_busy_loop(loop_name: str) -> None:
    """One guard's requests keep the loop busy for 1.5 s, in short iterations; the others have
    nothing in flight (one tracked a request before, one never did). On uvloop they have no
    heartbeat, and the OS shows the loop thread always running: they must ask the loop (the
    notify pipe) rather than call that a stall."""

    async def app(scope: Any, receive: Any, send: Any) -> None:
        await send({"type": "http.response.start", "status": 204, "headers": []})
        await send({"type": "http.response.body", "body": b""})

    async def main() -> tuple[int, list[str]]:
        quiet = LoopGuardConfig(log_blocking_events=False)
        busy = LoopGuardMiddleware(app, quiet)
        idle = LoopGuardMiddleware(app, quiet)
        await call(idle, http_scope("/once"))  # started, then nothing in flight
        never = LoopGuardMiddleware(app, quiet)
        never.guard.start()  # started (as by the lifespan), never a request
        end = time.monotonic() + 1.5
        served = 0
        # The collector off meanwhile: a full collection of the garbage 1,000+ requests leave is
        # a real block of the loop (100 ms here), which guards with nothing in flight now see
        # like any other; this test is about many short iterations, which are none.
        gc.disable()
        try:
            while time.monotonic() < end:
                await call(busy, http_scope("/busy"))
                await asyncio.sleep(0)
                served += 1
            await asyncio.sleep(0.1)
            seen = [
                f"{e.kind} {e.duration_ms:.0f} ms"
                for e in (*idle.guard.events, *never.guard.events)
            ]
            for middleware in (busy, idle, never):
                middleware.guard.stop()
        finally:
            gc.enable()  # only now: the collection that follows comes after the guards stopped
        return served, seen

    served, seen = run(loop_name, main)
    assert served > 1000
    assert seen == []


# ---- the extension missing or failing to load ---------------------------------------------------


def _broken_install(tmp_path: Path) -> Path:
    """A copy of the installed package whose extension is garbage: it fails in dlopen."""
    from fastapi_loopguard import _core

    site = tmp_path / "site"
    package = site / "fastapi_loopguard"
    shutil.copytree(
        Path(fastapi_loopguard.__file__).parent, package, ignore=shutil.ignore_patterns("_core*")
    )
    # Named like the real one (its ABI tag included), so the import system picks it.
    (package / Path(str(_core.__file__)).name).write_bytes(b"this is not an ELF file\n" * 64)
    return site


@pytest.mark.parametrize("how", ["missing", "corrupt"])
def test_without_its_extension_the_app_still_serves(
    loop_name: str, tmp_path: Path, how: str
) -> None:
    env = {"PYTHONPATH": str(ROOT)}
    if how == "corrupt":
        env["PYTHONPATH"] = f"{_broken_install(tmp_path)}{os.pathsep}{ROOT}"
        app = APP
    else:
        # A module that hides the extension before the app imports the package.
        (tmp_path / "hide_core.py").write_text(
            "import sys\nsys.modules['fastapi_loopguard._core'] = None\n"
            "from tests.apps.faults import app\n"
        )
        env["PYTHONPATH"] = f"{tmp_path}{os.pathsep}{ROOT}"
        app = "hide_core:app"
    server = start_server(app, loop_name, tmp_path, env=env)
    try:
        if how == "corrupt":
            pid = httpx.get(server.url + "/pid", timeout=5).json()["pid"]
            maps = Path(f"/proc/{pid}/maps").read_text()
            assert str(tmp_path) not in maps  # the garbage was never mapped
        response = httpx.get(server.url + "/block/60", timeout=10)
        assert response.status_code == 200
        assert response.json()["ms"] == 60
        assert "x-blocking-count" not in response.headers  # no guard, so no claims either
        assert httpx.get(server.url + "/stream", timeout=10).status_code == 200
    finally:
        stop_server(server)
    log = server.log()
    assert "fastapi_loopguard's native engine could not be loaded" in log
    assert "NOT being watched" in log
    assert "pip install --force-reinstall fastapi-loopguard" in log
    assert "Traceback" not in log, log


# ---- real uvicorn ------------------------------------------------------------------------------


@pytest.fixture
def faults_server(loop_name: str, tmp_path: Path) -> Any:
    server = start_server(APP, loop_name, tmp_path)
    yield server
    stop_server(server)
    _no_guard_failure(server.log())


def test_streaming_body_is_intact_and_its_block_blamed(faults_server: Server) -> None:
    with httpx.stream("GET", faults_server.url + "/stream", timeout=10) as response:
        assert response.status_code == 200
        body = b"".join(response.iter_bytes())
    assert body == b"".join(f"chunk {i:02d}\n".encode() for i in range(20))
    events = wait_events(faults_server)
    assert [e["path"] for e in events] == ["/stream"]
    assert _culprit(events[0]) == (str(APP_FILE), culprit_line(APP_FILE, "stream"))


def test_client_disconnect_mid_request(faults_server: Server) -> None:
    host, port = faults_server.url.removeprefix("http://").split(":")
    with socket.create_connection((host, int(port)), timeout=5) as sock:
        sock.sendall(b"GET /late-block HTTP/1.1\r\nHost: x\r\nx-request-id: gone\r\n\r\n")
        time.sleep(0.1)  # the request is in the app's await; the client hangs up
    events = wait_events(faults_server)
    assert [(e["request_id"], e["path"]) for e in events] == [("gone", "/late-block")]
    assert _culprit(events[0]) == (str(APP_FILE), culprit_line(APP_FILE, "after-disconnect"))
    # The server is unharmed and the request was ended.
    assert httpx.get(faults_server.url + "/health", timeout=5).status_code == 200
    assert httpx.get(faults_server.url + "/_stats", timeout=5).json()["inflight"] == 0


def test_two_guards_in_one_process(faults_server: Server) -> None:
    """A mounted app with its own middleware: both guards watch the loop, both name the line."""
    response = httpx.get(
        faults_server.url + "/sub/block", headers={"x-request-id": "nested"}, timeout=10
    )
    assert response.status_code == 200
    line = (str(APP_FILE), culprit_line(APP_FILE, "inner"))
    outer = wait_events(faults_server)
    assert [(e["request_id"], _culprit(e)) for e in outer] == [("nested", line)]
    deadline = time.monotonic() + 5
    while True:
        inner = httpx.get(faults_server.url + "/sub/_events", timeout=5).json()
        if inner or time.monotonic() > deadline:
            break
        time.sleep(0.05)
    assert [(e["request_id"], _culprit(e)) for e in inner] == [("nested", line)]


def test_lifespan_startup_failure_is_the_apps_own(loop_name: str, tmp_path: Path) -> None:
    port = free_port()
    log = tmp_path / "uvicorn.log"
    cmd = [sys.executable, "-m", "uvicorn", APP, "--port", str(port), "--loop", loop_name]
    cmd += ["--host", "127.0.0.1", "--lifespan", "on"]
    with open(log, "wb") as out:
        process = subprocess.Popen(
            cmd, cwd=ROOT, stdout=out, stderr=subprocess.STDOUT,
            env={**os.environ, "FAULTS_STARTUP_FAIL": "1"},
        )  # fmt: skip
    code = _wait_exit(process, 20)  # exits on its own: no watchdog thread keeps it alive
    text = log.read_text()
    assert code != 0
    assert "StartupFailed: the app's own startup failed" in text
    _no_guard_failure(text)


def test_shutdown_while_the_loop_is_blocked(loop_name: str, tmp_path: Path) -> None:
    event_log = tmp_path / "events.jsonl"
    server = start_server(APP, loop_name, tmp_path, env={"FAULTS_EVENT_LOG": str(event_log)})
    with concurrent.futures.ThreadPoolExecutor(1) as pool:
        pending = pool.submit(httpx.get, server.url + "/block/2500", timeout=30)
        time.sleep(0.8)  # the loop is now inside the 2.5 s block
        server.process.send_signal(signal.SIGTERM)
        code = _wait_exit(server.process, 20)
        response = pending.result()
    # uvicorn re-raises the signal it caught once it has shut down gracefully.
    assert code in (0, -signal.SIGTERM)
    assert "Finished server process" in server.log()
    assert response.status_code == 200  # graceful: the in-flight request was still answered
    records = complete_records(event_log)
    events = [r for r in records if r["type"] == "event"]
    assert [e["path"] for e in events] == ["/block/2500"]
    assert events[0]["hang"] is True
    assert 2400 <= events[0]["duration_ms"] < 5000
    assert [r["type"] for r in records].count("stats") == 1  # the guard stopped and said so
    log = server.log()
    assert "during GET /block/2500" in log or "/block/2500" in log  # the native hang report
    _no_guard_failure(log)


# ---- reload, preload, fork -------------------------------------------------------------------

RELOAD_APP = """
import time
from fastapi import FastAPI
from fastapi_loopguard import LoopGuardConfig, LoopGuardMiddleware

VERSION = {version}
EVENTS = []
app = FastAPI()
app.add_middleware(LoopGuardMiddleware, config=LoopGuardConfig(on_blocking=EVENTS.append))


@app.get("/health")
async def health():
    return {{"version": VERSION}}


@app.get("/block")
async def block():
    time.sleep(0.12)
    return {{"version": VERSION}}


@app.get("/_events")
async def events():
    return [e.request_id for e in EVENTS]
"""


def test_uvicorn_reload(loop_name: str, tmp_path: Path) -> None:
    code_dir = tmp_path / "code"
    code_dir.mkdir()
    module = code_dir / "reloadable.py"
    module.write_text(RELOAD_APP.format(version=1))
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    cmd = [sys.executable, "-m", "uvicorn", "reloadable:app", "--port", str(port)]
    cmd += ["--host", "127.0.0.1", "--loop", loop_name, "--reload", "--reload-dir", str(code_dir)]
    log = tmp_path / "uvicorn.log"
    with open(log, "wb") as out:
        process = subprocess.Popen(cmd, cwd=code_dir, stdout=out, stderr=subprocess.STDOUT)
    try:
        for version in (1, 2):
            if version == 2:
                time.sleep(1.1)  # a new mtime the reloader can see
                module.write_text(RELOAD_APP.format(version=2))
            deadline = time.monotonic() + 30
            while True:
                try:
                    if httpx.get(url + "/health", timeout=1).json()["version"] == version:
                        break
                except httpx.HTTPError:
                    pass
                assert time.monotonic() < deadline, log.read_text()
                time.sleep(0.1)
            request_id = f"reload-{version}"
            httpx.get(url + "/block", headers={"x-request-id": request_id}, timeout=10)
            deadline = time.monotonic() + 5
            while request_id not in httpx.get(url + "/_events", timeout=5).json():
                assert time.monotonic() < deadline, log.read_text()
                time.sleep(0.05)
    finally:
        process.send_signal(signal.SIGINT)  # what Ctrl+C sends the reloader
        code = _wait_exit(process, 20)
    assert code == 0
    _no_guard_failure(log.read_text())


GUNICORN_WORKERS = {
    "asyncio": "uvicorn_worker.UvicornH11Worker",
    "uvloop": "uvicorn_worker.UvicornWorker",
}


def test_gunicorn_preload_two_workers(loop_name: str, tmp_path: Path) -> None:
    """--preload builds the middleware in the master, then forks: each worker starts its own
    engine and detects its own blocks."""
    event_log = tmp_path / "events.jsonl"
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    cmd = [sys.executable, "-m", "gunicorn", APP, "--preload", "-w", "2"]
    cmd += ["-k", GUNICORN_WORKERS[loop_name], "-b", f"127.0.0.1:{port}", "--graceful-timeout", "5"]
    log = tmp_path / "gunicorn.log"
    with open(log, "wb") as out:
        process = subprocess.Popen(
            cmd, cwd=ROOT, stdout=out, stderr=subprocess.STDOUT,
            env={**os.environ, "FAULTS_EVENT_LOG": str(event_log)},
        )  # fmt: skip
    try:
        deadline = time.monotonic() + 30
        pids: set[int] = set()
        while len(pids) < 2:
            assert process.poll() is None and time.monotonic() < deadline, log.read_text()
            try:
                pids.add(httpx.get(url + "/pid", timeout=2).json()["pid"])
            except httpx.HTTPError:
                time.sleep(0.1)

        async def blocks() -> set[int]:
            # A long block holds one worker, which then cannot accept: the short one that
            # follows is served, and blamed, by the other.
            async with httpx.AsyncClient(base_url=url, timeout=20) as client:
                first = asyncio.create_task(client.get("/block/600"))
                await asyncio.sleep(0.2)
                second = await client.get("/block/150")
                return {(await first).json()["pid"], second.json()["pid"]}

        served_by: set[int] = set()
        for _ in range(10):
            served_by |= asyncio.run(blocks())
            if served_by == pids:
                break
        assert served_by == pids
    finally:
        process.send_signal(signal.SIGTERM)
        code = _wait_exit(process, 30)
    assert code == 0
    records = complete_records(event_log)
    blocked_in = {r["pid"] for r in records if r["type"] == "event"}
    assert blocked_in == pids, (pids, records)
    assert process.pid not in blocked_in  # the master only built the app; it never served
    assert {r["pid"] for r in records if r["type"] == "stats"} == pids
    _no_guard_failure(log.read_text())


FORK_PROGRAM = """
import asyncio, os, sys, threading, time, warnings
from fastapi_loopguard import LoopGuard, LoopGuardConfig

warnings.simplefilter("ignore", DeprecationWarning)  # fork() of a threaded process, on purpose
LOOP = sys.argv[1]
ROUNDS = int(sys.argv[2])


def new_loop():
    if LOOP == "uvloop":
        import uvloop
        return uvloop.new_event_loop()
    return asyncio.new_event_loop()


async def child_detects(guard):
    # The parent's guard object, restarted on this process's own loop, and a brand-new guard.
    fresh = LoopGuard(LoopGuardConfig(log_blocking_events=False))
    guard.events.clear()  # the parent's history came along with the fork
    guard.start()
    fresh.start()
    with guard.label("child"):
        with fresh.label("child"):
            time.sleep(0.15)
    await asyncio.sleep(0.05)
    found = [e.request_id for e in guard.events], [e.request_id for e in fresh.events]
    guard.stop()
    fresh.stop()
    return found


def fork_now(guard, results):
    pid = os.fork()
    if pid == 0:
        code = 1
        try:
            loop = new_loop()
            found = loop.run_until_complete(child_detects(guard))
            code = 0 if found == (["child"], ["child"]) else 3
        finally:
            os._exit(code)
    deadline = time.monotonic() + 15
    while time.monotonic() < deadline:
        done, status = os.waitpid(pid, os.WNOHANG)
        if done:
            results.append(os.waitstatus_to_exitcode(status))
            return
        time.sleep(0.01)
    os.kill(pid, 9)
    os.waitpid(pid, 0)
    results.append("hung")


async def main():
    guard = LoopGuard(LoopGuardConfig(log_blocking_events=False))
    guard.start()
    results = []
    for i in range(ROUNDS):
        with guard.label(f"parent-{i}"):
            # Forked from another thread while this loop is blocked and the watchdog samples it,
            # at a different moment of the stall each round.
            forker = threading.Timer(0.005 + 0.1 * i / ROUNDS, fork_now, (guard, results))
            forker.start()
            time.sleep(0.12)
            forker.join()
        await asyncio.sleep(0.02)
    # And once while the loop is idle, awaiting the forking thread.
    await asyncio.to_thread(fork_now, guard, results)
    parent = sorted({e.request_id for e in guard.events})
    guard.stop()
    print(results)
    print(len(parent))


loop = new_loop()
loop.run_until_complete(main())
"""


def test_fork_while_the_engine_runs(loop_name: str) -> None:
    rounds = 10
    result = subprocess.run(
        [sys.executable, "-c", FORK_PROGRAM, loop_name, str(rounds)],
        cwd=ROOT, capture_output=True, text=True, timeout=240,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    children, parent_events = result.stdout.split("\n")[:2]
    assert children == str([0] * (rounds + 1)), result.stdout + result.stderr
    assert int(parent_events) == rounds  # the parent still blamed each of its own blocks
    _no_guard_failure(result.stderr)


def _stat_after_name(path: Path) -> list[str]:
    """The fields of a /proc stat file after the name: "pid (comm) state ppid ...", where the
    name may hold spaces and parentheses, so the fields start after its last ')'."""
    return path.read_text().rsplit(")", 1)[1].split()


def _descendants(pid: int) -> list[int]:
    """Every live process below ``pid`` (a forked child of a program, and its children)."""
    children: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            ppid = int(_stat_after_name(Path(f"/proc/{entry}/stat"))[1])
        except OSError:
            continue  # ended while we looked
        children.setdefault(ppid, []).append(int(entry))
    found, todo = [], [pid]
    while todo:
        kids = children.get(todo.pop(), [])
        found += kids
        todo += kids
    return found


def _stacks(pids: list[int]) -> str:
    """What each thread of a hung process tree is doing, for the failure message: gdb's
    backtraces where gdb is installed, else each thread's state and kernel wait channel."""
    gdb = shutil.which("gdb")
    # gdb itself must not start under the sanitizer runtime preloaded into the programs.
    env = {k: v for k, v in os.environ.items() if k not in ("LD_PRELOAD", "ASAN_OPTIONS")}
    out = []
    for pid in pids:
        out.append(f"-- process {pid}")
        if gdb is not None:
            try:
                bt = subprocess.run(
                    [gdb, "-batch", "-nx", "-p", str(pid), "-ex", "thread apply all bt 12"],
                    capture_output=True, text=True, timeout=60, env=env,
                ).stdout  # fmt: skip
            except subprocess.TimeoutExpired:
                bt = "gdb did not answer"
            out += [line[:200] for line in bt.splitlines() if line.startswith(("Thread ", "#"))]
            continue
        for task in sorted(Path(f"/proc/{pid}/task").glob("*")):
            try:
                state = _stat_after_name(task / "stat")[0]
                out.append(f"{task.name} {(task / 'comm').read_text().strip()} {state} "
                           f"{(task / 'wchan').read_text()}")  # fmt: skip
            except OSError:
                continue
    return "\n".join(out)


def _run_programs(program: str, runs: list[list[str]]) -> list[tuple[list[str], int | str, str]]:
    """Runs ``python -c program`` once per argument list, four at a time: each run's arguments,
    its exit status (or "hung"), and its stderr. A run that hangs is not only killed: its stderr
    so far and the stacks of its processes (a forked child's included) say where it stopped."""

    def one(args: list[str]) -> tuple[list[str], int | str, str]:
        proc = subprocess.Popen(
            [sys.executable, "-c", program, *args],
            cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        )  # fmt: skip
        try:
            _, err = proc.communicate(timeout=30)
        except subprocess.TimeoutExpired:
            pids = [proc.pid, *_descendants(proc.pid)]
            stacks = _stacks(pids)
            for pid in pids:  # a forked child holds the pipes open too
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGKILL)
            _, err = proc.communicate()
            return args, "hung", f"{err}\n{stacks}"
        return args, proc.returncode, err

    with concurrent.futures.ThreadPoolExecutor(4) as pool:
        return list(pool.map(one, runs))


# ---- interpreter exit while a sample is in progress ----------------------------------------------

EXIT_PROGRAM = textwrap.dedent(
    """
    import asyncio, os, sys, threading, time
    from fastapi_loopguard import LoopGuard, LoopGuardConfig

    LOOP, MODE, DELAY = sys.argv[1], sys.argv[2], float(sys.argv[3])


    def hog():
        # Python bytecode in another thread: the sampler has to fight for the GIL.
        while True:
            sum(range(1000))


    async def main():
        guard = LoopGuard(LoopGuardConfig(log_blocking_events=False, fallback_threshold_ms=5))
        guard.start()
        if MODE == "gil-hog":
            threading.Thread(target=hog, daemon=True).start()
        with guard.label("exiting"):
            end = time.perf_counter() + DELAY
            while time.perf_counter() < end:  # the watchdog is sampling this stall
                pass
            if MODE == "sys.exit":
                sys.exit(0)  # unwinds through the loop while the engine still runs
        # "return" and "gil-hog": leave without stopping the guard; atexit must.


    if LOOP == "uvloop":
        import uvloop
        uvloop.run(main())
    else:
        asyncio.run(main())
    """
)
EXIT_RUNS = 200


def test_interpreter_exit_during_a_sample(loop_name: str) -> None:
    rng = random.Random(20261127)
    runs = [
        (rng.choice(["return", "sys.exit", "gil-hog"]), rng.uniform(0.0, 0.06))
        for _ in range(EXIT_RUNS)
    ]

    outcomes = _run_programs(
        EXIT_PROGRAM, [[loop_name, mode, f"{delay:.4f}"] for mode, delay in runs]
    )
    failures = [
        o
        for o in outcomes
        if o[1] != 0 or any(bad in o[2] for bad in ("Fatal", "Traceback", "leaked"))
    ]
    assert not failures, f"{len(failures)} of {EXIT_RUNS} runs failed, e.g. {failures[:3]}"


# ---- exit and fork while a stack is read without the GIL --------------------------------------

UNLOCKED_PROGRAM = textwrap.dedent(
    """
    import asyncio, ctypes, os, sys, time
    from fastapi_loopguard import LoopGuard, LoopGuardConfig

    LOOP, MODE, MICROS = sys.argv[1], sys.argv[2], int(sys.argv[3])
    # ctypes keeps the GIL through a PyDLL call: no stack through the GIL, so every hang report
    # (every 10, 20, 40 ms ...) reads the loop's frames, and the other threads', without it.
    WITH_GIL = ctypes.PyDLL(None)


    async def main():
        config = LoopGuardConfig(
            fallback_threshold_ms=5, hang_threshold_ms=10, log_blocking_events=False
        )
        guard = LoopGuard(config)
        guard.start()
        with guard.label("stuck"):
            WITH_GIL.usleep(MICROS)
            # Right as the call returns: the watchdog may be in the middle of such a read.
            if MODE == "fork":
                pid = os.fork()
                if pid == 0:
                    WITH_GIL.usleep(MICROS)  # the child's engine is abandoned: nothing reads
                    os._exit(0)
                os.waitpid(pid, 0)
            elif MODE == "sys.exit":
                sys.exit(0)  # unwinds through the loop while the engine still runs
        # "return": leave without stopping the guard; atexit must.


    if LOOP == "uvloop":
        import uvloop
        uvloop.run(main())
    else:
        asyncio.run(main())
    """
)
UNLOCKED_RUNS = 40


def test_exit_and_fork_during_a_read_without_the_gil(loop_name: str) -> None:
    rng = random.Random(20261202)
    runs = [
        (rng.choice(["return", "sys.exit", "fork"]), rng.randint(40_000, 150_000))
        for _ in range(UNLOCKED_RUNS)
    ]

    outcomes = _run_programs(
        UNLOCKED_PROGRAM, [[loop_name, mode, str(micros)] for mode, micros in runs]
    )
    failures = [
        o
        for o in outcomes
        if o[1] != 0
        or any(bad in o[2] for bad in ("Fatal", "Traceback", "leaked", "Segmentation", "Sanitizer"))
    ]
    assert not failures, f"{len(failures)} of {UNLOCKED_RUNS} runs failed, e.g. {failures[:3]}"
    # The reads did happen, so the test is not vacuous: hang lines named the call's line, read
    # without the GIL. Not in every run: on a busy host a starved watchdog or sampler makes the
    # evidence say "starved", and then nothing is read without the GIL, by design.
    read = [o for o in outcomes if "(read without the GIL)" in o[2]]
    assert read, outcomes[:3]
    call = UNLOCKED_PROGRAM.splitlines().index("        WITH_GIL.usleep(MICROS)") + 1
    # At least one of them named the call. Under stress-ng, 2 runs in about 300 had a read that
    # named another line of the loop thread, cut off in the output; whether that was another
    # system call of its exit or a read racing the thread is not known (see the note).
    assert any(f"<string>:{call} in main" in o[2] for o in read), read[:1]
