"""Soak test: minutes of mixed load with periodic blocking culprits, on asyncio and uvloop.

The issue's pass criteria, each checked per loop:

- no crash, and no exception escaping into the app: the server serves to the end, shuts down
  gracefully on SIGTERM, every request of the load gets its expected answer (the app's own
  deliberate error included: a 500, its traceback logged as the app's, unchanged), and the server
  log holds no traceback and no complaint of fastapi_loopguard;
- flat RSS (see ``rss_verdict`` for the bound and why it is what it is);
- detected = emitted + dropped, read from the engine's own counters in the ``stats`` record the
  guard writes to the event log when it stops; and every emitted event reached the app: the log
  holds one ``event`` record per emitted stall event and per cumulative event.

Besides, the culprits must be seen: at least half of the calls of each loop-blocking culprit
must have an event naming their request. Half, not all: a machine under load may fold a short
block into the neighbouring work or drop it; a guard that sees nothing fails all the same.

Load: wrk on the trivial endpoint (pinned to core 1), and on the same core this process with two
threads: one walks a mix of the other endpoints (async waits, streaming, websocket, /metrics,
the guard's stats), the other calls a culprit every 2 s. The server runs on core 0, as in
`make bench`. Run with `make soak` (SOAK_ARGS='--seconds 60' for a short one).
"""

from __future__ import annotations

import argparse
import json
import os
import random
import re
import signal
import statistics
import subprocess
import sys
import threading
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
from websockets.sync.client import connect as ws_connect

from .bench import ROOT, rss_kib, start

LOOPS = ("asyncio", "uvloop")
CULPRIT_EVERY_S = 2.0
# The culprits in the order they are called. sleep, cpu and cumulative hold the loop and must be
# reported; threadpool sleeps off the loop (it must not break anything, an event is not
# expected); boom is the app's own exception.
ROTATION = ("sleep", "cpu", "cumulative", "threadpool", "boom")
MUST_DETECT = ("sleep", "cpu", "cumulative")
MIN_DETECTED_SHARE = 0.5
# What the other thread walks through, over and over; "ws" is a websocket echo session.
MIX = ("/", "/io", "/stream", "/io", "ws", "/", "/metrics", "/_stats")
# A short pause between two requests of the mix: this thread shares core 1 with wrk, and the
# point is variety, not volume (wrk brings the volume).
MIX_PAUSE_S = 0.005
WRK_CONNECTIONS = 8
# Flat RSS: the last quarter's mean may exceed the second quarter's by this much at most.
RSS_LIMIT_SHARE = 0.05
RSS_LIMIT_KIB = 8 * 1024
STOP_TIMEOUT_S = 30.0
# Log lines in which the guard says something of its own went wrong (guard.py, middleware.py,
# eventlog.py, _native.py); the text lines of blocking events and the rate limiter's summaries
# are not complaints.
GUARD_COMPLAINT = re.compile(
    r"^fastapi_loopguard(: .*\b(failed|raised|cannot)\b|'s native engine could not be loaded)"
)
CRASH = re.compile(r"Fatal Python error|Segmentation fault|core dumped|terminate called")
TRACEBACK_START = ("Traceback (most recent call last)", "Exception Group Traceback")
CHAIN_LINKS = (
    "During handling of the above exception",
    "The above exception was the direct cause",
)
APP_ERROR = "SoakError"


@dataclass
class Tally:
    """What the two Python load threads did, written by both (hence the lock)."""

    lock: threading.Lock = field(default_factory=threading.Lock)
    requests: Counter[str] = field(default_factory=Counter)
    failures: list[str] = field(default_factory=list)
    failure_count: int = 0
    # Culprit kind -> the request ids of its calls (the event log names them).
    culprit_ids: dict[str, list[str]] = field(default_factory=dict)
    # Culprit responses whose dev-mode header said the request blocked.
    header_detected: Counter[str] = field(default_factory=Counter)

    def ok(self, what: str) -> None:
        with self.lock:
            self.requests[what] += 1

    def fail(self, what: str, why: str) -> None:
        with self.lock:
            self.requests[what] += 1
            self.failure_count += 1
            if len(self.failures) < 10:  # the first few say enough; the count says the rest
                self.failures.append(f"{what}: {why}")


