"""Prometheus metrics: names, units, labels and exposure, then a real deployment end to end.

* one uvicorn process (both loops): scrape ``/metrics`` and read every metric;
* the label set stays bounded, and a configured registry is used instead of the global one;
* gunicorn with two uvicorn workers and ``PROMETHEUS_MULTIPROC_DIR``, scraped by Debian's real
  ``prometheus`` server, queried with PromQL over its HTTP API.
"""

from __future__ import annotations

import asyncio
import json
import os
import shutil
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.parser import text_string_to_metric_families

from fastapi_loopguard import BlockingEvent, Frame, LoopGuard, LoopGuardConfig
from fastapi_loopguard.exporters.base import MAX_ROUTES, OTHER_ROUTE
from fastapi_loopguard.exporters.prometheus import PrometheusExporter

from .conftest import ROOT, Server, complete_records, free_port, start_server, stop_server

APP = "tests.apps.integrations:app"
Samples = dict[tuple[str, tuple[tuple[str, str], ...]], float]


def samples_of(text: str) -> Samples:
    out: Samples = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            out[(sample.name, tuple(sorted(sample.labels.items())))] = sample.value
    return out


def value(samples: Samples, name: str, **labels: str) -> float:
    return samples[(name, tuple(sorted(labels.items())))]


@pytest.fixture
def metrics_server(loop_name: str, tmp_path: Path) -> Iterator[Server]:
    env = {"LOOPGUARD_TEST_OPTIONS": json.dumps({"prometheus_enabled": True})}
    server = start_server(APP, loop_name, tmp_path, env=env)
    yield server
    stop_server(server)


def test_metrics_after_real_traffic(metrics_server: Server) -> None:
    async def traffic() -> None:
        async with httpx.AsyncClient(base_url=metrics_server.url, timeout=10) as client:
            innocents = [asyncio.create_task(client.get("/innocent")) for _ in range(4)]
            await asyncio.sleep(0.2)
            await client.get("/items/1")  # 4 innocents in flight: 4 victims
            await asyncio.gather(*innocents)
            await client.get("/items/2?secret=x")
            assert (await client.get("/no/such/page")).status_code == 404
            await asyncio.sleep(0.1)  # the last event is delivered a watchdog tick later

    asyncio.run(traffic())
    response = httpx.get(metrics_server.url + "/metrics", timeout=10)
    assert response.status_code == 200
    assert response.headers["content-type"].startswith("text/plain")
    text = response.text
    assert "/items/1" not in text and "/items/2" not in text and "secret" not in text
    s = samples_of(text)

    item = {"route": "/items/{item_id}", "method": "GET"}
    assert value(s, "loopguard_blocking_events_total", kind="sleep", **item) == 2
    unmatched = {"route": "<unmatched>", "method": "GET"}
    assert value(s, "loopguard_blocking_events_total", kind="sleep", **unmatched) == 1
    assert value(s, "loopguard_blocking_duration_seconds_count", **item) == 2
    # Base units: two blocks of 120 ms are about 0.24 s, not 240.
    assert 0.2 <= value(s, "loopguard_blocking_duration_seconds_sum", **item) < 1.5
    assert value(s, "loopguard_blocking_duration_seconds_bucket", le="0.1", **item) == 0
    assert value(s, "loopguard_blocking_duration_seconds_bucket", le="0.25", **item) == 2
    assert value(s, "loopguard_requests_delayed_total") >= 4

    # Engine totals, read at scrape time.
    lag_count = value(s, "loopguard_loop_lag_seconds_count")
    assert lag_count > 0
    assert value(s, "loopguard_loop_lag_seconds_bucket", le="+Inf") == lag_count
    buckets = [v for (name, _), v in s.items() if name == "loopguard_loop_lag_seconds_bucket"]
    assert len(buckets) == 17
    assert value(s, "loopguard_loop_lag_seconds_bucket", le="0.1") < lag_count  # the blocks
    assert value(s, "loopguard_loop_lag_seconds_sum") >= 0.3
    assert 0.04 <= value(s, "loopguard_threshold_seconds") < 1
    assert value(s, "loopguard_hangs_total") == 0
    assert value(s, "loopguard_events_dropped_total") == 0
    assert value(s, "loopguard_loop_saturation_seconds_total") >= 0

    # OpenMetrics when the scraper asks for it.
    om = httpx.get(
        metrics_server.url + "/metrics",
        headers={"accept": "application/openmetrics-text; version=1.0.0"},
        timeout=10,
    )
    assert om.headers["content-type"].startswith("application/openmetrics-text")
    assert om.text.endswith("# EOF\n")


