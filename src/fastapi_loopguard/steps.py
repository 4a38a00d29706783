"""Cumulative-blocking events, and where the suspended request that caused one waits.

The engine's step timer (cpp/src/python/timed_steps.h) times each step a request's coroutine
runs on the loop; when the steps of one request add up to a cumulative event, it calls the guard
back, which asks ``cumulative_event`` for the event: the engine's, pointing at where that
request waits now, right after the last of its steps.
"""

from __future__ import annotations

import time
import types
from collections.abc import Coroutine
from dataclasses import replace
from typing import TYPE_CHECKING, Any

from . import _native
from .events import BlockingEvent, Frame, RequestInfo, from_native
from .frames import frame_filter

if TYPE_CHECKING:
    from ._core import Engine, FrameFilter


def cumulative_event(
    engine: Engine, info: RequestInfo, coro: Coroutine[Any, Any, Any] | None
) -> BlockingEvent | None:
    """The cumulative event the engine just finished for ``info``'s request, if any."""
    raw = engine.take_cumulative()
    if raw is None:
        return None
    event = from_native(raw, info, engine.now_ns(), time.time(), None)
    # The steps are over; the one place left to point at is where the request's coroutine
    # waits now.
    frames = frame_filter(_native.load())
    stack = suspended_stack(coro, frames) if coro is not None else ()
    if not stack:
        return event
    index, library = frames.culprit([(f.filename, f.function) for f in stack[::-1]])
    return replace(
        event,
        stack=stack,
        culprit=stack[-1 - index] if index >= 0 else None,
        culprit_is_library=library,
        stack_missing=False,
    )


# Coroutines followed down from a request's own when it is suspended (a cumulative event's stack).
_MAX_SUSPENDED_DEPTH = 64


def suspended_stack(coro: object, frames_filter: FrameFilter) -> tuple[Frame, ...]:
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
