"""The event log: one JSON line per event, a stats record at stop, failures counted and said."""

from __future__ import annotations

import asyncio
import json
import logging
import multiprocessing
import os
import time
from pathlib import Path
from typing import Any

import pytest

from fastapi_loopguard import BlockingEvent, Frame, LoopGuard, LoopGuardConfig, LoopGuardMiddleware
from fastapi_loopguard.eventlog import EventLog
from fastapi_loopguard.report import load_event_log

from .asgi import call, http_scope
from .conftest import culprit_line
from .test_guard import run


def records(path: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_every_event_and_the_stats_are_written(loop_name: str, tmp_path: Path) -> None:
    log = tmp_path / "events.jsonl"

    async def main() -> list[BlockingEvent]:
        config = LoopGuardConfig(event_log_path=str(log), log_blocking_events=False)
        async with LoopGuard(config) as guard:
            for name in ("first", "second"):
                with guard.label(name):
                    await asyncio.sleep(0.03)
                    time.sleep(0.15)  # culprit:logged-sleep
                await asyncio.sleep(0.03)
            await asyncio.sleep(0.05)
            return list(guard.events)

    events = run(loop_name, main)
    written = records(log)
    assert [r["type"] for r in written] == ["event", "event", "stats"]
    for record, event in zip(written, events, strict=False):
        assert record["pid"] == os.getpid()
        assert record["request_id"] == event.request_id
        assert record["duration_ms"] == event.duration_ms
        assert record["kind"] == "sleep"
        assert record["culprit"]["lineno"] == culprit_line(__file__, "logged-sleep")
        assert record["stack"][-1] == record["culprit"]
    assert [r["request_id"] for r in written[:2]] == ["first", "second"]
    stats = written[2]
    assert stats["events_emitted"] == 2
    assert stats["lag_count"] > 0
    assert stats["event_log_lost"] == 0
    report = load_event_log(str(log))
    assert len(report.events) == 2
    assert report.skipped == 0
    assert report.stats[0]["pid"] == os.getpid()


def test_unwritable_log_counts_lost_events_and_recovers(
    loop_name: str, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    folder = tmp_path / "not-yet"
    log = folder / "events.jsonl"

    async def main() -> int:
        config = LoopGuardConfig(event_log_path=str(log), log_blocking_events=False)
        async with LoopGuard(config) as guard:
            for _ in range(2):  # the folder does not exist: both are lost, said once
                with guard.label("lost"):
                    await asyncio.sleep(0.03)
                    time.sleep(0.12)
                await asyncio.sleep(0.05)
            folder.mkdir()
            with guard.label("kept"):
                await asyncio.sleep(0.03)
                time.sleep(0.12)
            await asyncio.sleep(0.05)
            return len(guard.events)

    caplog.set_level(logging.WARNING, logger="fastapi_loopguard")
    assert run(loop_name, main) == 3  # the app side never noticed
    assert caplog.text.count("cannot write the event log") == 1
    assert "works again; 2 events were lost" in caplog.text
    written = records(log)
    assert [(r["type"], r.get("request_id")) for r in written] == [
        ("event", "kept"),
        ("stats", None),
    ]
    assert written[1]["event_log_lost"] == 2


HOSTILE = '/a\r\n{"type": "stats"}\n</script><script>alert(1)</script>\x1b[31m\u2028'


def test_hostile_request_path_stays_one_record(loop_name: str, tmp_path: Path) -> None:
    log = tmp_path / "events.jsonl"

    async def app(scope: Any, receive: Any, send: Any) -> None:
        time.sleep(0.12)
        await send({"type": "http.response.start", "status": 200, "headers": []})
        await send({"type": "http.response.body", "body": b""})

    async def main() -> None:
        config = LoopGuardConfig(event_log_path=str(log), log_blocking_events=False)
        middleware = LoopGuardMiddleware(app, config)
        await call(middleware, http_scope(HOSTILE))
        await asyncio.sleep(0.1)
        middleware.guard.stop()

    run(loop_name, main)
    text = log.read_text()
    assert text.isascii()
    written = records(log)
    # The request blocked, so its end writes a request record after the event, path and all.
    assert [r["type"] for r in written] == ["event", "request", "stats"]
    assert written[0]["path"] == HOSTILE  # kept exactly, escaped only by JSON
    assert written[1]["path"] == HOSTILE
    assert written[1]["blocks"] == 1 and written[1]["block_ms"] >= 100


def _append_many(path: str, tag: str, count: int) -> None:
    log = EventLog(path)
    # A long stack makes each line several KiB, so interleaving writes would show.
    stack = tuple(Frame(f"/srv/app/{tag}/module_{i}.py", i, f"function_{i}") for i in range(60))
    for i in range(count):
        log.write_event(
            BlockingEvent(
                duration_ms=float(i),
                kind="cpu",
                request_id=f"{tag}-{i}",
                method="GET",
                path=f"/{tag}/{i}",
                route=None,
                stack=stack,
                culprit=stack[-1],
                cpu_ms=1.0,
                victims=0,
                started_at=time.time(),
            )
        )
    log.close()


def test_processes_can_share_one_log(tmp_path: Path) -> None:
    path = str(tmp_path / "events.jsonl")
    context = multiprocessing.get_context("spawn")
    workers = [context.Process(target=_append_many, args=(path, t, 150)) for t in ("a", "b", "c")]
    for worker in workers:
        worker.start()
    for worker in workers:
        worker.join(timeout=60)
        assert worker.exitcode == 0
    written = records(Path(path))  # every line parses: no record was torn or interleaved
    assert len(written) == 450
    assert {r["request_id"] for r in written} == {f"{t}-{i}" for t in "abc" for i in range(150)}
    assert len({r["pid"] for r in written}) == 3