def test_metrics_path_is_configurable_and_can_be_off(loop_name: str, tmp_path: Path) -> None:
    options = {"prometheus_enabled": True, "metrics_path": "/internal/m"}
    server = start_server(
        APP, loop_name, tmp_path, env={"LOOPGUARD_TEST_OPTIONS": json.dumps(options)}
    )
    try:
        assert "loopguard_blocking_events_total" in httpx.get(server.url + "/internal/m").text
        assert httpx.get(server.url + "/metrics").status_code == 404  # the app's own 404
    finally:
        stop_server(server)
    options = {"prometheus_enabled": True, "metrics_path": None}
    server = start_server(
        APP, loop_name, tmp_path, env={"LOOPGUARD_TEST_OPTIONS": json.dumps(options)}
    )
    try:
        assert httpx.get(server.url + "/metrics").status_code == 404
    finally:
        stop_server(server)


def _event(route: str | None, method: str | None = "GET") -> BlockingEvent:
    return BlockingEvent(
        duration_ms=80.0,
        kind="sleep",
        request_id="r",
        method=method,
        path="/x",
        route=route,
        stack=(Frame("/app.py", 1, "f"),),
        culprit=Frame("/app.py", 1, "f"),
        cpu_ms=0.0,
        victims=0,
        started_at=time.time(),
    )


def test_label_set_is_bounded_and_registry_configurable() -> None:
    registry = CollectorRegistry()
    guard = LoopGuard(LoopGuardConfig(prometheus_enabled=True, prometheus_registry=registry))
    [exporter] = [e for e in guard.exporters if isinstance(e, PrometheusExporter)]
    assert exporter.registry is registry
    for i in range(MAX_ROUTES + 50):
        exporter.export(_event(f"/r{i}/{{id}}"), None)
    exporter.export(_event(None, method="BREW"), None)  # unmatched, and a made-up method
    exporter.export(_event(None, method=None), None)  # labelled work, not a request
    s = samples_of(generate_latest(registry).decode())
    routes = {
        dict(labels)["route"] for (name, labels) in s if name == "loopguard_blocking_events_total"
    }
    assert len(routes) == MAX_ROUTES + 3
    assert (
        value(s, "loopguard_blocking_events_total", route=OTHER_ROUTE, method="GET", kind="sleep")
        == 50
    )
    assert (
        value(
            s, "loopguard_blocking_events_total", route="<unmatched>", method="OTHER", kind="sleep"
        )
        == 1
    )
    assert value(s, "loopguard_blocking_events_total", route="<none>", method="", kind="sleep") == 1
    # Nothing leaked into the global registry, and a second guard on the same registry shares
    # the metrics instead of failing on duplicate names.
    from prometheus_client import REGISTRY

    assert "loopguard_blocking_events_total" not in generate_latest(REGISTRY).decode()
    second = LoopGuard(LoopGuardConfig(prometheus_enabled=True, prometheus_registry=registry))
    assert second.exporters[-1].metrics is exporter.metrics  # type: ignore[attr-defined]


# ---- gunicorn + PROMETHEUS_MULTIPROC_DIR + Debian's prometheus ---------------------------------

WORKERS = {"asyncio": "uvicorn_worker.UvicornH11Worker", "uvloop": "uvicorn_worker.UvicornWorker"}
BLOCKING_REQUESTS = 16


