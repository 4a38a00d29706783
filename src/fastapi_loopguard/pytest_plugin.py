"""pytest plugin: fail an async test whose own code blocks the event loop.

Registered through the ``pytest11`` entry point, and inert unless a test asks for it: only a test
marked ``@pytest.mark.no_blocking`` or using the ``loopguard`` fixture starts a guard (and only
then is the native engine loaded).

How: just before such a test runs, its coroutine function is wrapped, so that whichever runner
drives it (pytest-asyncio, anyio) the guard starts on the very loop that runs the test, and the
test's code runs under a label the watchdog attributes blocks to. Work the test spawns inherits
the label; other tasks on that loop (fixtures, servers) are not blamed on it.

    @pytest.mark.no_blocking
    async def test_handler():
        await handler()          # fails if handler() blocks the loop

    async def test_partial(loopguard):
        await warm_up()          # may block: not checked
        loopguard.reset()
        await handler()
        loopguard.assert_no_blocking()
"""

from __future__ import annotations

import asyncio
import functools
import inspect
from collections.abc import Callable, Coroutine, Generator
from typing import TYPE_CHECKING, Any

import pytest

from .hints import hint_for_event

if TYPE_CHECKING:
    from .events import BlockingEvent
    from .guard import LoopGuard, RequestInfo

MARKER = "no_blocking"
INI_THRESHOLD = "loopguard_threshold_ms"
EVENTS_OPTION = "--loopguard-events"
DEFAULT_THRESHOLD_MS = "50"
# How long to wait, after the test body, for the watchdog to hand over a block it counted.
SETTLE_TIMEOUT_S = 1.0


def pytest_addoption(parser: pytest.Parser) -> None:
    parser.addini(
        INI_THRESHOLD,
        "fastapi-loopguard: loop lag (ms) above which a test's code counts as blocking",
        default=DEFAULT_THRESHOLD_MS,
    )
    parser.addoption(
        EVENTS_OPTION,
        metavar="PATH",
        help="fastapi-loopguard: write the guarded tests' blocking events to PATH (JSON lines, "
        "emptied when the run starts), for `loopguard check` and `loopguard report`",
    )


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line(
        "markers",
        f"{MARKER}: fail this async test if its code blocks the event loop (fastapi-loopguard)",
    )
    path = config.getoption(EVENTS_OPTION)
    if path and not hasattr(config, "workerinput"):  # once per run, not per xdist worker
        open(path, "w").close()


class LoopGuardFixture:
    """What the ``loopguard`` fixture gives a test: its blocking events, and an assertion."""

    def __init__(self, threshold_ms: float, nodeid: str, events_path: str | None = None) -> None:
        self.threshold_ms = threshold_ms
        self.nodeid = nodeid
        self.events_path = events_path
        self.guard: LoopGuard | None = None
        self._info: RequestInfo | None = None
        self._skip_events = 0
        self._skip_count = 0

    @property
    def events(self) -> list[BlockingEvent]:
        """The test's blocking events delivered so far (since the last ``reset``)."""
        if self.guard is None or self._info is None:
            return []
        self.guard._drain()
        return self.guard.events_of(self._info)[self._skip_events :]

    def reset(self) -> None:
        """Forgets what blocked so far: later assertions look only at what follows."""
        if self.guard is not None and self._info is not None:
            self._skip_events = len(self.guard.events_of(self._info))
            self._skip_count = self.guard.blocking_of(self._info)[0]

    def assert_no_blocking(self) -> None:
        """Fails the test if its code has blocked the loop (since the last ``reset``)."""
        message = self._failure()
        if message:
            pytest.fail(message, pytrace=False)

    def _count(self) -> tuple[int, float]:
        if self.guard is None or self._info is None:
            return 0, 0.0
        count, total_ms = self.guard.blocking_of(self._info)
        return count - self._skip_count, total_ms

    def _failure(self) -> str | None:
        # The live counters know of a block as soon as it happened; its event (with the culprit)
        # comes a watchdog tick later. Either one is proof.
        events = self.events
        count, _ = self._count()
        if not events and count <= 0:
            return None
        lines = [
            f"{self.nodeid} blocked the event loop {max(count, len(events))} time(s) "
            f"(threshold {self.threshold_ms:g} ms):"
        ]
        for event in events:
            where = (
                f"{event.culprit.filename}:{event.culprit.lineno} in {event.culprit.function}"
                if event.culprit is not None
                else "<stack unavailable>"
            )
            lines.append(f"  {event.duration_ms:.1f} ms {event.kind} at {where}")
            lines.append(f"    fix: {hint_for_event(event)}")
        if len(events) < count:
            lines.append(f"  ({count - len(events)} more not yet delivered by the watchdog)")
        return "\n".join(lines)

    async def _settle(self) -> None:
        if self.guard is not None and self._info is not None:
            count = self.guard.blocking_of(self._info)[0]
            await self.guard.wait_for_events(self._info, count, SETTLE_TIMEOUT_S)


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


@pytest.fixture
def loopguard(request: pytest.FixtureRequest) -> LoopGuardFixture:
    """The blocking events of this async test, and ``assert_no_blocking()``."""
    return LoopGuardFixture(
        _threshold_ms(request.config),
        request.node.nodeid,
        request.config.getoption(EVENTS_OPTION),
    )


def _guarded(
    func: Callable[..., Coroutine[Any, Any, Any]], state: LoopGuardFixture, strict: bool
) -> Callable[..., Coroutine[Any, Any, Any]]:
    @functools.wraps(func)
    async def run_guarded(*args: Any, **kwargs: Any) -> Any:
        from .config import LoopGuardConfig
        from .guard import LoopGuard

        try:
            asyncio.get_running_loop()
        except RuntimeError:
            pytest.fail("fastapi-loopguard needs an asyncio event loop (trio is not supported)")
        config = LoopGuardConfig(
            fallback_threshold_ms=state.threshold_ms,
            calibration_iterations=0,  # the threshold is the ini value, not a measurement
            log_blocking_events=False,  # the failure message says it all
            event_log_path=state.events_path,
        )
        async with LoopGuard(config) as guard:
            state.guard = guard
            with guard.label(f"test {state.nodeid}") as info:
                state._info = info
                result = await func(*args, **kwargs)
                await state._settle()
            if strict:
                state.assert_no_blocking()
            return result

    return run_guarded


@pytest.hookimpl(wrapper=True)
def pytest_runtest_call(item: pytest.Item) -> Generator[None, Any, Any]:
    marked = item.get_closest_marker(MARKER) is not None
    fixture = getattr(item, "funcargs", {}).get("loopguard")
    if not (marked or isinstance(fixture, LoopGuardFixture)) or not isinstance(
        item, pytest.Function
    ):
        return (yield)
    if not inspect.iscoroutinefunction(item.obj):
        raise pytest.UsageError(
            f"{item.nodeid}: @pytest.mark.{MARKER} and the loopguard fixture apply to async "
            "tests (run by pytest-asyncio or anyio)"
        )
    if not isinstance(fixture, LoopGuardFixture):
        fixture = LoopGuardFixture(
            _threshold_ms(item.config), item.nodeid, item.config.getoption(EVENTS_OPTION)
        )
    original = item.obj
    item.obj = _guarded(original, fixture, strict=marked)
    try:
        return (yield)
    finally:
        item.obj = original
