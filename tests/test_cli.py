"""The `loopguard` command as a user runs it: in subprocesses, against real uvicorn on loopback."""

from __future__ import annotations

import json
import os
import re
import signal
import socket
import subprocess
import sys
import sysconfig
import tempfile
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import httpx
import pytest

from .conftest import ROOT, Server, complete_records, culprit_line, free_port

PLAIN = ROOT / "tests" / "apps" / "plain.py"
LOOPGUARD = [sys.executable, "-m", "fastapi_loopguard"]


def loopguard(*args: str, env: dict[str, str] | None = None, timeout: float = 60) -> Any:
    return subprocess.run(
        [*LOOPGUARD, *args],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=timeout,
        # Wide enough that rich's tables keep each route on one line in captured output.
        env={**os.environ, "COLUMNS": "200", **(env or {})},
    )


@contextmanager
def loopguard_run(
    tmp_path: Path,
    loop: str,
    *args: str,
    env: dict[str, str] | None = None,
    command: list[str] | None = None,
    replace_env: bool = False,
) -> Iterator[Server]:
    """`loopguard run ...` on a free loopback port, stopped with SIGTERM like a deployment.

    ``command`` replaces ``python -m fastapi_loopguard``, e.g. with the console script;
    ``env`` adds to this process's environment, or with ``replace_env`` is the whole of it.
    """
    port = free_port()
    log_path = tmp_path / f"loopguard-run-{loop}-{port}.log"
    command = [*(command or LOOPGUARD), "run", *args, "--port", str(port), "--loop", loop]
    with open(log_path, "wb") as log:
        process = subprocess.Popen(
            command,
            cwd=ROOT,
            stdout=log,
            stderr=subprocess.STDOUT,
            env=dict(env or {}) if replace_env else {**os.environ, **(env or {})},
        )
    server = Server(f"http://127.0.0.1:{port}", loop, log_path, process)
    try:
        deadline = time.monotonic() + 30
        while True:
            if process.poll() is not None:
                raise RuntimeError(f"loopguard run exited early:\n{server.log()}")
            try:
                httpx.get(server.url + "/health", timeout=0.5)
                break
            except httpx.HTTPError:
                if time.monotonic() > deadline:
                    raise RuntimeError(f"loopguard run did not start:\n{server.log()}") from None
                time.sleep(0.05)
        yield server
    finally:
        stop(process)


def stop(process: subprocess.Popen[bytes]) -> None:
    if process.poll() is None:
        process.send_signal(signal.SIGTERM)
        try:
            process.wait(timeout=20)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


def block_with_bystanders(url: str, blocker: str) -> httpx.Response:
    """The blocking request, with two innocent ones in flight to be its victims."""
    with ThreadPoolExecutor(3) as pool:
        innocents = [pool.submit(httpx.get, url + "/innocent", timeout=10) for _ in range(2)]
        time.sleep(0.15)
        guilty = httpx.get(url + blocker, timeout=10)
        assert all(f.result().status_code == 200 for f in innocents)
    return guilty


def test_console_script_is_installed() -> None:
    script = Path(sys.executable).parent / "loopguard"
    result = subprocess.run([str(script), "--help"], capture_output=True, text=True, timeout=30)
    assert result.returncode == 0
    for command in ("demo", "run", "report"):
        assert command in result.stdout


def test_run_guards_an_unmodified_app(loop_name: str, tmp_path: Path) -> None:
    events = tmp_path / "events.jsonl"
    with loopguard_run(
        tmp_path, loop_name, "tests.apps.plain:app", "--dev-mode", "--event-log", str(events)
    ) as server:
        guilty = block_with_bystanders(server.url, "/sleep/250")
        assert guilty.headers["x-blocking-detected"] == "true"
        assert int(guilty.headers["x-blocking-count"]) == 1
        time.sleep(0.3)
    line = culprit_line(PLAIN, "sleep")
    log = server.log()
    assert "loopguard: guarding tests.apps.plain:app" in log
    assert "Event loop blocked for" in log
    assert f"culprit={PLAIN}:{line} in sleep" in log
    assert "during GET /sleep/250 [route=/sleep/{ms} kind=sleep" in log
    written = complete_records(events)
    event = next(r for r in written if r["type"] == "event")
    assert (event["route"], event["kind"], event["victims"]) == ("/sleep/{ms}", "sleep", 2)
    assert event["culprit"] == {"filename": str(PLAIN), "lineno": line, "function": "sleep"}
    assert written[-1]["type"] == "stats"  # written at shutdown, through the lifespan


