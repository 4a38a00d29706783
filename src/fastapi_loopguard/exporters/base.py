"""The one interface every exporter implements, so the guard can call them all the same way.

All methods run on the loop thread. The guard calls each one failsafe: an exporter that raises is
logged and the others, and the app, carry on.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Protocol

from ..culprits import module_label

if TYPE_CHECKING:
    from ..events import BlockingEvent, RequestInfo

# Label values for metrics. Raw paths would explode cardinality (every id a new series), so the
# route template is used, and everything without one shares a value.
UNMATCHED_ROUTE = "<unmatched>"
OTHER_ROUTE = "<other>"
NO_REQUEST = "<none>"
MAX_ROUTES = 200
MAX_CULPRITS = 200
_METHODS = frozenset(
    {"GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS", "TRACE", "CONNECT", "WEBSOCKET"}
)


class StatsSource(Protocol):
    """Engine totals, read by the metric exporters at scrape time (``LoopGuard`` is one)."""

    def stats(self) -> dict[str, float | int]: ...

    def lag_histogram(self, bounds_s: list[float]) -> tuple[list[int], float]: ...


class Exporter:
    """Receives every blocking event, with the request it belongs to when there is one."""

    #: Whether ``request_started`` does anything: the guard skips the call on every request for
    #: exporters that leave it False, since that path is the one every request pays for.
    wants_requests = False

    def request_started(self, info: RequestInfo) -> None:
        """Called when a request (or label) begins, in its Context; capture what the event needs.

        The event arrives after the stall, often after the request ended, so anything that is
        only known while the request runs (its trace span) must be taken here.
        """

    #: Whether ``request_ended`` does anything: skipped otherwise, for the same reason.
    wants_request_ends = False

    def request_ended(self, info: RequestInfo, wait_ms: float, block_ms: float) -> None:
        """Called when a request (or label) ends, with the time it spent frozen by blocks that
        others caused (``wait_ms``) and the time its own code blocked the loop (``block_ms``),
        both as the engine summed them up."""

    def export(self, event: BlockingEvent, info: RequestInfo | None) -> None:
        """Called once per event, on the loop thread, after the stall."""
        raise NotImplementedError

    def flush(self) -> None:
        """Called when the guard stops (it may start again, on another loop): flush pending data."""


class RouteLabels:
    """Bounded ``route`` and ``method`` label values for one set of metrics.

    The first ``MAX_ROUTES`` distinct templates keep their own value; later ones share
    ``<other>``, so an app that registers routes dynamically cannot grow the series without end.
    A method outside the standard set (clients may send any token) becomes ``OTHER``.
    """

    def __init__(self, max_routes: int = MAX_ROUTES) -> None:
        self.max_routes = max_routes
        self._seen: set[str] = set()

    def route(self, event: BlockingEvent) -> str:
        return self.route_of(event.method, event.route)

    def route_of(self, method: str | None, route: str | None) -> str:
        """The label of a request with this method and route template (an event's, or a
        finished request's)."""
        if method is None:
            return NO_REQUEST  # labelled work or no request at all: no route to speak of
        if route is None:
            return UNMATCHED_ROUTE
        if route not in self._seen:
            if len(self._seen) >= self.max_routes:
                return OTHER_ROUTE
            self._seen.add(route)
        return route

    @staticmethod
    def method(event: BlockingEvent) -> str:
        if event.method is None:
            return ""
        return event.method if event.method in _METHODS else "OTHER"


class CulpritLabels:
    """Bounded ``culprit`` label values: ``module:function`` of the culprit frame.

    A dotted module, not the file's path, so the metrics tell nothing of the file system; the
    function, not the line, so an edit does not start a new series. The first ``MAX_CULPRITS``
    distinct values keep their own; later ones share ``<other>``, events without a culprit
    ``<none>``.
    """

    def __init__(self, max_culprits: int = MAX_CULPRITS) -> None:
        self.max_culprits = max_culprits
        self._by_frame: dict[tuple[str, str], str] = {}

    def culprit(self, event: BlockingEvent) -> str:
        frame = event.culprit
        if frame is None:
            return NO_REQUEST
        key = (frame.filename, frame.function)
        label = self._by_frame.get(key)
        if label is None:
            if len(self._by_frame) >= self.max_culprits:
                return OTHER_ROUTE
            label = self._by_frame[key] = module_label(frame.filename, frame.function)
        return label
