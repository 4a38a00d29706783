"""The cumulative-blocking step driver: times each step a request's coroutine runs on the loop.

The guard hands each step to the engine (``LoopGuard._step``); when the steps of one request add
up to a cumulative event, ``suspended_stack`` says where that request waits now.
"""

from __future__ import annotations

import time
import types
from collections.abc import Callable, Coroutine, Generator
from typing import Any

from .events import Frame, RequestInfo

# Coroutines followed down from a request's own when it is suspended (a cumulative event's stack).
_MAX_SUSPENDED_DEPTH = 64

# (request, step start, CPU clock at the start or -1, the coroutine while it is suspended, None
# once it is done) -> whether the engine wants the steps' CPU time from now on.
Step = Callable[[RequestInfo, int, int, "Coroutine[Any, Any, Any] | None"], bool]


class TimedSteps:
    """Drives a coroutine as ``await`` would, and reports how long each step ran on the loop.

    A step runs from the loop resuming the coroutine (``send``/``throw``) until it suspends
    again or finishes. Its wall time is what the request's code held the loop for, plus any wait
    for the GIL or for a CPU that other threads caused; so once the engine finds a request
    suspect it asks for the thread's CPU time of each step too. A step costs two monotonic clock
    reads and one call into the engine, and two CPU clock reads (system calls) only then.
    """

    __slots__ = ("_coro", "_info", "_step")

    def __init__(self, coro: Coroutine[Any, Any, Any], step: Step, info: RequestInfo) -> None:
        self._coro = coro
        self._step = step
        self._info = info

    def __await__(self) -> Generator[Any, Any, Any]:
        coro, step, info = self._coro, self._step, self._info
        clock = time.monotonic_ns  # CLOCK_MONOTONIC, the engine's clock
        value: Any = None
        error: BaseException | None = None
        measure = False
        while True:
            start = clock()
            cpu_start = time.thread_time_ns() if measure else -1
            try:
                yielded = coro.send(value) if error is None else coro.throw(error)
            except StopIteration as stop:
                step(info, start, cpu_start, None)
                return stop.value
            except BaseException:
                step(info, start, cpu_start, None)
                raise
            finally:
                error = None
            measure = step(info, start, cpu_start, coro) or measure
            try:
                value = yield yielded
            except GeneratorExit:
                coro.close()
                raise
            except BaseException as exc:  # cancellation included: handed to the coroutine
                error, value = exc, None


def suspended_stack(coro: object, frames_filter: Any) -> tuple[Frame, ...]:
    """Where a suspended coroutine waits, outermost first, following what each one awaits."""
    frames: list[Frame] = []
    obj: object = coro
    while len(frames) < _MAX_SUSPENDED_DEPTH:
        if isinstance(obj, types.CoroutineType):
            frame, obj = obj.cr_frame, obj.cr_await
        elif isinstance(obj, types.GeneratorType):
            frame, obj = obj.gi_frame, obj.gi_yieldfrom
        else:
            break
        if frame is None:
            break
        code = frame.f_code
        # Spelled as the sampler spells it.
        filename = frames_filter.normalized(code.co_filename)
        frames.append(Frame(filename, frame.f_lineno or 0, code.co_qualname))
    return tuple(frames)