def test_console_script_names_the_library_frame_never_itself(
    loop_name: str, tmp_path: Path
) -> None:
    """`loopguard run` as the installed script, a stack without a line of the app's own: the
    culprit is the innermost library frame, marked as such, and never the script's own line."""
    events = tmp_path / "events.jsonl"
    script = Path(sys.executable).parent / "loopguard"
    with loopguard_run(
        tmp_path,
        loop_name,
        "tests.apps.plain:app",
        "--event-log",
        str(events),
        command=[str(script)],
    ) as server:
        assert httpx.get(server.url + "/rows", timeout=30).status_code == 200
        deadline = time.monotonic() + 10
        while not [r for r in complete_records(events) if r["type"] == "event"]:
            assert time.monotonic() < deadline, server.log()
            time.sleep(0.05)
    blocked = [r for r in complete_records(events) if r["type"] == "event"]
    encoding = [r for r in blocked if r["route"] == "/rows" and r["culprit"] is not None]
    assert encoding, blocked
    # Library code every time. The encoding (hundreds of ms) is named in FastAPI's encoder. The
    # json.dumps of the result that may follow as an event of its own is C code holding the GIL:
    # its few samples are read when the loop next lets go of the GIL, up to a switch interval
    # later, which may already be in Starlette's render or in the server's send.
    library = os.path.join(sysconfig.get_paths()["purelib"], "")
    for event in encoding:
        culprit = event["culprit"]
        assert culprit["filename"].startswith(library), culprit
        assert event["culprit_is_library"] is True
    assert any(e["culprit"]["function"] == "jsonable_encoder" for e in encoding), encoding
    for event in blocked:
        # Every path is spelled once, normalised; the script is on the stack, and never named.
        assert all(f["filename"] == os.path.normpath(f["filename"]) for f in event["stack"])
        assert event["culprit"] is None or event["culprit"]["filename"] != str(script)
    assert any(f["filename"] == str(script) for f in encoding[0]["stack"])
    log = server.log()
    assert f"culprit={encoding[0]['culprit']['filename']}:" in log
    assert "(library code)" in log
    assert f"culprit={script}" not in log


def test_run_takes_its_config_from_the_environment(loop_name: str, tmp_path: Path) -> None:
    env = {"LOOPGUARD_DEV_MODE": "1", "LOOPGUARD_THRESHOLD_MS": "400"}
    with loopguard_run(
        tmp_path, loop_name, "tests.apps.plain:create_app", "--factory", env=env
    ) as server:
        short = httpx.get(server.url + "/sleep/200", timeout=10)
        long = httpx.get(server.url + "/sleep/600", timeout=10)
    # Dev-mode headers prove LOOPGUARD_DEV_MODE reached the worker; the threshold decides.
    assert short.headers["x-blocking-detected"] == "false"
    assert long.headers["x-blocking-detected"] == "true"
    assert "threshold max(5 x baseline, 400 ms); dev mode on" in server.log()