def mixed_load(base: str, stop: threading.Event, tally: Tally) -> None:
    """Walks MIX until stopped; every answer is checked, so a broken one is a failure."""
    ws_url = base.replace("http://", "ws://", 1) + "/ws"
    with httpx.Client(base_url=base, timeout=10) as client:
        i = 0
        while not stop.is_set():
            what = MIX[i % len(MIX)]
            i += 1
            try:
                if what == "ws":
                    with ws_connect(ws_url, open_timeout=10, close_timeout=5) as conn:
                        for k in range(8):
                            conn.send(f"echo {i}.{k}")
                            if conn.recv(timeout=10) != f"echo {i}.{k}":
                                raise AssertionError("wrong echo")
                else:
                    r = client.get(what)
                    if r.status_code != 200:
                        raise AssertionError(f"status {r.status_code}")
                    if what == "/stream" and r.text.count("\n") != 16:
                        raise AssertionError(f"stream cut short: {r.text!r}")
                tally.ok(what)
            except Exception as exc:
                tally.fail(what, repr(exc))
            stop.wait(MIX_PAUSE_S)


def culprit_request(kind: str, rng: random.Random) -> tuple[str, dict[str, int], int]:
    """Path, query and the expected status of one culprit call."""
    if kind == "sleep":
        return "/culprit/sleep", {"ms": rng.randint(60, 150)}, 200
    if kind == "cpu":
        return "/culprit/cpu", {"ms": 80}, 200
    if kind == "cumulative":
        return "/culprit/cumulative", {"slices": 40, "ms": 7}, 200
    if kind == "threadpool":
        return "/culprit/threadpool", {"ms": 100}, 200
    return "/boom", {}, 500


def culprits(base: str, loop: str, stop: threading.Event, tally: Tally, seed: int) -> None:
    """Calls the next culprit of ROTATION every CULPRIT_EVERY_S, on a fixed schedule."""
    rng = random.Random(seed)
    n = 0
    next_at = time.monotonic() + CULPRIT_EVERY_S
    with httpx.Client(base_url=base, timeout=10) as client:
        while not stop.wait(max(0.0, next_at - time.monotonic())):
            next_at += CULPRIT_EVERY_S
            kind = ROTATION[n % len(ROTATION)]
            # Our own X-Request-ID: the guard reuses a valid one, so its events name this call.
            request_id = f"soak-{loop}-{kind}-{n}"
            n += 1
            path, params, expected = culprit_request(kind, rng)
            with tally.lock:
                tally.culprit_ids.setdefault(kind, []).append(request_id)
            try:
                r = client.get(path, params=params, headers={"x-request-id": request_id})
                if r.status_code != expected:
                    raise AssertionError(f"status {r.status_code}, expected {expected}")
                if r.headers.get("x-blocking-detected") == "true":
                    with tally.lock:
                        tally.header_detected[kind] += 1
                tally.ok(f"culprit {kind}")
            except Exception as exc:
                tally.fail(f"culprit {kind}", repr(exc))


def parse_wrk(out: str) -> tuple[int, list[str]]:
    """Requests made, and what went wrong (non-2xx answers, socket errors)."""
    total = re.search(r"(\d+) requests in", out)
    if total is None:
        return 0, [f"wrk printed no summary: {out.strip()!r}"]
    problems = []
    non2xx = re.search(r"Non-2xx or 3xx responses: (\d+)", out)
    if non2xx is not None:
        problems.append(f"wrk: {non2xx.group(1)} non-2xx answers")
    errors = re.search(r"Socket errors: (.*)", out)
    if errors is not None:
        problems.append(f"wrk socket errors: {errors.group(1)}")
    return int(total.group(1)), problems


