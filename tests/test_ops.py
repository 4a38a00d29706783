"""The ops kit: `loopguard alerts` and `loopguard grafana` against Debian's promtool and prometheus.

The rules pass `promtool check rules`. Then a guarded gunicorn app (two uvicorn workers, the
README's gunicorn.conf.py hooks, on both loops) blocks, a real Prometheus scrapes it every
second and evaluates the generated rules (a short window and `--for 0s`, so the test takes
seconds, not the production ten minutes): the route and hang alerts fire. Every PromQL
expression of the dashboard then runs against that Prometheus, each without an error and with
series returned, and so do its variables' label queries.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from fastapi_loopguard.ops.grafana import VARIABLES, dashboard, expressions

from .conftest import ROOT, free_port
from .test_cli import loopguard
from .test_prometheus import APP, WORKERS, _query, _stop, _wait_http

# What the README tells gunicorn users to put in gunicorn.conf.py.
GUNICORN_CONF = """
import os

from prometheus_client import multiprocess


def post_fork(server, worker):
    os.environ["LOOPGUARD_WORKER"] = str(worker.age)


def child_exit(server, worker):
    multiprocess.mark_process_dead(worker.pid)
"""


def promtool() -> str:
    binary = shutil.which("promtool")
    if binary is None:
        pytest.fail("Debian's promtool is not installed (it comes with the prometheus package)")
    return binary


def test_alert_rules_pass_promtool(tmp_path: Path) -> None:
    for args in ([], ["--window", "1m", "--for", "30s", "--blocked-ratio", "0.2"]):
        result = loopguard("alerts", *args)
        assert result.returncode == 0, result.stderr
        rules = tmp_path / "rules.yml"
        rules.write_text(result.stdout)
        checked = subprocess.run(
            [promtool(), "check", "rules", str(rules)], capture_output=True, text=True, timeout=60
        )
        assert checked.returncode == 0, checked.stdout + checked.stderr
        assert "SUCCESS: 3 rules found" in checked.stdout
    assert "> 0.2" in result.stdout and "[1m]" in result.stdout
    bad = loopguard("alerts", "--for", "ten minutes")
    assert bad.returncode == 2 and "not a Prometheus duration" in bad.stderr


def test_dashboard_is_an_importable_grafana_dashboard() -> None:
    result = loopguard("grafana")
    assert result.returncode == 0, result.stderr
    board = json.loads(result.stdout)
    assert board == json.loads(json.dumps(dashboard()))
    assert board["uid"] == "fastapi-loopguard" and board["schemaVersion"] >= 36
    names = [v["name"] for v in board["templating"]["list"]]
    assert names == ["datasource", "job", "instance"]
    ids = [p["id"] for p in board["panels"]]
    assert len(ids) == len(set(ids))
    for panel in board["panels"]:
        grid = panel["gridPos"]
        assert grid["x"] >= 0 and grid["x"] + grid["w"] <= 24 and grid["h"] > 0
        assert panel["datasource"]["uid"] == "${datasource}" and panel["targets"]
        for target in panel["targets"]:
            assert target["expr"] and target["refId"]
    titles = " ".join(p["title"] for p in board["panels"]).lower()
    for topic in ("route", "kind", "culprit", "lag", "frozen", "worker"):
        assert topic in titles, topic


@pytest.fixture
def blocking_gunicorn(loop_name: str, tmp_path: Path) -> Iterator[str]:
    multiproc = tmp_path / "multiproc"
    multiproc.mkdir()
    conf = tmp_path / "gunicorn.conf.py"
    conf.write_text(GUNICORN_CONF)
    port = free_port()
    log = tmp_path / "gunicorn.log"
    env = {
        **os.environ,
        "PROMETHEUS_MULTIPROC_DIR": str(multiproc),
        "LOOPGUARD_TEST_OPTIONS": json.dumps({"prometheus_enabled": True}),
    }
    cmd = [sys.executable, "-m", "gunicorn", APP, "-w", "2", "-k", WORKERS[loop_name]]
    cmd += ["-b", f"127.0.0.1:{port}", "-c", str(conf), "--graceful-timeout", "5"]
    with open(log, "wb") as out:
        process = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=out, stderr=subprocess.STDOUT)
    try:
        _wait_http(f"http://127.0.0.1:{port}/health", process, log, 30)
        yield f"http://127.0.0.1:{port}"
    finally:
        _stop(process)


def _prometheus(tmp_path: Path, target: str, rules: str) -> tuple[subprocess.Popen[bytes], str]:
    binary = shutil.which("prometheus")
    if binary is None:
        pytest.fail("Debian's prometheus server is not installed (make install installs it)")
    (tmp_path / "rules.yml").write_text(rules)
    config = tmp_path / "prometheus.yml"
    config.write_text(
        "global:\n"
        "  scrape_interval: 1s\n"
        "  scrape_timeout: 1s\n"
        "  evaluation_interval: 1s\n"
        "rule_files:\n"
        "  - rules.yml\n"
        "scrape_configs:\n"
        "  - job_name: app\n"
        "    static_configs:\n"
        f"      - targets: ['{target}']\n"
    )
    port = free_port()
    log = tmp_path / "prometheus.log"
    cmd = [
        binary,
        f"--config.file={config}",
        f"--storage.tsdb.path={tmp_path / 'tsdb'}",
        f"--web.listen-address=127.0.0.1:{port}",
    ]
    with open(log, "wb") as out:
        process = subprocess.Popen(cmd, cwd=tmp_path, stdout=out, stderr=subprocess.STDOUT)
    _wait_http(f"http://127.0.0.1:{port}/-/ready", process, log, 30)
    return process, f"http://127.0.0.1:{port}"


def _firing(prom: str) -> set[str]:
    alerts = _query(prom, 'ALERTS{alertstate="firing"}')
    return {a["metric"]["alertname"] for a in alerts}


def _substitute(expr: str) -> str:
    """What Grafana does to the variables before it sends a query."""
    for name, value in (
        ("$__rate_interval", "20s"),
        ("$__range", "5m"),
        ("$job", ".*"),
        ("$instance", ".*"),
    ):
        expr = expr.replace(name, value)
    return expr


def test_alerts_fire_and_dashboard_queries_answer(blocking_gunicorn: str, tmp_path: Path) -> None:
    rules = loopguard("alerts", "--window", "20s", "--for", "0s")
    assert rules.returncode == 0, rules.stderr
    prometheus, prom = _prometheus(
        tmp_path, blocking_gunicorn.removeprefix("http://"), rules.stdout
    )
    stop = threading.Event()

    def block() -> None:
        # Sustained blocking on one route, a fresh connection each time so both workers take
        # some, until the test has seen what it waits for (bounded by its deadline below).
        with httpx.Client(timeout=30) as client:
            while not stop.is_set():
                client.get(f"{blocking_gunicorn}/sleep/150", headers={"connection": "close"})
                stop.wait(0.1)

    traffic = threading.Thread(target=block, daemon=True)
    try:
        # increase() sees a hang only if Prometheus saw the counter before it: wait for a scrape.
        deadline = time.monotonic() + 30
        while not _query(prom, "loopguard_hangs_total == 0"):
            assert time.monotonic() < deadline, "Prometheus never scraped the app"
            time.sleep(0.2)
        traffic.start()
        httpx.get(f"{blocking_gunicorn}/sleep/1300", timeout=30)  # one hang
        firing: set[str] = set()
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            firing = _firing(prom)
            if {"LoopGuardRouteBlocking", "LoopGuardHang"} <= firing:
                break
            time.sleep(0.5)
        assert {"LoopGuardRouteBlocking", "LoopGuardHang"} <= firing, (
            firing,
            _query(prom, "loopguard_hangs_total[60s]"),
        )
        route = _query(prom, 'ALERTS{alertname="LoopGuardRouteBlocking"}')
        assert "/sleep/{ms}" in {a["metric"]["route"] for a in route}
        assert "LoopGuardEventsDropped" not in firing

        answers: dict[str, list[dict[str, Any]]] = {}
        for expr in expressions():
            answers[expr] = _query(prom, _substitute(expr))  # raises on a PromQL error
        empty = [expr for expr, series in answers.items() if not series]
        assert not empty, empty
        workers = _query(prom, "sum by (worker) (loopguard_worker_blocking_events_total)")
        assert {s["metric"]["worker"] for s in workers} <= {"1", "2", "3", "4"}
        for name, query in VARIABLES:
            metric, label = query.removeprefix("label_values(").removesuffix(")").split(", ")
            values = httpx.get(
                f"{prom}/api/v1/label/{label}/values",
                params={"match[]": _substitute(metric)},
                timeout=5,
            ).json()
            assert values["status"] == "success" and values["data"], (name, values)
    finally:
        stop.set()
        if traffic.is_alive():
            traffic.join(timeout=30)
        _stop(prometheus)
