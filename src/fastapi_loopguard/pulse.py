"""Everything a guard installs on the loop it watches, and the one place that takes it off again.

The engine learns three things from the loop, each without a timer of its own:

- **that it is alive**: on selector loops (asyncio) each ``select`` call is bracketed, which gives
  exact busy periods; on uvloop, libuv's prepare and check handles bracket each poll the same way,
  in C (``cpp/include/loopguard/uv_pulse.h``). A loop with neither gets a heartbeat, but only
  while the engine wants one (requests in flight), plus the notify pipe through which the
  watchdog asks a busy loop whether it still iterates;
- **that it stopped, runs again, or closes**: ``loop.stop``, ``loop.run_forever`` and
  ``loop.close`` are wrapped on the loop instance (both loops allow it). A loop that stops is
  paused in the engine, because what its thread does between two runs is not the loop's blocking;
  a loop that closes stops the guard, which delivers what it still held. The thread exiting is the
  engine's own business (``watch_thread_exit``), for loops that die without closing;
- **that a collection runs, and on which thread** (a ``gc.callbacks`` hook), for the ``gc``
  kind: the loop's own, or another thread's that the loop waits for the GIL behind.

Nothing here holds the guard strongly: the loop keeps its hooks as long as it lives, and a guard
that is dropped (an app a test suite threw away) must be collectable, so the hooks that need the
guard reach it through a weak reference. ``LoopHooks.remove`` runs when the guard stops or is
collected.
"""

from __future__ import annotations

import asyncio
import contextlib
import gc
import logging
import selectors
import threading
import weakref
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from ._core import Engine
    from .guard import LoopGuard

logger = logging.getLogger("fastapi_loopguard")
# The loop methods wrapped on the instance, so the engine follows the loop's own life cycle.
_LIFECYCLE = ("stop", "run_forever", "close")


