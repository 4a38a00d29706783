"""Where a suspended request waits, for cumulative-blocking events.

The engine's step timer (cpp/src/python/timed_steps.h) times each step a request's coroutine
runs on the loop; when the steps of one request add up to a cumulative event, the guard asks
``suspended_stack`` where that request waits now, right after the last of them.
"""

from __future__ import annotations

import types
from typing import Any

from .events import Frame

# Coroutines followed down from a request's own when it is suspended (a cumulative event's stack).
_MAX_SUSPENDED_DEPTH = 64


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
