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

import functools
import inspect
import threading
import time
from collections.abc import Callable, Coroutine, Generator
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import pytest

if TYPE_CHECKING:
    import asyncio

    from .config import LoopGuardConfig
    from .events import BlockingEvent, RequestInfo
    from .guard import LoopGuard

MARKER = "no_blocking"
ALLOW_MARKER = "allow_blocking"
INI_THRESHOLD = "loopguard_threshold_ms"
EVENTS_OPTION = "--loopguard-events"
INI_ALL = "loopguard_all"
OPTION_ALL = "--loopguard"
DEFAULT_THRESHOLD_MS = "50"
# How long to wait, after the test body, for the watchdogs to hand over the blocks they saw.
SETTLE_TIMEOUT_S = 1.0

_WATCH = pytest.StashKey["LoopGuardFixture"]()
_BLOCKED = pytest.StashKey[list["_Blocked"]]()


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


@dataclass(frozen=True)
class _Seen:
    """An event another guard delivered while the test ran, and the loop it was on."""

    loop: asyncio.AbstractEventLoop | None
    event: BlockingEvent
    own: bool  # from one of the plugin's guards, rather than the app's


@dataclass(frozen=True)
class _Blocked:
    """A watched test that blocked, for the session summary."""

    nodeid: str
    events: list[BlockingEvent]
    undelivered: int

    @property
    def total_ms(self) -> float:
        return sum(e.duration_ms for e in self.events)


