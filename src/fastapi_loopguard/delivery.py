"""Delivery: every event of a guard reaches each of its subscribers once, through one fan-out.

A guard's subscribers are its exporters (log, Prometheus, OTel), its listeners (the event log,
the live dashboard), the config's ``on_blocking`` and the process-wide observers (the pytest
plugin, which watches whichever guards a test's app carries). They are all called the same way,
on the loop thread that delivers, in that order, and each in the same failsafe: a subscriber
that raises is logged and the others still get the event, since the guard must never break the
loop it watches.
"""

from __future__ import annotations

import logging
import threading
from collections import deque
from collections.abc import Callable, Iterable
from typing import Any

from .events import BlockingEvent, RequestInfo

logger = logging.getLogger("fastapi_loopguard")

# Events a guard keeps for ``guard.events``, newest last.
_KEPT_EVENTS = 1000

# (guard, event, info): what every subscriber is called with.
Subscriber = Callable[[Any, BlockingEvent, RequestInfo | None], object]
# A subscriber, what the log calls it if it raises, and what it was registered as (for removal).
_Entry = tuple[Subscriber, str, object]

# The process-wide observers, called with (guard, event) for every event of every guard. A tuple,
# replaced on change, so a delivering loop thread reads it without a lock; when empty it costs
# each event one tuple concatenation.
_observers: tuple[_Entry, ...] = ()
_observers_lock = threading.Lock()


def add_observer(observer: Callable[[Any, BlockingEvent], object]) -> None:
    """Calls ``observer(guard, event)`` for every event of every guard, until removed."""
    global _observers

    def subscriber(guard: Any, event: BlockingEvent, info: RequestInfo | None) -> object:
        return observer(guard, event)

    with _observers_lock:
        _observers = (*_observers, (subscriber, f"event observer {observer!r}", observer))


def remove_observer(observer: Callable[[Any, BlockingEvent], object]) -> None:
    global _observers
    with _observers_lock:
        _observers = tuple(e for e in _observers if e[2] is not observer)


class Delivery:
    """One guard's subscribers, and the events it delivered (``guard.events``)."""

    def __init__(
        self, exporters: Iterable[Any], on_blocking: Callable[[BlockingEvent], object] | None
    ) -> None:
        self.events: deque[BlockingEvent] = deque(maxlen=_KEPT_EVENTS)
        self._exporters: tuple[_Entry, ...] = tuple(
            (_exporting(e), f"exporter {e!r}", e) for e in exporters
        )
        self._listeners: tuple[_Entry, ...] = ()
        self._callback: tuple[_Entry, ...] = ()
        if on_blocking is not None:
            self._callback = ((_listening(on_blocking), "on_blocking callback", on_blocking),)

    def add_listener(self, listener: Callable[[BlockingEvent], object]) -> None:
        self._listeners = (
            *self._listeners,
            (_listening(listener), f"event listener {listener!r}", listener),
        )

    def remove_listener(self, listener: Callable[[BlockingEvent], object]) -> None:
        kept = tuple(e for e in self._listeners if e[2] is not listener)
        if len(kept) == len(self._listeners):
            raise ValueError(f"{listener!r} is not a listener of this guard")
        self._listeners = kept

    def dispatch(self, guard: Any, event: BlockingEvent, info: RequestInfo | None) -> None:
        """Keeps ``event`` and hands it to every subscriber, on the calling (loop) thread."""
        self.events.append(event)
        # Put together per event (events are rare), so nothing derived is kept to go stale.
        fan = self._exporters + self._listeners + self._callback + _observers
        for subscriber, name, _ in fan:
            try:
                subscriber(guard, event, info)
            except Exception:
                logger.exception("fastapi_loopguard: %s raised", name)


def _exporting(exporter: Any) -> Subscriber:
    export = exporter.export

    def subscriber(guard: Any, event: BlockingEvent, info: RequestInfo | None) -> object:
        return export(event, info)

    return subscriber


def _listening(listener: Callable[[BlockingEvent], object]) -> Subscriber:
    def subscriber(guard: Any, event: BlockingEvent, info: RequestInfo | None) -> object:
        return listener(event)

    return subscriber


__all__ = ["Delivery", "Subscriber", "add_observer", "remove_observer"]
