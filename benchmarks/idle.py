"""What an idle guarded server costs, against a bare one, started side by side: CPU time and
wake-ups (context switches) of every thread, over the same idle span.

Wake-ups are the cost of an idle monitor (docs/architecture.md, "Pulse without wake-ups"), and
unlike CPU time they hardly depend on how busy the machine is, so they are printed first.

    python -m benchmarks.idle [--python PATH] [--seconds 20]

``--python`` runs the servers with another interpreter (another build of the package in its own
venv), so two builds can be compared in one run: both the bare and the guarded server of each
build are measured over the same span.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import subprocess
import sys
import time
from pathlib import Path

import httpx

from .bench import free_port

ROOT = Path(__file__).resolve().parent.parent


def start(python: str, app: str, loop: str) -> tuple[subprocess.Popen[bytes], str]:
    port = free_port()
    cmd = [python, "-m", "uvicorn", f"benchmarks.apps:{app}", "--host", "127.0.0.1"]
    cmd += ["--port", str(port), "--loop", loop, "--no-access-log", "--log-level", "warning"]
    proc = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    url = f"http://127.0.0.1:{port}/"
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        with contextlib.suppress(httpx.HTTPError):
            httpx.get(url, timeout=1)  # one request: the guard starts lazily on the first one
            return proc, url
        time.sleep(0.1)
    proc.kill()
    raise SystemExit(f"{app} did not start")


def usage(pid: int) -> tuple[int, int]:
    """CPU nanoseconds and context switches, summed over every thread of `pid`."""
    cpu = switches = 0
    for task in Path(f"/proc/{pid}/task").iterdir():
        with contextlib.suppress(OSError, ValueError):  # a thread that ended meanwhile
            cpu += int((task / "schedstat").read_text().split()[0])
            for line in (task / "status").read_text().splitlines():
                if line.startswith(("voluntary_ctxt_switches", "nonvoluntary_ctxt_switches")):
                    switches += int(line.split()[1])
    return cpu, switches


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--python", action="append", default=[], help="interpreter (repeatable)")
    parser.add_argument("--seconds", type=int, default=20)
    args = parser.parse_args()
    pythons = args.python or [sys.executable]
    print(f"idle for {args.seconds} s, every thread counted; 'added' is guarded minus bare")
    print(f"{'build':<40} {'loop':<8} {'wake-ups/s added':>17} {'CPU added':>16}")
    for loop in ("asyncio", "uvloop"):
        procs = []
        try:
            for python in pythons:
                procs.append(
                    (python, start(python, "bare", loop)[0], start(python, "guarded", loop)[0])
                )
            time.sleep(2)  # past the guard's grace second after that first request
            before = {p.pid: usage(p.pid) for _, b, g in procs for p in (b, g)}
            time.sleep(args.seconds)
            after = {p.pid: usage(p.pid) for _, b, g in procs for p in (b, g)}
            for python, bare, guarded in procs:
                d = {p: [a - b for a, b in zip(after[p], before[p], strict=True)] for p in before}
                cpu = (d[guarded.pid][0] - d[bare.pid][0]) / (args.seconds * 1e9) * 100
                wakes = (d[guarded.pid][1] - d[bare.pid][1]) / args.seconds
                name = os.path.relpath(python) if len(python) < 40 else "..." + python[-37:]
                print(f"{name:<40} {loop:<8} {wakes:>17.2f} {cpu:>+14.4f}%")
        finally:
            for _, bare, guarded in procs:
                for p in (bare, guarded):
                    p.terminate()
                    p.wait()


if __name__ == "__main__":
    main()
