"""Every guard alive in this process, and what acts on all of them at once.

``label()`` reaches each guard of the running loop. At interpreter exit every engine is stopped
before finalization begins; in a forked child every guard forgets the engine it inherited,
whose threads stayed in the parent.
"""

from __future__ import annotations

import asyncio
import atexit
import contextvars
import logging
import os
import weakref
from collections.abc import Iterator
from contextlib import contextmanager
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from .events import RequestInfo
    from .guard import LoopGuard

logger = logging.getLogger("fastapi_loopguard")

_guards: weakref.WeakSet[LoopGuard] = weakref.WeakSet()


def add(guard: LoopGuard) -> None:
    _guards.add(guard)


def discard(guard: LoopGuard) -> None:
    _guards.discard(guard)


def live() -> list[LoopGuard]:
    """The guards running now: a copy, taken even while loop threads start or stop guards."""
    while True:
        try:
            return list(_guards)
        except RuntimeError:  # "set changed size during iteration": just copy it again
            continue


@contextmanager
def label(name: str) -> Iterator[None]:
    """Attributes blocking inside the block to ``name``, for every guard on the running loop.

    For your code that a framework runs in tasks of its own, outside any request (Gradio's queue
    workers, a consumer started at startup): the middleware's guard is out of reach there, and
    without a label such blocks only name their task. Outside a running loop (a sync handler in
    a thread pool) it does nothing.
    """
    try:
        loop = asyncio.get_running_loop()
    except RuntimeError:
        loop = None
    entered: list[tuple[LoopGuard, RequestInfo, contextvars.Token[int]]] = []
    for guard in live() if loop is not None else ():
        if guard.loop is not loop:
            continue
        try:
            entered.append((guard, *guard.begin(name)))
        except Exception:  # a broken guard must not break the code it labels
            logger.exception("fastapi_loopguard: labelling %r failed", name)
    try:
        yield
    finally:
        for guard, info, var_token in reversed(entered):
            try:
                guard.end(info, var_token)
            except Exception:
                logger.exception("fastapi_loopguard: ending the label %r failed", name)


def _stop_all_at_exit() -> None:
    # Interpreter exit: the sampler thread must not be waiting for the GIL once finalization
    # starts, so every engine is stopped (GIL released while joining) before that. A full stop
    # also delivers what the engine still held and lets go of every reference to it (gc hook,
    # selector hook): an engine still referenced at the very end is reported by nanobind as a
    # leak, on the stderr of an app that merely never ran its lifespan shutdown.
    for guard in live():
        try:
            guard.stop()
        except Exception:  # stop() stops the engine's threads whatever else fails
            logger.exception("fastapi_loopguard: stopping a guard at exit failed")


def _after_fork_in_child() -> None:
    for guard in live():
        guard.abandon_after_fork()
    _guards.clear()


atexit.register(_stop_all_at_exit)
os.register_at_fork(after_in_child=_after_fork_in_child)