def traceback_chains(lines: list[str]) -> list[list[str]]:
    """Each traceback in the log with its chained ones ("During handling ..."), as lines.

    A traceback is its header, indented frames, and one unindented line: the exception.
    """
    chains = []
    i = 0
    while i < len(lines):
        if not lines[i].lstrip(" |+-").startswith(TRACEBACK_START):
            i += 1
            continue
        begin = i
        i += 1
        while i < len(lines):
            line = lines[i]
            i += 1
            if not line or line[:1].isspace() or line.startswith(TRACEBACK_START):
                continue
            # The exception line. A chained one follows after a blank line and a link line.
            j = i
            while j < len(lines) and not lines[j].strip():
                j += 1
            if j < len(lines) and lines[j].startswith(CHAIN_LINKS):
                i = j + 1
                continue
            break
        chains.append(lines[begin:i])
    return chains


def exception_lines(chain: list[str]) -> list[str]:
    return [
        line
        for line in chain
        if line
        and not line[:1].isspace()
        and not line.startswith(TRACEBACK_START)
        and not line.startswith(CHAIN_LINKS)
    ]


@dataclass
class LogReview:
    app_errors: int  # tracebacks of the app's own SoakError, and nothing else
    guard_problems: list[str]  # tracebacks through fastapi_loopguard, its complaints, crashes
    other_tracebacks: list[str]  # anything else: reported, not failed (not the guard's doing)


def review_server_log(text: str) -> LogReview:
    lines = text.splitlines()
    app_errors = 0
    guard_problems: list[str] = []
    others: list[str] = []
    for chain in traceback_chains(lines):
        raised = exception_lines(chain)
        # The app's own exception passes through the middleware, so its traceback names
        # fastapi_loopguard's frames; it is told apart by what was raised, all of the chain.
        if raised and all(APP_ERROR in line for line in raised):
            app_errors += 1
        elif any("fastapi_loopguard" in line for line in chain):
            guard_problems.append("traceback through fastapi_loopguard: " + " | ".join(raised))
        else:
            others.append(" | ".join(raised) or chain[0])
    guard_problems += [f"guard complaint: {x}" for x in lines if GUARD_COMPLAINT.search(x)]
    guard_problems += [f"crash: {x}" for x in lines if CRASH.search(x)]
    return LogReview(app_errors, guard_problems, others)


def rss_verdict(
    samples: list[tuple[float, int]], seconds: float
) -> tuple[float, float, float] | None:
    """Mean RSS (KiB) of the second quarter and of the last quarter, and the allowed growth;
    None without samples in both (the server died early).

    The first quarter is the warm-up: allocator arenas, the threadpool's threads (each with a
    malloc arena of its own), the guard's bounded tables (the last 4096 requests, 1000 events)
    and Prometheus' label sets all settle there. Means of quarters, not two samples, so one
    moment of a burst (a streaming response, a culprit's request in flight) does not decide it.

    The bound, the larger of 5% and 8 MB: CPython's and glibc's allocators grow and shrink in
    steps of an arena (256 KiB, up to 64 MiB reserved per thread arena, only touched pages
    counting) without leaking, which makes a few MB of noise on a ~60 MB server. A leak the
    soak is meant to catch is per request or per event: at the ~3000 requests/s wrk gets through
    a guarded server on one core, the quarters of a 5-minute run lie ~450k requests apart, so
    8 MB is ~20 bytes per request, less than any object Python can leak; a leaked event (stack
    and all, KBs) shows much sooner. Short runs catch only bigger leaks.
    """
    second = [kib for t, kib in samples if 0.25 * seconds <= t < 0.5 * seconds]
    last = [kib for t, kib in samples if t >= 0.75 * seconds]
    if not second or not last:
        return None
    base = statistics.fmean(second)
    return base, statistics.fmean(last), max(RSS_LIMIT_SHARE * base, RSS_LIMIT_KIB)


def rss_slope_mb_per_min(samples: list[tuple[float, int]], seconds: float) -> float:
    """Least-squares slope after the warm-up, for the report (the verdict uses the means)."""
    kept = [(t, kib) for t, kib in samples if t >= 0.25 * seconds]
    if len(kept) < 2:
        return 0.0
    slope = statistics.linear_regression([t for t, _ in kept], [k for _, k in kept]).slope
    return slope * 60 / 1024


@dataclass
class Result:
    loop: str
    seconds: float
    rows: dict[str, str]
    checks: list[tuple[str, bool, str]]
    kept: list[Path]

    @property
    def passed(self) -> bool:
        return all(ok for _, ok, _ in self.checks)


