"""Real servers on loopback: uvicorn running the test apps, on asyncio and on uvloop.

Every server-backed test runs once per loop, the way uvloop's own suites run twice.
"""

from __future__ import annotations

import errno
import gc
import http.server
import json
import os
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest

ROOT = Path(__file__).resolve().parent.parent
LOOPS = ["asyncio", "uvloop"]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@dataclass
class Server:
    url: str
    loop: str
    log_path: Path
    process: subprocess.Popen[bytes]

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")


def start_server(app: str, loop: str, tmp_path: Path, env: dict[str, str] | None = None) -> Server:
    """uvicorn on a free port of loopback, once it answers ``/health``.

    A port that was free when picked can be taken before uvicorn binds it (the clients of other
    tests take ephemeral ports too); uvicorn then exits with EADDRINUSE having served nothing,
    and another port is picked.
    """
    for _ in range(5):
        server = _spawn_server(app, loop, tmp_path, env)
        if server is not None:
            return server
    raise RuntimeError("uvicorn found no free port in 5 attempts")


def _spawn_server(app: str, loop: str, tmp_path: Path, env: dict[str, str] | None) -> Server | None:
    port = free_port()
    log_path = tmp_path / f"uvicorn-{loop}-{port}.log"
    cmd = [sys.executable, "-m", "uvicorn", app, "--host", "127.0.0.1", "--port", str(port)]
    cmd += ["--loop", loop, "--lifespan", "on", "--no-access-log"]
    with open(log_path, "wb") as log:
        process = subprocess.Popen(
            cmd, cwd=ROOT, stdout=log, stderr=subprocess.STDOUT, env={**os.environ, **(env or {})}
        )
    server = Server(f"http://127.0.0.1:{port}", loop, log_path, process)
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline:
        if process.poll() is not None:
            if f"[Errno {errno.EADDRINUSE}]" in server.log():
                return None
            raise RuntimeError(f"uvicorn exited early:\n{server.log()}")
        try:
            httpx.get(server.url + "/health", timeout=0.5)
            return server
        except httpx.HTTPError:
            time.sleep(0.05)
    process.kill()
    raise RuntimeError(f"uvicorn did not start:\n{server.log()}")


def stop_server(server: Server) -> None:
    server.process.terminate()
    try:
        server.process.wait(timeout=10)
    except subprocess.TimeoutExpired:
        server.process.kill()
        server.process.wait()


def complete_records(path: Path) -> list[dict[str, Any]]:
    """The records of an event log (JSON lines) that were written whole, so far.

    Each record is one ``write(2)``, yet a reader racing a live server's write can see the
    first part of a record that crosses a page: the text after the last newline is still being
    written and is left for the next read.
    """
    if not path.exists():
        return []
    lines = path.read_text().split("\n")[:-1]
    return [json.loads(line) for line in lines if line.strip()]


@pytest.fixture(autouse=True)
def _collected_and_frozen_heap() -> None:
    """Each test starts with what the tests before it left collected, and the rest frozen.

    The in-process tests watch loops in this very process, whose heap grows test after test: a
    full collection of it takes 100-240 ms by the end of the suite on a busy host, a real block
    that a guard watching a loop at that moment rightly reports, next to the one the test planted.
    Frozen objects are never scanned again, so a collection during a test only walks what that
    test made. (The uvicorn test apps do the same at import.)
    """
    gc.collect()
    gc.freeze()


@pytest.fixture(params=LOOPS)
def loop_name(request: pytest.FixtureRequest) -> str:
    return str(request.param)


@pytest.fixture
def culprit_server(loop_name: str, tmp_path: Path) -> Iterator[Server]:
    server = start_server("tests.apps.culprits:app", loop_name, tmp_path)
    yield server
    stop_server(server)


class _SlowHandler(http.server.BaseHTTPRequestHandler):
    def do_GET(self) -> None:
        time.sleep(0.3)
        body = b"slow peer"
        self.send_response(200)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args: object) -> None:
        pass


@pytest.fixture(scope="session")
def slow_peer() -> Iterator[int]:
    """A local HTTP peer that takes 300 ms to answer: the target of blocking I/O."""
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _SlowHandler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield int(server.server_address[1])
    server.shutdown()
    server.server_close()


def wait_events(server: Server, count: int = 1, timeout: float = 5.0) -> list[dict[str, Any]]:
    """The test app's events (its ``/_events`` route) once ``count`` arrived, or when time is up.

    An event is handed to the loop one watchdog tick after the loop came back, so a client that
    asks right after its response (a websocket close is quick) can be there first.
    """
    deadline = time.monotonic() + timeout
    while True:
        response = httpx.get(server.url + "/_events", timeout=5)
        response.raise_for_status()
        events: list[dict[str, Any]] = response.json()
        if len(events) >= count or time.monotonic() > deadline:
            return events
        time.sleep(0.05)


def culprit_line(path: Path | str, name: str) -> int:
    """The number of the first line of ``path`` that holds the comment ``# culprit:NAME``."""
    for number, line in enumerate(Path(path).read_text().splitlines(), start=1):
        if f"# culprit:{name}" in line:
            return number
    raise LookupError(name)
