"""Side-by-side A/B of a bare app and the same app guarded, on asyncio and uvloop.

Prints throughput ratios (wrk, server and load generator pinned to different cores, rounds
alternated so drift hits both sides) and the idle CPU each server uses, counted over every thread
from /proc/<pid>/task/*/schedstat. Ratios only: the machine is shared and absolute numbers are
noise. Run with `make bench`.
"""

from __future__ import annotations

import argparse
import contextlib
import json
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


def start(
    app: str, loop: str, env: dict[str, str], stderr: int | None = None
) -> tuple[subprocess.Popen[bytes], str]:
    port = free_port()
    cmd = ["taskset", "-c", "0", sys.executable, "-m", "uvicorn", f"benchmarks.apps:{app}",
           "--host", "127.0.0.1", "--port", str(port), "--loop", loop, "--no-access-log",
           "--log-level", "warning"]  # fmt: skip
    proc = subprocess.Popen(cmd, cwd=ROOT, env={**os.environ, **env}, stderr=stderr)
    url = f"http://127.0.0.1:{port}/"
    for _ in range(200):
        try:
            urllib.request.urlopen(url, timeout=1).read()
            return proc, url
        except OSError:
            time.sleep(0.05)
    proc.kill()
    raise SystemExit(f"{app} did not start")


def wrk_run(url: str, seconds: int) -> tuple[float, int]:
    """Requests per second, and how many requests were made."""
    out = subprocess.run(
        ["taskset", "-c", "1", "wrk", "-t1", "-c32", f"-d{seconds}s", url],
        capture_output=True, text=True, check=True,
    ).stdout  # fmt: skip
    rate = re.search(r"Requests/sec:\s+([\d.]+)", out)
    total = re.search(r"(\d+) requests in", out)
    if rate is None or total is None:
        raise SystemExit(out)
    return float(rate.group(1)), int(total.group(1))


def wrk(url: str, seconds: int) -> float:
    return wrk_run(url, seconds)[0]


