"""Side-by-side A/B of a bare app and the same app guarded, on asyncio and uvloop.

Prints throughput ratios (wrk, server and load generator pinned to different cores, rounds
alternated so drift hits both sides) and the idle CPU each server uses, counted over every thread
from /proc/<pid>/task/*/schedstat. Ratios only: the machine is shared and absolute numbers are
noise. Run with `make bench`.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import re
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def start(app: str, loop: str, env: dict[str, str]) -> tuple[subprocess.Popen[bytes], str]:
    port = free_port()
    cmd = ["taskset", "-c", "0", sys.executable, "-m", "uvicorn", f"benchmarks.apps:{app}",
           "--host", "127.0.0.1", "--port", str(port), "--loop", loop, "--no-access-log",
           "--log-level", "warning"]  # fmt: skip
    proc = subprocess.Popen(cmd, cwd=ROOT, env={**os.environ, **env})
    url = f"http://127.0.0.1:{port}/"
    for _ in range(200):
        try:
            urllib.request.urlopen(url, timeout=1).read()
            return proc, url
        except OSError:
            time.sleep(0.05)
    proc.kill()
    raise SystemExit(f"{app} did not start")


def wrk(url: str, seconds: int) -> float:
    out = subprocess.run(
        ["taskset", "-c", "1", "wrk", "-t1", "-c32", f"-d{seconds}s", url],
        capture_output=True, text=True, check=True,
    ).stdout  # fmt: skip
    match = re.search(r"Requests/sec:\s+([\d.]+)", out)
    if match is None:
        raise SystemExit(out)
    return float(match.group(1))


def cpu_ns(pid: int) -> int:
    total = 0
    for task in Path(f"/proc/{pid}/task").iterdir():
        with contextlib.suppress(OSError, ValueError):  # a thread that ended meanwhile
            total += int((task / "schedstat").read_text().split()[0])
    return total


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--seconds", type=int, default=5, help="per wrk round")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--idle-seconds", type=int, default=20)
    args = parser.parse_args()
    rows = []
    for loop in ("asyncio", "uvloop"):
        configs = (
            ("defaults", {}),
            ("dev_mode=True", {"BENCH_DEV_MODE": "1"}),
            # What the per-step timer of cumulative detection costs, read against "defaults".
            ("no cumulative", {"BENCH_CUMULATIVE": "0"}),
        )
        for label, env in configs:
            bare, bare_url = start("bare", loop, env)
            guarded, guarded_url = start("guarded", loop, env)
            try:
                wrk(bare_url, 1)
                wrk(guarded_url, 1)  # warm-up, and the guard's lazy start
                b = g = 0.0
                for _ in range(args.rounds):
                    b += wrk(bare_url, args.seconds)
                    g += wrk(guarded_url, args.seconds)
                row = [loop, label, f"{g / b:.3f}x"]
                if label == "defaults":
                    time.sleep(2)  # past the guard's grace second
                    before = (cpu_ns(bare.pid), cpu_ns(guarded.pid))
                    time.sleep(args.idle_seconds)
                    after = (cpu_ns(bare.pid), cpu_ns(guarded.pid))
                    span = args.idle_seconds * 1e9
                    added = ((after[1] - before[1]) - (after[0] - before[0])) / span * 100
                    row.append(f"{added:+.4f}% of a core")
                else:
                    row.append("-")
                rows.append(row)
            finally:
                for p in (bare, guarded):
                    p.terminate()
                    p.wait()
    print(f"\n{'loop':<8} {'config':<14} {'throughput guarded/bare':>24} {'idle CPU added':>22}")
    for row in rows:
        print(f"{row[0]:<8} {row[1]:<14} {row[2]:>24} {row[3]:>22}")


if __name__ == "__main__":
    main()
