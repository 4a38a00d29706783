"""pytest plugin of `make test-transparency`: wraps every Starlette app in LoopGuardMiddleware, and
records what the verdict needs.

Test tooling, not part of the package: scripts/transparency/run.py copies it into the suite's
venv (site-packages, so that the guard counts its frames as library code, never as a culprit)
and loads it with ``-p loopguard_transparency`` in all three runs of a framework's suite, so
that its own cost is the same in each:

    --loopguard-inject=off        records only: the suite as shipped
    --loopguard-inject=defaults   every app wrapped, LoopGuardConfig()
    --loopguard-inject=dev_mode   every app wrapped, LoopGuardConfig(dev_mode=True)

The middleware goes where a user puts it with ``add_middleware``, only further out: around the
whole stack that ``build_middleware_stack`` returns (Starlette's, and FastAPI's own override),
so it sees every request and the lifespan. What ``TestClient`` is given directly (a raw ASGI
callable, a Router, a middleware instance) is wrapped there; a Starlette app is not wrapped
twice.

At the end of the session it writes one JSON file (``--loopguard-record=PATH``):

    outcomes  test id -> passed, failed, error, skipped, xfailed or xpassed (collection errors
              under the collector's id)
    output    everything our package said, each with the test it said it in (None: between
              tests): log records of the ``fastapi_loopguard`` logger (with the event's route and
              culprit when there is one), captured stdout/stderr lines that mention loopguard
              (the engine's native lines start with ``loopguard:``), and warnings that do
    threads   the process's threads at the end: every task in /proc/self/task with its name,
              which of them are Python's, and which were born in a LoopGuard.start() (our
              engine's native threads, with the test that started them); the peak task count
    engines   apps wrapped, engines started, engines with threads still alive, and guards that
              still say they run at the end

Lines the engine writes while pytest does not capture (between tests, at exit) land in the
process's real stderr, which run.py keeps and compare.py reads.
"""

from __future__ import annotations

import functools
import gc
import json
import logging
import os
import threading
import time
import weakref
from pathlib import Path
from typing import Any

import pytest

MODES = ("off", "defaults", "dev_mode")


def pytest_addoption(parser: pytest.Parser) -> None:
    group = parser.getgroup("loopguard-transparency")
    group.addoption("--loopguard-inject", choices=MODES, default="off", help="wrap apps how")
    group.addoption("--loopguard-record", default=None, help="write the session's record here")


def pytest_configure(config: pytest.Config) -> None:
    path = config.getoption("--loopguard-record")
    if path is None:
        return
    # xdist workers would each write over the same file; the harness runs suites serially.
    recorder = Recorder(Path(path), config.getoption("--loopguard-inject"))
    config.pluginmanager.register(recorder, "loopguard-transparency-recorder")


# Bound now, before any test runs: Starlette's suite patches these (blockbuster) to fail blocking
# calls made on an event loop, and LoopGuard.start(), which runs there, is where we look at our
# threads. Our looking must not count as the package blocking the loop.
_listdir, _open, _read, _close = os.listdir, os.open, os.read, os.close


def _tids() -> set[int]:
    """Every thread of this process, native ones included (cheap: one directory listing)."""
    return {int(entry) for entry in _listdir("/proc/self/task")}


def _tasks() -> dict[int, str]:
    """Every thread of this process, native ones included: tid -> name (comm)."""
    tasks: dict[int, str] = {}
    for entry in _listdir("/proc/self/task"):
        try:
            fd = _open(f"/proc/self/task/{entry}/comm", os.O_RDONLY)
        except OSError:
            continue  # ended while we looked
        try:
            tasks[int(entry)] = _read(fd, 64).decode(errors="replace").strip()
        except OSError:
            continue
        finally:
            _close(fd)
    return tasks


def _python_tids() -> set[int]:
    return {t.native_id for t in threading.enumerate() if t.native_id is not None}


def _outcome(report: pytest.TestReport, previous: str | None) -> str | None:
    """The test's outcome so far, from the report of one phase (None: nothing to say yet)."""
    xfail = hasattr(report, "wasxfail")
    if report.when == "call":
        if xfail:
            return "xfailed" if report.skipped else "xpassed"
        return report.outcome
    if report.failed:
        # A failed setup, or a teardown failing after a passed call, is an error; a failed call
        # stays a failure.
        return "failed" if previous == "failed" else "error"
    if report.skipped:
        return "xfailed" if xfail else "skipped"
    return previous