@pytest.mark.parametrize(
    ("args", "env", "expected"),
    [
        ([], {"LOOPGUARD_THRESHOLD_MS": "fast"}, "LOOPGUARD_THRESHOLD_MS must be a number, got"),
        ([], {"LOOPGUARD_DEV_MODE": "sure"}, "LOOPGUARD_DEV_MODE must be one of 1/0"),
        (
            [],
            {"LOOPGUARD_CALIBRATION_ITERATIONS": "-3"},
            "LOOPGUARD_CALIBRATION_ITERATIONS: calibration_iterations must be an integer",
        ),
        (["--dashboard", "/a b"], {}, "--dashboard: dashboard_path must be None or a path"),
        (["--threshold-ms", "0"], {}, "--threshold-ms: fallback_threshold_ms must be a number"),
        (
            ["--event-log", "/nonexistent-dir/events.jsonl"],
            {},
            "cannot write the event log /nonexistent-dir/events.jsonl: No such file or directory",
        ),
        (
            ["--workers", "2", "--prometheus"],
            {"PROMETHEUS_MULTIPROC_DIR": "/nonexistent-dir"},
            "PROMETHEUS_MULTIPROC_DIR=/nonexistent-dir is not a writable directory",
        ),
        (["--enforcement-mode", "loud"], {}, "argument --enforcement-mode: invalid choice"),
    ],
)
def test_run_refuses_bad_configuration(args: list[str], env: dict[str, str], expected: str) -> None:
    result = loopguard("run", "tests.apps.plain:app", *args, "--port", "1", env=env)
    assert result.returncode == 2, result.stderr
    assert f"loopguard run: error: {expected}" in result.stderr
    assert "Uvicorn running" not in result.stderr  # refused before any server started


def test_run_names_an_app_it_cannot_import() -> None:
    missing = loopguard("run", "no_such_module:app", "--port", "1")
    assert missing.returncode == 2
    assert "loopguard run: error: cannot find the module 'no_such_module'" in missing.stderr
    no_attribute = loopguard("run", "tests.apps.plain:nope", "--port", "1")
    assert no_attribute.returncode == 1
    assert 'Error loading ASGI app. Attribute "nope" not found' in no_attribute.stderr
    assert "Traceback" not in no_attribute.stderr


def test_run_warns_about_unknown_variables(tmp_path: Path) -> None:
    env = {"LOOPGUARD_DEVMODE": "1"}
    with loopguard_run(tmp_path, "asyncio", "tests.apps.plain:app", env=env) as server:
        pass
    assert "LOOPGUARD_DEVMODE is not a fastapi-loopguard setting; ignored" in server.log()


def _block_in_both_workers(url: str) -> set[int]:
    """Waits until both workers answer, sends six blocking requests spread over them, and returns
    the workers' pids."""
    pids: set[int] = set()
    deadline = time.monotonic() + 20
    while len(pids) < 2 and time.monotonic() < deadline:
        pids.add(httpx.get(url + "/pid", timeout=5).json()["pid"])
    assert len(pids) == 2, "uvicorn did not start two workers"
    with ThreadPoolExecutor(6) as pool:
        responses = list(pool.map(lambda _: httpx.get(url + "/sleep/150"), range(6)))
    assert all(r.status_code == 200 for r in responses)
    return pids


def test_run_with_workers_shares_one_event_log(loop_name: str, tmp_path: Path) -> None:
    events = tmp_path / "events.jsonl"
    with loopguard_run(
        tmp_path, loop_name, "tests.apps.plain:app", "--workers", "2", "--event-log", str(events)
    ) as server:
        pids = _block_in_both_workers(server.url)
        time.sleep(0.3)
    written = complete_records(events)
    blocked = [r for r in written if r["type"] == "event"]
    assert len(blocked) >= 3 and {r["route"] for r in blocked} == {"/sleep/{ms}"}
    assert {r["pid"] for r in blocked} <= pids
    assert {r["pid"] for r in written if r["type"] == "stats"} == pids  # one per worker


