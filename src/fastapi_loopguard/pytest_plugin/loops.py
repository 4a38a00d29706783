"""The loops a watched test starts, each given a guard of the plugin's before it first runs.

``run_forever`` of asyncio's and uvloop's loop classes is wrapped once per process: every way of
running a loop goes through it, on the thread that runs it.
"""

from __future__ import annotations

import functools
import threading
import time
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import asyncio

    from ..guard import LoopGuard
    from .watch import LoopGuardFixture


# The test whose loops are being watched (its setup and body), if any.
current: LoopGuardFixture | None = None
# The plugin's guards on loops tests started. A guard follows its loop and stops when it closes;
# the ones left are let go of when their loop sits idle after a test (see release_idle_guards).
own_guards: list[LoopGuard] = []
own_lock = threading.Lock()
hooked = False


def hook_loops() -> None:
    """Wraps ``run_forever`` of asyncio's and uvloop's loop classes, once per process.

    Every way of running a loop ends up there (``run_until_complete``, ``asyncio.Runner`` and so
    ``asyncio.run``, anyio's portals and so ``TestClient``, whatever the loop factory), on the
    thread that runs it. The wrappers stay: they do nothing while no test is watched, and taking
    them off again could also take off whatever was put on top of them later.
    """
    global hooked
    if hooked:
        return
    hooked = True
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
        watch = current
        if watch is not None:
            watch._loop_starts(self)
        original(self)

    setattr(cls, "run_forever", run_forever)  # noqa: B010 (mypy: no assigning to a method)


def own_guard_on(loop: asyncio.AbstractEventLoop | None) -> bool:
    return loop is not None and any(g.loop is loop for g in own_guards)


def release_idle_guards() -> None:
    """After a test, stops the plugin's guards on loops that are neither running nor closed.

    A loop left unclosed would otherwise be kept alive, with its engine's threads, by the guard
    (the next test that runs it gives it a new one). One whose loop another guard also watches
    stays: taking its pulse off that loop could take the other guard's with it.
    """
    from .. import registry

    idle: list[LoopGuard] = []
    with own_lock:
        keep: list[LoopGuard] = []
        for guard in own_guards:
            loop = guard.loop
            if loop is None:
                continue  # stopped with its loop
            shared = any(g is not guard and g.loop is loop for g in registry.live())
            (keep if loop.is_running() or shared else idle).append(guard)
        own_guards[:] = keep
    for guard in idle:
        guard.stop()


def in_running_loop() -> bool:
    import asyncio

    return asyncio._get_running_loop() is not None


def settle_loops(timeout: float) -> None:
    """Waits (bounded) until every loop running in another thread has gone round twice.

    A block outside requests is delivered in the loop iteration after it ended; the test's
    thread may be done with it (a ``TestClient`` response) before that. Two iterations after
    this call, everything that ended before it has been delivered.
    """
    import asyncio

    from .. import registry

    here = asyncio._get_running_loop()
    loops: dict[int, asyncio.AbstractEventLoop] = {}
    for guard in registry.live():
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