class LoopHooks:
    """The pulse, the lifecycle wrappers, the notify reader and the gc hook of one loop."""

    def __init__(
        self,
        loop: asyncio.AbstractEventLoop,
        engine: Engine,
        guard: LoopGuard,
        interval_s: float,
    ) -> None:
        self.loop = loop
        self.engine = engine
        self._interval_s = interval_s
        self._guard_ref = weakref.ref(guard)
        self._heartbeat: asyncio.TimerHandle | None = None
        self._restore_select: Callable[[], None] | None = None
        self._wrapped: dict[str, Callable[..., Any]] = {}
        # What each wrapped name was in the instance dict before us (another guard's wrapper).
        self._previous: dict[str, Any] = {}
        self._held: dict[str, Any] = {}
        self._gc_callback: Callable[[str, dict[str, int]], None] | None = None
        self._reader = False
        self._thread = threading.get_ident()
        self._uv_open = False  # libuv handles on the loop, closed only on the loop's thread
        self.heartbeat_mode = False

    def install(self) -> None:
        loop, engine = self.loop, self.engine
        self._restore_select = _install_selector_pulse(loop, engine)
        if self._restore_select is None:
            self._uv_open = _attach_uvloop(loop, engine)
        self.heartbeat_mode = self._restore_select is None and not self._uv_open
        if self.heartbeat_mode:
            # No beat until a request comes; meanwhile a loop the OS shows busy is asked
            # through the notify pipe, so untracked traffic is never taken for a stall.
            engine.heartbeat_off()
        guard_ref = self._guard_ref

        def on_notify() -> None:
            guard = guard_ref()
            if guard is not None:
                guard._on_notify()

        loop.add_reader(engine.notify_fd(), on_notify)
        self._reader = True
        self._wrap_lifecycle()
        self._gc_callback = _gc_tracker(engine)
        gc.callbacks.append(self._gc_callback)

    def remove(self) -> None:
        """Takes everything off the loop again. Safe to call twice, and on a closed loop."""
        if self._heartbeat is not None:
            self._heartbeat.cancel()
            self._heartbeat = None
        if self._restore_select is not None:
            self._restore_select()
            self._restore_select = None
        on_loop_thread = threading.get_ident() == self._thread
        if self._uv_open and on_loop_thread:
            self.engine.close_uvloop()
            self._uv_open = False
        for name, wrapper in self._wrapped.items():
            if name == "close" and self._uv_open:
                # Off the loop's thread libuv must not be touched: the close wrapper stays, to
                # close the handles before uvloop's own close() (which needs them closed).
                continue
            # Only our own wrapper is taken off; one put on top of it later (a second guard on
            # this loop) stays, and calls through ours, which is now inert.
            wrapper._loopguard_inert = True  # type: ignore[attr-defined]
            if _own_attr(self.loop, name) is wrapper:
                below = _first_live(self._previous.get(name))
                if below is None:
                    delattr(self.loop, name)
                else:
                    setattr(self.loop, name, below)
        self._wrapped.clear()
        self._previous.clear()
        if not self._uv_open:
            self._held.clear()  # else the close wrapper still needs the engine, to close libuv's
        if self._gc_callback is not None and self._gc_callback in gc.callbacks:
            gc.callbacks.remove(self._gc_callback)
        self._gc_callback = None
        if self._reader and not self.loop.is_closed():
            with contextlib.suppress(RuntimeError, ValueError, OSError):  # loop closing under us
                self.loop.remove_reader(self.engine.notify_fd())
        self._reader = False

    def forget_after_fork(self) -> None:
        """In a forked child: the engine is abandoned, so nothing may call into it again."""
        self._heartbeat = None
        if self._gc_callback is not None and self._gc_callback in gc.callbacks:
            gc.callbacks.remove(self._gc_callback)
        self._gc_callback = None
        self._wrapped.clear()

    # -- heartbeat (loops without a selector hook) ---------------------------------------------

    def wake_heartbeat(self) -> None:
        """A request began: on uvloop the heartbeat runs while the engine wants it."""
        if self.heartbeat_mode and self._heartbeat is None:
            self._beat()

    def _beat(self) -> None:
        engine = self.engine
        engine.heartbeat()
        if engine.wants_heartbeat():
            self._heartbeat = self.loop.call_later(self._interval_s, self._beat)
        else:
            engine.heartbeat_off()
            self._heartbeat = None

    # -- the loop's own life cycle --------------------------------------------------------------

    def _wrap_lifecycle(self) -> None:
        loop, guard_ref = self.loop, self._guard_ref
        originals = {name: getattr(loop, name) for name in _LIFECYCLE}
        self._previous = {
            name: own for name in _LIFECYCLE if (own := _own_attr(loop, name)) is not None
        }
        wrapped = self._wrapped
        # The wrappers reach the engine through this holder: a wrapper that stays on the loop
        # after the guard let go of it (buried under another guard's, or the uvloop close
        # wrapper kept off-thread) must not keep the engine alive once it is emptied.
        held = self._held = {"engine": self.engine}

        def stop() -> None:
            # The loop leaves run_forever at the end of this iteration: whatever its thread
            # does afterwards (a test's sync code, the next run_until_complete's caller) is not
            # the loop's blocking.
            engine = held.get("engine")
            if engine is not None and "stop" in wrapped:
                engine.pause()
            originals["stop"]()

        def run_forever() -> None:
            engine = held.get("engine")
            if engine is not None and "run_forever" in wrapped:
                engine.resume()
            try:
                originals["run_forever"]()
            finally:
                if engine is not None and "run_forever" in wrapped:
                    engine.pause()

        def close() -> None:
            engine = held.pop("engine", None)
            if engine is not None:
                engine.close_uvloop()  # first of all, whatever else happens (idempotent)
            guard = guard_ref()
            if "close" in wrapped and guard is not None:
                # Delivers what the engine still held, then lets go of the loop.
                guard.stop()
            originals["close"]()

        for name, wrapper in (("stop", stop), ("run_forever", run_forever), ("close", close)):
            wrapper._loopguard_below = self._previous.get(name)  # type: ignore[attr-defined]
            try:
                setattr(loop, name, wrapper)
            except AttributeError:  # a loop class without an instance dict: engine-only life
                continue
            wrapped[name] = wrapper