class _Handler(logging.Handler):
    """Every record of the ``fastapi_loopguard`` logger, with the test it was logged in."""

    def __init__(self, recorder: Recorder) -> None:
        super().__init__(logging.NOTSET)
        self.recorder = recorder

    def emit(self, record: logging.LogRecord) -> None:
        text = record.getMessage()
        if record.exc_info and record.exc_info[1] is not None:
            text += f" [{type(record.exc_info[1]).__name__}: {record.exc_info[1]}]"
        item: dict[str, Any] = {"kind": "log", "level": record.levelname, "text": text}
        event = getattr(record, "loopguard", None)
        if event is not None:
            culprit = event.culprit
            item["route"] = event.route
            item["method"] = event.method
            item["culprit"] = (
                None if culprit is None else [culprit.filename, culprit.lineno, culprit.function]
            )
        self.recorder.said(item)


class Recorder:
    def __init__(self, path: Path, mode: str) -> None:
        self.path = path
        self.mode = mode
        self.current: str | None = None
        self.outcomes: dict[str, str] = {}
        self.output: list[dict[str, Any]] = []
        self.started = time.monotonic()
        self.peak_tasks = len(_tasks())
        # Our engines' native threads, by tid: which engine (a count), started in which test.
        self.engine_tids: dict[int, tuple[int, str | None]] = {}
        self.guards: weakref.WeakSet[Any] = weakref.WeakSet()
        self.engines_started = 0
        self.apps_wrapped = 0
        self.handler = _Handler(self)
        logging.getLogger("fastapi_loopguard").addHandler(self.handler)
        if mode != "off":
            self._inject()

    def said(self, item: dict[str, Any]) -> None:
        self.output.append({"test": self.current, **item})

    # -- injection ------------------------------------------------------------------------------

    def _inject(self) -> None:
        from starlette.applications import Starlette
        from starlette.testclient import TestClient

        from fastapi_loopguard import LoopGuardConfig, LoopGuardMiddleware
        from fastapi_loopguard.guard import LoopGuard

        dev_mode = self.mode == "dev_mode"

        def wrap(app: Any) -> Any:
            self.apps_wrapped += 1
            return LoopGuardMiddleware(app, config=LoopGuardConfig(dev_mode=dev_mode))

        classes: list[type[Any]] = [Starlette]
        try:
            from fastapi import FastAPI
        except ImportError:
            pass  # the Starlette suite: no FastAPI to wrap
        else:
            classes.append(FastAPI)
        for cls in classes:
            # Only where it is defined: FastAPI overrides Starlette's without calling it.
            if "build_middleware_stack" in vars(cls):
                cls.build_middleware_stack = _wrapped_stack(cls.build_middleware_stack, wrap)

        original_init = TestClient.__init__

        @functools.wraps(original_init)
        def client_init(client: Any, /, *args: Any, **kwargs: Any) -> None:
            # Everything passed on as given: TestClient has a keyword argument named `client`.
            original_init(client, *args, **kwargs)
            if isinstance(args[0] if args else kwargs["app"], Starlette):
                return  # wrapped by its own build_middleware_stack
            # After TestClient's own adaptation (an ASGI2 app is wrapped into ASGI3 first),
            # both places that hold the app: the client's attribute (lifespan) and its transport
            # (requests). Loudly, if starlette.testclient no longer looks like that.
            transport = client._transport
            if getattr(transport, "app", None) is not client.app:
                raise RuntimeError("loopguard_transparency: TestClient internals changed")
            client.app = transport.app = wrap(client.app)

        TestClient.__init__ = client_init  # type: ignore[method-assign,assignment]

        original_start = LoopGuard.start

        @functools.wraps(original_start)
        def start(guard: Any) -> None:
            # The engine's threads are native and unnamed: they are told apart from everything
            # else by being born during start() without being Python threads. start() runs on
            # the loop, so this costs it no more than a directory listing.
            before = _tids()
            original_start(guard)
            born = _tids() - before - _python_tids()
            if born:
                self.engines_started += 1
                self.guards.add(guard)
                self.engine_tids.update(dict.fromkeys(born, (self.engines_started, self.current)))

        LoopGuard.start = start  # type: ignore[method-assign,assignment]

    # -- recording ------------------------------------------------------------------------------

    @pytest.hookimpl(tryfirst=True)
    def pytest_runtest_logstart(self, nodeid: str) -> None:
        self.current = nodeid

    @pytest.hookimpl(trylast=True)
    def pytest_runtest_logfinish(self, nodeid: str) -> None:
        self.current = None
        self.peak_tasks = max(self.peak_tasks, len(_tids()))

    def pytest_runtest_logreport(self, report: pytest.TestReport) -> None:
        outcome = _outcome(report, self.outcomes.get(report.nodeid))
        if outcome is not None:
            self.outcomes[report.nodeid] = outcome
        self._scan(report.nodeid, report.when, report.sections)

    def pytest_collectreport(self, report: pytest.CollectReport) -> None:
        # A module that skips itself, or fails to import, is one outcome, as pytest counts it.
        if report.failed:
            self.outcomes[report.nodeid] = "error"
        elif report.skipped:
            self.outcomes[report.nodeid] = "skipped"
        self._scan(None, "collect", report.sections)

    def _scan(self, nodeid: str | None, when: str | None, sections: list[tuple[str, str]]) -> None:
        for title, text in sections:
            if not title.startswith(("Captured stdout", "Captured stderr")):
                continue  # captured log is seen by the handler, record by record
            for line in text.splitlines():
                if "loopguard" in line.lower():
                    kind = "native" if line.startswith("loopguard:") else "text"
                    self.output.append({"test": nodeid, "kind": kind, "when": when, "text": line})

    def pytest_warning_recorded(
        self, warning_message: Any, when: str, nodeid: str, location: Any
    ) -> None:
        text = f"{warning_message.category.__name__}: {warning_message.message}"
        if "loopguard" in f"{text} {warning_message.filename}".lower():
            self.output.append({"test": nodeid or None, "kind": "warning", "text": text})

    @pytest.hookimpl(trylast=True)
    def pytest_sessionfinish(self, session: pytest.Session) -> None:
        # Whatever a collection can still end (a guard only garbage kept alive) is not a leak.
        gc.collect()
        tasks = _tasks()
        python = _python_tids()
        ours: list[dict[str, Any]] = [
            {"tid": tid, "name": tasks[tid], "engine": engine, "test": test}
            for tid, (engine, test) in sorted(self.engine_tids.items())
            if tid in tasks and tid not in python
        ]
        # Named threads are ours whoever started them (once the engine names its threads).
        ours += [
            {"tid": tid, "name": name, "engine": None, "test": None}
            for tid, name in sorted(tasks.items())
            if name.startswith("loopguard") and tid not in self.engine_tids
        ]
        record = {
            "mode": self.mode,
            "session_s": time.monotonic() - self.started,
            "outcomes": self.outcomes,
            "output": self.output,
            "threads": {
                "tasks": len(tasks),
                "python": sorted(t.name for t in threading.enumerate()),
                # Native threads that are not ours (another library's), for comparison.
                "native_other": sorted(
                    name
                    for tid, name in tasks.items()
                    if tid not in python and tid not in {t["tid"] for t in ours}
                ),
                "ours": ours,
                "peak_tasks": self.peak_tasks,
            },
            "engines": {
                # Proof that the injection took: apps wrapped, engines started.
                "apps_wrapped": self.apps_wrapped,
                "started": self.engines_started,
                # Guards that still say they run; an engine can also outlive its guard (the
                # threads above tell).
                "running": sum(1 for guard in list(self.guards) if guard.running),
                "alive": len({t["engine"] for t in ours if t["engine"] is not None}),
            },
        }
        self.path.write_text(json.dumps(record, indent=1))


def _wrapped_stack(original: Any, wrap: Any) -> Any:
    from fastapi_loopguard import LoopGuardMiddleware

    @functools.wraps(original)
    def build_middleware_stack(app: Any) -> Any:
        stack = original(app)
        # A subclass whose override calls super() must not get two guards.
        return stack if isinstance(stack, LoopGuardMiddleware) else wrap(stack)

    return build_middleware_stack
