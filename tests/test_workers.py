"""Multi-worker and multi-host reports: who wrote each record, and logs merged into one report.

`loopguard run --workers 2` on both loops: each record names its pid, host and worker index
(uvicorn's workers are multiprocessing children); the log, split per worker as two hosts would
write it, merges back through a glob, with a row per worker in the page and the terminal.
"""

from __future__ import annotations

import json
import socket
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx

from fastapi_loopguard.report import load_event_log
from fastapi_loopguard.report.loading import expand_paths, load_event_logs
from fastapi_loopguard.report.profile import speedscope

from .conftest import complete_records, start_server, stop_server, wait_events
from .test_cli import loopguard, loopguard_run


def test_worker_records_merge_into_one_report(loop_name: str, tmp_path: Path) -> None:
    events = tmp_path / "events.jsonl"
    with loopguard_run(
        tmp_path, loop_name, "tests.apps.plain:app", "--workers", "2", "--event-log", str(events)
    ) as server:
        pids: set[int] = set()
        deadline = time.monotonic() + 20
        while len(pids) < 2 and time.monotonic() < deadline:
            pids.add(httpx.get(server.url + "/pid", timeout=5).json()["pid"])
        assert len(pids) == 2, "uvicorn did not start two workers"
        # New connections spread over both workers (a blocked one cannot accept).
        with ThreadPoolExecutor(8) as pool:
            list(pool.map(lambda _: httpx.get(server.url + "/sleep/120", timeout=20), range(8)))
        time.sleep(0.3)
    written = complete_records(events)
    host = socket.gethostname()
    assert {r["host"] for r in written} == {host}
    workers = {r["pid"]: r["worker"] for r in written}
    assert set(workers) == pids
    assert sorted(workers.values()) == sorted({str(w) for w in workers.values()})  # distinct
    assert all(w is not None and w.isdigit() for w in workers.values())

    # Two logs, as two hosts would write them: merged through a glob, told apart by (host, pid).
    logs = tmp_path / "logs"
    logs.mkdir()
    for i, pid in enumerate(sorted(pids)):
        own = [{**r, "host": f"web-{i}"} for r in written if r["pid"] == pid]
        (logs / f"web-{i}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in own))
    paths = expand_paths([str(logs / "*.jsonl")])
    assert len(paths) == 2
    merged = load_event_logs(paths)
    assert len(merged.events) == len(load_event_log(str(events)).events)
    assert [w.host for w in merged.workers()] == ["web-0", "web-1"]
    assert len(merged.stats) == 2  # each process's statistics kept apart
    assert len(speedscope(merged)["profiles"]) == 3  # all, then one per worker

    page = tmp_path / "report.html"
    result = loopguard("report", str(logs / "*.jsonl"), "-o", str(page))
    assert result.returncode == 0, result.stderr
    assert "Per worker" in result.stdout
    for i, pid in enumerate(sorted(pids)):
        label = f"web-{i} worker {workers[pid]} (pid {pid})"
        assert label in result.stdout
        assert label in page.read_text()
    section = page.read_text().split('id="lg-workers"')[1].split("</section>")[0]
    assert section.count("<tr><td") == 2


def test_worker_index_from_the_environment(loop_name: str, tmp_path: Path) -> None:
    """LOOPGUARD_WORKER names the worker where the server sets it (gunicorn's post_fork)."""
    log = tmp_path / "events.jsonl"
    options = json.dumps({"event_log_path": str(log)})
    env = {"LOOPGUARD_WORKER": "7", "LOOPGUARD_TEST_OPTIONS": options}
    server = start_server("tests.apps.integrations:app", loop_name, tmp_path, env=env)
    try:
        assert httpx.get(server.url + "/sleep/120", timeout=10).status_code == 200
        wait_events(server)
    finally:
        stop_server(server)
    [event] = [r for r in complete_records(log) if r["type"] == "event"]
    assert (event["worker"], event["host"]) == ("7", socket.gethostname())