class LoopGuardFixture:
    """What the ``loopguard`` fixture gives a test: its blocking events, and an assertion.

    Also the plugin's record of every watched test, fixture or not.
    """

    def __init__(self, threshold_ms: float, nodeid: str, *, strict: bool) -> None:
        self.threshold_ms = threshold_ms
        self.nodeid = nodeid
        self.strict = strict
        # An async test's: the plugin's guard on the loop that runs the test's coroutine.
        self.guard: LoopGuard | None = None
        self._label = f"test {nodeid}"
        self._info: RequestInfo | None = None
        self._test_loop: asyncio.AbstractEventLoop | None = None
        # What the guard knew of the test's code when the body ended: its live count, and its
        # events (its counters for the test's label end with the label).
        self._frozen: tuple[int, list[BlockingEvent]] | None = None
        self._seen: list[_Seen] = []
        self._problems: list[str] = []
        self._since = 0.0  # wall clock at the start of the test body
        self._skip_seen = 0
        self._skip_events = 0
        self._skip_count = 0
        self._previous: LoopGuardFixture | None = None
        self._watching_loops = False
        self._recording = False

    # -- the fixture's API ----------------------------------------------------------------------

    @property
    def events(self) -> list[BlockingEvent]:
        """The test's blocking events delivered so far (since the last ``reset``)."""
        self._catch_up()
        return self._tally()[0]

    def reset(self) -> None:
        """Forgets what blocked so far: later assertions look only at what follows."""
        self._catch_up()
        self._skip_seen = len(self._seen)
        self._skip_events = len(self._test_events())
        self._skip_count = self._test_count()

    def assert_no_blocking(self) -> None:
        """Fails the test if its code has blocked the loop (since the last ``reset``)."""
        self._catch_up()
        message = self._failure()
        if message:
            pytest.fail(message, pytrace=False)

    # -- the test's life, driven by the hooks below ---------------------------------------------

    def watch_loops(self) -> None:
        """From now on (the test's setup), every loop that starts running gets a guard."""
        global _current
        if self._watching_loops:
            return
        _hook_loops()
        self._watching_loops = True
        self._previous, _current = _current, self

    def stop_watching_loops(self) -> None:
        global _current
        if not self._watching_loops:
            return
        self._watching_loops = False
        if _current is self:
            _current = self._previous
        _release_idle_guards()

    def begin(self) -> None:
        """The test body starts: from now on the events of every guard are the test's."""
        from .delivery import add_observer

        self.watch_loops()
        self._since = time.time()
        self._recording = True
        add_observer(self._observe)

    def end(self) -> _Blocked | None:
        """The test body is over: collects what every guard still held. None if nothing blocked."""
        from .delivery import remove_observer

        if not self._recording:
            return None
        try:
            _settle_loops(SETTLE_TIMEOUT_S)
        finally:
            remove_observer(self._observe)
            self._recording = False
            self.stop_watching_loops()
        events, undelivered = self._tally()
        if not events and not undelivered:
            return None
        return _Blocked(self.nodeid, events, undelivered)

    def check(self) -> None:
        """The verdict on a strict (marked, or whole-suite) test whose body passed."""
        if not self.strict:
            return
        message = self._failure()
        if message:
            pytest.fail(message, pytrace=False)

    # -- bookkeeping ----------------------------------------------------------------------------

    def _observe(self, guard: LoopGuard, event: BlockingEvent) -> None:
        # On the loop thread that delivers the event.
        loop = guard.loop
        own = guard in _own_guards
        if event.duration_ms < self.threshold_ms:
            return  # an app guard with a lower threshold than the tests'
        if event.started_at + event.duration_ms / 1000 < self._since:
            return  # over before the test body began (its setup), delivered only now
        if loop is not None and loop is self._test_loop:
            # The async test's own loop: the test's code is read through its label, with the
            # live counters; other tasks there (fixtures, servers) are not blamed on it, only
            # the requests it made.
            if own or event.request_id is None:
                return
        elif not own and event.request_id is None and not _own_guard_on(loop):
            return  # an app's block outside requests on a loop the test did not start
        self._seen.append(_Seen(loop, event, own))

    def _catch_up(self) -> None:
        """Has every guard hand over what it holds, as far as that is possible from here."""
        if self.guard is not None and self._frozen is None:
            self.guard.deliver()
        if self._recording and not _in_running_loop():
            _settle_loops(SETTLE_TIMEOUT_S)

    def _test_events(self) -> list[BlockingEvent]:
        if self._frozen is not None:
            return self._frozen[1]
        if self.guard is None or self._info is None:
            return []
        return self.guard.events_of(self._info)

    def _test_count(self) -> int:
        """The label's live count: the guard knows of a block before its event is delivered."""
        if self._frozen is not None:
            return self._frozen[0]
        if self.guard is None or self._info is None:
            return 0
        return self.guard.blocking_of(self._info)[0]

    def _freeze(self) -> None:
        """Keeps what the guard knows of the test's code before the label ends with the body
        (the label's live counters end with it)."""
        if self._frozen is None:
            self._frozen = (self._test_count(), list(self._test_events()))

    def _tally(self) -> tuple[list[BlockingEvent], int]:
        """The test's blocks (since the last reset), one event per block, and how many blocks
        the live counters know of that no event has been delivered for yet."""
        seen = self._seen[self._skip_seen :]
        test_events = self._test_events()[self._skip_events :]
        app = [s for s in seen if not s.own]
        ours = [s for s in seen if s.own] + [_Seen(self._test_loop, e, True) for e in test_events]
        kept = [
            s.event
            for s in ours
            if not any(a.loop is s.loop and _same_block(a.event, s.event) for a in app)
        ]
        events = sorted([a.event for a in app] + kept, key=lambda e: e.started_at)
        undelivered = max(0, self._test_count() - self._skip_count - len(test_events))
        return events, undelivered

    def _failure(self) -> str | None:
        events, undelivered = self._tally()
        if self._problems:
            return f"{self.nodeid}: fastapi-loopguard could not watch a loop: {self._problems[0]}"
        if not events and not undelivered:
            return None
        lines = [
            f"{self.nodeid} blocked the event loop {len(events) + undelivered} time(s) "
            f"(threshold {self.threshold_ms:g} ms):"
        ]
        from .hints import hint_for_event

        for event in events:
            lines.append(f"  {_describe(event, self._label)}")
            lines.append(f"    fix: {hint_for_event(event)}")
        if undelivered:
            lines.append(f"  ({undelivered} more not yet delivered by the watchdog)")
        return "\n".join(lines)

    def _loop_starts(self, loop: asyncio.AbstractEventLoop) -> None:
        """On the thread about to run ``loop``: gives it a guard, unless it has one of ours."""
        import asyncio

        if asyncio._get_running_loop() is not None:
            return  # a nested run, which is about to fail anyway
        # The guard binds to the running loop, and this one runs right after: started now (not
        # in a callback), it is watching before the first callback, which may be the one that
        # blocks (a coroutine given to asyncio.run that blocks before its first await).
        asyncio._set_running_loop(loop)
        try:
            self._guard_on(loop)
        except Exception as error:  # the engine cannot load: the verdict says so
            self._problems.append(str(error))
        finally:
            asyncio._set_running_loop(None)

    def _guard_on(self, loop: asyncio.AbstractEventLoop) -> LoopGuard:
        """The plugin's guard on ``loop``, the running loop, started if it has none yet.

        One per loop, whichever test started it: it follows the loop until the loop closes (a
        loop several tests share keeps it), and an async test's label uses it too.
        """
        from .guard import LoopGuard

        with _own_lock:
            guard = next((g for g in _own_guards if g.loop is loop), None)
            if guard is not None:
                return guard
            guard = LoopGuard(_guard_config(self.threshold_ms))
            guard.start()
            _own_guards.append(guard)
            return guard

    async def _settle(self) -> None:
        if self.guard is not None and self._info is not None:
            count = self.guard.blocking_of(self._info)[0]
            await self.guard.wait_for_events(self._info, count, SETTLE_TIMEOUT_S)