def test_run_flags_turn_on_metrics_enforcement_and_json_logs(
    loop_name: str, tmp_path: Path
) -> None:
    args = ("--prometheus", "--enforcement-mode", "warn", "--log-format", "json")
    with loopguard_run(tmp_path, loop_name, "tests.apps.plain:app", *args) as server:
        guilty = httpx.get(server.url + "/sleep/150", timeout=10)
        assert guilty.headers["x-blocking-count"] == "1"  # warn mode adds the headers
        metrics = httpx.get(server.url + "/metrics", timeout=10)
        assert metrics.status_code == 200
        assert 'loopguard_blocking_events_total{kind="sleep"' in metrics.text
    log = server.log()
    assert (
        "enforcement warn; json logs; "
        f"metrics http://127.0.0.1:{server.url.rsplit(':', 1)[1]}/metrics" in log
    )
    assert "!!! LOOPGUARD: GET /sleep/150 blocked the event loop 1 time(s)" in log
    record = next(line for line in log.splitlines() if '"event loop blocked"' in line)
    fields = json.loads(record[record.index("{") :])
    assert (fields["route"], fields["kind"], fields["pid"]) == (
        "/sleep/{ms}",
        "sleep",
        server.process.pid,
    )


def test_run_with_workers_and_prometheus_aggregates_and_names_each_worker(
    loop_name: str, tmp_path: Path
) -> None:
    events = tmp_path / "events.jsonl"
    env = {k: v for k, v in os.environ.items() if k != "PROMETHEUS_MULTIPROC_DIR"}
    with loopguard_run(
        tmp_path,
        loop_name,
        "tests.apps.plain:app",
        "--workers",
        "2",
        "--prometheus",
        "--event-log",
        str(events),
        env=env,
        replace_env=True,
    ) as server:
        pids = _block_in_both_workers(server.url)
        # Whichever worker answers a scrape, it counts every worker's events: as many as the
        # workers wrote to the event log (which may lag the responses by a loop iteration).
        totals: list[float] = []
        blocked: list[dict[str, Any]] = []
        for _ in range(100):
            blocked = [r for r in complete_records(events) if r["type"] == "event"]
            totals = [_events_total(server) for _ in range(6)]
            if blocked and totals == [len(blocked)] * 6:
                break
            time.sleep(0.05)
        assert totals == [len(blocked)] * 6, (totals, blocked)
    log = server.log()
    banner = next(line for line in log.splitlines() if line.startswith("loopguard: guarding"))
    assert "(all 2 workers, through " in banner and ", removed at exit)" in banner
    made = banner.split("(all 2 workers, through ", 1)[1].split(",", 1)[0]
    assert made.startswith(tempfile.gettempdir()) and not os.path.exists(made)
    # Every worker's log lines say which worker wrote them, blocking records included.
    for pid in pids:
        assert f"INFO:     [pid {pid}] " in log
    for pid in {r["pid"] for r in blocked}:
        assert f"[pid {pid}] Event loop blocked for" in log


def _events_total(server: Server) -> float:
    scraped = httpx.get(server.url + "/metrics", timeout=10).text
    return sum(
        float(line.rsplit(" ", 1)[1])
        for line in scraped.splitlines()
        if line.startswith("loopguard_blocking_events_total{")
    )


def test_report_command(tmp_path: Path) -> None:
    log = tmp_path / "events.jsonl"
    event = {
        "type": "event",
        "duration_ms": 150.0,
        "kind": "sleep",
        "request_id": "r1",
        "method": "GET",
        "path": "/sleep/150",
        "route": "/sleep/{ms}",
        "stack": [
            {"filename": str(PLAIN), "lineno": culprit_line(PLAIN, "sleep"), "function": "sleep"}
        ],
        "culprit": {
            "filename": str(PLAIN),
            "lineno": culprit_line(PLAIN, "sleep"),
            "function": "sleep",
        },
        "cpu_ms": 0.1,
        "victims": 4,
        "started_at": time.time(),
    }
    log.write_text(json.dumps(event) + "\n" + json.dumps({**event, "victims": 1}) + "\n")
    out = tmp_path / "report.html"
    result = loopguard("report", str(log), "-o", str(out))
    assert result.returncode == 0, result.stderr
    assert "2 blocking events, 300 ms of blocked loop in all, 5 requests frozen" in result.stdout
    assert "plain.py:" in result.stdout and "time.sleep(ms / 1000)" in result.stdout
    assert f"wrote {out}: 2 events" in result.stderr
    html = out.read_text()
    assert html.startswith("<!DOCTYPE html>")
    assert "time.sleep(ms / 1000)  # culprit:sleep" in html
    quiet = loopguard("report", str(log), "-o", str(out), "--quiet")
    assert quiet.returncode == 0 and quiet.stdout == ""


