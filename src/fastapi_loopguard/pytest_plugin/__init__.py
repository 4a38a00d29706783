"""pytest plugin: fail a test whose code blocks an event loop, async or sync.

Registered through the ``pytest11`` entry point, and inert unless used: only a test marked
``@pytest.mark.no_blocking``, one using the ``loopguard`` fixture, or every test in whole-suite
mode (``--loopguard`` or the ``loopguard_all`` ini option; ``@pytest.mark.allow_blocking`` opts
out) is watched, and only then is anything but pytest imported, or the native engine loaded.

A watched test's blocks are what these guards report while its body runs:

- **The plugin's, on every loop the test runs or starts, in any thread** (``TestClient`` with or
  without ``with``, ``asyncio.run``, anyio's blocking portals, on asyncio or uvloop): while the
  test and its fixtures are set up and run, a loop that starts running gets one, started right
  before its first iteration; it follows the loop until the loop closes.
- **On an async test's own loop** (pytest-asyncio, anyio) the test's coroutine function is
  wrapped, so that whichever runner drives it the test's code runs under a label the watchdog
  attributes blocks to. Work the test spawns inherits the label; other tasks on that loop
  (fixtures, servers) are not blamed on it.
- **The app's own** ``LoopGuardMiddleware``: every guard in the process hands its events to the
  plugin (``delivery.add_observer``), so a block inside a request names the request. When two
  guards saw the same block on one loop, the app's event is kept, because it names the request.

    @pytest.mark.no_blocking
    def test_handler():
        with TestClient(app) as client:
            client.get("/items")         # fails if the handler blocks the loop

    async def test_partial(loopguard):
        await warm_up()                  # may block: not checked
        loopguard.reset()
        await handler()
        loopguard.assert_no_blocking()
"""

from __future__ import annotations

import inspect
from collections.abc import Generator
from typing import Any

import pytest

from .watch import Blocked, LoopGuardFixture, guarded

MARKER = "no_blocking"
ALLOW_MARKER = "allow_blocking"
INI_THRESHOLD = "loopguard_threshold_ms"
EVENTS_OPTION = "--loopguard-events"
INI_ALL = "loopguard_all"
OPTION_ALL = "--loopguard"
DEFAULT_THRESHOLD_MS = "50"

_WATCH = pytest.StashKey[LoopGuardFixture]()
_BLOCKED = pytest.StashKey[list[Blocked]]()


def pytest_addoption(parser: pytest.Parser) -> None:
    parser.addini(
        INI_THRESHOLD,
        "fastapi-loopguard: loop lag (ms) above which a test's code counts as blocking",
        default=DEFAULT_THRESHOLD_MS,
    )
    parser.addini(
        INI_ALL,
        f"fastapi-loopguard: check every test as if marked {MARKER} (except {ALLOW_MARKER})",
        type="bool",
        default=False,
    )
    group = parser.getgroup("loopguard", "fastapi-loopguard")
    group.addoption(
        EVENTS_OPTION,
        metavar="PATH",
        help="write the watched tests' blocking events to PATH (JSON lines, emptied when the "
        "run starts), for `loopguard check` and `loopguard report`",
    )
    group.addoption(
        OPTION_ALL,
        action="store_true",
        dest="loopguard",
        help=f"check every test as if marked {MARKER} (except those marked {ALLOW_MARKER})",
    )


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line(
        "markers",
        f"{MARKER}: fail this test if its code blocks an event loop, its own or one it starts "
        "(fastapi-loopguard)",
    )
    config.addinivalue_line(
        "markers",
        f"{ALLOW_MARKER}: never fail this test for blocking, even with {OPTION_ALL} "
        "(fastapi-loopguard)",
    )
    config.stash[_BLOCKED] = []
    path = config.getoption(EVENTS_OPTION)
    if path and not hasattr(config, "workerinput"):  # once per run, not per xdist worker
        open(path, "w").close()


def _record(config: pytest.Config, blocked: Blocked) -> None:
    """Keeps a blocking test for the summary, and its events in the event log if asked for."""
    config.stash[_BLOCKED].append(blocked)
    path = config.getoption(EVENTS_OPTION)
    if path:
        from ..eventlog import EventLog

        log = EventLog(path)
        for event in blocked.events:
            log.write_event(event)
        log.close()


# -- hooks --------------------------------------------------------------------------------------


