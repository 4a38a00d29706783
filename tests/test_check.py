"""`loopguard check`, the CI gate: exit codes, budgets, the baseline, and a test run feeding it.

The command runs in a subprocess, as CI runs it. The last test has pytest (through pytester)
write the event log with --loopguard-events, on asyncio and uvloop, and gates on it.
"""

from __future__ import annotations

import json
import re
import textwrap
import time
from pathlib import Path
from typing import Any

import pytest

from fastapi_loopguard.culprits import culprit_key, function_key

from .conftest import culprit_line
from .test_cli import loopguard
from .test_pytest_plugin import CONFTEST

APP_SOURCE = """
import time


async def build_report():
    time.sleep(0.2)  # culprit:report


async def login():
    total = sum(i * i for i in range(10**7))  # culprit:login
    return total
"""


def app_file(root: Path, source: str = APP_SOURCE) -> Path:
    path = root / "app" / "main.py"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(textwrap.dedent(source).lstrip())
    return path


def record(
    path: Path, marker: str, function: str, kind: str, ms: float, route: str
) -> dict[str, Any]:
    culprit = {"filename": str(path), "lineno": culprit_line(path, marker), "function": function}
    return {
        "type": "event",
        "duration_ms": ms,
        "kind": kind,
        "request_id": "r",
        "method": "GET",
        "path": route,
        "route": route,
        "stack": [culprit],
        "culprit": culprit,
        "cpu_ms": 0.0,
        "victims": 0,
        "started_at": time.time(),
    }


