"""``loopguard demo``: the demo shop under ``loopguard run``, real traffic, then the reports.

Three processes, as in production: uvicorn serving the shop (started exactly as a user would
start their own app, through ``loopguard run`` with an event log and the live page on), a
traffic generator, and this one, which draws progress and then builds the terminal and HTML
reports from the event log the server wrote. Everything stays on 127.0.0.1; nothing needs the
network.
"""

from __future__ import annotations

import errno
import json
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from pathlib import Path

from rich.console import Console
from rich.progress import BarColumn, Progress, TextColumn, TimeRemainingColumn

from ..report import load_event_log, render
from ..report.terminal import print_report

DASHBOARD = "/_loopguard"
_PORT_ATTEMPTS = 5


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class _PortTaken(Exception):
    """The free port we picked was taken before uvicorn could bind it."""


def _wait_ready(url: str, server: subprocess.Popen[bytes], log: Path) -> None:
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        if server.poll() is not None:
            text = log.read_text(errors="replace")
            if f"[Errno {errno.EADDRINUSE}]" in text:
                raise _PortTaken
            raise SystemExit(f"the demo server exited early; its log:\n{text}")
        try:
            with urllib.request.urlopen(url + DASHBOARD + "/data.json", timeout=2):
                return
        except (OSError, urllib.error.URLError):
            time.sleep(0.1)
    raise SystemExit(f"the demo server did not start within 30 s; its log:\n{log.read_text()}")


def _start_server(
    loop: str, events_path: Path, server_log: Path
) -> tuple[subprocess.Popen[bytes], str]:
    """Start the shop under ``loopguard run`` and wait until it answers.

    The port is free when we pick it, but another process may bind it before uvicorn does; on a
    busy machine that happens. Picking again is the cure: the server never bound anything.
    """
    for _ in range(_PORT_ATTEMPTS):
        port = _free_port()
        url = f"http://127.0.0.1:{port}"
        command = [
            sys.executable, "-m", "fastapi_loopguard", "run", "fastapi_loopguard.demo.app:app",
            "--host", "127.0.0.1", "--port", str(port), "--loop", loop, "--dev-mode",
            "--event-log", str(events_path), "--dashboard", DASHBOARD,
            "--no-access-log", "--log-level", "warning",
        ]  # fmt: skip
        with open(server_log, "wb") as log:
            server = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT)
        try:
            _wait_ready(url, server, server_log)
        except _PortTaken:
            continue
        except BaseException:
            _stop(server)
            raise
        return server, url
    raise SystemExit(f"no free port for the demo server after {_PORT_ATTEMPTS} attempts")


def _count_events(path: Path) -> int:
    try:
        with open(path, encoding="utf-8", errors="replace") as f:
            return sum(1 for line in f if line.startswith('{"type": "event"'))
    except OSError:
        return 0


def _stop(process: subprocess.Popen[bytes]) -> None:
    if process.poll() is None:
        process.send_signal(signal.SIGTERM)  # uvicorn shuts down, lifespan stops the guard
        try:
            process.wait(timeout=20)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


def demo(duration: float, loop: str, concurrency: int, html_path: str) -> int:
    console = Console(highlight=False)
    workdir = Path(tempfile.mkdtemp(prefix="loopguard-demo-"))
    events_path = workdir / "events.jsonl"
    server_log = workdir / "server.log"
    console.print("[bold]fastapi-loopguard demo[/]: a small shop API with blocking culprits")
    console.print(f"Starting it under [bold]loopguard run[/] (uvicorn, {loop} loop)")
    server, url = _start_server(loop, events_path, server_log)
    traffic: subprocess.Popen[str] | None = None
    try:
        console.print(f"Serving on {url}")
        console.print(f"Live page while it runs: [link]{url}{DASHBOARD}/[/]")
        traffic = subprocess.Popen(
            [sys.executable, "-m", "fastapi_loopguard.demo.traffic", url,
             "--duration", str(duration), "--concurrency", str(concurrency)],
            stdout=subprocess.PIPE, text=True,
        )  # fmt: skip
        _drive(console, traffic, duration, concurrency, events_path)
        if traffic.wait(timeout=60) != 0:
            console.print("[red]the traffic generator failed[/]")
            return 1
    finally:
        if traffic is not None and traffic.poll() is None:
            traffic.kill()
            traffic.wait()
        _stop(server)

    report = load_event_log(str(events_path))
    report.source = f"loopguard demo, {duration:g} s of traffic on the {loop} loop"
    print_report(console, report)
    Path(html_path).write_text(render(report, title="fastapi-loopguard demo report"), "utf-8")
    console.print(f"\nHTML report: [bold]{os.path.abspath(html_path)}[/]")
    console.print(f"Event log:   {events_path}  (server log: {server_log})")
    console.print(f"Rebuild it:  loopguard report {events_path} -o {html_path}")
    return 0


def _drive(
    console: Console,
    traffic: subprocess.Popen[str],
    duration: float,
    concurrency: int,
    events_path: Path,
) -> None:
    columns = (
        TextColumn("[bold]traffic[/]"),
        BarColumn(),
        TextColumn("{task.completed:4.1f}/{task.total:g} s"),
        TimeRemainingColumn(),
        TextColumn("{task.fields[status]}"),
    )
    with Progress(*columns, console=console) as progress:
        task = progress.add_task("traffic", total=duration, status="starting")
        assert traffic.stdout is not None
        for line in traffic.stdout:
            try:
                state = json.loads(line)
            except ValueError:
                continue
            progress.update(
                task,
                completed=state["elapsed"],
                status=(
                    f"{concurrency} clients, {state['ok']} responses, "
                    f"{_count_events(events_path)} blocking events, "
                    f"{state['blocked']} responses saw their own block"
                ),
            )