def _own_attr(obj: object, name: str) -> Any:
    """What ``obj`` itself holds under ``name`` (another guard's wrapper), or None.

    Read without ``obj.__dict__``: on CPython 3.11 asking an object for its ``__dict__``
    materialises it, and from then on every attribute load on that object takes the slow path.
    For the loop that was +3.8k instructions per iteration for its whole life (callgrind, an
    ``asyncio.sleep(0)`` loop: 20.3k bare). A name the class provides comes back bound to ``obj``,
    equal to the class's own attribute bound to it; anything else is the instance's.
    """
    value = getattr(obj, name, None)
    declared = getattr(type(obj), name, None)
    if value is None or declared is None or not hasattr(declared, "__get__"):
        return value
    return None if value == declared.__get__(obj, type(obj)) else value


def _attach_uvloop(loop: asyncio.AbstractEventLoop, engine: Engine) -> bool:
    """On uvloop, libuv's prepare/check handles become the pulse; False if that cannot be done."""
    if not type(loop).__module__.startswith("uvloop"):
        return False
    try:
        import uvloop.loop

        why = engine.attach_uvloop(loop, uvloop.loop.__file__)
    except Exception as error:  # an uvloop build we do not recognise: the heartbeat will do
        why = str(error)
    if why:
        logger.debug("fastapi_loopguard: uvloop pulse unavailable (%s); using a heartbeat", why)
        return False
    engine.wait_end()  # this very iteration is busy from now on
    return True


def _install_selector_pulse(
    loop: asyncio.AbstractEventLoop, engine: Engine
) -> Callable[[], None] | None:
    """On selector loops, brackets each ``select`` call: exact busy periods, no timer at all.

    Returns the undo function, or None when the loop has no selector to hook (uvloop), in which
    case the guard falls back to a heartbeat that runs only while requests are in flight.
    """
    selector = getattr(loop, "_selector", None)
    if not isinstance(loop, asyncio.SelectorEventLoop) or not isinstance(
        selector, selectors.BaseSelector
    ):
        return None
    # Another guard's pulse on this loop (guards stack: the plugin's and the app's), kept when
    # ours comes off before it, or that guard would be left without a pulse.
    previous = _own_attr(selector, "select")
    # Native: it runs on every loop iteration (see select_pulse.h).
    select = engine.select_pulse(selector.select)
    select._loopguard_below = previous
    selector.select = select  # type: ignore[method-assign]
    engine.wait_end()  # this very iteration is busy from now on

    def restore() -> None:
        select.release()  # a pass-through, with no engine, wherever it stays
        if _own_attr(selector, "select") is select:
            below = _first_live(previous)
            if below is None:
                del selector.select
            else:
                selector.select = below  # type: ignore[method-assign]

    return restore


def _first_live(wrapper: Any) -> Any:
    """The first wrapper at or below ``wrapper`` whose guard still runs (None: the loop's own).

    Guards stack their wrappers on one loop; one taken off while buried stays in the chain as a
    pass-through, and must not be put back on top when the one above it comes off.
    """
    while wrapper is not None and getattr(wrapper, "_loopguard_inert", False):
        wrapper = getattr(wrapper, "_loopguard_below", None)
    return wrapper


def _gc_tracker(engine: Engine) -> Callable[[str, dict[str, int]], None]:
    """A gc.callbacks hook telling the engine when a collection runs, and on which thread.

    One on the loop thread is the loop's own pause. One on any other thread (a threadpool
    thread, a TestClient's test thread) holds the GIL from start to end: a loop that needs the
    GIL meanwhile waits for that collector, and the engine says so instead of blaming the GIL.
    """
    loop_thread = threading.get_ident()
    begin, end = engine.gc_begin, engine.gc_end
    elsewhere_begin, elsewhere_end = engine.gc_elsewhere_begin, engine.gc_elsewhere_end
    get_ident, native_id = threading.get_ident, threading.get_native_id

    def on_gc(phase: str, info: dict[str, int]) -> None:
        if get_ident() == loop_thread:
            (begin if phase == "start" else end)()
        elif phase == "start":
            elsewhere_begin(native_id())
        else:
            elsewhere_end()

    return on_gc