def write_log(path: Path, records: list[dict[str, Any]]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return path


def check(*args: str) -> Any:
    return loopguard("check", *args)


@pytest.fixture
def project(tmp_path: Path) -> tuple[Path, Path]:
    app = app_file(tmp_path)
    log = write_log(
        tmp_path / "events.jsonl",
        [
            record(app, "report", "build_report", "sleep", 200, "/reports"),
            record(app, "report", "build_report", "sleep", 210, "/reports"),
            record(app, "login", "login.<locals>.<genexpr>", "cpu", 120, "/login"),
        ],
    )
    return app, log


def test_any_event_fails_without_a_budget(project: tuple[Path, Path], tmp_path: Path) -> None:
    app, log = project
    result = check(str(log), "--root", str(tmp_path))
    assert result.returncode == 1, result.stdout + result.stderr
    out = result.stdout
    assert out.startswith("loopguard check: FAILED (2 over budget): 3 events, 530 ms")
    assert "new culprit app/main.py:build_report: 2 events, 410 ms, sleep" in out
    assert f"app/main.py:{culprit_line(app, 'report')} (410 ms)  time.sleep(0.2)" in out
    assert "fix: await asyncio.sleep(0.2)" in out
    # A comprehension's frame is its function's culprit (3.12 inlines them anyway).
    assert "new culprit app/main.py:login:" in out
    empty = write_log(tmp_path / "empty.jsonl", [])
    clean = check(str(empty))
    assert clean.returncode == 0 and "OK: 0 events" in clean.stdout


def test_baseline_tolerates_known_culprits_wherever_their_lines_moved(
    project: tuple[Path, Path], tmp_path: Path
) -> None:
    app, log = project
    baseline = tmp_path / "loopguard-baseline.txt"
    written = check(str(log), "--root", str(tmp_path), "--write-baseline", str(baseline))
    assert written.returncode == 0, written.stderr
    keys = [line for line in baseline.read_text().splitlines() if not line.startswith("#")]
    assert keys == ["app/main.py:build_report", "app/main.py:login"]  # relative, no lines
    # The file is edited: lines move. The same culprits still pass.
    moved = app_file(tmp_path, "\n\n\n" + APP_SOURCE)
    later = write_log(
        tmp_path / "later.jsonl",
        [record(moved, "report", "build_report", "sleep", 200, "/reports")],
    )
    ok = check(str(later), "--root", str(tmp_path), "--baseline", str(baseline))
    assert ok.returncode == 0, ok.stdout
    assert "OK: 1 events, 200 ms" in ok.stdout and "every culprit in the baseline" in ok.stdout
    # A new culprit fails, listed with its line and its fix; known ones are not listed.
    app_file(tmp_path, APP_SOURCE + "\n\nasync def export():\n    time.sleep(1)  # culprit:new\n")
    new = write_log(
        tmp_path / "new.jsonl",
        [
            record(moved, "report", "build_report", "sleep", 200, "/reports"),
            record(app, "new", "export", "sleep", 1000, "/export"),
        ],
    )
    failed = check(str(new), "--root", str(tmp_path), "--baseline", str(baseline))
    assert failed.returncode == 1
    out = failed.stdout
    assert "new culprit app/main.py:export (not in the baseline): 1 events, 1000 ms" in out
    assert "fix: await asyncio.sleep(1)" in out
    assert "build_report" not in out


def test_budgets(project: tuple[Path, Path], tmp_path: Path) -> None:
    _, log = project
    assert check(str(log), "--max-events", "3").returncode == 0
    over = check(str(log), "--max-events", "2")
    assert over.returncode == 1 and "3 blocking events, over the budget of 2" in over.stdout
    assert "fix: await asyncio.sleep(0.2)" in over.stdout
    routes = check(str(log), "--max-ms-per-route", "300")
    assert routes.returncode == 1
    assert "GET /reports: 410 ms of blocked loop in 2 events, over the budget of 300 ms" in (
        routes.stdout
    )
    assert "GET /login" not in routes.stdout  # 120 ms: within the budget
    assert check(str(log), "--max-ms-per-route", "500").returncode == 0


def test_unusable_input_exits_2(project: tuple[Path, Path], tmp_path: Path) -> None:
    _, log = project
    missing = check(str(tmp_path / "nope.jsonl"))
    assert missing.returncode == 2 and "cannot read" in missing.stderr
    nothing = check(str(tmp_path / "logs" / "*.jsonl"))
    assert nothing.returncode == 2 and "no file matches" in nothing.stderr
    garbage = tmp_path / "garbage.jsonl"
    garbage.write_text('not json\n{"type": "nope"}\n')
    result = check(str(garbage))
    assert result.returncode == 2 and "no valid record" in result.stderr
    bad = tmp_path / "bad-baseline.txt"
    bad.write_text("no colon here\n")
    result = check(str(log), "--baseline", str(bad))
    assert result.returncode == 2 and "expected file:function" in result.stderr
    assert check(str(log), "--max-events", "-1").returncode == 2  # argparse's own usage error
    # Some broken lines among good ones: warned about, and the good ones are checked.
    mixed = tmp_path / "mixed.jsonl"
    mixed.write_text(log.read_text() + "{truncated\n")
    result = check(str(mixed), "--max-events", "10")
    assert result.returncode == 0 and "1 lines are not valid records" in result.stderr


def test_several_logs_and_globs_are_merged(project: tuple[Path, Path], tmp_path: Path) -> None:
    _, log = project
    logs = tmp_path / "logs"
    logs.mkdir()
    lines = log.read_text().splitlines(keepends=True)
    (logs / "worker-1.jsonl").write_text("".join(lines[:2]))
    (logs / "worker-2.jsonl").write_text("".join(lines[2:]))
    result = check(str(logs / "*.jsonl"), "--max-events", "2")
    assert result.returncode == 1 and "3 blocking events" in result.stdout
    both = check(str(logs / "worker-1.jsonl"), str(logs / "worker-2.jsonl"), "--max-events", "3")
    assert both.returncode == 0


def test_culprit_keys() -> None:
    assert function_key("handler.<locals>.<listcomp>.<genexpr>") == "handler"
    assert function_key("Service.run.<locals>.inner") == "Service.run.<locals>.inner"
    assert function_key("<lambda>") == "<lambda>"
    assert culprit_key("/repo/app/x.py", "f.<locals>.<lambda>", "/repo") == "app/x.py:f"
    assert culprit_key("/elsewhere/x.py", "f", "/repo") == "/elsewhere/x.py:f"


TESTS = """
import asyncio
import time

import pytest


def helper():
    time.sleep(0.15)  # culprit:helper


@pytest.mark.asyncio
@pytest.mark.no_blocking
async def test_blocks():
    await asyncio.sleep(0.01)
    helper()


@pytest.mark.asyncio
@pytest.mark.no_blocking
async def test_clean():
    await asyncio.sleep(0.01)
"""


def test_a_pytest_run_feeds_the_gate(pytester: pytest.Pytester) -> None:
    pytester.makeconftest(CONFTEST)
    path = pytester.makepyfile(test_gate=TESTS)
    events = pytester.path / "events.jsonl"
    events.write_text("stale\n")  # emptied when the run starts
    result = pytester.runpytest_subprocess("-p", "no:cacheprovider", f"--loopguard-events={events}")
    outcomes = result.parseoutcomes()
    assert outcomes.get("failed", 0) >= 2, outcomes  # test_blocks, on both loops
    line = culprit_line(path, "helper")
    # The failure names the fix too.
    assert result.stdout.str().count("fix: await asyncio.sleep(0.15)") >= 2
    written = [json.loads(x) for x in events.read_text().splitlines()]
    blocked = [r for r in written if r["type"] == "event"]
    assert {r["request_id"] for r in blocked} >= {
        f"test test_gate.py::test_blocks[{loop}]" for loop in ("asyncio", "uvloop")
    }
    root = str(pytester.path)
    gate = loopguard("check", str(events), "--root", root)
    assert gate.returncode == 1
    assert re.search(r"new culprit test_gate.py:helper: [2-9] events", gate.stdout), gate.stdout
    assert f"{path}:{line}" in gate.stdout or f"test_gate.py:{line}" in gate.stdout
    assert "fix: await asyncio.sleep(0.15)" in gate.stdout
    per_test = loopguard("check", str(events), "--max-ms-per-route", "100")
    assert per_test.returncode == 1
    assert "label test test_gate.py::test_blocks[asyncio]:" in per_test.stdout
    baseline = pytester.path / "baseline.txt"
    assert (
        loopguard(
            "check", str(events), "--root", root, "--write-baseline", str(baseline)
        ).returncode
        == 0
    )
    assert (
        loopguard("check", str(events), "--root", root, "--baseline", str(baseline)).returncode == 0
    )