def _record(config: pytest.Config, blocked: _Blocked) -> None:
    """Keeps a blocking test for the summary, and its events in the event log if asked for."""
    config.stash[_BLOCKED].append(blocked)
    path = config.getoption(EVENTS_OPTION)
    if path:
        from .eventlog import EventLog

        log = EventLog(path)
        for event in blocked.events:
            log.write_event(event)
        log.close()


def _describe(event: BlockingEvent, test_label: str) -> str:
    """One block: its ms, kind and culprit line, and the request when there is one."""
    culprit = event.culprit
    where = (
        f"{culprit.filename}:{culprit.lineno} in {culprit.function}"
        if culprit is not None
        else "<stack unavailable>"
    )
    text = f"{event.duration_ms:.1f} ms {event.kind} at {where}"
    if event.method is not None:
        text += f" ({event.method} {event.path})"
    elif event.request_id is not None and event.request_id != test_label:
        text += f" ({event.request_id})"  # a label of the app's: lifespan.startup, ...
    return text


def _same_block(a: BlockingEvent, b: BlockingEvent) -> bool:
    """Whether two guards' events on one loop are the same block: they share most of it."""
    if a.kind == "cumulative" or b.kind == "cumulative":
        return False  # a sum of steps, not one stretch of time
    start = max(a.started_at, b.started_at)
    end = min(a.started_at + a.duration_ms / 1000, b.started_at + b.duration_ms / 1000)
    return end - start >= min(a.duration_ms, b.duration_ms) / 2000


def _guard_config(threshold_ms: float) -> LoopGuardConfig:
    from .config import LoopGuardConfig

    return LoopGuardConfig(
        fallback_threshold_ms=threshold_ms,
        calibration_iterations=0,  # the threshold is the ini value, not a measurement
        log_blocking_events=False,  # the failure message says it all
    )


# -- loops the tests start ----------------------------------------------------------------------

# The test whose loops are being watched (its setup and body), if any.
_current: LoopGuardFixture | None = None
# The plugin's guards on loops tests started. A guard follows its loop and stops when it closes;
# the ones left are let go of when their loop sits idle after a test (see _release_idle_guards).
_own_guards: list[LoopGuard] = []
_own_lock = threading.Lock()
_hooked = False


