"""The engine's lifecycle on a running event loop, usable without any web framework.

``LoopGuard`` starts the C++ watchdog for the loop it is started on, feeds it a pulse, tells it
which request each piece of code belongs to (through a ContextVar that the watchdog reads from
the loop thread's current Context), and turns the events it hands back into ``BlockingEvent``
objects, log records and callbacks. All of that Python work happens on the loop thread, after a
stall: the watchdog thread never runs Python.
"""

from __future__ import annotations

import asyncio
import contextvars
import logging
import time
import weakref
from collections.abc import Awaitable, Callable, Coroutine, Iterator
from contextlib import contextmanager
from typing import TYPE_CHECKING, Any

from . import _native, exporters, registry
from ._convert import engine_configs, stats_dict
from .config import LoopGuardConfig
from .delivery import Delivery
from .eventlog import EventLog
from .events import BlockingEvent, RequestInfo, from_native
from .exporters.base import Exporter
from .loops import running_asyncio_loop
from .pulse import LoopHooks
from .steps import cumulative_event
from .units import Units

if TYPE_CHECKING:
    from ._core import Engine

logger = logging.getLogger("fastapi_loopguard")

_NS_PER_MS = 1_000_000


class LoopGuard:
    """Watches one event loop. Start it on the loop, inside a coroutine or callback.

    Usable directly in any asyncio program::

        async with LoopGuard(LoopGuardConfig()) as guard:
            ...
            print(guard.stats())
    """

    def __init__(self, config: LoopGuardConfig | None = None) -> None:
        self.config = config or LoopGuardConfig()
        # One ContextVar per guard: two guards in one process never read each other's tokens.
        self._request_var: contextvars.ContextVar[int] = contextvars.ContextVar(
            f"loopguard_request_{id(self):x}"
        )
        self._engine: Engine | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._hooks: LoopHooks | None = None
        # Stops the engine if this guard is dropped without stop() (an app thrown away while its
        # loop lives on): its threads must not outlive everything that could stop them.
        self._finalizer: weakref.finalize[Any, Any] | None = None
        self._units = Units()
        self._calibration: asyncio.Task[None] | None = None
        self.exporters: list[Exporter] = exporters.build(self.config, self)
        self._request_exporters = [e for e in self.exporters if e.wants_requests]
        self._end_exporters = [e for e in self.exporters if e.wants_request_ends]
        self._delivery = Delivery(self.exporters, self.config.on_blocking)
        self.events = self._delivery.events
        self._event_log: EventLog | None = None
        if self.config.event_log_path is not None:
            self._event_log = EventLog(self.config.event_log_path)
            self.add_listener(self._event_log.write_event)

    # -- lifecycle ------------------------------------------------------------------------------

    @property
    def running(self) -> bool:
        return self._engine is not None

    @property
    def loop(self) -> asyncio.AbstractEventLoop | None:
        """The loop this guard watches while it runs."""
        return self._loop

    def start(self) -> None:
        """Starts watching the running loop (idempotent). Call on the loop thread.

        A guard belongs to one loop. Started from another loop (``TestClient`` without ``with``
        runs each request on a new loop in a new thread; pytest-asyncio gives each test its own),
        it lets go of the old one and watches the new one.
        """
        loop = running_asyncio_loop()
        if self._engine is not None:
            if self._loop is loop:
                return
            self.stop()  # a new loop (tests, reload): watch that one instead
        core = _native.load()
        if core is None:
            raise RuntimeError(_native.load_error())
        # The running task's name outside requests: 3.11 to 3.13 keep it in this dict, 3.14
        # answers through _asyncio's current_task (the native side knows which versions do
        # which, see compat.h, and calls the function only if it is the C one).
        current_tasks = getattr(asyncio.tasks, "_current_tasks", None)
        engine = core.Engine(
            *engine_configs(core, self.config),
            self._request_var,
            loop,
            current_tasks if isinstance(current_tasks, dict) else None,
            asyncio.current_task,
            asyncio.Task,
        )
        hooks = LoopHooks(loop, engine, self, self.config.monitor_interval_ms / 1000)
        self._engine, self._loop, self._hooks = engine, loop, hooks
        engine.watch_thread_exit()
        engine.start()
        hooks.install()
        self._finalizer = weakref.finalize(self, _release, hooks, engine)
        if self.config.calibration_iterations > 0:
            self._calibration = loop.create_task(self._calibrate())
        registry.add(self)

    def stop(self) -> None:
        """Stops the watchdog and delivers what it still held. Safe to call twice."""
        engine, hooks = self._engine, self._hooks
        if engine is None or hooks is None:
            return
        if self._finalizer is not None:
            self._finalizer.detach()
            self._finalizer = None
        if self._calibration is not None:
            self._calibration.cancel()
            self._calibration = None
        try:
            hooks.remove()
        finally:
            engine.stop()  # whatever else fails, its threads must not outlive the guard
        self.deliver()
        for exporter in self.exporters:
            try:
                exporter.flush()
            except Exception:
                logger.exception("fastapi_loopguard: flushing exporter %r failed", exporter)
        if self._event_log is not None:
            self._event_log.write_stats(self.stats())
        self._engine = None
        self._loop = None
        self._hooks = None
        registry.discard(self)

    async def __aenter__(self) -> LoopGuard:
        self.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        self.stop()

    def abandon_after_fork(self) -> None:
        """In a forked child: forgets the engine, whose threads stayed in the parent."""
        if self._finalizer is not None:
            self._finalizer.detach()
            self._finalizer = None
        if self._hooks is not None:
            self._hooks.forget_after_fork()
        if self._engine is not None:
            self._engine.abandon_after_fork()
        self._engine = None
        self._loop = None
        self._hooks = None
        self._calibration = None

    async def _calibrate(self) -> None:
        loop = asyncio.get_running_loop()
        interval = self.config.monitor_interval_ms / 1000
        lags: list[int] = []
        for _ in range(self.config.calibration_iterations):
            t0 = loop.time()
            await asyncio.sleep(interval)
            lags.append(int((loop.time() - t0 - interval) * 1e9))
        if self._engine is not None:
            self._engine.calibrate(lags)

    # -- attribution ----------------------------------------------------------------------------

    def begin(
        self,
        request_id: str,
        method: str | None = None,
        path: str | None = None,
        scope: dict[str, Any] | None = None,
    ) -> tuple[RequestInfo, contextvars.Token[int]]:
        """Marks the current Context as belonging to one request until ``end``."""
        self.start()
        engine = self._engine
        assert engine is not None  # start() raises when it cannot start one
        # The engine keeps what names the request in its hang reports, written without Python.
        token = engine.begin_request(method, path or "", request_id)
        info = RequestInfo(token, request_id, method, path, scope)
        self._units.inflight[token] = info
        for exporter in self._request_exporters:
            try:
                exporter.request_started(info)
            except Exception:
                logger.exception("fastapi_loopguard: exporter %r failed on a request", exporter)
        if self._hooks is not None:
            self._hooks.wake_heartbeat()
        return info, self._request_var.set(token)

    def end(self, info: RequestInfo, var_token: contextvars.Token[int]) -> None:
        self._request_var.reset(var_token)
        self._units.finish(info)
        # The request's code has just run again, so a stall it was part of is over: the engine
        # finishes it now, and its events are delivered before the request is done (tests that
        # call an app in-process see them when the call returns). The same crossing hands back
        # the delay the request suffered and inflicted, already summed up by the engine.
        if self._engine is None:
            return
        pending, count, total_ns, wait_ns = self._engine.end_request(info.token)
        if pending:
            self.deliver()
        if self._end_exporters or self._event_log is not None:
            self._ended(info, count, total_ns, wait_ns)

    def _ended(self, info: RequestInfo, count: int, total_ns: int, wait_ns: int) -> None:
        """Hands a finished request's delay to the exporters that want it, and to the log."""
        wait_ms = wait_ns / _NS_PER_MS
        block_ms = total_ns / _NS_PER_MS
        for exporter in self._end_exporters:
            try:
                exporter.request_ended(info, wait_ms, block_ms)
            except Exception:
                logger.exception("fastapi_loopguard: exporter %r failed on a request", exporter)
        # Only requests (labelled work is nobody's request to wait for, and its blocks are in
        # its events) that waited or blocked: one record per request would cost every request a
        # write, and the report's percentiles are about the delayed ones (see eventlog.py).
        if self._event_log is not None and info.method is not None and (wait_ns or count):
            self._event_log.write_request(info, wait_ms, block_ms, count)

    def settle(self) -> None:
        """Delivers now the events of a stall that just ended, without waiting for the watchdog.

        For code that runs on the loop right after its own block (strict mode at response
        start): the engine finishes the stall at once (the GIL is released meanwhile).
        """
        if self._engine is not None and self._engine.settle():
            self.deliver()

    @contextmanager
    def label(self, name: str) -> Iterator[RequestInfo]:
        """Attributes blocking inside the block to ``name`` (for work that is not a request)."""
        info, var_token = self.begin(name)
        try:
            yield info
        finally:
            self.end(info, var_token)

    def add_listener(self, listener: Callable[[BlockingEvent], object]) -> None:
        """Calls ``listener`` on the loop thread for every event (the event log, the dashboard)."""
        self._delivery.add_listener(listener)

    def remove_listener(self, listener: Callable[[BlockingEvent], object]) -> None:
        self._delivery.remove_listener(listener)

    def blocking_of(self, info: RequestInfo) -> tuple[int, float]:
        """Blocks this request's own code caused so far: (count, total ms), live during a stall."""
        count, total_ms, _ = self.delay_of(info)
        return count, total_ms

    def delay_of(self, info: RequestInfo) -> tuple[int, float, float]:
        """(blocks, ms blocked, ms waited) so far: the blocks this request's code caused, and
        the time it spent frozen by blocks of other requests or of code outside requests. Live
        during a stall, up to the watchdog's last sample of it."""
        if self._engine is None:
            return 0, 0.0, 0.0
        count, total_ns, wait_ns = self._engine.request_counters(info.token)
        return count, total_ns / _NS_PER_MS, wait_ns / _NS_PER_MS

    def events_of(self, info: RequestInfo) -> list[BlockingEvent]:
        """The events of this request drained so far while it was in flight."""
        return list(info.events or ())

    async def wait_for_events(
        self, info: RequestInfo, count: int, timeout: float
    ) -> list[BlockingEvent]:
        """Waits (bounded) until ``count`` events of this request have been delivered.

        The live counters learn of a block during the stall, but its event is handed over only
        after the watchdog has seen the loop come back, one tick later at most. Code that must
        name the culprit at response start (strict and warn modes) waits here for it.
        """
        deadline = time.monotonic() + timeout
        self.settle()
        while True:
            self.deliver()
            if len(info.events or ()) >= count or time.monotonic() >= deadline:
                return list(info.events or ())
            await asyncio.sleep(self.config.monitor_interval_ms / 1000)

    def stats(self) -> dict[str, float | int]:
        """Loop-lag percentiles, threshold, and event counters, from the engine."""
        if self._engine is None:
            return {}
        return stats_dict(self._engine.stats())

    def lag_histogram(self, bounds_s: list[float]) -> tuple[list[int], float]:
        """Loop-lag counts at ``bounds_s`` (cumulative, the total last) and their sum, in seconds.

        Exporters with their own bucket bounds (Prometheus) read this; the engine keeps a finer
        log-linear histogram, so a value within 1/16 below a bound may count at the next one.
        """
        engine = self._engine
        if engine is None:
            return [0] * (len(bounds_s) + 1), 0.0
        counts = engine.lag_cumulative([int(b * 1e9) for b in bounds_s])
        return list(counts), engine.lag_sum_ns() / 1e9

    def timed(self, coro: Coroutine[Any, Any, Any], info: RequestInfo) -> Awaitable[Any]:
        """``coro`` (a request's own coroutine) with each of its steps on the loop timed.

        The engine adds the steps up per request: many blocks too short to be a stall each are
        reported as cumulative blocking once they reach ``cumulative_blocking_threshold_ms``
        within ``cumulative_window_ms``. Child tasks the request starts run as their own tasks
        and are not counted. The timer is native (the engine's ``timed``): it is on the path of
        every step of every request, and calls back into Python only to report an event.
        """
        engine = self._engine
        if engine is None:
            return coro
        return engine.timed(coro, info.token, self._cumulative, info)

    def _cumulative(self, info: RequestInfo, coro: Coroutine[Any, Any, Any] | None) -> None:
        """A step completed a cumulative event: delivers it, pointing at where ``coro`` waits."""
        engine = self._engine
        if engine is None:
            return
        try:
            event = cumulative_event(engine, info, coro)
            if event is None:
                return
            if info.events is None:
                info.events = []
            info.events.append(event)
            self._delivery.dispatch(self, event, info)
        except Exception:  # the guard must never break the request it times
            logger.exception("fastapi_loopguard: reporting a request's cumulative blocking failed")

    # -- pulse and delivery ---------------------------------------------------------------------

    def _on_notify(self) -> None:
        """The notify pipe's reader: events are waiting, or the watchdog asks if the loop runs."""
        if self._hooks is not None and self._engine is not None:
            # The watchdog pokes the pipe when it sees the loop thread running with the
            # heartbeat off: one beat here proves the loop is iterating, not stuck.
            self._hooks.wake_heartbeat()
        self.deliver()

    def deliver(self) -> None:
        """Delivers, on this (the loop's) thread, every event the engine has finished so far."""
        engine = self._engine
        if engine is None:
            return
        try:
            raw_events = engine.drain()
            now_ns = engine.now_ns()
            wall = time.time()
        except Exception:  # the guard must never break the loop it watches
            logger.exception("fastapi_loopguard: draining events failed")
            return
        for raw in raw_events:
            try:
                inflight = self._units.inflight.get(raw.token)
                info = inflight or self._units.find(raw.token)
                created_by = self._units.created_by(raw.origin) if info is None else None
                event = from_native(raw, info, now_ns, wall, created_by)
                if inflight is not None:
                    if inflight.events is None:
                        inflight.events = []
                    inflight.events.append(event)
                self._delivery.dispatch(self, event, info)
            except Exception:
                logger.exception("fastapi_loopguard: handling a blocking event failed")


def _release(hooks: LoopHooks, engine: Engine) -> None:
    """A dropped guard's finalizer: takes its hooks off the loop and stops its engine's threads.

    Holds no reference to the guard (that would keep it alive); runs at the guard's collection,
    or at interpreter exit for one that is still alive then.
    """
    try:
        hooks.remove()
    finally:
        engine.stop()