def soak_one(loop: str, seconds: float, seed: int, keep: bool) -> Result:
    stem = Path(f"/tmp/loopguard-soak-{os.getpid()}-{loop}")
    event_log, server_log = Path(f"{stem}.jsonl"), Path(f"{stem}.log")
    event_log.unlink(missing_ok=True)
    with open(server_log, "wb") as stderr:
        proc, url = start("soak", loop, {"SOAK_EVENT_LOG": str(event_log)}, stderr=stderr.fileno())
    base = url.rstrip("/")
    print(f"[{loop}] server pid {proc.pid} at {base}; soaking for {seconds:.0f} s", flush=True)

    checks: list[tuple[str, bool, str]] = []

    def check(name: str, ok: bool, detail: str) -> None:
        checks.append((name, ok, detail))

    tally = Tally()
    stop = threading.Event()
    wrk = subprocess.Popen(
        ["taskset", "-c", "1", "wrk", "-t1", f"-c{WRK_CONNECTIONS}", f"-d{seconds:.0f}s",
         "--timeout", "5s", url],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
    )  # fmt: skip
    workers: list[tuple[Callable[..., None], tuple[Any, ...]]] = [
        (mixed_load, (base, stop, tally)),
        (culprits, (base, loop, stop, tally, seed)),
    ]
    threads = [threading.Thread(target=f, args=a, daemon=True) for f, a in workers]
    for t in threads:
        t.start()

    # RSS every ~10 s on a long run; more often on a short one, so each quarter has samples.
    every = min(10.0, max(1.0, seconds / 30))
    samples: list[tuple[float, int]] = []
    t0 = time.monotonic()
    died = None
    while (elapsed := time.monotonic() - t0) < seconds:
        died = proc.poll()
        if died is not None:
            break
        samples.append((elapsed, rss_kib(proc.pid)))
        time.sleep(min(every, max(0.0, seconds - elapsed)))
    if died is None and proc.poll() is None:
        samples.append((time.monotonic() - t0, rss_kib(proc.pid)))
    stop.set()
    for t in threads:
        t.join(timeout=STOP_TIMEOUT_S)
    try:
        wrk_out = wrk.communicate(timeout=STOP_TIMEOUT_S + 10)[0]
    except subprocess.TimeoutExpired:
        wrk.kill()
        wrk_out = wrk.communicate()[0]
    wrk_requests, wrk_problems = parse_wrk(wrk_out)

    live: dict[str, Any] = {}
    if proc.poll() is None:
        try:
            live = httpx.get(base + "/_stats", timeout=10).json()
        except Exception as exc:
            check("stats endpoint answers", False, repr(exc))
    check(
        "server served to the end",
        died is None and proc.poll() is None,
        f"exited early with status {proc.returncode}",
    )

    # SIGTERM: uvicorn's graceful shutdown runs the lifespan's, so the guard stops and writes
    # its final stats record. The counters in it are exact; live ones can race a stall.
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout=STOP_TIMEOUT_S)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
            check("server stops on SIGTERM", False, f"not in {STOP_TIMEOUT_S:.0f} s")
    # uvicorn shuts down gracefully, then raises the signal it caught again, so a clean stop on
    # SIGTERM ends with -SIGTERM (its stats record, checked below, proves the shutdown ran);
    # anything else (-SIGSEGV, -SIGABRT, exit 1 or 3) is a crash or a failed lifespan.
    check(
        "server exit after a graceful shutdown (0 or -SIGTERM)",
        proc.returncode in (0, -signal.SIGTERM),
        f"status {proc.returncode}",
    )

    # --- the load's own view ------------------------------------------------------------------
    python_requests = sum(tally.requests.values())
    check(
        "every Python request answered as expected",
        tally.failure_count == 0,
        f"{tally.failure_count} failed; first: {tally.failures}",
    )
    check(
        "wrk: only 2xx, no socket errors",
        not wrk_problems and wrk_requests > 0,
        "; ".join(wrk_problems) or "wrk made no requests",
    )
    boom_calls = len(tally.culprit_ids.get("boom", []))

    # --- the server log -----------------------------------------------------------------------
    review = review_server_log(server_log.read_text(errors="replace"))
    check(
        "no fastapi_loopguard traceback, complaint or crash in the server log",
        not review.guard_problems,
        "; ".join(review.guard_problems[:5]),
    )
    check(
        "the app's own exception logged once per call, unchanged",
        review.app_errors == boom_calls,
        f"{review.app_errors} SoakError tracebacks for {boom_calls} calls",
    )

    # --- the event log and the engine's counters ----------------------------------------------
    records = []
    if event_log.exists():
        records = [json.loads(x) for x in event_log.read_text().splitlines() if x.strip()]
    events = [r for r in records if r.get("type") == "event"]
    finals = [r for r in records if r.get("type") == "stats"]
    final: dict[str, Any] = finals[-1] if finals else {}
    check("the guard wrote its stats record on stop", bool(finals), f"{len(finals)} stats records")
    detected = int(final.get("events_detected", -1))
    emitted = int(final.get("events_emitted", -1))
    dropped = int(final.get("events_dropped", -1))
    cumulative = int(final.get("cumulative_events", -1))
    lost = int(final.get("event_log_lost", 0))
    check(
        "detected == emitted + dropped",
        bool(finals) and detected == emitted + dropped,
        f"{detected} != {emitted} + {dropped}",
    )
    expected_records = emitted + cumulative - lost
    check(
        "event records == emitted + cumulative - lost",
        bool(finals) and len(events) == expected_records,
        f"{len(events)} records, expected {emitted} + {cumulative} - {lost}",
    )
    check("at least one event detected", detected > 0, f"detected {detected}")

    seen_ids = Counter(str(e.get("request_id")) for e in events)
    detection_cells = []
    for kind in MUST_DETECT:
        ids = tally.culprit_ids.get(kind, [])
        hit = sum(1 for i in ids if seen_ids[i])
        detection_cells.append(f"{kind} {hit}/{len(ids)}")
        check(
            f"{kind} culprit calls with an event >= {MIN_DETECTED_SHARE:.0%}",
            bool(ids) and hit >= MIN_DETECTED_SHARE * len(ids),
            f"{hit} of {len(ids)} calls",
        )
    pool_ids = tally.culprit_ids.get("threadpool", [])
    pool_events = sum(seen_ids[i] for i in pool_ids)
    stall_culprit_calls = sum(len(tally.culprit_ids.get(k, [])) for k in ("sleep", "cpu"))

    # --- RSS ----------------------------------------------------------------------------------
    rss = rss_verdict(samples, seconds)
    rss_base, rss_end, limit = rss if rss is not None else (float("nan"),) * 3
    growth = rss_end - rss_base
    check(
        "flat RSS",
        rss is not None and growth <= limit,
        f"grew {growth / 1024:+.1f} MB, limit {limit / 1024:.1f} MB"
        if rss is not None
        else "no RSS samples in the second or last quarter",
    )

    culprit_calls = sum(len(v) for v in tally.culprit_ids.values())
    rows = {
        "duration (s)": f"{seconds:.0f}",
        "requests wrk (trivial endpoint)": str(wrk_requests),
        "requests Python (mix + culprits)": str(python_requests),
        "culprit calls (all kinds)": str(culprit_calls),
        "culprit calls with an event": ", ".join(detection_cells),
        "threadpool calls / events naming them": f"{len(pool_ids)} / {pool_events}",
        "culprit answers flagged by dev headers": ", ".join(
            f"{k} {tally.header_detected[k]}" for k in MUST_DETECT
        ),
        "stall events vs sleep+cpu calls": f"{detected} vs {stall_culprit_calls}",
        "events detected": str(detected),
        "events emitted": str(emitted),
        "events dropped": str(dropped),
        "cumulative events": str(cumulative),
        "event records in the log (lost)": f"{len(events)} ({lost})",
        "live stats before stop: detected": str(live.get("events_detected", "-")),
        "app errors (500) / tracebacks": f"{boom_calls} / {review.app_errors}",
        "other tracebacks (not the guard's)": str(len(review.other_tracebacks)),
        "RSS after warm-up, Q2 mean (MB)": f"{rss_base / 1024:.1f}",
        "RSS at the end, Q4 mean (MB)": f"{rss_end / 1024:.1f}",
        "RSS growth (limit)": f"{growth / 1024:+.2f} MB {growth / rss_base * 100:+.2f}% "
        f"({limit / 1024:.1f} MB)",
        "RSS slope after warm-up (MB/min)": f"{rss_slope_mb_per_min(samples, seconds):+.3f}",
        "RSS samples (every s)": f"{len(samples)} ({every:.1f})",
    }
    for line in review.other_tracebacks[:5]:
        print(f"[{loop}] note: a traceback not through the guard: {line}")
    result = Result(loop, seconds, rows, checks, [])
    if keep or not result.passed:
        # The RSS curve too: a failed "flat RSS" is judged by its shape (a step or a ramp).
        rss_log = Path(f"{stem}.rss")
        rss_log.write_text("".join(f"{t:.1f}\t{kib}\n" for t, kib in samples))
        result.kept = [event_log, server_log, rss_log]
    else:
        event_log.unlink(missing_ok=True)
        server_log.unlink(missing_ok=True)
    return result