def _wait_http(url: str, process: subprocess.Popen[bytes], log: Path, seconds: float) -> None:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"{url}: process exited early:\n{log.read_text(errors='replace')}")
        try:
            if httpx.get(url, timeout=0.5).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.1)
    raise RuntimeError(f"{url} did not come up:\n{log.read_text(errors='replace')}")


def _stop(process: subprocess.Popen[bytes]) -> None:
    process.terminate()
    try:
        process.wait(timeout=15)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait()


@pytest.fixture
def gunicorn_app(loop_name: str, tmp_path: Path) -> Iterator[tuple[str, Path]]:
    multiproc = tmp_path / "multiproc"
    multiproc.mkdir()
    port = free_port()
    log = tmp_path / "gunicorn.log"
    conf = tmp_path / "gunicorn_conf.py"
    # prometheus_client's documented gunicorn hook: a dead worker's live gauges go with it.
    conf.write_text(
        "from prometheus_client import multiprocess\n"
        "def child_exit(server, worker):\n"
        "    multiprocess.mark_process_dead(worker.pid)\n"
    )
    env = {
        **os.environ,
        "PROMETHEUS_MULTIPROC_DIR": str(multiproc),
        # The event log: what each worker itself emitted, to hold the scraped sum against.
        "LOOPGUARD_TEST_OPTIONS": json.dumps(
            {"prometheus_enabled": True, "event_log_path": str(tmp_path / "events.jsonl")}
        ),
    }
    cmd = [sys.executable, "-m", "gunicorn", APP, "-w", "2", "-k", WORKERS[loop_name]]
    cmd += ["-b", f"127.0.0.1:{port}", "-c", str(conf), "--graceful-timeout", "5"]
    with open(log, "wb") as out:
        process = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=out, stderr=subprocess.STDOUT)
    try:
        _wait_http(f"http://127.0.0.1:{port}/health", process, log, 30)
        # One worker answering is not both: wait until each has started its app.
        deadline = time.monotonic() + 30
        while log.read_text(errors="replace").count("Application startup complete") < 2:
            assert time.monotonic() < deadline, log.read_text(errors="replace")
            time.sleep(0.1)
        yield f"http://127.0.0.1:{port}", log
    finally:
        _stop(process)


@pytest.fixture
def prometheus_server(tmp_path: Path) -> Iterator[tuple[Path, str, int]]:
    """Debian's prometheus binary, on loopback, with a config the test writes."""
    binary = shutil.which("prometheus")
    if binary is None:
        pytest.fail("Debian's prometheus server is not installed (make install installs it)")
    port = free_port()
    yield Path(binary), f"http://127.0.0.1:{port}", port


def _start_prometheus(
    binary: Path, port: int, target: str, tmp_path: Path
) -> tuple[subprocess.Popen[bytes], Path]:
    config = tmp_path / "prometheus.yml"
    config.write_text(
        "global:\n"
        "  scrape_interval: 1s\n"
        "  scrape_timeout: 1s\n"
        "scrape_configs:\n"
        "  - job_name: app\n"
        "    metrics_path: /metrics\n"
        "    static_configs:\n"
        f"      - targets: ['{target}']\n"
    )
    log = tmp_path / "prometheus.log"
    cmd = [
        str(binary),
        f"--config.file={config}",
        f"--storage.tsdb.path={tmp_path / 'tsdb'}",
        f"--web.listen-address=127.0.0.1:{port}",
    ]
    with open(log, "wb") as out:
        process = subprocess.Popen(cmd, cwd=tmp_path, stdout=out, stderr=subprocess.STDOUT)
    _wait_http(f"http://127.0.0.1:{port}/-/ready", process, log, 30)
    return process, log


def _query(base: str, promql: str) -> list[dict[str, Any]]:
    response = httpx.get(base + "/api/v1/query", params={"query": promql}, timeout=5)
    response.raise_for_status()
    body = response.json()
    assert body["status"] == "success", body
    result: list[dict[str, Any]] = body["data"]["result"]
    return result


