"""``python -m fastapi_loopguard.demo``: start the demo shop, drive traffic, print the report."""

from __future__ import annotations

import argparse
import json
import linecache
import os
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections import Counter, defaultdict
from typing import Any


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _get_json(url: str) -> Any:
    with urllib.request.urlopen(url, timeout=5) as response:
        return json.loads(response.read())


def _wait_ready(url: str, server: subprocess.Popen[bytes]) -> None:
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        if server.poll() is not None:
            raise SystemExit("the demo server exited before it was ready")
        try:
            _get_json(url + "/_loopguard/stats")
            return
        except OSError:
            time.sleep(0.1)
    raise SystemExit("the demo server did not start within 30 s")


def report(events: list[dict[str, Any]], stats: dict[str, Any]) -> str:
    """The terminal report: routes, culprit lines with their source, victims, loop lag."""
    lines: list[str] = []
    add = lines.append
    total = sum(e["duration_ms"] for e in events)
    add(f"\n{len(events)} blocking events, {total:.0f} ms of blocked loop in all\n")

    by_route: dict[str, list[dict[str, Any]]] = defaultdict(list)
    for e in events:
        by_route[f"{e['method'] or '-'} {e['route'] or e['path'] or '(no request)'}"].append(e)
    add(f"{'route':<34} {'events':>6} {'total ms':>9} {'worst ms':>9}  kinds")
    for route, evs in sorted(
        by_route.items(), key=lambda kv: -sum(e["duration_ms"] for e in kv[1])
    ):
        kinds = ", ".join(f"{k} x{n}" for k, n in Counter(e["kind"] for e in evs).most_common())
        add(
            f"{route[:34]:<34} {len(evs):>6} {sum(e['duration_ms'] for e in evs):>9.0f} "
            f"{max(e['duration_ms'] for e in evs):>9.0f}  {kinds}"
        )

    add("\nTop culprit lines")
    by_line: dict[tuple[str, int, str], list[dict[str, Any]]] = defaultdict(list)
    for e in events:
        c = e.get("culprit")
        if c:
            by_line[(c["filename"], c["lineno"], c["function"])].append(e)
    ranked = sorted(by_line.items(), key=lambda kv: -sum(e["duration_ms"] for e in kv[1]))
    for (filename, lineno, function), evs in ranked[:8]:
        source = linecache.getline(filename, lineno).strip()
        victims = sum(e["victims"] for e in evs)
        kinds = "/".join(sorted({e["kind"] for e in evs}))
        add(
            f"  {os.path.basename(filename)}:{lineno} in {function}  [{kinds}] "
            f"{len(evs)} events, {sum(e['duration_ms'] for e in evs):.0f} ms, "
            f"froze {victims} other requests"
        )
        add(f"      {source}")

    if stats:
        add(
            "\nLoop lag: p50 {lag_p50_ms:.2f} ms, p90 {lag_p90_ms:.2f} ms, "
            "p99 {lag_p99_ms:.2f} ms, max {lag_max_ms:.2f} ms "
            "over {lag_count} loop iterations".format(**stats)
        )
        add(
            "Engine: threshold {threshold_ms:.1f} ms, {stalls} stalls, {events_emitted} events, "
            "{events_dropped} dropped, stack sample pause p50 {sample_pause_p50_us:.0f} us / "
            "p99 {sample_pause_p99_us:.0f} us".format(**stats)
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m fastapi_loopguard.demo", description=__doc__)
    parser.add_argument("--duration", type=float, default=15, help="seconds of traffic")
    parser.add_argument("--loop", choices=["asyncio", "uvloop"], default="asyncio")
    parser.add_argument("--concurrency", type=int, default=30)
    args = parser.parse_args(argv)

    workdir = tempfile.mkdtemp(prefix="loopguard-demo-")
    events_path = os.path.join(workdir, "events.jsonl")
    port = _free_port()
    url = f"http://127.0.0.1:{port}"
    env = {**os.environ, "LOOPGUARD_DEMO_EVENTS": events_path}
    print(f"Starting the demo shop on {url} (uvicorn, {args.loop} loop) ...")
    server = subprocess.Popen(
        [sys.executable, "-m", "uvicorn", "fastapi_loopguard.demo.app:app", "--host", "127.0.0.1",
         "--port", str(port), "--loop", args.loop, "--no-access-log", "--log-level", "warning"],
        env=env,
    )  # fmt: skip
    try:
        _wait_ready(url, server)
        print(f"Driving {args.duration:.0f} s of concurrent traffic from a separate process ...")
        subprocess.run(
            [sys.executable, "-m", "fastapi_loopguard.demo.traffic", url,
             "--duration", str(args.duration), "--concurrency", str(args.concurrency)],
            check=True,
        )  # fmt: skip
        time.sleep(0.3)  # let the last stall's event be written
        stats = _get_json(url + "/_loopguard/stats")
    finally:
        server.terminate()
        server.wait(timeout=15)
    events: list[dict[str, Any]] = []
    if os.path.exists(events_path):
        with open(events_path, encoding="utf-8") as f:
            events = [json.loads(line) for line in f if line.strip()]
    print(report(events, stats))
    print(f"\nEvery event, as JSON lines: {events_path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