def _threshold_ms(config: pytest.Config) -> float:
    raw = config.getini(INI_THRESHOLD)
    try:
        value = float(raw)
    except (TypeError, ValueError):
        raise pytest.UsageError(
            f"{INI_THRESHOLD} must be a number of milliseconds, got {raw!r}"
        ) from None
    if not 1 <= value <= 3_600_000:
        raise pytest.UsageError(f"{INI_THRESHOLD} must be in [1, 3.6e+06], got {raw!r}")
    return value


def _watch_for(item: pytest.Item) -> LoopGuardFixture | None:
    """The watch for a test that is checked or uses the fixture; None for any other."""
    if not isinstance(item, pytest.Function):
        return None
    config = item.config
    strict = item.get_closest_marker(ALLOW_MARKER) is None and (
        item.get_closest_marker(MARKER) is not None
        or config.getoption("loopguard")
        or config.getini(INI_ALL)
    )
    if not strict and "loopguard" not in item.fixturenames:
        return None
    return LoopGuardFixture(
        _threshold_ms(config),
        item.nodeid,
        strict=bool(strict),
    )


@pytest.fixture
def loopguard(request: pytest.FixtureRequest) -> LoopGuardFixture:
    """The blocking events of this test, and ``assert_no_blocking()``."""
    watch: LoopGuardFixture | None = request.node.stash.get(_WATCH, None)
    if watch is None:  # asked for from the test body (getfixturevalue): watched from now on
        watch = LoopGuardFixture(_threshold_ms(request.config), request.node.nodeid, strict=False)
        request.node.stash[_WATCH] = watch
        watch.begin()
    return watch


@pytest.hookimpl(wrapper=True)
def pytest_runtest_setup(item: pytest.Item) -> Generator[None, None, None]:
    watch = _watch_for(item)
    if watch is not None:
        item.stash[_WATCH] = watch
        # Already during setup: a fixture's TestClient starts its loop there.
        watch.watch_loops()
    return (yield)


@pytest.hookimpl(wrapper=True)
def pytest_runtest_call(item: pytest.Item) -> Generator[None, Any, Any]:
    watch = item.stash.get(_WATCH, None)
    if watch is None or not isinstance(item, pytest.Function):
        return (yield)
    original = item.obj
    if inspect.iscoroutinefunction(original):
        item.obj = guarded(original, watch)
    watch.begin()
    try:
        result = yield
    finally:
        item.obj = original
        blocked = watch.end()
        if blocked is not None:
            _record(item.config, blocked)
    watch.check()
    return result


@pytest.hookimpl(tryfirst=True)
def pytest_runtest_teardown(item: pytest.Item) -> None:
    watch = item.stash.get(_WATCH, None)
    if watch is None:
        return
    # Still recording when the fixture was first asked for from the test body.
    blocked = watch.end()
    if blocked is not None:
        _record(item.config, blocked)
    # Setup may have failed before the body ran; the loops the fixtures' teardown starts are
    # not the test's either way.
    watch.stop_watching_loops()


@pytest.hookimpl(wrapper=True, tryfirst=True)
def pytest_terminal_summary(
    terminalreporter: Any, config: pytest.Config
) -> Generator[None, None, None]:
    # Outermost, and after the others: the list comes last, right above the final counts.
    yield
    blocked = config.stash.get(_BLOCKED, [])
    if not blocked:
        return
    terminalreporter.section("fastapi-loopguard: tests that blocked the event loop, worst first")
    for entry in sorted(blocked, key=lambda b: b.total_ms, reverse=True):
        count = len(entry.events) + entry.undelivered
        line = f"{entry.total_ms:9.1f} ms in {count} block(s)  {entry.nodeid}"
        if entry.events:
            worst = max(entry.events, key=lambda e: e.duration_ms)
            where = "<stack unavailable>"
            if worst.culprit is not None:
                where = f"{_relative(worst.culprit.filename, config)}:{worst.culprit.lineno}"
            line += f"  (worst: {worst.kind}, {worst.duration_ms:.1f} ms, {where})"
        terminalreporter.line(line)


def _relative(filename: str, config: pytest.Config) -> str:
    """A culprit's file as pytest shows test files: relative to the rootdir, if inside it."""
    import os

    path = os.path.relpath(filename, config.rootpath)
    return filename if path.startswith(os.pardir) else path