def _emitted_per_worker(event_log: Path, requests: int) -> dict[int, int]:
    """Blocking events of the /items route per worker pid, once they stop arriving."""
    deadline = time.monotonic() + 5
    while True:
        counts: dict[int, int] = {}
        for record in complete_records(event_log):
            if record["type"] == "event" and record["route"] == "/items/{item_id}":
                counts[record["pid"]] = counts.get(record["pid"], 0) + 1
        if sum(counts.values()) >= requests or time.monotonic() > deadline:
            return counts
        time.sleep(0.1)


def test_gunicorn_workers_scraped_by_real_prometheus(
    gunicorn_app: tuple[str, Path],
    prometheus_server: tuple[Path, str, int],
    tmp_path: Path,
) -> None:
    app_url, app_log = gunicorn_app

    async def traffic() -> list[int]:
        # A fresh connection per request, one every 50 ms: a worker blocked in time.sleep
        # (120 ms) cannot accept, so the other worker takes the next connection. (Sent all at
        # once, the first worker to wake would accept the whole backlog.)
        async def one(i: int) -> int:
            await asyncio.sleep(0.05 * i)
            async with httpx.AsyncClient(timeout=30) as client:
                response = await client.get(f"{app_url}/items/{i}")
                assert response.status_code == 200
                return int(response.json()["pid"])

        return list(await asyncio.gather(*(one(i) for i in range(BLOCKING_REQUESTS))))

    # The kernel decides which worker accepts; another round if one got everything (bounded).
    pids: list[int] = []
    for _ in range(3):
        pids += asyncio.run(traffic())
        if len(set(pids)) == 2:
            break
    assert len(set(pids)) == 2, f"both workers should have served blocking requests: {pids}"
    # The exporter's job is the exact sum of what the workers emitted; whether every block was
    # detected is the attribution tests' job. (Here one in a few hundred 120 ms blocks has been
    # seen to go unreported under gunicorn on uvloop; see the closing note of the proof issue.)
    own = _emitted_per_worker(tmp_path / "events.jsonl", len(pids))
    assert set(own) == set(pids), own
    emitted = sum(own.values())
    assert emitted >= len(pids) - 1, (own, pids)

    binary, prom_url, prom_port = prometheus_server
    target = app_url.removeprefix("http://")
    process, prom_log = _start_prometheus(binary, prom_port, target, tmp_path)
    try:
        total = per_worker = None
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            total = _query(
                prom_url, 'sum(loopguard_blocking_events_total{route="/items/{item_id}"})'
            )
            per_worker = _query(prom_url, "loopguard_threshold_seconds")
            if total and float(total[0]["value"][1]) == emitted and len(per_worker) == 2:
                break
            time.sleep(0.5)
        assert total and float(total[0]["value"][1]) == emitted, (
            total,
            prom_log.read_text(errors="replace")[-3000:],
            app_log.read_text(errors="replace")[-3000:],
        )
        # The threshold gauge keeps one series per live worker (multiprocess_mode="liveall"):
        # each worker's engine totals reached the scrape, whichever worker answered it.
        assert per_worker is not None
        assert {int(series["metric"]["pid"]) for series in per_worker} == set(pids)
        assert all(float(series["value"][1]) > 0 for series in per_worker)
        lag = _query(prom_url, "loopguard_loop_lag_seconds_count")
        assert lag and float(lag[0]["value"][1]) > 0
        slow = _query(prom_url, 'loopguard_loop_lag_seconds_bucket{le="0.1"}')
        assert float(slow[0]["value"][1]) < float(lag[0]["value"][1])  # the 120 ms blocks
        durations = _query(
            prom_url, 'sum(loopguard_blocking_duration_seconds_count{route="/items/{item_id}"})'
        )
        assert float(durations[0]["value"][1]) == emitted
        up = _query(prom_url, 'up{job="app"}')
        assert float(up[0]["value"][1]) == 1
    finally:
        _stop(process)