def rss_kib(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    raise SystemExit(f"no VmRSS for {pid}")


def detection(loop: str) -> list[str]:
    """First hang report of a 2.5 s block (stderr, from the watchdog) and the sample pauses."""
    log = Path(f"/tmp/loopguard-bench-{os.getpid()}-{loop}.jsonl")
    err = Path(f"{log}.stderr")
    log.unlink(missing_ok=True)
    with open(err, "wb") as stderr:
        proc, url = start("detect", loop, {"BENCH_EVENT_LOG": str(log)}, stderr=stderr.fileno())
    try:
        for _ in range(20):  # stalls of 80 ms: several stack samples each
            urllib.request.urlopen(url + "block?ms=80", timeout=10).read()
        # The client says when it sends (CLOCK_MONOTONIC is one clock for every process), so its
        # interpreter's start-up is not counted.
        client = (
            "import time, urllib.request as u; print(time.monotonic(), flush=True); "
            f"u.urlopen('{url}block?ms=2500')"
        )
        blocker = subprocess.Popen([sys.executable, "-c", client], stdout=subprocess.PIPE)
        assert blocker.stdout is not None
        sent = float(blocker.stdout.readline())
        first = None
        while blocker.poll() is None and first is None:
            if "loopguard: event loop blocked for" in err.read_text(errors="replace"):
                first = time.monotonic() - sent
            time.sleep(0.002)
        blocker.wait()
    finally:
        proc.terminate()
        proc.wait()
    stats = [json.loads(x) for x in log.read_text().splitlines() if '"type": "stats"' in x]
    log.unlink(missing_ok=True)
    err.unlink(missing_ok=True)
    if not stats:
        raise SystemExit("the detect app wrote no stats record")
    s = stats[-1]
    latency = f"{first * 1000:.0f} ms" if first is not None else "never"
    return [
        f"{loop:<8} first report of a 2.5 s block     {latency:>10}   (target <= 1020 ms)",
        f"{loop:<8} loop pause per stack sample     p50 {s['sample_pause_p50_us']:.1f} us, "
        f"p99 {s['sample_pause_p99_us']:.1f} us over {s['sample_pause_count']} samples "
        "(target p99 <= 50 us)",
    ]


def memory(loop: str, requests: int, step: int) -> list[str]:
    """RSS of the guarded and the bare app after warm-up, and how much each grew over the same
    number of requests: the bare app's growth is the allocator's and the server's own. With a
    ``step`` below ``requests``, the growth is also printed every ``step`` requests, to tell a
    creep that levels off (allocator arenas filling) from one that keeps going (a leak)."""
    bare, bare_url = start("bare", loop, {})
    guarded, guarded_url = start("guarded", loop, {})
    lines = []
    try:
        for url in (bare_url, guarded_url):
            wrk_run(url, 5)  # warm-up: caches, allocator arenas, the guard's lazy start
        base = {p.pid: rss_kib(p.pid) for p in (bare, guarded)}
        done = {bare.pid: 0, guarded.pid: 0}
        mark = step
        while min(done.values()) < requests:
            for p, url in ((bare, bare_url), (guarded, guarded_url)):
                if done[p.pid] < requests:
                    done[p.pid] += wrk_run(url, 20)[1]
            if step < requests and min(done.values()) >= mark:
                g, b = (rss_kib(p.pid) - base[p.pid] for p in (guarded, bare))
                lines.append(
                    f"{loop:<8} after {min(done.values()):>9} requests: RSS growth guarded "
                    f"{g / 1024:+.2f} MB, bare {b / 1024:+.2f} MB"
                )
                print(lines[-1], flush=True)
                mark += step
        grown = {p.pid: rss_kib(p.pid) - base[p.pid] for p in (bare, guarded)}
    finally:
        for p in (bare, guarded):
            p.terminate()
            p.wait()
    added = (base[guarded.pid] - base[bare.pid]) / 1024
    g, b = grown[guarded.pid], grown[bare.pid]
    lines.append(
        f"{loop:<8} RSS guarded - bare after warm-up {added:+.1f} MB; growth over "
        f"{done[guarded.pid]} requests: guarded {g / 1024:+.2f} MB "
        f"({g / base[guarded.pid] * 100:+.2f}%), bare {b / 1024:+.2f} MB "
        f"({b / base[bare.pid] * 100:+.2f}%) (targets <= 2 MB; <= 1%)"
    )
    return lines


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
    parser.add_argument(
        "--rss-requests", type=int, default=1_000_000, help="requests for the RSS growth (0: skip)"
    )
    parser.add_argument(
        "--rss-step", type=int, default=0, help="also print the RSS growth every this many requests"
    )
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
        # The per-request cost alone: tracked against excluded requests of one process.
        same, same_url = start("same_process", loop, {})
        try:
            excluded_url = same_url + "excluded"
            wrk(same_url, 1)
            wrk(excluded_url, 1)
            t = x = 0.0
            for _ in range(args.rounds):
                x += wrk(excluded_url, args.seconds)
                t += wrk(same_url, args.seconds)
            rows.append([loop, "same process", f"{t / x:.3f}x", "-"])
        finally:
            same.terminate()
            same.wait()
    notes = []
    for loop in ("asyncio", "uvloop"):
        notes += detection(loop)
        if args.rss_requests > 0:
            notes += memory(loop, args.rss_requests, args.rss_step or args.rss_requests)
    print(f"\n{'loop':<8} {'config':<14} {'throughput guarded/bare':>24} {'idle CPU added':>22}")
    for row in rows:
        print(f"{row[0]:<8} {row[1]:<14} {row[2]:>24} {row[3]:>22}")
    print("(targets: defaults >= 0.99x, dev_mode >= 0.97x, idle CPU <= 0.01% of a core;")
    print(" 'same process': tracked/excluded requests of one guarded server)\n")
    for line in notes:
        print(line)


if __name__ == "__main__":
    main()
