"""The plugin's watch over one test: the events every guard delivers while it runs, and the
verdict on them."""

from __future__ import annotations

import functools
import time
from collections.abc import Callable, Coroutine
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import pytest

from . import loops

if TYPE_CHECKING:
    import asyncio

    from ..config import LoopGuardConfig
    from ..events import BlockingEvent, RequestInfo
    from ..guard import LoopGuard

# How long to wait, after the test body, for the watchdogs to hand over the blocks they saw.
SETTLE_TIMEOUT_S = 1.0


@dataclass(frozen=True)
class _Seen:
    """An event another guard delivered while the test ran, and the loop it was on."""

    loop: asyncio.AbstractEventLoop | None
    event: BlockingEvent
    own: bool  # from one of the plugin's guards, rather than the app's


@dataclass(frozen=True)
class Blocked:
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
        if self._watching_loops:
            return
        loops.hook_loops()
        self._watching_loops = True
        self._previous, loops.current = loops.current, self

    def stop_watching_loops(self) -> None:
        if not self._watching_loops:
            return
        self._watching_loops = False
        if loops.current is self:
            loops.current = self._previous
        loops.release_idle_guards()

    def begin(self) -> None:
        """The test body starts: from now on the events of every guard are the test's."""
        from ..delivery import add_observer

        self.watch_loops()
        self._since = time.time()
        self._recording = True
        add_observer(self._observe)

    def end(self) -> Blocked | None:
        """The test body is over: collects what every guard still held. None if nothing blocked."""
        from ..delivery import remove_observer

        if not self._recording:
            return None
        try:
            loops.settle_loops(SETTLE_TIMEOUT_S)
        finally:
            remove_observer(self._observe)
            self._recording = False
            self.stop_watching_loops()
        events, undelivered = self._tally()
        if not events and not undelivered:
            return None
        return Blocked(self.nodeid, events, undelivered)

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
        own = guard in loops.own_guards
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
        elif not own and event.request_id is None and not loops.own_guard_on(loop):
            return  # an app's block outside requests on a loop the test did not start
        self._seen.append(_Seen(loop, event, own))

    def _catch_up(self) -> None:
        """Has every guard hand over what it holds, as far as that is possible from here."""
        if self.guard is not None and self._frozen is None:
            self.guard.deliver()
        if self._recording and not loops.in_running_loop():
            loops.settle_loops(SETTLE_TIMEOUT_S)

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
        from ..hints import hint_for_event

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
        from ..guard import LoopGuard

        with loops.own_lock:
            guard = next((g for g in loops.own_guards if g.loop is loop), None)
            if guard is not None:
                return guard
            guard = LoopGuard(_guard_config(self.threshold_ms))
            guard.start()
            loops.own_guards.append(guard)
            return guard

    async def _settle(self) -> None:
        if self.guard is not None and self._info is not None:
            count = self.guard.blocking_of(self._info)[0]
            await self.guard.wait_for_events(self._info, count, SETTLE_TIMEOUT_S)


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
    from ..config import LoopGuardConfig

    return LoopGuardConfig(
        fallback_threshold_ms=threshold_ms,
        calibration_iterations=0,  # the threshold is the ini value, not a measurement
        log_blocking_events=False,  # the failure message says it all
    )


def guarded(
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
