"""OpenTelemetry: metrics through ``get_meter``, and a span per blocking event.

Only the API (opentelemetry-api) is used; the app's SDK setup decides where data goes, and with
no SDK every call is a no-op. The request's span is taken when the request starts, because the
event is delivered after the stall, when that span is no longer current and may have ended. The
event becomes a span ``event loop blocked`` covering exactly the blocked interval, a child of the
request's span, with the culprit and kind as attributes; if the request's span is still open, it
also gets a span event, so the block shows on the request itself. As its response completes,
and again when it ends, the request's span (while still open) gets ``loopguard.wait_ms`` and
``loopguard.block_ms``: how long it was frozen by others' blocks, and how long its own code
blocked the loop.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import TYPE_CHECKING

from opentelemetry import context as otel_context
from opentelemetry import metrics, trace
from opentelemetry.metrics import CallbackOptions, Observation

from .base import Exporter, RouteLabels

if TYPE_CHECKING:
    from opentelemetry.util.types import AttributeValue

    from ..events import BlockingEvent, RequestInfo
    from .base import StatsSource

SPAN_NAME = "event loop blocked"


class OTelExporter(Exporter):
    """Metrics and spans for one guard, through the global meter and tracer providers."""

    wants_requests = True

    def __init__(self, guard: StatsSource) -> None:
        from .. import __version__

        self.guard = guard
        self.routes = RouteLabels()
        meter = metrics.get_meter("fastapi_loopguard", __version__)
        self._events = meter.create_counter(
            "loopguard.blocking.events", unit="{event}", description="Blocking events."
        )
        self._duration = meter.create_histogram(
            "loopguard.blocking.duration",
            unit="s",
            description="How long each blocking event held the event loop.",
        )
        self._delayed = meter.create_counter(
            "loopguard.requests.delayed",
            unit="{request}",
            description="Requests frozen while another one blocked the loop.",
        )
        # Engine totals change without Python running: read when the SDK collects, no polling.
        meter.create_observable_counter(
            "loopguard.hangs", [self._observe("hangs", 1)], unit="{hang}"
        )
        meter.create_observable_counter(
            "loopguard.loop.saturation", [self._observe("saturation_ms", 1e-3)], unit="s"
        )
        meter.create_observable_counter(
            "loopguard.events.dropped", [self._observe("events_dropped", 1)], unit="{event}"
        )
        meter.create_observable_gauge(
            "loopguard.threshold", [self._observe("threshold_ms", 1e-3)], unit="s"
        )
        self._tracer = trace.get_tracer("fastapi_loopguard", __version__)

    def _observe(
        self, key: str, scale: float
    ) -> Callable[[CallbackOptions], Iterable[Observation]]:
        def callback(options: CallbackOptions) -> Iterable[Observation]:
            try:
                stats = self.guard.stats()
            except Exception:  # an engine stopping under the SDK's reader thread
                return []
            return [Observation(stats[key] * scale)] if stats else []

        return callback

    def request_started(self, info: RequestInfo) -> None:
        span = trace.get_current_span()
        if span.get_span_context().is_valid:
            info.trace_span = span

    wants_request_ends = True

    def request_ended(self, info: RequestInfo, wait_ms: float, block_ms: float) -> None:
        self.annotate(info, wait_ms, block_ms)

    @staticmethod
    def annotate(info: RequestInfo, wait_ms: float, block_ms: float) -> None:
        """Puts the request's delay on its span, if that is still open.

        Called at the request's end, and by the middleware just before the response's last
        body message: FastAPI's own server span ends as that message goes out, before the
        request is over for us. A span that has ended takes no attributes and is left alone.
        """
        span = info.trace_span
        if span is not None and span.is_recording():
            span.set_attributes({"loopguard.wait_ms": wait_ms, "loopguard.block_ms": block_ms})

    def export(self, event: BlockingEvent, info: RequestInfo | None) -> None:
        route, method = self.routes.route(event), self.routes.method(event)
        labels = {"http.route": route, "http.request.method": method}
        self._events.add(1, {**labels, "loopguard.kind": event.kind})
        self._duration.record(event.duration_ms / 1000, labels)
        if event.victims:
            self._delayed.add(event.victims, labels)

        attributes = span_attributes(event)
        parent = info.trace_span if info is not None else None
        # An empty Context, not the current one: the drain runs in whatever Context the loop's
        # reader callback was registered in, which may be some unrelated request's.
        ctx = trace.set_span_in_context(parent) if parent is not None else otel_context.Context()
        start_ns = int(event.started_at * 1e9)
        end_ns = start_ns + int(event.duration_ms * 1e6)
        span = self._tracer.start_span(
            SPAN_NAME, context=ctx, start_time=start_ns, attributes=attributes
        )
        span.end(end_time=end_ns)
        if parent is not None and parent.is_recording():
            parent.add_event(SPAN_NAME, attributes, timestamp=start_ns)


def span_attributes(event: BlockingEvent) -> dict[str, AttributeValue]:
    attributes: dict[str, AttributeValue] = {
        "loopguard.kind": event.kind,
        "loopguard.duration_ms": event.duration_ms,
        "loopguard.cpu_ms": event.cpu_ms,
        "loopguard.victims": event.victims,
        "loopguard.hang": event.hang,
        "loopguard.stack": [str(frame) for frame in event.stack],
    }
    if event.request_id is not None:
        attributes["loopguard.request_id"] = event.request_id
    if event.method is not None:
        attributes["http.request.method"] = event.method
    if event.route is not None:
        attributes["http.route"] = event.route
    if event.culprit is not None:
        attributes["code.file.path"] = event.culprit.filename
        attributes["code.line.number"] = event.culprit.lineno
        attributes["code.function.name"] = event.culprit.function
        attributes["loopguard.culprit"] = str(event.culprit)
    return attributes