def report(results: list[Result]) -> None:
    label_width = max(len(k) for k in results[0].rows) + 2
    width = max(14, *(len(v) + 2 for r in results for v in r.rows.values()))
    print()
    print(" " * label_width + "".join(f"{r.loop:>{width}}" for r in results))
    for key in results[0].rows:
        print(f"{key:<{label_width}}" + "".join(f"{r.rows[key]:>{width}}" for r in results))
    verdicts = "".join(f"{'PASS' if r.passed else 'FAIL':>{width}}" for r in results)
    print(f"{'verdict':<{label_width}}{verdicts}")
    for r in results:
        for name, ok, detail in r.checks:
            if not ok:
                print(f"FAIL [{r.loop}] {name}: {detail}")
        for path in r.kept:
            print(f"[{r.loop}] kept {path}")
    print(
        "\nPass criteria: server up to the end and a graceful stop on SIGTERM; every request "
        "answered as expected; no guard traceback/complaint in the server log; detected == "
        "emitted + dropped and event records == emitted + cumulative - lost (final stats "
        f"record); >= {MIN_DETECTED_SHARE:.0%} of each of {', '.join(MUST_DETECT)} culprit calls "
        f"with an event; RSS Q4 mean - Q2 mean <= max({RSS_LIMIT_SHARE:.0%}, "
        f"{RSS_LIMIT_KIB // 1024} MB)."
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument(
        "--seconds", type=float, default=300, help="per loop (default 300: 10 minutes for both)"
    )
    parser.add_argument(
        "--loops", default=",".join(LOOPS), help="comma-separated, of: asyncio,uvloop"
    )
    parser.add_argument("--seed", type=int, default=1, help="for the culprits' random durations")
    parser.add_argument("--keep", action="store_true", help="keep the logs and RSS samples")
    args = parser.parse_args()
    loops = [x for x in args.loops.split(",") if x]
    if not loops or any(x not in LOOPS for x in loops):
        parser.error(f"--loops takes a comma-separated list of {', '.join(LOOPS)}")
    # Quarters of the run must each hold several RSS samples and culprit calls.
    if args.seconds < 30:
        parser.error("--seconds must be at least 30")
    if (os.cpu_count() or 1) < 2:
        raise SystemExit("the soak pins the server to core 0 and the load to core 1: 2 cores")
    # This process is load too: keep it off the server's core.
    os.sched_setaffinity(0, {1})
    os.chdir(ROOT)
    total = args.seconds * len(loops)
    print(
        f"soak: {args.seconds:.0f} s on each of {', '.join(loops)} ({total / 60:.1f} min); "
        f"wrk -c{WRK_CONNECTIONS} on / (core 1), a mix of endpoints and a culprit every "
        f"{CULPRIT_EVERY_S:.0f} s from Python (core 1), server on core 0",
        flush=True,
    )
    results = [soak_one(loop, args.seconds, args.seed, args.keep) for loop in loops]
    report(results)
    sys.exit(0 if all(r.passed for r in results) else 1)


if __name__ == "__main__":
    main()