def _hook_loops() -> None:
    """Wraps ``run_forever`` of asyncio's and uvloop's loop classes, once per process.

    Every way of running a loop ends up there (``run_until_complete``, ``asyncio.Runner`` and so
    ``asyncio.run``, anyio's portals and so ``TestClient``, whatever the loop factory), on the
    thread that runs it. The wrappers stay: they do nothing while no test is watched, and taking
    them off again could also take off whatever was put on top of them later.
    """
    global _hooked
    if _hooked:
        return
    _hooked = True
    import asyncio

    _wrap_run_forever(asyncio.BaseEventLoop)
    try:
        import uvloop
    except ImportError:
        return
    _wrap_run_forever(uvloop.Loop)


def _wrap_run_forever(cls: type[Any]) -> None:
    original: Callable[[Any], None] = cls.run_forever

    @functools.wraps(original)
    def run_forever(self: Any) -> None:
        watch = _current
        if watch is not None:
            watch._loop_starts(self)
        original(self)

    setattr(cls, "run_forever", run_forever)  # noqa: B010 (mypy: no assigning to a method)


def _own_guard_on(loop: asyncio.AbstractEventLoop | None) -> bool:
    return loop is not None and any(g.loop is loop for g in _own_guards)


def _release_idle_guards() -> None:
    """After a test, stops the plugin's guards on loops that are neither running nor closed.

    A loop left unclosed would otherwise be kept alive, with its engine's threads, by the guard
    (the next test that runs it gives it a new one). One whose loop another guard also watches
    stays: taking its pulse off that loop could take the other guard's with it.
    """
    from .guard import _live_guards

    idle: list[LoopGuard] = []
    with _own_lock:
        keep: list[LoopGuard] = []
        for guard in _own_guards:
            loop = guard.loop
            if loop is None:
                continue  # stopped with its loop
            shared = any(g is not guard and g.loop is loop for g in _snapshot(_live_guards))
            (keep if loop.is_running() or shared else idle).append(guard)
        _own_guards[:] = keep
    for guard in idle:
        guard.stop()


def _snapshot(guards: Any) -> list[LoopGuard]:
    """A copy of a WeakSet of guards that loop threads may change while it is copied."""
    while True:
        try:
            return list(guards)
        except RuntimeError:  # "set changed size during iteration": just copy it again
            continue


def _in_running_loop() -> bool:
    import asyncio

    return asyncio._get_running_loop() is not None


def _settle_loops(timeout: float) -> None:
    """Waits (bounded) until every loop running in another thread has gone round twice.

    A block outside requests is delivered in the loop iteration after it ended; the test's
    thread may be done with it (a ``TestClient`` response) before that. Two iterations after
    this call, everything that ended before it has been delivered.
    """
    import asyncio

    from .guard import _live_guards

    here = asyncio._get_running_loop()
    loops: dict[int, asyncio.AbstractEventLoop] = {}
    for guard in _snapshot(_live_guards):
        loop = guard.loop
        if loop is not None and loop is not here and loop.is_running():
            loops[id(loop)] = loop
    waits = []
    for loop in loops.values():
        went_round = threading.Event()
        try:
            loop.call_soon_threadsafe(loop.call_soon, went_round.set)
        except RuntimeError:  # closed in the meantime: it delivered everything then
            continue
        waits.append(went_round)
    deadline = time.monotonic() + timeout
    for went_round in waits:
        went_round.wait(max(0.0, deadline - time.monotonic()))


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


def _guarded(
    func: Callable[..., Coroutine[Any, Any, Any]], watch: LoopGuardFixture
) -> Callable[..., Coroutine[Any, Any, Any]]:
    @functools.wraps(func)
    async def run_guarded(*args: Any, **kwargs: Any) -> Any:
        import asyncio

        try:
            loop = asyncio.get_running_loop()
        except RuntimeError:
            pytest.fail("fastapi-loopguard needs an asyncio event loop (trio is not supported)")
        # Usually started when the loop began to run (for the test's async fixtures); not if
        # it was already running before this test.
        guard = watch._guard_on(loop)
        watch.guard, watch._test_loop = guard, loop
        with guard.label(watch._label) as info:
            watch._info = info
            try:
                result = await func(*args, **kwargs)
                await watch._settle()
            finally:
                watch._freeze()
        return result

    return run_guarded


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
        item.obj = _guarded(original, watch)
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