def test_report_command_errors(tmp_path: Path) -> None:
    missing = loopguard("report", str(tmp_path / "nope.jsonl"), "-o", str(tmp_path / "r.html"))
    assert missing.returncode == 2
    assert "cannot read" in missing.stderr and "No such file or directory" in missing.stderr
    log = tmp_path / "events.jsonl"
    log.write_text("")
    unwritable = loopguard("report", str(log), "-o", str(tmp_path), "--quiet")
    assert unwritable.returncode == 2
    assert "cannot write" in unwritable.stderr


def _demo_server_log(out: str) -> str:
    """The server log the demo left next to the event log its report names, minus the events."""
    found = re.search(r"(/\S+)/events\.jsonl", out)
    log = Path(found.group(1)) / "server.log" if found else None
    if log is None or not log.exists():
        return "(no server log)"
    lines = log.read_text(errors="replace").splitlines()
    return "\n".join(line for line in lines if "Event loop blocked" not in line)


def test_demo_end_to_end(loop_name: str, tmp_path: Path) -> None:
    html = tmp_path / "demo.html"
    result = loopguard(
        "demo", "--duration", "5", "--loop", loop_name, "--html", str(html), timeout=120
    )
    assert result.returncode == 0, result.stdout + result.stderr
    out = result.stdout
    assert "Per route" in out and "Top culprit lines" in out and "Loop lag: p50" in out
    # The classic culprits are all found, each on its line, and shown with its source: the
    # traffic sends each route at least once. A miss prints the whole report and the server's
    # log, whose tracebacks would say if those requests failed.
    routes = ("/api/reports/{report_id}", "/api/prices/{sku}", "POST /api/checkout")
    missing = [route for route in routes if route not in out]
    assert not missing, f"{missing} missing from the report:\n{out}\n{_demo_server_log(out)}"
    assert 'time.sleep(0.2)  # "just a quick sleep while the file lands"' in out
    assert "with urllib.request.urlopen(url, timeout=5) as response:" in out
    assert "fix: await asyncio.sleep(0.2)" in out and "fix: await client.get(url)" in out
    page = html.read_text()
    timeline = page.split('class="chart timeline"')[1].split("</svg>")[0]
    assert timeline.count("<rect ") >= 5
    assert "/api/reports/{report_id}" in page
    # The blocking profile's flame graph, and the fix for each culprit line.
    flame = page.split('class="flame fg-wide"')[1].split("</svg>")[0]
    assert "build_report  " in flame and "supplier_price  " in flame  # in the frames' titles
    assert "fix for time.sleep: " in page and "<code>await asyncio.sleep(0.2)</code>" in page


def test_demo_picks_another_port_when_its_pick_is_taken(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The demo's free port can be bound by someone else before uvicorn binds it; it retries."""
    from fastapi_loopguard.demo import driver

    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        taken_port = int(taken.getsockname()[1])
        picks = iter([taken_port, free_port()])
        monkeypatch.setattr(driver, "_free_port", lambda: next(picks))
        server, url = driver._start_server("asyncio", tmp_path / "e.jsonl", tmp_path / "s.log")
        try:
            assert url != f"http://127.0.0.1:{taken_port}"
            assert httpx.get(url + driver.DASHBOARD + "/data.json", timeout=5).status_code == 200
        finally:
            driver._stop(server)
    assert server.returncode is not None
